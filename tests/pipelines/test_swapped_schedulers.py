"""Swapped decoder samplers (``pipe.scheduler = X.from_config(pipe.scheduler.config, **options)``, as Kubin, SD.Next
and scripts do) give the reference's latents for the same seed, in every decoder pipeline.

The schedulers are built from the tiny repos' official DDPM config, so they inherit its "leading" spacing with
``steps_offset`` 1. The reference runs with three of our deliberate fixes applied (``_with_our_fixes``), so that the
rest can be compared:

* it never calls ``scale_model_input``, so Euler's UNet inputs are ~σ times too large
  (``test_text2img_pipeline.test_a_sigma_scheduler_gets_its_model_input_scaled``);
* it passes ``generator`` to every ``scheduler.step``, and UniPC's, Heun's, DPM2's and DPM++ SDE's take none: a
  TypeError at the first step;
* its inpaint re-noises the kept region with the start latents, which a σ scheduler has multiplied by its init_noise_sigma
  (``test_inpaint_with_a_sigma_scheduler_renoises_the_kept_region_at_each_steps_level``).

Compared as latents, relative to their size: without clipping the tiny random UNet drives them to ~100 and float32
rounding (relative 1e-6) is all that differs. The reference's controlnet pipelines have no ``"latent"`` output; their
final latents come from their ``callback``.
"""

from __future__ import annotations

import inspect

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch

import kandinsky22

