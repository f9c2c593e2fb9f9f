"""Heun, DPM2 and DPM2-ancestral beyond the trajectory parity of ``test_schedulers_parity.py``: config swapping with the
reference, clear errors, and the cases where the reference fails and we do not."""

from __future__ import annotations

import diffusers
import pytest
import torch
from tiny_repos import DECODER_SCHEDULER_CONFIG

import kandinsky22
from kandinsky22.schedulers import HeunDiscreteScheduler, KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
CLASSES = (HeunDiscreteScheduler, KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler)


@pytest.mark.parametrize("cls", CLASSES)
def test_swapped_in_from_the_decoder_config_like_the_reference(cls) -> None:
    ours = cls.from_config(kandinsky22.DDPMScheduler.from_config(DECODER_SCHEDULER_CONFIG).config)
    reference = getattr(diffusers, cls.__name__).from_config(DECODER_SCHEDULER_CONFIG)
    assert ours.order == reference.order == 2
    for steps in (1, 4, 10):
        ours.set_timesteps(steps)
        reference.set_timesteps(steps)
        assert torch.equal(ours.timesteps, reference.timesteps) and torch.equal(ours.sigmas, reference.sigmas)
        assert float(ours.init_noise_sigma) == float(reference.init_noise_sigma)
        assert ours.num_inference_steps == reference.num_inference_steps == steps
    # Our config is the reference's: it builds the same scheduler back
    back = getattr(diffusers, cls.__name__).from_config(dict(ours.config))
    back.set_timesteps(10)
    assert torch.equal(back.timesteps, ours.timesteps)
    assert cls in ours.compatibles and len(ours) == 1000


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize(
    ("key", "value"),
    [("use_exponential_sigmas", True), ("use_beta_sigmas", True), ("beta_schedule", "exp"), ("prediction_type", "x")],
)
def test_unsupported_config_values_are_refused_by_name(cls, key, value) -> None:
    with pytest.raises(ValueError, match=f"{key}={value!r}"):
        cls.from_config(DECODER_SCHEDULER_CONFIG, **{key: value})


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("steps", [0, 1001, 2.5, True])
def test_bad_step_counts_are_refused(cls, steps) -> None:
    with pytest.raises(ValueError, match="num_inference_steps"):
        cls().set_timesteps(steps)


def test_heun_custom_timesteps_are_checked_and_exclude_karras_sigmas() -> None:
    with pytest.raises(ValueError, match="strictly descending"):
        HeunDiscreteScheduler().set_timesteps(timesteps=[10, 500])
    with pytest.raises(ValueError, match="use_karras_sigmas=True"):
        HeunDiscreteScheduler(use_karras_sigmas=True).set_timesteps(timesteps=[900, 500])
    with pytest.raises(ValueError, match="only one of"):
        HeunDiscreteScheduler().set_timesteps(3, timesteps=[900, 500])


@pytest.mark.parametrize("cls", CLASSES)
def test_a_run_begun_on_a_steps_second_evaluation_is_refused(cls) -> None:
    """The reference takes it and steps by zero (DPM2) or ends in NaN (Heun): ours says where to begin."""
    scheduler = cls()
    scheduler.set_timesteps(4)
    scheduler.set_begin_index(1)
    x = torch.ones(1, 4, 2, 2)
    with pytest.raises(ValueError, match=r"set_begin_index\(2\)"):
        scheduler.step(x, scheduler.timesteps[1], x)


@pytest.mark.parametrize("cls", CLASSES)
def test_a_step_past_the_tables_end_is_refused(cls) -> None:
    scheduler = cls()
    scheduler.set_timesteps(2)
    x = torch.ones(1, 4, 2, 2)
    for t in scheduler.timesteps:
        x = scheduler.step(0.1 * x, t, x).prev_sample
    assert scheduler.step_index == len(scheduler.timesteps) == 3
    with pytest.raises(ValueError, match="once too often"):
        scheduler.step(x, scheduler.timesteps[-1], x)


@pytest.mark.parametrize("cls", (KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler))
def test_dpm2_with_x0_prediction_reaches_the_prediction(cls) -> None:
    """The reference's DPM2 classes raise NotImplementedError for prediction_type "sample"; a model that always
    predicts the same x₀ must lead there (without noise at the last step, the ancestral one too)."""
    target = torch.full((1, 4, 3, 3), 0.25)
    scheduler = cls.from_config(DECODER_SCHEDULER_CONFIG, prediction_type="sample")
    scheduler.set_timesteps(5)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(target.shape, generator=generator) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        kwargs = {"generator": generator} if cls is KDPM2AncestralDiscreteScheduler else {}
        x = scheduler.step(target, t, x, **kwargs).prev_sample
    assert torch.allclose(x, target, atol=1e-5)


def test_copy_gives_an_independent_run() -> None:
    """A copy taken between a step's two evaluations finishes that step on its own predictor state."""
    scheduler = HeunDiscreteScheduler.from_config(DECODER_SCHEDULER_CONFIG)
    scheduler.set_timesteps(3)
    x = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    t0, t1 = scheduler.timesteps[:2]
    half = scheduler.step(0.3 * x, t0, x).prev_sample
    twin = scheduler.copy()
    a = scheduler.step(0.2 * half, t1, half).prev_sample
    scheduler.step(0.5 * a, scheduler.timesteps[2], a)
    b = twin.step(0.2 * half, t1, half).prev_sample
    assert torch.equal(a, b)
