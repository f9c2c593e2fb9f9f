"""Scheduler behaviour: config swapping and I/O against the reference, add_noise, input errors, copies, timesteps on
an accelerator (never read), generator lists and the global RNG."""

from __future__ import annotations

import copy
import inspect
import json
import logging

import diffusers
import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor as reference_randn_tensor
from test_schedulers_parity import CLASS_NAMES, CONFIGS, SHAPE, run, seeded, stand_in_model

import kandinsky22
import kandinsky22.schedulers as ours

# The reference converts torch tensors with np.array(..., copy=False) under numpy 2: noise, not our concern.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

DECODER = CONFIGS["decoder"]
COSINE = CONFIGS["cosine_learned"]
NON_SIGMA = ("DDPMScheduler", "DDIMScheduler", "UnCLIPScheduler", "PNDMScheduler")
SIGMA_CLASSES = [n for n in CLASS_NAMES if n not in NON_SIGMA]
# Non-default settings for the round trips, so that a lost key shows.
NON_DEFAULT = {
    "DDPMScheduler": DECODER,
    "DDIMScheduler": CONFIGS["ddim_test"],
    "UnCLIPScheduler": CONFIGS["prior"],
    "DPMSolverMultistepScheduler": {**DECODER, "solver_order": 3, "use_karras_sigmas": True, "solver_type": "heun"},
    "EulerDiscreteScheduler": {**DECODER, "use_karras_sigmas": True, "sigma_min": 0.05},
    "EulerAncestralDiscreteScheduler": {**DECODER, "timestep_spacing": "trailing"},
    "UniPCMultistepScheduler": {**DECODER, "disable_corrector": [1], "solver_type": "bh1", "predict_x0": False},
    "LMSDiscreteScheduler": {**DECODER, "use_karras_sigmas": True},
    "DPMSolverSinglestepScheduler": {**DECODER, "solver_order": 3, "algorithm_type": "sde-dpmsolver++"},
    "DEISMultistepScheduler": {**DECODER, "solver_order": 3, "lower_order_final": False},
    "HeunDiscreteScheduler": {**DECODER, "use_karras_sigmas": True, "clip_sample_range": 2.0},
    "KDPM2DiscreteScheduler": {**DECODER, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
    "KDPM2AncestralDiscreteScheduler": {**DECODER, "use_karras_sigmas": True},
    "DPMSolverSDEScheduler": {**DECODER, "use_karras_sigmas": True, "noise_sampler_seed": 5},
    "PNDMScheduler": {**DECODER, "skip_prk_steps": True, "set_alpha_to_one": True, "timestep_spacing": "trailing"},
}


def reference_config(scheduler) -> dict:
    return {k: v for k, v in scheduler.config.items() if not k.startswith("_")}


def test_top_level_names_are_the_scheduler_classes() -> None:
    for name in CLASS_NAMES:
        assert getattr(kandinsky22, name) is getattr(ours, name)


@pytest.mark.parametrize("base", [{}, COSINE], ids=["defaults", "cosine"])
@pytest.mark.parametrize("source", CLASS_NAMES)
def test_from_config_swaps_between_all_classes(source: str, base: dict, caplog: pytest.LogCaptureFixture) -> None:
    original = getattr(ours, source).from_config(base)
    for target in CLASS_NAMES:
        if target == "UnCLIPScheduler" and original.config.get("beta_schedule") != "squaredcos_cap_v2":
            with pytest.raises(ValueError, match="'linear'"):  # as the reference: UnCLIP needs the cosine schedule
                ours.UnCLIPScheduler.from_config(original.config)
            continue
        with caplog.at_level(logging.WARNING, logger="kandinsky22"):
            swapped = getattr(ours, target).from_config(original.config)
        assert not caplog.records, f"{source} → {target} warned: {caplog.text}"
        assert type(swapped).__name__ == target
        for key, value in swapped.config.items():
            if key == "solver_type" and "solver_type" in original.config:  # DPM ↔ UniPC types are mapped
                continue
            if key == "algorithm_type" and "algorithm_type" in original.config:  # DPM ↔ DEIS types are mapped
                continue
            expected = original.config[key] if key in original.config else swapped.config_defaults[key]
            assert value == expected, f"{source} → {target}: {key}"


@pytest.mark.parametrize("target", CLASS_NAMES)
def test_swap_from_the_official_decoder_config_matches_reference(target: str, tmp_path) -> None:
    """``pipe.scheduler = X.from_config(pipe.scheduler.config)`` on the decoder's DDPM scheduler, both libraries."""
    diffusers.DDPMScheduler(**DECODER).save_pretrained(tmp_path)
    reference_ddpm = diffusers.DDPMScheduler.from_pretrained(tmp_path)
    ddpm = ours.DDPMScheduler.from_pretrained(tmp_path)
    if target == "UnCLIPScheduler":  # linear betas: the reference refuses, and so do we
        with pytest.raises(ValueError, match="linear"):
            ours.UnCLIPScheduler.from_config(ddpm.config)
        return
    swapped = getattr(ours, target).from_config(ddpm.config)
    reference = getattr(diffusers, target).from_config(reference_ddpm.config)
    assert dict(swapped.config) == reference_config(reference)


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_save_and_load_round_trips_with_the_reference(name: str, tmp_path) -> None:
    scheduler = getattr(ours, name).from_config(NON_DEFAULT[name])
    scheduler.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == name
    loaded_by_reference = getattr(diffusers, name).from_pretrained(tmp_path / "ours")
    assert reference_config(loaded_by_reference) == dict(scheduler.config)

    loaded_by_reference.save_pretrained(tmp_path / "reference")
    loaded = getattr(ours, name).from_pretrained(tmp_path / "reference")
    assert dict(loaded.config) == dict(scheduler.config)
    nested = getattr(ours, name).from_pretrained(tmp_path, subfolder="ours", steps_offset=0)
    if "steps_offset" in nested.config:  # a keyword that is not a hub option overrides the config
        assert nested.config.steps_offset == 0


@pytest.mark.parametrize("name", [*CLASS_NAMES[:2], *SIGMA_CLASSES, "PNDMScheduler"])
def test_trained_betas_as_an_array_saves_like_the_reference(name: str, tmp_path) -> None:
    """The reference documents ``trained_betas`` as an array and writes it as a list; saving (and repr) failed."""
    betas = np.linspace(0.00085, 0.012, 1000)
    getattr(diffusers, name)(trained_betas=betas).save_pretrained(tmp_path / "reference")
    scheduler = getattr(ours, name)(trained_betas=betas)
    scheduler.save_pretrained(tmp_path / "ours")
    assert "trained_betas" in repr(scheduler)
    written = json.loads((tmp_path / "ours" / "scheduler_config.json").read_text())
    expected = json.loads((tmp_path / "reference" / "scheduler_config.json").read_text())
    assert written["trained_betas"] == expected["trained_betas"]
    loaded = getattr(ours, name).from_pretrained(tmp_path / "ours")
    assert torch.equal(loaded.alphas_cumprod, scheduler.alphas_cumprod)


def test_unknown_config_keys_are_ignored_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="kandinsky22"):
        scheduler = ours.DDPMScheduler.from_config({**DECODER, "made_up_key": 3, "_diffusers_version": "0.42.1"})
    assert "made_up_key" in caplog.text and "_diffusers_version" not in caplog.text
    assert "made_up_key" not in scheduler.config


