"""Text2img decoder: parity with the reference, the shared loop's callbacks, the fixes, the input errors."""

from __future__ import annotations

import warnings

import numpy as np
import PIL.Image
import pytest
import torch

from kandinsky22 import DDIMScheduler, EulerDiscreteScheduler, ImagePipelineOutput, KandinskyV22Pipeline

TOL = 1e-4


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def embeds(batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, 32, generator=gen(10)), torch.randn(batch, 32, generator=gen(11))


def run_both(ours, ref, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    kwargs = {"height": 64, "width": 64, "num_inference_steps": 2, "output_type": "np", **kwargs}
    a = ours(generator=gen(), **kwargs).images
    b = ref(generator=gen(), **kwargs).images
    return a, b


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"height": 64, "width": 128, "num_inference_steps": 3},
        {"num_images_per_prompt": 2, "batch": 2},
        {"guidance_scale": 1.0},
    ],
    ids=["square", "non-square", "2x2", "no-guidance"],
)
def test_text2img_matches_reference_with_official_ddpm(our_decoder, ref_decoder, kwargs):
    kwargs = dict(kwargs)
    positive, negative = embeds(kwargs.pop("batch", 1))
    a, b = run_both(our_decoder, ref_decoder, image_embeds=positive, negative_image_embeds=negative, **kwargs)
    assert a.shape == b.shape and np.abs(a - b).max() < TOL