# name: (scheduler class, from_config options)
SCHEDULERS = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpm-karras-order3-sigma-min": (
        "DPMSolverMultistepScheduler",
        {"use_karras_sigmas": True, "solver_order": 3, "final_sigmas_type": "sigma_min"},
    ),
    "dpm-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpm-order1-heun": ("DPMSolverMultistepScheduler", {"solver_order": 1, "solver_type": "heun"}),
    "dpm-order3": ("DPMSolverMultistepScheduler", {"solver_order": 3}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "unipc-karras": ("UniPCMultistepScheduler", {"use_karras_sigmas": True}),
    "ddpm-thresholding": ("DDPMScheduler", {"clip_sample": False, "thresholding": True}),
    "ddim-no-clip": ("DDIMScheduler", {"clip_sample": False}),
    "lms": ("LMSDiscreteScheduler", {}),
    "lms-karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "dpm-single-order3": ("DPMSolverSinglestepScheduler", {"solver_order": 3}),
    "sde-dpm-single": ("DPMSolverSinglestepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "deis": ("DEISMultistepScheduler", {}),
    "deis-order3-karras": ("DEISMultistepScheduler", {"solver_order": 3, "use_karras_sigmas": True}),
    "heun": ("HeunDiscreteScheduler", {}),  # clip_sample from the official config: x̂₀ clamped to ±1
    "heun-karras": ("HeunDiscreteScheduler", {"use_karras_sigmas": True, "clip_sample": False}),
    "kdpm2": ("KDPM2DiscreteScheduler", {}),
    "kdpm2-a": ("KDPM2AncestralDiscreteScheduler", {}),
    # A fixed Brownian path: the reference seeds it from torch's global RNG otherwise (ours from the generator)
    "dpm++-sde": ("DPMSolverSDEScheduler", {"noise_sampler_seed": 7}),
    "dpm++-sde-karras": ("DPMSolverSDEScheduler", {"noise_sampler_seed": 11, "use_karras_sigmas": True}),
    "euler-exponential": ("EulerDiscreteScheduler", {"use_exponential_sigmas": True}),
    "dpm-beta": ("DPMSolverMultistepScheduler", {"use_beta_sigmas": True}),
    "unipc-exponential": ("UniPCMultistepScheduler", {"use_exponential_sigmas": True}),
    "heun-beta": ("HeunDiscreteScheduler", {"use_beta_sigmas": True, "clip_sample": False}),
    "kdpm2-exponential": ("KDPM2DiscreteScheduler", {"use_exponential_sigmas": True}),
    "dpm++-sde-beta": ("DPMSolverSDEScheduler", {"noise_sampler_seed": 5, "use_beta_sigmas": True}),
    "pndm": ("PNDMScheduler", {}),  # the official config has no skip_prk_steps: the Runge–Kutta warm-up
    "pndm-skip-prk": ("PNDMScheduler", {"skip_prk_steps": True}),
}

# (pipeline, scheduler, call options). Sizes are (height, width); `batch` is the number of image embeddings.
CASES = [
    ("text2img", "euler", {"steps": 3}),
    ("text2img", "euler-karras", {"steps": 5, "n": 2, "size": (64, 96)}),
    ("text2img", "euler-ancestral", {"steps": 3, "batch": 2, "guidance_scale": 1.0}),
    ("text2img", "dpm-karras-order3-sigma-min", {"steps": 5}),
    ("text2img", "unipc", {"steps": 3, "n": 2}),
    ("text2img", "ddpm-thresholding", {"steps": 3}),
    ("text2img", "ddim-no-clip", {"steps": 5}),
    ("img2img", "euler-karras", {"steps": 5, "strength": 0.3}),  # int(5 * 0.3) = 1 step
    ("img2img", "dpm-order3", {"steps": 7, "strength": 0.5, "n": 2, "size": (64, 96)}),
    ("img2img", "unipc", {"steps": 5, "strength": 1.0}),
    ("inpaint", "euler", {"steps": 3, "size": (64, 96)}),
    ("inpaint", "unipc-karras", {"steps": 5, "n": 2}),
    ("controlnet", "euler-ancestral", {"steps": 3, "n": 2}),
    ("controlnet", "dpm-order1-heun", {"steps": 3, "guidance_scale": 1.0}),
    ("controlnet_img2img", "euler-ancestral", {"steps": 5, "strength": 0.6}),
    ("text2img", "lms", {"steps": 6, "n": 2}),
    ("text2img", "dpm-single-order3", {"steps": 7}),
    ("text2img", "sde-dpm-single", {"steps": 4, "n": 2}),
    ("text2img", "deis-order3-karras", {"steps": 6}),
    ("img2img", "lms-karras", {"steps": 10, "strength": 0.6}),  # starts at index 4: order 1, 2, 3, 4 (see below)
    ("img2img", "dpm-single-order3", {"steps": 8, "strength": 0.5}),  # starts mid-group
    ("img2img", "deis", {"steps": 6, "strength": 0.7, "n": 2}),
    ("inpaint", "lms", {"steps": 5}),
    ("inpaint", "sde-dpm-single", {"steps": 4}),
    ("inpaint", "deis", {"steps": 4, "size": (64, 96)}),
    ("controlnet", "deis", {"steps": 3}),
    # Second-order samplers: two timesteps per step; img2img starts at index int(steps · strength) of that table
    ("text2img", "heun", {"steps": 3}),
    ("text2img", "heun-karras", {"steps": 4, "n": 2}),
    ("text2img", "kdpm2", {"steps": 3, "size": (64, 96)}),
    ("text2img", "kdpm2-a", {"steps": 3, "batch": 2}),
    ("img2img", "heun", {"steps": 5, "strength": 0.6}),
    ("img2img", "kdpm2", {"steps": 4, "strength": 1.0}),
    ("img2img", "kdpm2-a", {"steps": 4, "strength": 0.5, "n": 2}),
    ("inpaint", "heun", {"steps": 3}),
    ("inpaint", "kdpm2", {"steps": 3}),
    ("inpaint", "kdpm2-a", {"steps": 3, "n": 2}),
    ("controlnet", "kdpm2-a", {"steps": 3}),
    ("controlnet_img2img", "heun", {"steps": 4, "strength": 0.5}),
    ("text2img", "dpm++-sde", {"steps": 3, "n": 2}),
    ("text2img", "dpm++-sde-karras", {"steps": 4, "batch": 2}),
    ("img2img", "dpm++-sde", {"steps": 5, "strength": 0.6}),
    ("img2img", "dpm++-sde-karras", {"steps": 4, "strength": 1.0, "n": 2}),
    ("inpaint", "dpm++-sde", {"steps": 3, "size": (64, 96)}),
    ("controlnet", "dpm++-sde", {"steps": 3}),
    ("controlnet_img2img", "dpm++-sde-karras", {"steps": 4, "strength": 0.5}),
    # Exponential and beta σ
    ("text2img", "euler-exponential", {"steps": 5, "n": 2}),
    ("text2img", "dpm-beta", {"steps": 6}),
    ("img2img", "unipc-exponential", {"steps": 6, "strength": 0.5}),
    ("inpaint", "heun-beta", {"steps": 3}),
    ("controlnet_img2img", "dpm-beta", {"steps": 5, "strength": 0.6}),
    ("text2img", "kdpm2-exponential", {"steps": 4}),  # fractional float64 timesteps in the reference
    ("img2img", "dpm++-sde-beta", {"steps": 4, "strength": 0.7}),
    # PNDM: 4 steps are 13 model calls with the warm-up (12 of them Runge–Kutta stages); n + 1 without. img2img with
    # the warm-up only from the start (see test_pndm_img2img_with_the_runge_kutta_warm_up_needs_strength_1); without
    # it from index 1 (the repeated timestep) and 3 (past it: one step lost, as the reference)
    ("text2img", "pndm", {"steps": 5}),
    ("text2img", "pndm", {"steps": 4, "n": 2, "size": (64, 96)}),
    ("text2img", "pndm-skip-prk", {"steps": 3, "batch": 2}),
    ("img2img", "pndm", {"steps": 4, "strength": 1.0}),
    ("img2img", "pndm-skip-prk", {"steps": 5, "strength": 0.8}),
    ("img2img", "pndm-skip-prk", {"steps": 6, "strength": 0.5, "n": 2}),
    ("inpaint", "pndm", {"steps": 4}),
    ("inpaint", "pndm-skip-prk", {"steps": 3, "size": (64, 96)}),
    ("controlnet", "pndm", {"steps": 4}),
    ("controlnet_img2img", "pndm-skip-prk", {"steps": 5, "strength": 0.6}),
]

PIPELINES = {
    "text2img": ("KandinskyV22Pipeline", "decoder_repo"),
    "img2img": ("KandinskyV22Img2ImgPipeline", "decoder_repo"),
    "inpaint": ("KandinskyV22InpaintPipeline", "inpaint_repo"),
    "controlnet": ("KandinskyV22ControlnetPipeline", "controlnet_repo"),
    "controlnet_img2img": ("KandinskyV22ControlnetImg2ImgPipeline", "controlnet_repo"),
}


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def loaded(request) -> dict[str, tuple]:
    """(ours, reference) per repository, loaded once; each test builds its pipelines from their components."""
    pipes = {}
    for name, (ours_class, ref_class) in {
        "decoder_repo": ("KandinskyV22Pipeline", "KandinskyV22Pipeline"),
        "inpaint_repo": ("KandinskyV22InpaintPipeline", "KandinskyV22InpaintPipeline"),
        "controlnet_repo": ("KandinskyV22ControlnetPipeline", "KandinskyV22ControlnetPipeline"),
    }.items():
        folder = request.getfixturevalue(name)
        pipes[name] = (
            getattr(kandinsky22, ours_class).from_pretrained(folder),
            getattr(diffusers, ref_class).from_pretrained(folder),
        )
    return pipes


def _schedulers(name: str, ours_config, ref_config) -> tuple:
    class_name, options = SCHEDULERS[name]
    return (
        getattr(kandinsky22, class_name).from_config(ours_config, **options),
        getattr(diffusers, class_name).from_config(ref_config, **options),
    )


def _with_our_fixes(ref) -> torch.utils.hooks.RemovableHandle:
    """The reference pipeline ``ref`` with our two deliberate fixes (see the module docstring); returns the UNet hook's
    handle."""

    def scale_latent_channels(module, args, kwargs):
        sample = kwargs["sample"]
        latents = ref.scheduler.scale_model_input(sample[:, :4], kwargs["timestep"])
        kwargs["sample"] = torch.cat([latents, sample[:, 4:]], dim=1)
        return args, kwargs

    if "generator" not in inspect.signature(ref.scheduler.step).parameters:  # UniPC, LMS, DEIS, Heun, DPM2, DPM++ SDE
        step = ref.scheduler.step
        ref.scheduler.step = lambda *args, generator=None, **kwargs: step(*args, **kwargs)
    if type(ref.scheduler).__name__ == "LMSDiscreteScheduler":
        # Our LMS takes its order from the derivatives it holds (k-diffusion's rule); the reference from the step's
        # index in the schedule, which differs when a run starts mid-schedule (img2img): told the order, it agrees
        lms_step, lms = ref.scheduler.step, ref.scheduler
        ref.scheduler.step = lambda *args, **kwargs: lms_step(*args, order=min(len(lms.derivatives) + 1, 4), **kwargs)
    if type(ref).__name__ == "KandinskyV22InpaintPipeline":
        # Our inpaint re-noises the kept region with unit noise; the reference passes its start latents, which are
        # times init_noise_sigma (about σ_max for Euler, 1 for the DDPM family)
        add_noise = ref.scheduler.add_noise
        ref.scheduler.add_noise = lambda x, noise, t: add_noise(x, noise / ref.scheduler.init_noise_sigma, t)
    return ref.unet.register_forward_pre_hook(scale_latent_channels, with_kwargs=True)


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _image(size: tuple[int, int]) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, (*size, 3), dtype=np.uint8))