def test_reference_defaulted_keys_take_this_class_defaults() -> None:
    """A reference config lists keys it never received in ``_use_default_values``; the target's defaults apply."""
    reference = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012)
    swapped = ours.DPMSolverMultistepScheduler.from_config(reference.config)
    assert swapped.config.timestep_spacing == "linspace"  # DPM's default, not DDPM's "leading"
    assert swapped.config.beta_end == 0.012


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_add_noise_matches_reference(name: str) -> None:
    config = COSINE if name == "UnCLIPScheduler" else DECODER
    scheduler, reference = getattr(ours, name).from_config(config), getattr(diffusers, name).from_config(config)
    scheduler.set_timesteps(25)
    reference.set_timesteps(25)
    generator = torch.Generator().manual_seed(1)
    original, noise = torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)
    if name in SIGMA_CLASSES:  # indexed by position in this run's timesteps
        timesteps = reference.timesteps[[3, 17]]
    else:
        timesteps = torch.tensor([0, 999])
    expected = reference.add_noise(original, noise, timesteps)
    torch.testing.assert_close(scheduler.add_noise(original, noise, timesteps), expected, rtol=0, atol=1e-6)
    # One timestep as a number or a 0-d tensor, for every sample (the reference takes a 1-d tensor only)
    one = timesteps[:1]
    expected = reference.add_noise(original, noise, one.expand(SHAPE[0]))
    for timestep in (one[0], one.item()):
        torch.testing.assert_close(scheduler.add_noise(original, noise, timestep), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_bad_input_raises_value_error_naming_the_value(name: str) -> None:
    cls = getattr(ours, name)
    config = COSINE if name == "UnCLIPScheduler" else DECODER
    scheduler = cls.from_config(config)
    with pytest.raises(ValueError, match="num_inference_steps=0"):
        scheduler.set_timesteps(0)
    with pytest.raises(ValueError, match="num_inference_steps=1001"):
        scheduler.set_timesteps(1001)
    with pytest.raises(ValueError, match="'cubic'"):
        cls.from_config(config, beta_schedule="cubic")
    with pytest.raises(ValueError, match="'flow'"):
        cls.from_config(config, prediction_type="flow")


def test_unclip_needs_two_steps() -> None:
    with pytest.raises(ValueError, match="num_inference_steps=1"):
        ours.UnCLIPScheduler.from_config(CONFIGS["prior"]).set_timesteps(1)


def test_unsupported_reference_options_are_refused() -> None:
    with pytest.raises(ValueError, match="use_lu_lambdas=True"):
        ours.DPMSolverMultistepScheduler(use_lu_lambdas=True)
    with pytest.raises(ValueError, match="'sde-dpmsolver\\+\\+'"):
        ours.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")


def continue_run(scheduler, sample: torch.Tensor, start: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    for t in scheduler.timesteps[start:]:
        output = stand_in_model(scheduler.scale_model_input(sample, t), t, 4)
        sample = scheduler.step(output, t, sample, generator=generator).prev_sample
    return sample


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda s: s.copy()], ids=["deepcopy", "copy"])
@pytest.mark.parametrize("name", ["DDPMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_copies_step_independently(name: str, clone) -> None:
    """A copy taken mid-run (random draws, solver history) continues exactly like the original, and stepping it
    leaves the original untouched — the server samples several requests with copies of one scheduler."""
    scheduler = getattr(ours, name).from_config({**DECODER, "solver_order": 3})
    scheduler.set_timesteps(12)
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    for t in scheduler.timesteps[:4]:
        sample = scheduler.step(stand_in_model(sample, t, 4), t, sample, generator=generator).prev_sample
    twin = clone(scheduler)
    from_twin = continue_run(twin, sample, 4, seed=2)
    from_original = continue_run(scheduler, sample, 4, seed=2)
    assert torch.equal(from_twin, from_original)
    fresh = getattr(ours, name).from_config({**DECODER, "solver_order": 3})
    fresh.set_timesteps(12)
    replay = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    replay_generator = torch.Generator().manual_seed(1)
    for t in fresh.timesteps[:4]:
        replay = fresh.step(stand_in_model(replay, t, 4), t, replay, generator=replay_generator).prev_sample
    assert torch.equal(continue_run(fresh, replay, 4, seed=2), from_original)


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_timesteps_on_an_accelerator_are_not_read(name: str) -> None:
    """A timestep tensor off the CPU (here on ``meta``, which cannot be read at all) is never synced: the step counter
    indexes the host tables, with the same result as Python ints."""
    config = COSINE if name == "UnCLIPScheduler" else DECODER
    expected = run(getattr(ours, name).from_config(config), 7, 8)[1]

    scheduler = getattr(ours, name).from_config(config)
    scheduler.set_timesteps(7)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(SHAPE, generator=generator) * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        on_device = t.to("meta")
        output = stand_in_model(scheduler.scale_model_input(sample, on_device), t, 8)
        kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        if name == "UnCLIPScheduler":
            kwargs["prev_timestep"] = timesteps[i + 1].to("meta") if i + 1 < len(timesteps) else None
        sample = scheduler.step(output, on_device, sample, **kwargs).prev_sample
    assert torch.equal(sample, expected)


@pytest.mark.parametrize("name", SIGMA_CLASSES)
def test_begin_index_starts_mid_schedule_like_the_reference(name: str) -> None:
    """img2img: the loop starts at ``t_start``. The reference finds it by value; with ``set_begin_index`` no timestep
    is read at all."""
    start = 3 if getattr(ours, name).order == 1 else 4  # a second-order table: the first evaluation of a step
    results = []
    for library, use_begin_index in ((diffusers, False), (ours, True)):
        scheduler = getattr(library, name).from_config(seeded(name, {**DECODER, "use_karras_sigmas": True}))
        scheduler.set_timesteps(10)
        generator = torch.Generator().manual_seed(0)
        sample = torch.randn(SHAPE, generator=generator)
        timesteps = scheduler.timesteps[start:]
        sample = scheduler.add_noise(sample, torch.randn(SHAPE, generator=generator), timesteps[:1].repeat(SHAPE[0]))
        if use_begin_index:
            scheduler.set_begin_index(start)
        for t in timesteps:
            passed = t.to("meta") if use_begin_index else t
            output = stand_in_model(scheduler.scale_model_input(sample, passed), t, 4)
            kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
            if (
                library is diffusers and name == "LMSDiscreteScheduler"
            ):  # our order fix: see test_schedulers_multistep_extra
                kwargs["order"] = min(len(scheduler.derivatives) + 1, 4)
            sample = scheduler.step(output, passed, sample, **kwargs).prev_sample
        results.append(sample)
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["DDPMScheduler", "EulerAncestralDiscreteScheduler", "UnCLIPScheduler"])
def test_per_sample_generators_match_reference(name: str) -> None:
    """A list of generators draws each sample's noise from its own generator, as the reference's ``randn_tensor``."""
    config = COSINE if name == "UnCLIPScheduler" else DECODER
    results = []
    for library in (diffusers, ours):
        scheduler = getattr(library, name).from_config(config)
        scheduler.set_timesteps(5)
        generators = [torch.Generator().manual_seed(seed) for seed in (10, 20)]
        sample = torch.cat([torch.randn((1, *SHAPE[1:]), generator=g) for g in generators])
        timesteps = scheduler.timesteps
        for i, t in enumerate(timesteps):
            output = stand_in_model(scheduler.scale_model_input(sample, t), t, 8 if config is COSINE else 4)
            kwargs = {}
            if name == "UnCLIPScheduler":
                kwargs["prev_timestep"] = timesteps[i + 1] if i + 1 < len(timesteps) else None
            sample = scheduler.step(output, t, sample, generator=generators, **kwargs).prev_sample
        results.append(sample)
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("generators", [1, 3], ids=["one", "list"])
def test_randn_tensor_matches_reference(generators: int) -> None:
    def make():
        gens = [torch.Generator().manual_seed(5 + i) for i in range(generators)]
        return gens[0] if generators == 1 else gens

    shape = (3, 4, 5, 5)
    expected = reference_randn_tensor(shape, generator=make(), device=torch.device("cpu"), dtype=torch.float32)
    assert torch.equal(ours.randn_tensor(shape, make(), "cpu", torch.float32), expected)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        ours.randn_tensor(shape, [torch.Generator(), torch.Generator()])


def test_no_generator_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(0)
    state = torch.get_rng_state()
    scheduler = ours.EulerAncestralDiscreteScheduler.from_config(DECODER)
    scheduler.set_timesteps(3)
    sample = torch.zeros(SHAPE)
    for t in scheduler.timesteps:
        sample = scheduler.step(stand_in_model(sample, t, 4), t, sample).prev_sample
    assert torch.equal(torch.get_rng_state(), state)
    assert sample.abs().sum() > 0  # noise was drawn, from a private generator


def test_return_dict_false_gives_the_reference_tuples() -> None:
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    ddpm = ours.DDPMScheduler.from_config(DECODER)
    ddpm.set_timesteps(3)
    prev_sample, x0 = ddpm.step(sample, ddpm.timesteps[0], sample, return_dict=False)
    assert prev_sample.shape == x0.shape == SHAPE
    dpm = ours.DPMSolverMultistepScheduler.from_config(DECODER)
    dpm.set_timesteps(3)
    (prev_sample,) = dpm.step(sample, dpm.timesteps[0], sample, return_dict=False)
    assert prev_sample.shape == SHAPE


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_step_output_indexes_like_the_reference(name: str) -> None:
    """The reference's own loops take ``scheduler.step(...)[0]``: its outputs index like a tuple of the fields that are
    set, and like a dict."""
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    outputs = []
    for library in (diffusers, ours):
        scheduler = getattr(library, name).from_config(NON_DEFAULT[name])
        scheduler.set_timesteps(5)
        t = scheduler.timesteps[0]
        takes_generator = "generator" in inspect.signature(scheduler.step).parameters
        kwargs = {"generator": torch.Generator().manual_seed(1)} if takes_generator else {}
        outputs.append(scheduler.step(stand_in_model(sample, t, 4), t, sample, **kwargs))
    expected, got = outputs
    assert len(got.to_tuple()) == len(expected.to_tuple())
    for i in range(len(expected.to_tuple())):
        torch.testing.assert_close(got[i], expected[i], rtol=0, atol=1e-5)
    torch.testing.assert_close(got["prev_sample"], expected["prev_sample"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_compatibles_are_the_references_that_kandinsky22_has(name: str) -> None:
    """``pipe.scheduler.compatibles`` lists the classes to swap to (the reference's, less those we do not have)."""
    expected = {cls.__name__ for cls in getattr(diffusers, name)().compatibles} & set(CLASS_NAMES)
    compatibles = getattr(ours, name)().compatibles
    assert {cls.__name__ for cls in compatibles} == expected
    assert all(cls is getattr(ours, cls.__name__) for cls in compatibles)


def test_ddim_with_eta_draws_noise_like_the_reference() -> None:
    results = []
    for library in (diffusers, ours):
        scheduler = library.DDIMScheduler.from_config(CONFIGS["ddim_test"])
        scheduler.set_timesteps(10)
        generator = torch.Generator().manual_seed(3)
        sample = torch.randn(SHAPE, generator=generator)
        for t in scheduler.timesteps:
            sample = scheduler.step(stand_in_model(sample, t, 4), t, sample, eta=0.7, generator=generator).prev_sample
        results.append((sample, torch.randn(3, generator=generator)))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=1e-5)
    assert torch.equal(results[1][1], results[0][1])


def test_signatures_take_the_reference_arguments_in_its_order() -> None:
    """Code written for the reference runs unchanged: ``set_timesteps`` and ``step`` take every argument the
    reference's do, at the same position and with the same default (so positional calls mean the same);
    kandinsky22's extras are keyword-only."""
    for name in CLASS_NAMES:
        for method in ("set_timesteps", "step"):
            reference = list(inspect.signature(getattr(getattr(diffusers, name), method)).parameters.values())[1:]
            params = list(inspect.signature(getattr(getattr(ours, name), method)).parameters.values())[1:]
            positional = [p for p in params if p.kind != inspect.Parameter.KEYWORD_ONLY]
            expected = [(p.name, p.default) for p in reference]
            assert [(p.name, p.default) for p in positional] == expected, f"{name}.{method}"


DPM_PLAIN = {**DECODER, "timestep_spacing": "linspace"}
# (class, set_timesteps keywords, what the message must name)
BAD_SCHEDULES = [
    *(
        (name, kwargs, match)
        for name in ("DDPMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler")
        for kwargs, match in (
            ({"timesteps": [999, 999, 500]}, r"strictly descending: timesteps\[1\]=999\.?0? follows timesteps\[0\]"),
            ({"timesteps": [100, 500]}, r"timesteps\[1\]=500\.?0? follows timesteps\[0\]=100"),
            ({"timesteps": [1000, 500]}, r"timesteps=\[1000, 500\] is out of range: 1000"),
            ({"timesteps": [500, -1]}, r"timesteps=\[500, -1\] is out of range: -1"),
            ({"timesteps": []}, r"timesteps=\[\] is empty"),
            ({"timesteps": [999, float("nan")]}, r"timesteps=\[999, nan\] must be finite"),
            ({"timesteps": [[999], [500]]}, r"timesteps must be a list of numbers, got \[\[999\], \[500\]\]"),
            ({"num_inference_steps": 10, "timesteps": [999, 500]}, r"num_inference_steps=10, timesteps=\[999, 500\]"),
            ({}, r"needs one of num_inference_steps, timesteps"),
        )
    ),
    ("DDPMScheduler", {"timesteps": [999.5, 500]}, r"timesteps=\[999.5, 500\] must be whole numbers"),
    ("DPMSolverMultistepScheduler", {"timesteps": [999, 500.25]}, r"timesteps=\[999, 500.25\] must be whole numbers"),
    ("DPMSolverMultistepScheduler", {"num_inference_steps": 10, "mu": 0.5}, r"mu=0.5 needs use_dynamic_shifting"),
    ("EulerDiscreteScheduler", {"timesteps": [999.5, 999.5]}, r"timesteps\[1\]=999.5 follows timesteps\[0\]=999.5"),
    ("EulerDiscreteScheduler", {"timesteps": [999], "sigmas": [1.0, 0.0]}, r"only one of timesteps, sigmas"),
    ("EulerDiscreteScheduler", {"sigmas": [14.0]}, r"sigmas=\[14.0\] has 1 value"),
    ("EulerDiscreteScheduler", {"sigmas": [1.0, 2.0, 0.0]}, r"sigmas\[1\]=2.0 follows sigmas\[0\]=1.0"),
    ("EulerDiscreteScheduler", {"sigmas": [1.0, -0.5]}, r"sigmas=\[1.0, -0.5\] must be non-negative"),
    ("EulerDiscreteScheduler", {"sigmas": []}, r"sigmas=\[\] is empty"),
    (
        "UniPCMultistepScheduler",
        {"num_inference_steps": 10, "sigmas": [1.0, 0.0]},
        r"sigmas=\[1.0, 0.0\] needs use_flow",
    ),
    ("UniPCMultistepScheduler", {"num_inference_steps": 10, "mu": 1.0}, r"mu=1.0 needs use_dynamic_shifting"),
]


@pytest.mark.parametrize(("name", "kwargs", "match"), BAD_SCHEDULES)
def test_bad_custom_schedules_raise_value_error_naming_the_value(name: str, kwargs: dict, match: str) -> None:
    scheduler = getattr(ours, name).from_config(DPM_PLAIN)
    with pytest.raises(ValueError, match=match):
        scheduler.set_timesteps(**kwargs)


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "EulerDiscreteScheduler"])
def test_custom_timesteps_with_karras_sigmas_are_refused_like_the_reference(name: str) -> None:
    config = {**DECODER, "use_karras_sigmas": True}
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        getattr(diffusers, name).from_config(config).set_timesteps(timesteps=[999, 500])
    with pytest.raises(ValueError, match=r"timesteps=\[999, 500\] cannot be used with use_karras_sigmas=True"):
        getattr(ours, name).from_config(config).set_timesteps(timesteps=[999, 500])


