"""Exponential and beta σ spacings (``use_exponential_sigmas``, ``use_beta_sigmas``): the Beta quantiles we compute
ourselves against scipy's (the reference's source), and the config rules. Trajectories against the reference are in
test_schedulers_parity.py (OPTION_VARIANTS), whole pipelines in pipelines/test_swapped_schedulers.py."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from tiny_repos import DECODER_SCHEDULER_CONFIG

import kandinsky22.schedulers as ours
from kandinsky22.schedulers import tables

scipy_stats = pytest.importorskip("scipy.stats")
# scipy's own root finding gives up on a few extreme quantiles of the skewed shapes (its answer is still within tolerance)
pytestmark = pytest.mark.filterwarnings("ignore:Error in function boost:RuntimeWarning")

# Every scheduler with the three switches
SPACED = [
    name
    for name in ours.__all__
    if isinstance(getattr(ours, name), type)
    and "use_beta_sigmas" in getattr(getattr(ours, name), "config_defaults", {})
]
SHAPES = [(0.6, 0.6), (0.5, 2.0), (3.0, 0.7), (1.0, 1.0), (5.0, 5.0), (0.2, 0.3)]


def test_every_sampler_with_the_switches_is_covered() -> None:
    assert set(SPACED) == {
        "EulerDiscreteScheduler",
        "LMSDiscreteScheduler",
        "HeunDiscreteScheduler",
        "KDPM2DiscreteScheduler",
        "KDPM2AncestralDiscreteScheduler",
        "DPMSolverSDEScheduler",
        "DPMSolverMultistepScheduler",
        "DPMSolverSinglestepScheduler",
        "DEISMultistepScheduler",
        "UniPCMultistepScheduler",
    }


@pytest.mark.parametrize(("a", "b"), SHAPES)
def test_beta_cdf_matches_scipy(a: float, b: float) -> None:
    x = np.concatenate([[0.0, 1e-12, 1e-6, 1 - 1e-9, 1.0], np.linspace(0, 1, 513)])
    np.testing.assert_allclose(tables.beta_cdf(x, a, b), scipy_stats.beta.cdf(x, a, b), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize(("a", "b"), SHAPES)
def test_beta_quantiles_match_scipy_to_a_few_units_in_the_last_place(a: float, b: float) -> None:
    q = np.concatenate([[1e-10, 1e-4, 0.5, 1 - 1e-4], np.linspace(0, 1, 1001)])
    expected = scipy_stats.beta.ppf(q, a, b)
    found = tables.beta_quantiles(q, a, b)
    np.testing.assert_allclose(found, expected, rtol=2e-14, atol=1e-15)
    assert found[q == 0].tolist() == [0.0] and found[q == 1].tolist() == [1.0]  # exactly: the ends of the σ range
    assert np.all(np.diff(found[4:]) >= 0)


@pytest.mark.parametrize("steps", [1, 2, 7, 50, 1000])
def test_the_reference_beta_grid_is_reproduced(steps: int) -> None:
    # The reference: σ_min + ppf(1 − linspace(0, 1, n); 0.6, 0.6)·(σ_max − σ_min), one scipy call per value
    low, high = 0.0291675, 14.6146
    q = 1 - np.linspace(0, 1, steps)
    expected = np.array([low + scipy_stats.beta.ppf(v, 0.6, 0.6) * (high - low) for v in q])
    found = tables.spaced_sigmas("beta", low, high, steps)
    np.testing.assert_allclose(found, expected, rtol=1e-14, atol=0)
    assert np.array_equal(found.astype(np.float32), expected.astype(np.float32))  # the σ tables are float32


def test_exponential_sigmas_are_evenly_spaced_in_log_sigma() -> None:
    found = tables.spaced_sigmas("exponential", 0.03, 14.6, 11)
    assert found[0] == pytest.approx(14.6, rel=1e-15) and found[-1] == pytest.approx(0.03, rel=1e-15)
    np.testing.assert_allclose(np.diff(np.log(found)), np.log(0.03 / 14.6) / 10, rtol=1e-12)


@pytest.mark.parametrize("name", SPACED)
@pytest.mark.parametrize(
    "switches",
    [("use_karras_sigmas", "use_beta_sigmas"), ("use_exponential_sigmas", "use_beta_sigmas")],
)
def test_two_spacings_at_once_are_refused_by_name(name: str, switches: tuple[str, str]) -> None:
    options = dict.fromkeys(switches, True)
    with pytest.raises(ValueError):  # the reference refuses too
        getattr(diffusers, name).from_config(DECODER_SCHEDULER_CONFIG, **options)
    with pytest.raises(ValueError, match=rf"{switches[0]}=True, {switches[1]}=True: only one σ spacing"):
        getattr(ours, name).from_config(DECODER_SCHEDULER_CONFIG, **options)


@pytest.mark.parametrize(
    "name",
    ["EulerDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler"],
)
@pytest.mark.parametrize("switch", ["use_exponential_sigmas", "use_beta_sigmas"])
def test_custom_timesteps_are_refused_with_respaced_sigmas(name: str, switch: str) -> None:
    scheduler = getattr(ours, name).from_config(DECODER_SCHEDULER_CONFIG, **{switch: True})
    with pytest.raises(ValueError, match=rf"timesteps=\[999, 500, 10\] cannot be used with {switch}=True"):
        scheduler.set_timesteps(timesteps=[999, 500, 10])


def test_beta_sigmas_run_where_the_reference_skips_its_first_step() -> None:
    """50 beta σ of the decoder schedule: the first two timesteps truncate to the same integer (998). The reference
    then starts at the second (skipping σ_max) and runs past its tables (IndexError); ours starts at σ_max."""
    scheduler = ours.DPMSolverMultistepScheduler.from_config(DECODER_SCHEDULER_CONFIG, use_beta_sigmas=True)
    scheduler.set_timesteps(50)
    assert scheduler.timesteps[0] == scheduler.timesteps[1]
    reference = diffusers.DPMSolverMultistepScheduler.from_config(DECODER_SCHEDULER_CONFIG, use_beta_sigmas=True)
    reference.set_timesteps(50)
    assert np.array_equal(scheduler.timesteps.numpy(), reference.timesteps.numpy())
    sample = torch.ones(1, 4, 2, 2)
    for t in scheduler.timesteps:
        sample = scheduler.step(-0.1 * sample, t, sample).prev_sample
    assert scheduler.step_index == 50 and torch.isfinite(sample).all()