def _mask(size: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(size, dtype=np.float32)
    mask[size[0] // 4 : size[0] // 2 + 8, size[1] // 3 :] = 1
    return mask


@pytest.mark.parametrize(("pipeline", "scheduler", "options"), CASES, ids=[f"{p}-{s}" for p, s, _ in CASES])
def test_swapped_scheduler_gives_the_reference_latents(loaded, pipeline, scheduler, options):
    """Fix: text2img, inpaint and controlnet scaled the start noise by ``init_noise_sigma`` before ``set_timesteps``,
    i.e. by the σ of the table installed before the run (the full training range: 25.2 for these betas) instead of
    the run's (4.6 for 3 "leading" steps), so Euler swapped in from the official config started from the wrong noise
    level. The combined pipelines, which set the timesteps while checking their inputs, hid it."""
    class_name, repo = PIPELINES[pipeline]
    ours_loaded, ref_loaded = loaded[repo]
    ours_scheduler, ref_scheduler = _schedulers(scheduler, ours_loaded.scheduler.config, ref_loaded.scheduler.config)
    ours = _quiet(
        getattr(kandinsky22, class_name)(unet=ours_loaded.unet, scheduler=ours_scheduler, movq=ours_loaded.movq)
    )
    ref = _quiet(getattr(diffusers, class_name)(unet=ref_loaded.unet, scheduler=ref_scheduler, movq=ref_loaded.movq))
    hook = _with_our_fixes(ref)
    try:
        expected, got = _run_both(pipeline, ours, ref, options)
    finally:
        hook.remove()
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-4 + 1e-5 * expected.abs().max()


def _run_both(pipeline: str, ours, ref, options: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's final latents and ours for the same seed."""
    height, width = options.get("size", (64, 64))
    batch = options.get("batch", 1)
    common = {
        "image_embeds": torch.randn(batch, 32, generator=torch.Generator().manual_seed(10)),
        "negative_image_embeds": torch.randn(batch, 32, generator=torch.Generator().manual_seed(11)),
        "num_inference_steps": options["steps"],
        "num_images_per_prompt": options.get("n", 1),
        "guidance_scale": options.get("guidance_scale", 4.0),
    }
    if "strength" in options:
        common.update(image=_image((height, width)), strength=options["strength"])
    if pipeline == "inpaint":
        common.update(image=_image((height, width)), mask_image=_mask((height, width)))
    if pipeline.startswith("controlnet"):
        common["hint"] = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(2))
    ours_size = {"height": height, "width": width}
    # The reference's img2img resizes the image to (height=width, width=height) (reference-behaviour §5.8).
    ref_size = {"height": width, "width": height} if "strength" in options else ours_size
    got = ours(**common, **ours_size, generator=_gen(), output_type="latent").images
    if pipeline.startswith("controlnet"):  # no "latent" output: the last step's latents, from the callback
        seen = []
        ref(**common, **ref_size, generator=_gen(), output_type="np", callback=lambda i, t, x: seen.append(x))
        return seen[-1], got
    return ref(**common, **ref_size, generator=_gen(), output_type="latent").images, got


def test_combined_pipeline_swap_reaches_the_decoder_and_matches_the_reference(decoder_repo):
    """``combined.scheduler = X`` replaces the decoder's sampler (the reference keeps the old one in its
    ``decoder_pipe``, so it is set there too), and the result is the reference's."""
    ours = _quiet(kandinsky22.KandinskyV22CombinedPipeline.from_pretrained(decoder_repo))
    ref = _quiet(diffusers.KandinskyV22CombinedPipeline.from_pretrained(decoder_repo))
    ours.scheduler, ref.scheduler = _schedulers("euler-ancestral", ours.scheduler.config, ref.scheduler.config)
    assert ours.decoder_pipe.scheduler is ours.scheduler and ref.decoder_pipe.scheduler is not ref.scheduler
    ref.decoder_pipe.scheduler = ref.scheduler
    _with_our_fixes(ref.decoder_pipe)
    kwargs = {"num_inference_steps": 3, "prior_num_inference_steps": 3, "height": 64, "width": 64}
    kwargs.update(num_images_per_prompt=2, output_type="latent")
    got = ours("horse", generator=_gen(), **kwargs).images
    expected = ref("horse", generator=_gen(), **kwargs).images
    assert got.shape == (2, 4, 32, 32)
    assert (got - expected).abs().max() <= 1e-4 + 1e-5 * expected.abs().max()


def _img2img_pair(loaded, scheduler: str) -> tuple:
    ours_loaded, ref_loaded = loaded["decoder_repo"]
    ours_scheduler, ref_scheduler = _schedulers(scheduler, ours_loaded.scheduler.config, ref_loaded.scheduler.config)
    ours = kandinsky22.KandinskyV22Img2ImgPipeline(
        unet=ours_loaded.unet, scheduler=ours_scheduler, movq=ours_loaded.movq
    )
    ref = diffusers.KandinskyV22Img2ImgPipeline(unet=ref_loaded.unet, scheduler=ref_scheduler, movq=ref_loaded.movq)
    return _quiet(ours), _quiet(ref)


def _embeds(batch: int) -> dict[str, torch.Tensor]:
    return {
        "image_embeds": torch.randn(batch, 32, generator=torch.Generator().manual_seed(10)),
        "negative_image_embeds": torch.randn(batch, 32, generator=torch.Generator().manual_seed(11)),
    }


@pytest.mark.parametrize("scheduler", ["dpm-karras", "unipc-karras"])
def test_img2img_starting_on_a_timestep_listed_twice(loaded, scheduler):
    """50 Karras steps from the official config end [.., 5, 3, 1, 1, 0]; strength 0.06 keeps the last 3, from index 47.
    The reference looks t=1 up, takes index 48 and runs past the table (IndexError / AssertionError); we start at 47:
    the reference's result when told so with ``set_begin_index``."""
    ours, ref = _img2img_pair(loaded, scheduler)
    kwargs = {**_embeds(1), "image": _image((64, 64)), "height": 64, "width": 64, "num_inference_steps": 50}
    kwargs.update(strength=0.06, output_type="latent")
    set_timesteps = ref.scheduler.set_timesteps

    def set_timesteps_and_begin(*args, **options):
        set_timesteps(*args, **options)
        ref.scheduler.set_begin_index(47)

    ref.scheduler.set_timesteps = set_timesteps_and_begin
    got = ours(**kwargs, generator=_gen()).images
    assert ours.scheduler.timesteps[46:].tolist() == [3, 1, 1, 0]
    hook = _with_our_fixes(ref)
    try:
        expected = ref(**kwargs, generator=_gen()).images
    finally:
        hook.remove()
    assert (got - expected).abs().max() <= 1e-4 + 1e-5 * expected.abs().max()


def test_img2img_one_image_for_several_embeddings_gets_noise_per_sample(loaded):
    """As the reference given the image once per embedding (it broadcasts one noise draw to all samples otherwise)."""
    ours, ref = _img2img_pair(loaded, "dpm-order3")
    kwargs = {**_embeds(2), "height": 64, "width": 64, "num_inference_steps": 4, "strength": 0.5}
    kwargs["output_type"] = "latent"
    got = ours(**kwargs, image=_image((64, 64)), generator=_gen()).images
    expected = ref(**kwargs, image=[_image((64, 64))] * 2, generator=_gen()).images
    assert got.shape == (2, 4, 32, 32)
    assert (got - expected).abs().max() <= 1e-4 + 1e-5 * expected.abs().max()


@pytest.mark.parametrize("scheduler", ["dpm-karras-order3-sigma-min", "unipc", "euler-ancestral"])
@pytest.mark.parametrize("pipeline", ["img2img", "controlnet_img2img"])
def test_a_strength_that_leaves_no_step_is_refused_with_any_scheduler(loaded, pipeline, scheduler):
    """The reference fails inside ``add_noise`` (a RuntimeError about reshaping 0 elements)."""
    class_name, repo = PIPELINES[pipeline]
    ours_loaded = loaded[repo][0]
    ours_scheduler, _ = _schedulers(scheduler, ours_loaded.scheduler.config, {})
    pipe = getattr(kandinsky22, class_name)(unet=ours_loaded.unet, scheduler=ours_scheduler, movq=ours_loaded.movq)
    hint = {"hint": torch.rand(1, 3, 64, 64)} if pipeline == "controlnet_img2img" else {}
    with pytest.raises(ValueError, match=r"`strength`=0.1 with `num_inference_steps`=5 leaves no denoising step"):
        pipe(**_embeds(1), **hint, image=_image((64, 64)), height=64, width=64, num_inference_steps=5, strength=0.1)


@pytest.mark.parametrize("pipeline", ["img2img", "controlnet_img2img"])
def test_pndm_img2img_with_the_runge_kutta_warm_up_needs_strength_1(loaded, pipeline):
    """The reference's warm-up takes the noise levels of the full schedule's first entries whatever the strength
    (``test_schedulers_pndm``): it would transfer the barely noised image as if it were pure noise. We refuse before
    any model runs, and point to ``skip_prk_steps=True``."""
    class_name, repo = PIPELINES[pipeline]
    ours_loaded = loaded[repo][0]
    scheduler, _ = _schedulers("pndm", ours_loaded.scheduler.config, {})
    pipe = _quiet(getattr(kandinsky22, class_name)(unet=ours_loaded.unet, scheduler=scheduler, movq=ours_loaded.movq))
    hint = {"hint": torch.rand(1, 3, 64, 64)} if pipeline == "controlnet_img2img" else {}
    calls = []
    handle = ours_loaded.unet.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"start at step 4 .*strength < 1.*skip_prk_steps=True"):
            pipe(**_embeds(1), **hint, image=_image((64, 64)), height=64, width=64, num_inference_steps=8, strength=0.5)
    finally:
        handle.remove()
    assert not calls
    with pytest.raises(ValueError, match="num_inference_steps=3 is too few"):
        pipe(**_embeds(1), **hint, image=_image((64, 64)), height=64, width=64, num_inference_steps=3, strength=1.0)
