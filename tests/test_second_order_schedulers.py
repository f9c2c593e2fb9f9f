"""Heun, DPM2, DPM2-ancestral and DPM++ SDE beyond the trajectory parity of ``test_schedulers_parity.py``: config
swapping with the reference, clear errors, the cases where the reference fails and we do not, and DPM++ SDE's seeding
from the generator."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import warnings

import diffusers
import pytest
import torch
from tiny_repos import DECODER_SCHEDULER_CONFIG

import kandinsky22
from kandinsky22.schedulers import (
    DPMSolverSDEScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
CLASSES = (HeunDiscreteScheduler, KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler, DPMSolverSDEScheduler)


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
    [("beta_schedule", "exp"), ("prediction_type", "x")],
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


@pytest.mark.parametrize("cls", (KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler, DPMSolverSDEScheduler))
def test_dpm2_with_x0_prediction_reaches_the_prediction(cls) -> None:
    """The reference's DPM2 and DPM++ SDE classes raise NotImplementedError for prediction_type "sample"; a model that
    always predicts the same x₀ must lead there (without noise at the last step, the stochastic ones too)."""
    target = torch.full((1, 4, 3, 3), 0.25)
    scheduler = cls.from_config(DECODER_SCHEDULER_CONFIG, prediction_type="sample")
    scheduler.set_timesteps(5)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(target.shape, generator=generator) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        kwargs = {"generator": generator} if "generator" in inspect.signature(cls.step).parameters else {}
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


# -- DPM++ SDE: where its Brownian path's seed comes from ------------------------------------------------------------


def _sde_run(generator, batch: int = 2, steps: int = 6, **config) -> torch.Tensor:
    """A loop like the pipelines': start noise from ``generator`` (a generator, a list or None), then ``step`` given
    it. The stand-in model acts per element, so a sample's result depends on its own noise only."""
    scheduler = DPMSolverSDEScheduler.from_config(DECODER_SCHEDULER_CONFIG, **config)
    scheduler.set_timesteps(steps)
    shape = (batch, 4, 5, 5)
    x = kandinsky22.schedulers.randn_tensor(shape, generator) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        output = 0.6 * torch.sin(scheduler.scale_model_input(x, t) + float(t) / 1000)
        x = scheduler.step(output, t, x, generator=generator).prev_sample
    return x


def test_dpm_sde_is_reproducible_from_the_generator_alone() -> None:
    """The reference seeds its Brownian path from torch's global RNG when ``noise_sampler_seed`` is None, so the
    pipeline's generator does not reproduce its images. Ours seeds it from the generator: the same seed gives the same
    latents whatever the global RNG's state (which stays untouched), another seed other latents."""
    torch.manual_seed(1)
    first = _sde_run(torch.Generator().manual_seed(7))
    torch.manual_seed(2)
    state = torch.get_rng_state()
    second = _sde_run(torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, second)
    other = _sde_run(torch.Generator().manual_seed(8))
    assert (other - first).abs().max() > 0.1
    # The start noise alike, only the path's seed differing: the Brownian noise matters to the result
    fixed = [_sde_run(torch.Generator().manual_seed(7), noise_sampler_seed=s) for s in (1, 2)]
    assert (fixed[0] - fixed[1]).abs().max() > 0.1


def test_dpm_sde_generators_per_sample_give_results_independent_of_the_batch() -> None:
    """One Brownian path per generator: a sample's latents do not depend on the others in its batch."""
    pair = _sde_run([torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)])
    for row, seed in enumerate((3, 4)):
        alone = _sde_run([torch.Generator().manual_seed(seed)], batch=1)
        assert torch.equal(pair[row : row + 1], alone)
    assert (pair[0] - pair[1]).abs().max() > 0.1
    with pytest.raises(ValueError, match="Got 3 generators for a batch of 2"):
        _sde_run([torch.Generator() for _ in range(3)])