def test_bad_step_options_raise_value_error_naming_the_value() -> None:
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    euler = ours.EulerDiscreteScheduler.from_config(DECODER)
    euler.set_timesteps(5)
    with pytest.raises(ValueError, match="s_churn=-1.0 must be >= 0"):
        euler.step(sample, euler.timesteps[0], sample, s_churn=-1.0)
    ddim = ours.DDIMScheduler.from_config(DECODER)
    ddim.set_timesteps(5)
    t = ddim.timesteps[0]
    with pytest.raises(ValueError, match="either generator or variance_noise"):
        ddim.step(sample, t, sample, eta=0.5, generator=torch.Generator(), variance_noise=sample)
    with pytest.raises(ValueError, match=r"variance_noise has shape \(1, 4, 6, 6\); it must match the sample's"):
        ddim.step(sample, t, sample, eta=0.5, variance_noise=sample[:1])


def test_euler_churn_draws_noise_only_inside_its_window() -> None:
    """Karras et al.'s churn applies where s_tmin ≤ σ ≤ s_tmax: one draw per such step, none elsewhere."""
    scheduler = ours.EulerDiscreteScheduler.from_config(DECODER)
    scheduler.set_timesteps(12)
    levels = scheduler.sigmas[:-1]
    inside = int(((levels >= 0.5) & (levels <= 5.0)).sum())
    assert 0 < inside < len(levels)
    generator = torch.Generator().manual_seed(0)
    sample = torch.zeros(SHAPE)
    for t in scheduler.timesteps:
        output = stand_in_model(scheduler.scale_model_input(sample, t), t, 4)
        sample = scheduler.step(
            output, t, sample, s_churn=40.0, s_tmin=0.5, s_tmax=5.0, generator=generator
        ).prev_sample
    replay = torch.Generator().manual_seed(0)
    for _ in range(inside):
        torch.randn(SHAPE, generator=replay)
    assert torch.equal(torch.randn(3, generator=generator), torch.randn(3, generator=replay))


