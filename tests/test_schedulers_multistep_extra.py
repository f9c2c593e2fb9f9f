"""LMS, DPM-Solver singlestep and DEIS: errors, config round trips and the LMS order fix (parity with the reference is
in test_schedulers_parity.py and tests/pipelines/test_swapped_schedulers.py)."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from tiny_repos import DECODER_SCHEDULER_CONFIG

import kandinsky22
from kandinsky22.schedulers import (
    DEISMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
)
from kandinsky22.schedulers.deis import deis_coefficients
from kandinsky22.schedulers.lms import lms_coefficients

NEW = (LMSDiscreteScheduler, DPMSolverSinglestepScheduler, DEISMultistepScheduler)


@pytest.mark.parametrize("cls", NEW)
def test_swapped_in_from_the_official_decoder_config_and_exported(cls):
    ddpm = kandinsky22.DDPMScheduler.from_config(DECODER_SCHEDULER_CONFIG)
    scheduler = cls.from_config(ddpm.config)
    assert getattr(kandinsky22, cls.__name__) is cls
    assert cls in ddpm.compatibles
    assert scheduler.order == 1 and scheduler.init_noise_sigma is not None
    assert len(scheduler) == 1000
    # the DDPM keys ride along, so swapping back restores DDPM's settings
    back = kandinsky22.DDPMScheduler.from_config(scheduler.config)
    assert {k: back.config[k] for k in ddpm.config_defaults} == {k: ddpm.config[k] for k in ddpm.config_defaults}
    ref = getattr(diffusers, cls.__name__).from_config(DECODER_SCHEDULER_CONFIG)
    assert {k: scheduler.config[k] for k in cls.config_defaults} == {k: ref.config[k] for k in cls.config_defaults}


@pytest.mark.parametrize(
    ("cls", "key", "value"),
    [
        (LMSDiscreteScheduler, "timestep_spacing", "uniform"),
        (LMSDiscreteScheduler, "prediction_type", "flow_prediction"),
        (DPMSolverSinglestepScheduler, "use_flow_sigmas", True),
        (DPMSolverSinglestepScheduler, "algorithm_type", "sde-dpmsolver"),
        (DPMSolverSinglestepScheduler, "solver_order", 4),
        (DPMSolverSinglestepScheduler, "final_sigmas_type", "last"),
        (DEISMultistepScheduler, "use_dynamic_shifting", True),
        (DEISMultistepScheduler, "algorithm_type", "unipc"),
        (DEISMultistepScheduler, "solver_order", 0),
        (DEISMultistepScheduler, "beta_schedule", "sigmoid"),
    ],
)
def test_an_unsupported_config_value_is_named(cls, key, value):
    with pytest.raises(ValueError, match=key):
        cls(**{key: value})


def test_dpm_singlestep_refuses_what_the_reference_cannot_run():
    with pytest.raises(ValueError, match="final_sigmas_type"):
        DPMSolverSinglestepScheduler(algorithm_type="dpmsolver")
    with pytest.raises(ValueError, match="thresholding"):
        DPMSolverSinglestepScheduler(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", thresholding=True)


@pytest.mark.parametrize("cls", NEW)
@pytest.mark.parametrize("steps", [0, -1, 1001, 2.5, True])
def test_bad_step_counts_are_refused(cls, steps):
    with pytest.raises(ValueError, match="num_inference_steps"):
        cls().set_timesteps(steps)


@pytest.mark.parametrize("cls", (DPMSolverSinglestepScheduler, DEISMultistepScheduler))
def test_mu_and_step_before_set_timesteps_are_refused(cls):
    with pytest.raises(ValueError, match="mu="):
        cls().set_timesteps(5, mu=0.5)
    with pytest.raises(ValueError, match="set_timesteps"):
        cls().step(torch.zeros(1, 4, 2, 2), 999, torch.zeros(1, 4, 2, 2))


def test_lms_order_must_be_positive():
    scheduler = LMSDiscreteScheduler()
    scheduler.set_timesteps(5)
    x = torch.ones(1, 4, 2, 2)
    with pytest.raises(ValueError, match="order=0"):
        scheduler.step(x, scheduler.timesteps[0], x, order=0)


def test_lms_coefficients_integrate_polynomials_exactly():
    sigmas = [9.0, 6.5, 4.0, 2.2, 1.1, 0.0]
    for order in (1, 2, 3, 4):
        weights = lms_coefficients(sigmas, 3, order)
        nodes = [sigmas[3 - k] for k in range(order)]
        for degree in range(order):  # exact for d(σ) = σ^degree, degree < order
            exact = (sigmas[4] ** (degree + 1) - sigmas[3] ** (degree + 1)) / (degree + 1)
            assert sum(w * n**degree for w, n in zip(weights, nodes)) == pytest.approx(exact, rel=1e-12)


def test_deis_coefficients_integrate_polynomials_in_log_rho_exactly():
    nodes, rho_to = [3.0, 5.0, 9.0], 1.7
    weights = deis_coefficients(nodes[0], rho_to, nodes)
    for degree in range(3):  # ∫ (log ρ)^degree dρ by the trapezoid rule on a fine grid
        grid = np.linspace(nodes[0], rho_to, 200001)
        exact = np.trapezoid(np.log(grid) ** degree, grid)
        assert sum(w * np.log(n) ** degree for w, n in zip(weights, nodes)) == pytest.approx(exact, rel=1e-8)


def test_lms_run_started_mid_schedule_takes_an_euler_step_first():
    """Fix: the reference weighs an img2img run's first derivative with a 4th-order coefficient (its order comes from
    the step index); ours starts at order 1, i.e. Euler's step."""
    lms, euler = LMSDiscreteScheduler(), EulerDiscreteScheduler()
    for s in (lms, euler):
        s.set_timesteps(10)
        s.set_begin_index(5)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    eps = torch.sin(x)
    t = lms.timesteps[5]
    got = lms.step(eps, t, x).prev_sample
    assert torch.allclose(got, euler.step(eps, t, x).prev_sample, atol=1e-6)
    ref = diffusers.LMSDiscreteScheduler()
    ref.set_timesteps(10)
    ref.set_begin_index(5)
    with pytest.warns(UserWarning):  # the reference's scale_model_input warning
        assert not torch.allclose(ref.step(eps, t, x).prev_sample, got, atol=1e-3)


@pytest.mark.parametrize("cls", NEW)
def test_copy_runs_independently(cls):
    scheduler = cls()
    scheduler.set_timesteps(6)
    x = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    first = scheduler.step(0.3 * x, scheduler.timesteps[0], x).prev_sample
    twin = scheduler.copy()
    a = scheduler.step(0.3 * first, scheduler.timesteps[1], first).prev_sample
    b = twin.step(0.3 * first, twin.timesteps[1], first).prev_sample
    assert torch.equal(a, b) and scheduler.step_index == twin.step_index == 2