def test_dpm_sde_without_a_generator_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(0)
    state = torch.get_rng_state()
    results = [_sde_run(None) for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(*results)  # seeded from the OS: two runs differ


def test_dpm_sde_queries_its_path_without_warnings() -> None:
    """torchsde rounds the path's range to 6 digits, and σ(t(σ)) lies a float32 rounding away from σ: queries outside
    the range, where torchsde warns and clamps (the reference's runs warn). Ours clamps them itself, to the same noise
    (the parity tests)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for steps in range(2, 13):
            for karras in (False, True):
                _sde_run(torch.Generator().manual_seed(0), 1, steps, use_karras_sigmas=karras)


def test_dpm_sde_copy_draws_the_same_noise_on_its_own() -> None:
    """A copy taken between a step's two evaluations finishes that step with the same Brownian noise."""
    scheduler = DPMSolverSDEScheduler.from_config(DECODER_SCHEDULER_CONFIG)
    scheduler.set_timesteps(3)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 2, 2, generator=generator)
    t0, t1 = scheduler.timesteps[:2]
    half = scheduler.step(0.3 * x, t0, x, generator=generator).prev_sample
    twin = scheduler.copy()
    a = scheduler.step(0.2 * half, t1, half).prev_sample
    b = twin.step(0.2 * half, t1, half).prev_sample
    assert torch.equal(a, b) and twin._noise is not scheduler._noise


@pytest.mark.parametrize("seed", [-1, 2.5, "3", True])
def test_dpm_sde_bad_noise_sampler_seed_is_refused_by_name(seed) -> None:
    with pytest.raises(ValueError, match=f"noise_sampler_seed={seed!r}"):
        DPMSolverSDEScheduler(noise_sampler_seed=seed)


def test_dpm_sde_without_torchsde_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torchsde", None)  # `import torchsde` now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "kandinsky22\[sde\]"'):
        DPMSolverSDEScheduler()


def test_the_package_imports_without_torchsde() -> None:
    """torchsde is optional: only building DPM++ SDE needs it (a fresh interpreter, where it cannot be imported)."""
    code = (
        "import sys; sys.modules['torchsde'] = None\n"
        "import kandinsky22, kandinsky22.schedulers, kandinsky22.jobs\n"
        "kandinsky22.EulerDiscreteScheduler()\n"
        "try:\n    kandinsky22.DPMSolverSDEScheduler()\nexcept ImportError as err:\n    print(err)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert 'pip install "kandinsky22[sde]"' in result.stdout


def test_the_cli_name_dpm_sde_picks_it() -> None:
    from kandinsky22.cli import build_parser
    from kandinsky22.jobs import Job, make_scheduler

    args = build_parser().parse_args(["generate", "a cat", "--scheduler", "dpm++-sde"])
    assert args.scheduler == "dpm++-sde"
    Job(prompt="a cat", scheduler="dpm++-sde")  # validated on construction
    scheduler = make_scheduler("dpm++-sde", DECODER_SCHEDULER_CONFIG)
    assert type(scheduler) is DPMSolverSDEScheduler
    assert scheduler.config.noise_sampler_seed is None  # seeded from each image's generator


def test_dpm_sde_half_precision_samples_get_the_float32_path() -> None:
    """The noise of a short σ interval, as a float16 sample gets it, is the float32 path's rounded to float16: a path
    built in half precision (the reference's, in the sample's dtype) is off by tenths there."""
    results = {}
    for dtype in (torch.float32, torch.float16):
        scheduler = DPMSolverSDEScheduler(noise_sampler_seed=4)
        scheduler.set_timesteps(400)
        start = len(scheduler.timesteps) - 7  # a predictor near σ_min, over an interval of ~1e-4
        scheduler.set_begin_index(start)
        zeros = torch.zeros(1, 4, 8, 8, dtype=dtype)
        # x = 0 and ε̂ = 0: x̂₀ = 0, so the step returns the noise times σ_up alone
        results[dtype] = scheduler.step(zeros, scheduler.timesteps[start], zeros).prev_sample
    assert results[torch.float16].dtype == torch.float16
    scale = results[torch.float32].abs().max()
    assert (results[torch.float16].float() - results[torch.float32]).abs().max() <= 2e-3 * scale
