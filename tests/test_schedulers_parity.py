"""Sampling trajectories of every scheduler against the reference library (diffusers), fp32, tolerance 1e-5.

Both libraries run the same loop — seeded initial noise, a deterministic stand-in for the network, ``step`` with the
same generator — and must agree on the timesteps, the final sample and how far the generator advanced (the order and
number of random draws, reference-behaviour §5 quirk 4).
"""

from __future__ import annotations

import inspect

import diffusers
import pytest
import torch
from tiny_repos import DECODER_SCHEDULER_CONFIG, PRIOR_SCHEDULER_CONFIG

import kandinsky22.schedulers as ours
from kandinsky22.schedulers import tables

# The reference converts torch tensors with np.array(..., copy=False) under numpy 2: noise, not our concern.
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning"),
    # The reference's DPM++ SDE queries its Brownian path one float32 rounding outside its range (torchsde clamps)
    pytest.mark.filterwarnings("ignore:Should have t:UserWarning"),
]

TOLERANCE = 1e-5
SHAPE = (2, 4, 6, 6)
STEP_COUNTS = (1, 2, 7, 25, 50, 100)
CLASS_NAMES = (
    "DDPMScheduler",
    "DDIMScheduler",
    "UnCLIPScheduler",
    "DPMSolverMultistepScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "UniPCMultistepScheduler",
    "LMSDiscreteScheduler",
    "DPMSolverSinglestepScheduler",
    "DEISMultistepScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DPMSolverSDEScheduler",
    "PNDMScheduler",
)
# Schedulers whose reference implementation splits an 8-channel (learned-variance) output itself; the others get the
# 4 noise channels on the reference side (its DPM-Solver would slice 3 channels, a bug kandinsky22 does not copy).
SPLITS_VARIANCE = ("DDPMScheduler", "UnCLIPScheduler")
# The reference's LMS integrates its coefficients numerically (scipy's quad) from a float32 integrand: they carry ~1e-7
# relative noise, which ours (the exact integral of the same polynomial) do not. Compared relative to the samples' size.
# DEIS's closed-form coefficients are differences of nearly equal terms, which the reference evaluates in float32 (up to
# 1e-4 relative noise over a run), ours in float64. Ours must then agree with the reference to within the reference's
# own float32 noise: twice the gap between its run and the same run with its σ table (hence its coefficients) in float64.
RELATIVE_TOLERANCE = {"LMSDiscreteScheduler": 1e-6}
FLOAT32_COEFFICIENTS = ("DEISMultistepScheduler",)
# Config values both libraries get, so that their random draws can agree: DPM++ SDE's Brownian path is seeded from
# torch's global RNG in the reference (from the step's generator in ours) unless noise_sampler_seed fixes it.
SEEDED = {"DPMSolverSDEScheduler": {"noise_sampler_seed": 2024}}


def seeded(name: str, config: dict) -> dict:
    return {**SEEDED.get(name, {}), **config}


def tolerance(name: str, expected: torch.Tensor) -> float:
    return max(TOLERANCE, RELATIVE_TOLERANCE.get(name, 0.0) * expected.abs().max().item())


def reference_noise(name: str, config: dict, expected: torch.Tensor, *run_args) -> float:
    """For FLOAT32_COEFFICIENTS: 2·max|Δ| between the reference's result ``expected`` and its run with float64 tables."""
    if name not in FLOAT32_COEFFICIENTS:
        return 0.0
    scheduler = getattr(diffusers, name).from_config(config)
    set_timesteps = scheduler.set_timesteps

    def set_timesteps_float64(*args, **kwargs):
        set_timesteps(*args, **kwargs)
        scheduler.sigmas = scheduler.sigmas.double()

    scheduler.set_timesteps = set_timesteps_float64
    return 2 * (run(scheduler, *run_args)[1] - expected).abs().max().item()