@pytest.mark.parametrize(
    ("name", "schedule", "step_options"),
    [
        ("DDPMScheduler", {"timesteps": [999, 600, 421, 37, 0]}, {}),
        ("DPMSolverMultistepScheduler", {"timesteps": [999, 600, 421, 37]}, {}),
        ("EulerDiscreteScheduler", {"sigmas": [14.0, 3.0, 1.0, 0.3, 0.0]}, {"s_churn": 2.0, "s_tmin": 0.5}),
    ],
)
def test_custom_schedules_never_read_timesteps_on_an_accelerator(name: str, schedule: dict, step_options: dict) -> None:
    """With a custom table (and churn) too, a timestep off the CPU is not read: the step counter indexes the host
    tables, with the same result as host timesteps."""
    expected = run(getattr(ours, name).from_config(DECODER), 0, 4, schedule=schedule, step_options=step_options)[1]
    scheduler = getattr(ours, name).from_config(DECODER)
    scheduler.set_timesteps(**schedule)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(SHAPE, generator=generator) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        on_device = t.to("meta")
        output = stand_in_model(scheduler.scale_model_input(sample, on_device), t, 4)
        sample = scheduler.step(output, on_device, sample, generator=generator, **step_options).prev_sample
    assert torch.equal(sample, expected)


