"""PNDM behaviour: its timestep tables and mid-schedule starts against the reference, the refusals (too few steps for
the Runge–Kutta warm-up, a mid-schedule start with it, unsupported config values) and the reference bug behind one."""

from __future__ import annotations

import diffusers
import pytest
import torch
from test_schedulers_parity import CONFIGS, SHAPE, stand_in_model

import kandinsky22.schedulers as ours

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

DECODER = CONFIGS["decoder"]


@pytest.mark.parametrize("skip_prk_steps", [False, True])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("steps", [4, 5, 10, 50, 999])
def test_timesteps_are_the_references(skip_prk_steps: bool, spacing: str, steps: int) -> None:
    config = {**DECODER, "skip_prk_steps": skip_prk_steps, "timestep_spacing": spacing}
    scheduler, reference = ours.PNDMScheduler.from_config(config), diffusers.PNDMScheduler.from_config(config)
    scheduler.set_timesteps(steps)
    reference.set_timesteps(steps)
    assert scheduler.timesteps.dtype == reference.timesteps.dtype
    assert torch.equal(scheduler.timesteps, reference.timesteps)
    assert len(scheduler.timesteps) == steps + (1 if skip_prk_steps else 9)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_too_few_steps_for_the_runge_kutta_warm_up_are_refused(steps: int) -> None:
    """The reference fails inside numpy (a broadcast error) below 4 steps; we name the argument. Without the warm-up
    every count from 1 works."""
    reference = diffusers.PNDMScheduler.from_config(DECODER)
    with pytest.raises(ValueError, match="broadcast"):
        reference.set_timesteps(steps)
    with pytest.raises(ValueError, match=rf"num_inference_steps={steps} is too few.*skip_prk_steps=True"):
        ours.PNDMScheduler.from_config(DECODER).set_timesteps(steps)
    scheduler = ours.PNDMScheduler.from_config(DECODER, skip_prk_steps=True)
    scheduler.set_timesteps(steps)
    assert len(scheduler.timesteps) == steps + (steps > 1)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"prediction_type": "sample"}, "prediction_type='sample' is not supported; choose one of 'epsilon'"),
        ({"beta_schedule": "cubic"}, "beta_schedule='cubic'"),
        ({"timestep_spacing": "middle"}, "timestep_spacing='middle'"),
    ],
)
def test_unsupported_config_values_are_refused(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ours.PNDMScheduler.from_config(DECODER, **options)


def test_a_mid_schedule_start_with_the_warm_up_is_refused() -> None:
    scheduler = ours.PNDMScheduler.from_config(DECODER)
    scheduler.set_timesteps(10)
    scheduler.set_begin_index(0)  # a run from the start (inpaint, img2img at strength 1) is fine
    with pytest.raises(ValueError, match=r"skip_prk_steps=False cannot start at step 3.*skip_prk_steps=True"):
        scheduler.set_begin_index(3)


def test_the_references_warm_up_ignores_where_the_run_starts() -> None:
    """The reference bug behind the refusal: started at table index 5 (img2img), its first Runge–Kutta stage still
    transfers from the noise level of the table's first entry, not of the run's. With ε = 0 the transfer is the pure
    scaling √(ᾱ_target/ᾱ_from), which shows which level it takes."""
    reference = diffusers.PNDMScheduler.from_config(DECODER)
    reference.set_timesteps(10)
    timesteps = reference.timesteps.tolist()
    sample = torch.ones(1, 4, 2, 2)
    result = reference.step(torch.zeros_like(sample), reference.timesteps[5], sample).prev_sample
    half = 1000 // 10 // 2
    alphas = reference.alphas_cumprod
    assert timesteps[0] != timesteps[5]
    from_table_start = (alphas[timesteps[5] - half] / alphas[timesteps[0]]) ** 0.5
    torch.testing.assert_close(result, from_table_start * sample)


@pytest.mark.parametrize("start", [1, 2, 3])
def test_a_mid_schedule_start_without_the_warm_up_is_the_references(start: int) -> None:
    """img2img with ``skip_prk_steps``: the reference's slice of the table and call count, copied (from index 2 on,
    past the repeated timestep, one step is lost — documented); our timesteps are not read (on ``meta``)."""
    results = []
    for library in (diffusers, ours):
        scheduler = library.PNDMScheduler.from_config(DECODER, skip_prk_steps=True)
        scheduler.set_timesteps(8)
        generator = torch.Generator().manual_seed(0)
        sample = torch.randn(SHAPE, generator=generator)
        timesteps = scheduler.timesteps[start:]
        sample = scheduler.add_noise(sample, torch.randn(SHAPE, generator=generator), timesteps[:1].repeat(SHAPE[0]))
        if library is ours:
            scheduler.set_begin_index(start)
        for t in timesteps:
            passed = t.to("meta") if library is ours else t
            sample = scheduler.step(stand_in_model(sample, t, 4), passed, sample).prev_sample
        results.append(sample)
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("skip_prk_steps", [False, True])
def test_a_copy_mid_step_continues_independently(skip_prk_steps: bool) -> None:
    """Copied inside a Runge–Kutta step (after 6 calls) or after the improved-Euler call: both continue alike and
    stepping one leaves the other's state alone."""
    scheduler = ours.PNDMScheduler.from_config(DECODER, skip_prk_steps=skip_prk_steps)
    scheduler.set_timesteps(6)
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    split = 6 if not skip_prk_steps else 2
    for t in scheduler.timesteps[:split]:
        sample = scheduler.step(stand_in_model(sample, t, 4), t, sample).prev_sample
    twin = scheduler.copy()
    finals = []
    for s in (twin, scheduler):
        x = sample
        for t in s.timesteps[split:]:
            x = s.step(stand_in_model(x, t, 4), t, x).prev_sample
        finals.append(x)
    assert torch.equal(finals[0], finals[1])


def test_return_dict_false_gives_the_references_one_tuple() -> None:
    scheduler = ours.PNDMScheduler.from_config(DECODER)
    scheduler.set_timesteps(5)
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    output = scheduler.step(sample, scheduler.timesteps[0], sample, return_dict=False)
    assert isinstance(output, tuple) and len(output) == 1 and output[0].shape == SHAPE
    assert scheduler.order == 1 and scheduler.init_noise_sigma == 1.0 and len(scheduler) == 1000