# Official configs (reference-behaviour §3), the reference's DDIM test config (§4) and two more schedules.
CONFIGS = {
    "decoder": DECODER_SCHEDULER_CONFIG,
    "prior": PRIOR_SCHEDULER_CONFIG,
    "ddim_test": {
        "num_train_timesteps": 1000,
        "beta_schedule": "linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": "epsilon",
        "thresholding": False,
    },
    "vpred_trailing": {
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "prediction_type": "v_prediction",
        "timestep_spacing": "trailing",
        "clip_sample": False,
    },
    "cosine_learned": {
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "epsilon",
        "variance_type": "learned_range",
        "timestep_spacing": "linspace",
        "clip_sample": False,
    },
}


def stand_in_model(x: torch.Tensor, t: torch.Tensor, out_channels: int) -> torch.Tensor:
    """A smooth deterministic function of the sample and the timestep, in place of the UNet / prior. The timestep is
    read in float32, as the UNet's time embedding reads it (a float64 table gives the float32 network's input)."""
    phase = float(torch.as_tensor(t).float()) / 1000.0
    prediction = 0.7 * torch.sin(1.7 * x + phase) + 0.2 * torch.cos(torch.tensor(3.0 * phase)) * x
    if out_channels == 2 * x.shape[1]:
        return torch.cat([prediction, torch.tanh(0.5 * x - phase)], dim=1)
    return prediction


def run(
    scheduler,
    steps: int,
    out_channels: int,
    slice_channels: bool = False,
    seed: int = 0,
    schedule: dict | None = None,
    step_options: dict | None = None,
):
    """A sampling loop like the pipelines'. Returns the timesteps, the final sample and the generator's next draw.

    ``schedule`` replaces ``steps`` as the keywords of ``set_timesteps``; ``step_options`` go to every ``step`` (the
    generator too, unless they hold ``variance_noise``)."""
    if schedule is None:
        scheduler.set_timesteps(steps)
    else:
        scheduler.set_timesteps(**schedule)
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(SHAPE, generator=generator) * scheduler.init_noise_sigma
    step_params = inspect.signature(scheduler.step).parameters
    step_options = step_options or {}
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        output = stand_in_model(scheduler.scale_model_input(sample, t), t, out_channels)
        if slice_channels:
            output = output[:, : SHAPE[1]]
        kwargs = dict(step_options)
        if "generator" in step_params and "variance_noise" not in step_options:
            kwargs["generator"] = generator
        if "prev_timestep" in step_params:  # UnCLIP: the prior pipeline passes the next timestep (None at the end)
            kwargs["prev_timestep"] = timesteps[i + 1] if i + 1 < len(timesteps) else None
        sample = scheduler.step(output, t, sample, **kwargs).prev_sample
    return timesteps, sample, torch.randn(3, generator=generator)