def test_ddpm_previous_timestep_follows_the_custom_list_like_the_reference() -> None:
    custom = [999, 600, 421, 37, 5]
    results = []
    for library in (diffusers, ours):
        scheduler = library.DDPMScheduler.from_config(DECODER)
        before = [int(scheduler.previous_timestep(t)) for t in (999, 1, 0)]  # before set_timesteps: t − 1
        scheduler.set_timesteps(timesteps=custom)
        flags = [scheduler.custom_timesteps]
        custom_prev = [int(scheduler.previous_timestep(t)) for t in custom]
        scheduler.set_timesteps(10)
        flags.append(scheduler.custom_timesteps)
        results.append((before, custom_prev, flags))
    assert results[1] == results[0]
    assert results[1][1] == [600, 421, 37, 5, -1]


@pytest.mark.parametrize(
    ("name", "config", "schedule"),
    [
        ("DDPMScheduler", DECODER, {"timesteps": [999, 500, 20]}),
        ("DPMSolverMultistepScheduler", {**DECODER, "solver_order": 3, "solver_type": "heun"}, {"timesteps": [999, 9]}),
        ("EulerDiscreteScheduler", NON_DEFAULT["EulerDiscreteScheduler"], {"sigmas": [10.0, 2.0, 0.5, 0.0]}),
        ("EulerDiscreteScheduler", {**DECODER, "final_sigmas_type": "sigma_min"}, {"timesteps": [998.5, 9.25]}),
    ],
)
def test_custom_schedules_leave_the_config_to_save_and_load(name: str, config: dict, schedule: dict, tmp_path) -> None:
    """A custom table is per run, not configuration: the config saves and loads as before (readable by the reference),
    and the loaded scheduler given the same call builds the same tables."""
    scheduler = getattr(ours, name).from_config(config)
    before = dict(scheduler.config)
    scheduler.set_timesteps(**schedule)
    assert dict(scheduler.config) == before
    scheduler.save_pretrained(tmp_path)
    assert reference_config(getattr(diffusers, name).from_pretrained(tmp_path)) == before
    loaded = getattr(ours, name).from_pretrained(tmp_path)
    assert dict(loaded.config) == before
    loaded.set_timesteps(**schedule)
    assert torch.equal(loaded.timesteps, scheduler.timesteps)
    assert not hasattr(scheduler, "sigmas") or torch.equal(loaded.sigmas, scheduler.sigmas)
    swapped = getattr(ours, name).from_config(scheduler.config)
    assert dict(swapped.config) == before