def test_text2img_matches_reference_with_ddim(our_decoder, ref_decoder):
    import diffusers

    config = {"beta_schedule": "linear", "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False}
    ours = KandinskyV22Pipeline(**{**our_decoder.components, "scheduler": DDIMScheduler(**config, steps_offset=1)})
    ref = diffusers.KandinskyV22Pipeline(
        **{**ref_decoder.components, "scheduler": diffusers.DDIMScheduler(**config, steps_offset=1)}
    )
    for pipe in (ours, ref):
        pipe.set_progress_bar_config(disable=True)
    positive, negative = embeds(2)
    # Compared as latents: DDIM without clipping lets the tiny random UNet drive latents to ~15, and the random MoVQ
    # amplifies float32 rounding (relative 1e-6) to ~1e-4 in pixels.
    a, b = run_both(ours, ref, image_embeds=positive, negative_image_embeds=negative, output_type="latent")
    assert a.shape == (2, 4, 32, 32) and (a - b).abs().max() < TOL


def test_callback_changing_latents_and_embeds_return_tuple_and_generator_list_match_reference(our_decoder, ref_decoder):
    seen = []

    def callback(pipe, i, t, kwargs):
        seen.append((i, int(t), sorted(kwargs)))
        return {"latents": kwargs["latents"] * 0.8, "image_embeds": kwargs["image_embeds"] + 0.1} if i == 0 else {}

    positive, negative = embeds(2)
    kwargs = {
        "height": 64,
        "width": 64,
        "num_inference_steps": 3,
        "output_type": "latent",
        "return_dict": False,
        "callback_on_step_end": callback,
        "callback_on_step_end_tensor_inputs": ["latents", "image_embeds", "negative_image_embeds"],
    }
    ours = our_decoder(positive, negative, generator=[gen(1), gen(2)], **kwargs)
    ours_seen, seen[:] = list(seen), []
    ref = ref_decoder(positive, negative, generator=[gen(1), gen(2)], **kwargs)
    assert isinstance(ours, tuple) and len(ours) == 1
    assert ours[0].shape == (2, 4, 32, 32) and (ours[0] - ref[0]).abs().max() < TOL
    assert ours_seen == seen and [i for i, _, _ in seen] == [0, 1, 2]
    assert seen[0][2] == ["image_embeds", "latents", "negative_image_embeds"]


def test_latents_argument_matches_reference_and_legacy_callback_runs(our_decoder, ref_decoder):
    positive, negative = embeds()
    latents = torch.randn(1, 4, 32, 32, generator=gen(7))
    steps = []
    a, b = run_both(our_decoder, ref_decoder, image_embeds=positive, negative_image_embeds=negative, latents=latents)
    assert np.abs(a - b).max() < TOL
    our_decoder(positive, negative, height=64, width=64, num_inference_steps=3, output_type="latent",
                callback=lambda i, t, x: steps.append(i))  # fmt: skip
    assert steps == [0, 1, 2]  # the reference crashes when callback_steps is not given (issue #13596, 5)


def test_a_list_of_one_generator_serves_the_whole_batch_as_in_the_reference(our_decoder, ref_decoder):
    """The reference (and our noise function) take ``[g]`` as ``g``; the pipelines' own check refused it for n > 1."""
    positive, negative = embeds(2)
    kwargs = {"height": 64, "width": 64, "num_inference_steps": 2, "output_type": "np", "num_images_per_prompt": 2}
    ours = our_decoder(positive, negative, generator=[gen(3)], **kwargs).images
    ref = ref_decoder(positive, negative, generator=[gen(3)], **kwargs).images
    assert ours.shape == (4, 64, 64, 3) and np.abs(ours - ref).max() < 1e-4


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_a_sigma_scheduler_gets_its_model_input_scaled(our_decoder):
    """Fix: the reference's decoders multiply the start latents by ``init_noise_sigma`` but never call
    ``scale_model_input``, so Euler's UNet inputs are ~15x too large. The first UNet input must be the reference
    scheduler's ``scale_model_input`` of the start latents (computed with diffusers' own Euler)."""
    import diffusers

    config = {"beta_schedule": "linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1}
    ours = KandinskyV22Pipeline(**{**our_decoder.components, "scheduler": EulerDiscreteScheduler(**config)})
    ours.set_progress_bar_config(disable=True)
    seen: list[torch.Tensor] = []
    hook = ours.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        latents = torch.randn(1, 4, 32, 32, generator=gen(5))
        ours(*embeds(), latents=latents, height=64, width=64, num_inference_steps=3, output_type="latent")
    finally:
        hook.remove()
    reference = diffusers.EulerDiscreteScheduler(**config)
    reference.set_timesteps(3)
    start = latents * reference.init_noise_sigma
    expected = reference.scale_model_input(torch.cat([start, start]), reference.timesteps[0])
    assert torch.allclose(seen[0], expected, atol=1e-6) and reference.init_noise_sigma > 10


def test_no_guidance_works_for_several_images_and_any_embedding_dtype(our_decoder):
    """The reference crashes here (§5.1): embeddings not repeated per image, nor cast, without guidance."""
    positive, negative = embeds()
    kwargs = {"height": 64, "width": 64, "num_inference_steps": 2, "guidance_scale": 1.0, "output_type": "np"}
    both = our_decoder(
        positive.double(), negative.double(), num_images_per_prompt=2, generator=[gen(1), gen(2)], **kwargs
    )
    first = our_decoder(positive, negative, generator=gen(1), **kwargs).images
    second = our_decoder(positive, negative, generator=gen(2), **kwargs).images
    assert np.abs(both.images - np.concatenate([first, second])).max() < TOL


def test_pt_output_is_nchw_in_unit_range_and_equals_np(our_decoder):
    positive, negative = embeds()
    kwargs = {"height": 64, "width": 64, "num_inference_steps": 2}
    pt = our_decoder(positive, negative, output_type="pt", generator=gen(), **kwargs).images
    arr = our_decoder(positive, negative, output_type="np", generator=gen(), **kwargs).images
    pil = our_decoder(positive, negative, generator=gen(), **kwargs).images
    assert pt.shape == (1, 3, 64, 64) and pt.dtype == torch.float32 and pt.min() >= 0 and pt.max() <= 1
    assert np.abs(pt.permute(0, 2, 3, 1).numpy() - arr).max() < 1e-6
    assert isinstance(pil[0], PIL.Image.Image) and np.array_equal(np.asarray(pil[0]), (arr[0] * 255).round())


def test_sizes_round_up_as_the_reference_with_one_warning_naming_the_size(our_decoder, ref_decoder):
    """Rounded up to a multiple of scale_factor² px (64 for the official MoVQ; 4 for the tiny one)."""
    positive, negative = embeds()
    kwargs = {"height": 50, "width": 70, "num_inference_steps": 2, "output_type": "np"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = our_decoder(positive, negative, generator=gen(), **kwargs).images
    b = ref_decoder(positive, negative, generator=gen(), **kwargs).images
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1 and f"{b.shape[1]}x{b.shape[2]}" in messages[0] and b.shape[1:3] != (50, 70)
    assert a.shape == b.shape and np.abs(a - b).max() < TOL


def test_progress_bar_config(our_decoder, capsys):
    pipe = KandinskyV22Pipeline(**our_decoder.components)
    positive, negative = embeds()
    pipe.set_progress_bar_config(desc="decoding")
    pipe(positive, negative, height=64, width=64, num_inference_steps=2, output_type="latent")
    assert "decoding" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    pipe(positive, negative, height=64, width=64, num_inference_steps=2, output_type="latent")
    assert "decoding" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_embeds": torch.zeros(1, 16)}, "image_embeds"),
        ({"image_embeds": torch.zeros(32)}, "image_embeds"),
        ({"negative_image_embeds": torch.zeros(3, 32), "image_embeds": torch.zeros(2, 32)}, "negative_image_embeds"),
        ({"height": 0}, "height"),
        ({"width": -64}, "width"),
        ({"output_type": "jpeg"}, "output_type"),
        ({"callback_on_step_end_tensor_inputs": ["latents", "noise_pred"]}, "noise_pred"),
        ({"generator": [torch.Generator()] * 2}, "generator"),
        ({"latents": torch.zeros(1, 4, 16, 16)}, "latents"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"callback_steps": 0}, "callback_steps"),
        ({"guidance_scale": float("nan")}, r"`guidance_scale` must be a finite number, got nan"),
        ({"guidance_scale": float("inf")}, r"`guidance_scale` must be a finite number, got inf"),
        ({"guidance_scale": "4"}, r"`guidance_scale` must be a finite number, got '4'"),
        ({"guidance_scale": None}, r"`guidance_scale` must be a finite number, got None"),
        # the official DDPM config ("leading", steps_offset 1) reaches timestep 1000 at 1000 steps: an IndexError
        # inside the first step (in the reference too)
        ({"num_inference_steps": 1000}, r"`num_inference_steps`=1000 gives timestep 1000 .* past the 1000 trained"),
        # a TypeError after the first step, or at entry one that named nothing
        ({"callback_on_step_end": "save"}, r"`callback_on_step_end` must be a callable or None, got str"),
        ({"callback": 3}, r"`callback` must be a callable or None, got int"),
        ({"callback_on_step_end_tensor_inputs": 1.5}, r"`callback_on_step_end_tensor_inputs` must be a list of names"),
        ({"callback_on_step_end_tensor_inputs": "latents"}, r"`callback_on_step_end_tensor_inputs` must be a list"),
        (
            {"latents": [torch.zeros(1, 4, 32, 32)]},
            r"`latents` must be a torch.Tensor of shape \(1, 4, 32, 32\), got list",
        ),
        ({"latents": np.zeros((1, 4, 32, 32), np.float32)}, r"`latents` must be a torch.Tensor .*got ndarray"),
        (
            {"image_embeds": [torch.zeros(1, 32), torch.zeros(1, 16)]},
            r"`image_embeds\[1\]` must have shape \(batch, 32\)",
        ),
    ],
)
def test_text2img_input_errors(our_decoder, kwargs, match):
    positive, negative = embeds()
    kwargs = {"image_embeds": positive, "negative_image_embeds": negative, "height": 64, "width": 64, **kwargs}
    with pytest.raises(ValueError, match=match):
        our_decoder(num_inference_steps=kwargs.pop("num_inference_steps", 2), **kwargs)


def test_output_class_access(our_decoder):
    positive, negative = embeds()
    out = our_decoder(positive, negative, height=64, width=64, num_inference_steps=2, output_type="latent")
    assert isinstance(out, ImagePipelineOutput)
    assert out[0] is out.images is out["images"] is out.to_tuple()[0]
    (images,) = out
    assert images is out.images