def compare(name: str, config: dict, steps: int) -> float:
    """Run both libraries; return the max |Δ| of the final samples (asserting everything else matches)."""
    out_channels = 8 if config.get("variance_type") in ("learned", "learned_range") else 4
    config = seeded(name, config)
    ref_overrides = {}
    if out_channels == 8 and name not in SPLITS_VARIANCE and "variance_type" in getattr(diffusers, name)().config:
        ref_overrides["variance_type"] = None
    try:
        reference = getattr(diffusers, name).from_config(config, **ref_overrides)
        ref_ts, ref_sample, ref_next = run(
            reference, steps, out_channels, slice_channels=out_channels == 8 and name not in SPLITS_VARIANCE
        )
    except (NotImplementedError, IndexError, AssertionError) as err:
        # Combinations kandinsky22 runs and the reference cannot: Euler-ancestral with x₀-prediction
        # (NotImplementedError), and Karras σ on the cosine schedule, whose duplicated first timesteps make the
        # reference skip σ_max and run past its tables (IndexError, or UniPC's internal assertion).
        _, sample, _ = run(getattr(ours, name).from_config(config), steps, out_channels)
        assert torch.isfinite(sample).all()
        pytest.skip(f"the reference cannot run it: {type(err).__name__}: {err}")
    except (ValueError, ZeroDivisionError) as err:
        # The reference rejects this combination (e.g. UnCLIP with linear betas, or 1 step): so must we, clearly.
        with pytest.raises(ValueError):
            run(getattr(ours, name).from_config(config), steps, out_channels)
        pytest.skip(f"the reference rejects it too: {type(err).__name__}: {err}")
    ts, sample, next_draw = run(getattr(ours, name).from_config(config), steps, out_channels)
    if ts.isfinite().all() and not ref_ts.isfinite().all():  # KDPM2-ancestral: a σ_down that underflows to 0
        assert torch.isfinite(sample).all()
        pytest.skip("the reference's timesteps hold NaN (a midpoint σ of NaN); kandinsky22's are finite")
    if name.startswith("KDPM2") and tables.SIGMA_SPACINGS.keys() & {k for k, on in config.items() if on is True}:
        # the reference's timesteps are float64 with respaced σ (float32 otherwise); ours are float32
        ref_ts = ref_ts.float()
    if config.get("use_beta_sigmas") and ts.dtype == torch.float64:
        # Fractional float64 timesteps of beta σ: our Beta quantiles and scipy's are each within ~2 units in the last
        # place of the exact value (tests/test_sigma_spacings.py), not bit-identical; float32 (the network) is
        assert ts.dtype == ref_ts.dtype and torch.allclose(ts, ref_ts, rtol=0, atol=1e-9)
        assert torch.equal(ts.float(), ref_ts.float())
    else:
        assert ts.dtype == ref_ts.dtype and torch.equal(ts, ref_ts)
    assert torch.equal(next_draw, ref_next), "different number of random draws"
    if not torch.isfinite(ref_sample).all():
        assert torch.isfinite(sample).all()
        pytest.skip("the reference diverges (inf/NaN) on this combination; kandinsky22 stays finite")
    error = (sample - ref_sample).abs().max().item()
    slice_channels = out_channels == 8 and name not in SPLITS_VARIANCE
    allowed = tolerance(name, ref_sample) + reference_noise(
        name, config, ref_sample, steps, out_channels, slice_channels
    )
    assert error < allowed, f"{name} {steps} steps: max |Δ| = {error:.2e}"
    return error


@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("name", CLASS_NAMES)
def test_trajectory_matches_reference(name: str, config_name: str, steps: int) -> None:
    compare(name, CONFIGS[config_name], steps)


# Options beyond the five configs. Exact samplers: variance types, thresholding, prediction types. Fast solvers:
# orders, solver types, Karras σ, final steps, thresholding, on an 8-channel learned-range decoder output (the
# official decoder config with variance_type="learned_range") or the cosine schedule.
DECODER = CONFIGS["decoder"]
LEARNED_DECODER = {**DECODER, "variance_type": "learned_range"}
COSINE = CONFIGS["cosine_learned"]
SPACINGS = ("linspace", "leading", "trailing")
OPTION_VARIANTS = [
    ("DDPMScheduler", DECODER, {"thresholding": True, "sample_max_value": 2.0, "variance_type": "fixed_large"}),
    ("DDPMScheduler", DECODER, {"variance_type": "fixed_small_log", "timestep_spacing": "linspace"}),
    ("DDPMScheduler", DECODER, {"variance_type": None}),  # a fast solver's default, swapped back to DDPM
    ("DDPMScheduler", LEARNED_DECODER, {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
    ("DDIMScheduler", DECODER, {"thresholding": True, "prediction_type": "sample", "set_alpha_to_one": True}),
    ("UnCLIPScheduler", COSINE, {"variance_type": "fixed_small_log", "clip_sample": True}),
    *(
        ("DPMSolverMultistepScheduler", LEARNED_DECODER, {"solver_order": o, "solver_type": s, "use_karras_sigmas": k})
        for o in (1, 2, 3)
        for s in ("midpoint", "heun")
        for k in (False, True)
    ),
    ("DPMSolverMultistepScheduler", LEARNED_DECODER, {"solver_order": 3, "lower_order_final": False}),
    ("DPMSolverMultistepScheduler", LEARNED_DECODER, {"euler_at_final": True, "timestep_spacing": "trailing"}),
    ("DPMSolverMultistepScheduler", LEARNED_DECODER, {"final_sigmas_type": "sigma_min", "lower_order_final": False}),
    ("DPMSolverMultistepScheduler", COSINE, {"use_karras_sigmas": True, "solver_order": 3}),
    ("DPMSolverMultistepScheduler", COSINE, {"lambda_min_clipped": -5.1}),
    ("DPMSolverMultistepScheduler", COSINE, {"thresholding": True, "sample_max_value": 1.5}),
    # B(h) = h ("bh1") and the noise-prediction form only stay finite with a final σ > 0 (at σ = 0, h = ∞).
    *(
        ("UniPCMultistepScheduler", LEARNED_DECODER, {"solver_order": o, "use_karras_sigmas": k, **bh})
        for o in (1, 2, 3)
        for bh in ({"solver_type": "bh1", "final_sigmas_type": "sigma_min"}, {"solver_type": "bh2"})
        for k in (False, True)
    ),
    ("UniPCMultistepScheduler", LEARNED_DECODER, {"predict_x0": False, "final_sigmas_type": "sigma_min"}),
    ("UniPCMultistepScheduler", LEARNED_DECODER, {"disable_corrector": [0, 2]}),
    (
        "UniPCMultistepScheduler",
        LEARNED_DECODER,
        {"solver_order": 3, "lower_order_final": False, "final_sigmas_type": "sigma_min"},
    ),
    # The reference's B(h) = h solver multiplies h = −∞ by a zero residual on the last step to σ = 0 (NaN).
    ("UniPCMultistepScheduler", LEARNED_DECODER, {"solver_type": "bh1"}),
    ("UniPCMultistepScheduler", COSINE, {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}),
    ("UniPCMultistepScheduler", LEARNED_DECODER, {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}),
    ("EulerDiscreteScheduler", LEARNED_DECODER, {"use_karras_sigmas": True}),
    ("EulerDiscreteScheduler", LEARNED_DECODER, {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}),
    ("EulerDiscreteScheduler", COSINE, {"final_sigmas_type": "sigma_min", "prediction_type": "sample"}),
    ("EulerAncestralDiscreteScheduler", LEARNED_DECODER, {"timestep_spacing": "linspace"}),
    ("EulerAncestralDiscreteScheduler", COSINE, {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
    *(
        ("DPMSolverSinglestepScheduler", LEARNED_DECODER, {"solver_order": o, "solver_type": s, "algorithm_type": a})
        for o in (1, 2, 3)
        for s in ("midpoint", "heun")
        for a in ("dpmsolver++", "sde-dpmsolver++")
    ),
    *(
        ("DPMSolverSinglestepScheduler", LEARNED_DECODER, {"solver_order": o, "use_karras_sigmas": True, **f})
        for o in (2, 3)
        for f in ({}, {"final_sigmas_type": "sigma_min", "lower_order_final": False})
    ),
    *(
        ("DPMSolverSinglestepScheduler", COSINE, {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", **o})
        for o in ({"solver_order": 3, "solver_type": "heun"}, {"prediction_type": "v_prediction"})
    ),
    ("DPMSolverSinglestepScheduler", LEARNED_DECODER, {"final_sigmas_type": "sigma_min", "lower_order_final": False}),
    ("DPMSolverSinglestepScheduler", COSINE, {"lambda_min_clipped": -5.1, "solver_order": 3}),
    ("DPMSolverSinglestepScheduler", COSINE, {"thresholding": True, "sample_max_value": 1.5}),
    *(
        ("DEISMultistepScheduler", LEARNED_DECODER, {"solver_order": o, "use_karras_sigmas": k})
        for o in (1, 2, 3)
        for k in (False, True)
    ),
    ("DEISMultistepScheduler", LEARNED_DECODER, {"solver_order": 3, "lower_order_final": False}),
    ("DEISMultistepScheduler", COSINE, {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
    ("DEISMultistepScheduler", COSINE, {"thresholding": True, "prediction_type": "sample"}),
    ("LMSDiscreteScheduler", LEARNED_DECODER, {"use_karras_sigmas": True}),
    ("LMSDiscreteScheduler", LEARNED_DECODER, {"prediction_type": "v_prediction", "timestep_spacing": "linspace"}),
    ("LMSDiscreteScheduler", COSINE, {"prediction_type": "sample", "timestep_spacing": "trailing"}),
    *((n, LEARNED_DECODER, {"use_karras_sigmas": True}) for n in ("HeunDiscreteScheduler", "KDPM2DiscreteScheduler")),
    (
        "KDPM2AncestralDiscreteScheduler",
        LEARNED_DECODER,
        {"use_karras_sigmas": True, "prediction_type": "v_prediction"},
    ),
    ("HeunDiscreteScheduler", COSINE, {"clip_sample": True, "clip_sample_range": 2.0, "timestep_spacing": "trailing"}),
    ("HeunDiscreteScheduler", COSINE, {"prediction_type": "sample", "use_karras_sigmas": True}),
    ("KDPM2DiscreteScheduler", DECODER, {"prediction_type": "v_prediction", "steps_offset": 0}),
    # DPM++ SDE (noise_sampler_seed from SEEDED): Karras σ, prediction types, spacings, another seed
    *(("DPMSolverSDEScheduler", LEARNED_DECODER, {"use_karras_sigmas": True, "timestep_spacing": s}) for s in SPACINGS),
    ("DPMSolverSDEScheduler", COSINE, {"prediction_type": "v_prediction", "use_karras_sigmas": True}),
    ("DPMSolverSDEScheduler", COSINE, {"prediction_type": "sample", "timestep_spacing": "trailing"}),
    ("DPMSolverSDEScheduler", DECODER, {"steps_offset": 0, "noise_sampler_seed": 3}),
    ("DPMSolverSDEScheduler", {**DECODER, "beta_schedule": "scaled_linear"}, {"timestep_spacing": "linspace"}),
    # PNDM: the Runge–Kutta warm-up (the default; the reference fails below 4 steps) or the improved-Euler start
    *(("PNDMScheduler", DECODER, {"skip_prk_steps": s, "set_alpha_to_one": a}) for s in (False, True) for a in (0, 1)),
    ("PNDMScheduler", COSINE, {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
    ("PNDMScheduler", COSINE, {"skip_prk_steps": True, "prediction_type": "v_prediction"}),
    ("PNDMScheduler", LEARNED_DECODER, {"timestep_spacing": "linspace", "skip_prk_steps": True}),
    ("PNDMScheduler", {**DECODER, "beta_schedule": "scaled_linear"}, {"steps_offset": 0}),
    # Exponential and beta σ (each sampler that has them; Karras σ above): timesteps not rounded but truncated where
    # the table is int64 (the DPM-Solver family, DEIS, UniPC), as the reference
    *(
        (name, base, {key: True, **extra})
        for key in ("use_exponential_sigmas", "use_beta_sigmas")
        for name, base, extra in (
            ("EulerDiscreteScheduler", LEARNED_DECODER, {}),
            ("EulerDiscreteScheduler", COSINE, {"sigma_min": 0.1, "sigma_max": 10.0, "final_sigmas_type": "sigma_min"}),
            ("LMSDiscreteScheduler", LEARNED_DECODER, {}),
            ("HeunDiscreteScheduler", LEARNED_DECODER, {}),
            ("KDPM2DiscreteScheduler", COSINE, {"prediction_type": "v_prediction"}),
            ("KDPM2AncestralDiscreteScheduler", LEARNED_DECODER, {}),
            ("DPMSolverSDEScheduler", LEARNED_DECODER, {}),
            ("DPMSolverMultistepScheduler", LEARNED_DECODER, {"solver_order": 3}),
            ("DPMSolverMultistepScheduler", COSINE, {"final_sigmas_type": "sigma_min"}),
            ("DPMSolverSinglestepScheduler", LEARNED_DECODER, {"solver_order": 3}),
            ("DEISMultistepScheduler", LEARNED_DECODER, {"solver_order": 3}),
            ("UniPCMultistepScheduler", LEARNED_DECODER, {}),
            (
                "UniPCMultistepScheduler",
                LEARNED_DECODER,
                {"sigma_min": 0.1, "sigma_max": 10.0, "final_sigmas_type": "sigma_min"},
            ),
        )
    ),
]


@pytest.mark.parametrize("steps", (1, 2, 7, 25))
@pytest.mark.parametrize(("name", "base", "options"), OPTION_VARIANTS)
def test_options_match_reference(name: str, base: dict, options: dict, steps: int) -> None:
    compare(name, {**base, **options}, steps)


# Custom schedules (``set_timesteps(timesteps=…)`` / ``sigmas=…``) and per-step options (Euler's churn, DDIM's clipped
# ε and given noise), each against the same call to the reference: the timestep and σ tables must be identical, the
# trajectories agree to TOLERANCE and the generator advance alike (Euler's churn draws only on the steps it applies
# to). Euler's σ of the decoder schedule run from 0.029 to 14.6, so the windows below churn on some steps only.
SOME_NOISE = torch.randn(SHAPE, generator=torch.Generator().manual_seed(42))
CUSTOM_VARIANTS = [
    ("DDPMScheduler", DECODER, {"timesteps": [999, 850, 600, 421, 250, 100, 37, 1, 0]}, {}),
    ("DDPMScheduler", LEARNED_DECODER, {"timesteps": [900, 500, 20]}, {}),  # the last step goes to x₀ from t = 20
    ("DDPMScheduler", COSINE, {"timesteps": [999, 998, 600, 3]}, {}),  # 999 → 998: a single training step
    ("DDIMScheduler", DECODER, {"num_inference_steps": 10}, {"eta": 0.5, "use_clipped_model_output": True}),
    ("DDIMScheduler", DECODER, {"num_inference_steps": 10}, {"eta": 0.8, "variance_noise": SOME_NOISE}),
    *(
        ("DPMSolverMultistepScheduler", LEARNED_DECODER, {"timesteps": [999, 850, 600, 421, 250, 100, 37, 1]}, o)
        for o in ({}, {"variance_noise": SOME_NOISE})
    ),
    *(
        ("DPMSolverMultistepScheduler", {**LEARNED_DECODER, **o}, {"timesteps": torch.tensor([961, 700, 480, 9])}, {})
        for o in ({"solver_order": 3, "lower_order_final": False}, {"final_sigmas_type": "sigma_min"})
    ),
    ("EulerDiscreteScheduler", DECODER, {"timesteps": [999, 700, 400, 100, 0]}, {}),
    ("EulerDiscreteScheduler", LEARNED_DECODER, {"timesteps": [999.0, 750.5, 500.25, 250.75, 10.5]}, {}),
    ("EulerDiscreteScheduler", DECODER, {"sigmas": [14.0, 8.0, 3.0, 1.0, 0.3, 0.05, 0.0]}, {}),
    # custom σ take precedence over Karras σ, and their last value replaces final_sigmas_type
    ("EulerDiscreteScheduler", {**DECODER, "use_karras_sigmas": True}, {"sigmas": [10.0, 2.0, 0.5, 0.1]}, {}),
    ("EulerDiscreteScheduler", DECODER, {"num_inference_steps": 12}, {"s_churn": 1.0}),
    ("EulerDiscreteScheduler", DECODER, {"num_inference_steps": 12}, {"s_churn": 40.0, "s_tmin": 0.5, "s_tmax": 5.0}),
    ("EulerDiscreteScheduler", DECODER, {"num_inference_steps": 12}, {"s_churn": 3.0, "s_noise": 1.003, "s_tmin": 1}),
    (
        "EulerDiscreteScheduler",
        {**DECODER, "prediction_type": "v_prediction", "use_karras_sigmas": True},
        {"num_inference_steps": 9},
        {"s_churn": 2.0, "s_tmax": 3.0},
    ),
    ("EulerDiscreteScheduler", DECODER, {"sigmas": [14.0, 8.0, 3.0, 1.0, 0.3, 0.05, 0.0]}, {"s_churn": 2.0}),
    *(("LMSDiscreteScheduler", LEARNED_DECODER, {"num_inference_steps": 12}, {"order": o}) for o in (1, 2, 3, 5)),
    *(
        (
            "DPMSolverSinglestepScheduler",
            {**LEARNED_DECODER, **o},
            {"timesteps": [999, 850, 600, 421, 250, 100, 37]},
            {},
        )
        for o in ({"solver_order": 3}, {"algorithm_type": "sde-dpmsolver++"})
    ),
    ("HeunDiscreteScheduler", DECODER, {"timesteps": [999, 700, 400, 100, 0]}, {}),
    ("HeunDiscreteScheduler", LEARNED_DECODER, {"timesteps": [999.0, 750.5, 500.25, 250.75, 10.5]}, {}),
    *(
        (n, DECODER, {"num_inference_steps": 6}, {})
        for n in ("KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler")
    ),
    ("DPMSolverSDEScheduler", DECODER, {"num_inference_steps": 6}, {"s_noise": 1.003}),
    (
        "DPMSolverSDEScheduler",
        {**LEARNED_DECODER, "use_karras_sigmas": True},
        {"num_inference_steps": 9},
        {"s_noise": 0.5},
    ),
]


def custom_id(variant: tuple) -> str:
    name, _, schedule, options = variant
    shown = {
        k: "noise" if isinstance(v, torch.Tensor) and v.ndim > 1 else v for k, v in {**schedule, **options}.items()
    }
    return f"{name}-{shown}"


@pytest.mark.parametrize(
    ("name", "config", "schedule", "step_options"), CUSTOM_VARIANTS, ids=map(custom_id, CUSTOM_VARIANTS)
)
def test_custom_schedules_and_step_options_match_reference(
    name: str, config: dict, schedule: dict, step_options: dict
) -> None:
    out_channels = 8 if config.get("variance_type") in ("learned", "learned_range") else 4
    slice_channels = out_channels == 8 and name not in SPLITS_VARIANCE
    ref_overrides = {"variance_type": None} if slice_channels and name.startswith("DPMSolver") else {}
    config = seeded(name, config)
    reference = getattr(diffusers, name).from_config(config, **ref_overrides)
    scheduler = getattr(ours, name).from_config(config)
    ref_ts, ref_sample, ref_next = run(reference, 0, out_channels, slice_channels, 0, schedule, step_options)
    ts, sample, next_draw = run(scheduler, 0, out_channels, False, 0, schedule, step_options)
    if config.get("use_beta_sigmas") and ts.dtype == torch.float64:
        # Fractional float64 timesteps of beta σ: our Beta quantiles and scipy's are each within ~2 units in the last
        # place of the exact value (tests/test_sigma_spacings.py), not bit-identical; float32 (the network) is
        assert ts.dtype == ref_ts.dtype and torch.allclose(ts, ref_ts, rtol=0, atol=1e-9)
        assert torch.equal(ts.float(), ref_ts.float())
    else:
        assert ts.dtype == ref_ts.dtype and torch.equal(ts, ref_ts)
    if hasattr(reference, "sigmas"):
        assert torch.equal(scheduler.sigmas, reference.sigmas.float())
    assert scheduler.num_inference_steps == (len(ts) + scheduler.order - 1) // scheduler.order  # Heun: 2n - 1
    assert torch.equal(next_draw, ref_next), "different number of random draws"
    error = (sample - ref_sample).abs().max().item()
    assert error < tolerance(name, ref_sample), f"{name}: max |Δ| = {error:.2e}"


@pytest.mark.parametrize(("order", "solver_type"), [(2, "heun"), (3, "midpoint")])
def test_dpm_solver_zero_length_last_step_keeps_the_sample_where_the_reference_gives_nan(order, solver_type):
    """Karras σ end at σ_min and ``final_sigmas_type="sigma_min"`` repeats it: the last step has zero length. From 15
    steps (no ``lower_order_final``) the reference's higher-order formulas divide by that length; ours steps at first
    order there, which leaves the sample unchanged. Every earlier step is the reference's."""
    config = {**DECODER_SCHEDULER_CONFIG, "use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}
    config.update(solver_order=order, solver_type=solver_type)
    trajectories = []
    for library in (ours, diffusers):
        scheduler = library.DPMSolverMultistepScheduler.from_config(config)
        scheduler.set_timesteps(20)
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        trajectory = [x]
        for t in scheduler.timesteps:
            x = scheduler.step(0.1 * x, t, x).prev_sample
            trajectory.append(x)
        trajectories.append(trajectory)
    mine, reference = trajectories
    assert reference[-1].isnan().all() and torch.isfinite(mine[-1]).all()
    assert max((a - b).abs().max().item() for a, b in zip(mine[:-1], reference[:-1])) < 1e-5
    assert torch.equal(mine[-1], mine[-2])
