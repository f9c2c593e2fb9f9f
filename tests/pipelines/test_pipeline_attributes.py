"""The reference's pipeline attributes that scripts use: the running call's guidance scale and step count (and
guidance turned off by a callback), ``from_pipe``, ``config`` / ``name_or_path``, ``numpy_to_pil``,
``get_zero_embed`` and ``maybe_free_model_hooks``. Expected values come from the reference on the same checkpoints."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from kandinsky22 import (
    KandinskyV22CombinedPipeline,
    KandinskyV22Img2ImgCombinedPipeline,
    KandinskyV22Img2ImgPipeline,
    KandinskyV22InpaintPipeline,
    KandinskyV22Pipeline,
)

TOL = 1e-4


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def embeds(batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, 32, generator=gen(10)), torch.randn(batch, 32, generator=gen(11))


def guidance_off_at(step: int, names: list[str]):
    """A callback that records what the pipeline shows it, and turns guidance off after ``step`` as the reference's
    documentation shows (``pipe._guidance_scale = 0``, the positive halves of the doubled tensors)."""
    seen = []

    def callback(pipe, i, t, kwargs):
        seen.append((i, pipe.guidance_scale, pipe.do_classifier_free_guidance, pipe.num_timesteps))
        if i != step:
            return {}
        pipe._guidance_scale = 0.0
        return {name: kwargs[name].chunk(2)[1] for name in names}

    return callback, seen


def run_with_callback(pipe, step: int, names: list[str], **kwargs):
    callback, seen = guidance_off_at(step, names)
    out = pipe(**kwargs, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=names)
    return out, seen


def image(seed: int, mode: str = "RGB") -> PIL.Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels).convert(mode)


@pytest.mark.parametrize("kind", ["text2img", "img2img"])
def test_a_callback_turning_guidance_off_gives_the_reference_image(our_decoder, ref_decoder, kind):
    import diffusers

    ours, ref = our_decoder, ref_decoder
    kwargs = {"height": 64, "width": 64, "num_inference_steps": 4, "output_type": "np", "num_images_per_prompt": 2}
    if kind == "img2img":
        ours = KandinskyV22Img2ImgPipeline(**our_decoder.components)
        ref = diffusers.KandinskyV22Img2ImgPipeline(**ref_decoder.components)
        kwargs.update(image=image(1), strength=0.75)  # 3 of the 4 steps run
    positive, negative = embeds(1)
    kwargs.update(image_embeds=positive, negative_image_embeds=negative)
    a, seen_a = run_with_callback(ours, 1, ["image_embeds"], generator=gen(), **kwargs)
    b, seen_b = run_with_callback(ref, 1, ["image_embeds"], generator=gen(), **kwargs)
    steps = 3 if kind == "img2img" else 4
    expected = [(i, 4.0 if i < 2 else 0.0, i < 2, steps) for i in range(steps)]
    assert seen_a == seen_b == expected
    assert a.images.shape == (2, 64, 64, 3) and np.abs(a.images - b.images).max() < TOL
    # and the guidance did change the image
    c = ours(generator=gen(), **kwargs).images
    assert np.abs(a.images - c).max() > 1e-3


def test_a_callback_turning_guidance_off_in_inpaint_gives_the_reference_image(inpaint_repo):
    import diffusers

    # With clip_sample as in test_inpaint.py: the official inpaint config lets the tiny random UNet drive the latents
    # to ~25, where fp32 rounding reaches 1e-3 in the image.
    ours = KandinskyV22InpaintPipeline.from_pretrained(inpaint_repo)
    ours.scheduler = ours.scheduler.from_config(ours.scheduler.config, clip_sample=True)
    ref = diffusers.KandinskyV22InpaintPipeline.from_pretrained(inpaint_repo)
    ref.scheduler = diffusers.DDPMScheduler.from_config({**ref.scheduler.config, "clip_sample": True})
    mask = np.zeros((64, 64), dtype=np.float32)
    mask[16:48, 8:40] = 1
    positive, negative = embeds(1)
    kwargs = {"height": 64, "width": 64, "num_inference_steps": 3, "output_type": "np", "image": image(2)}
    kwargs.update(mask_image=mask, image_embeds=positive, negative_image_embeds=negative)
    names = ["image_embeds", "masked_image", "mask_image"]
    ref.set_progress_bar_config(disable=True)
    ours.set_progress_bar_config(disable=True)
    a, seen_a = run_with_callback(ours, 0, names, generator=gen(), **kwargs)
    b, seen_b = run_with_callback(ref, 0, names, generator=gen(), **kwargs)
    assert seen_a == seen_b and seen_a[-1] == (2, 0.0, False, 3)
    assert np.abs(a.images - b.images).max() < TOL


def test_a_callback_turning_guidance_off_in_the_prior_gives_the_reference_embeddings(our_prior, ref_prior):
    names = ["prompt_embeds", "text_encoder_hidden_states", "text_mask"]
    kwargs = {"prompt": "a red cat", "num_inference_steps": 4, "num_images_per_prompt": 2}
    a, seen_a = run_with_callback(our_prior, 1, names, generator=gen(), **kwargs)
    b, seen_b = run_with_callback(ref_prior, 1, names, generator=gen(), **kwargs)
    assert seen_a == seen_b and seen_a[-1] == (3, 0.0, False, 4)
    assert (a.image_embeds - b.image_embeds).abs().max() < TOL


def test_guidance_changed_without_the_batch_to_match_is_refused_naming_the_tensors(our_decoder):
    def off_only(pipe, i, t, kwargs):
        pipe._guidance_scale = 1.0
        return {}

    def nan(pipe, i, t, kwargs):
        pipe._guidance_scale = float("nan")
        return {}

    positive, negative = embeds(1)
    kwargs = {"height": 64, "width": 64, "num_inference_steps": 3, "output_type": "latent"}
    with pytest.raises(ValueError, match=r"at step 1, guidance_scale=1.0 needs a batch of 1 in \['image_embeds'\].*"
                       r"got batches \{'image_embeds': 2\}"):  # fmt: skip
        our_decoder(positive, negative, callback_on_step_end=off_only, **kwargs)
    with pytest.raises(ValueError, match=r"`pipe._guidance_scale` must be a finite number, got nan"):
        our_decoder(positive, negative, callback_on_step_end=nan, **kwargs)


def test_the_call_attributes_keep_the_last_calls_values(our_decoder):
    pipe = KandinskyV22Pipeline(**our_decoder.components)
    assert (pipe.guidance_scale, pipe.do_classifier_free_guidance, pipe.num_timesteps) == (None, False, None)
    positive, negative = embeds(1)
    pipe(positive, negative, height=64, width=64, num_inference_steps=2, guidance_scale=1.0, output_type="latent")
    assert (pipe.guidance_scale, pipe.do_classifier_free_guidance, pipe.num_timesteps) == (1.0, False, 2)


def test_from_pipe_shares_the_components_and_runs_as_the_reference(our_decoder, ref_decoder):
    import diffusers

    ours = KandinskyV22Img2ImgPipeline.from_pipe(our_decoder)
    ref = diffusers.KandinskyV22Img2ImgPipeline.from_pipe(ref_decoder)
    assert all(getattr(ours, n) is getattr(our_decoder, n) for n in ("unet", "scheduler", "movq"))
    assert ours.name_or_path == our_decoder.name_or_path == str(ref.name_or_path)
    positive, negative = embeds(1)
    kwargs = {"image": image(3), "height": 64, "width": 64, "num_inference_steps": 4, "output_type": "np"}
    a = ours(positive, negative_image_embeds=negative, generator=gen(), **kwargs).images
    b = ref(positive, negative_image_embeds=negative, generator=gen(), **kwargs).images
    assert np.abs(a - b).max() < TOL


def test_from_pipe_takes_replacements_and_refuses_what_it_cannot_build(our_decoder, our_prior, decoder_repo):
    scheduler = our_decoder.scheduler.from_config(our_decoder.scheduler.config)
    pipe = KandinskyV22Pipeline.from_pipe(our_decoder, scheduler=scheduler)
    assert pipe.scheduler is scheduler and pipe.unet is our_decoder.unet
    with pytest.raises(ValueError, match=r"KandinskyV22Pipeline has no components \['vae'\]"):
        KandinskyV22Pipeline.from_pipe(our_decoder, vae=None)
    with pytest.raises(ValueError, match=r"KandinskyV22PriorPipeline has no \['unet', 'movq'\]; pass them by name"):
        KandinskyV22Pipeline.from_pipe(our_prior)
    with pytest.raises(ValueError, match=r"from_pipe takes a kandinsky22 pipeline, got str"):
        KandinskyV22Pipeline.from_pipe("kandinsky-community/kandinsky-2-2-decoder")
    with pytest.raises(ValueError, match=r"`torch_dtype` must be a torch.dtype"):
        KandinskyV22Pipeline.from_pipe(our_decoder, torch_dtype="float16")
    combined = KandinskyV22CombinedPipeline.from_pretrained(decoder_repo)
    decoder = KandinskyV22Pipeline.from_pipe(combined)
    assert decoder.unet is combined.unet and decoder.name_or_path == str(decoder_repo)
    edit = KandinskyV22Img2ImgCombinedPipeline.from_pipe(combined)
    assert edit.prior_prior is combined.prior_prior and edit.decoder_pipe.unet is combined.unet


def test_config_and_name_or_path_are_the_references(our_decoder, ref_decoder, our_prior, ref_prior, decoder_repo):
    import diffusers

    def entries(pipe) -> dict:
        """The components' entries (another test's reference ``from_pipe`` may add private keys to its source) and
        the source as a string (the reference keeps the ``Path`` it was given; ours is a string)."""
        return {**{k: v for k, v in pipe.config.items() if not k.startswith("_")}, "from": str(pipe.name_or_path)}

    assert entries(our_decoder) == entries(ref_decoder) and entries(our_prior) == entries(ref_prior)
    assert our_decoder.config._name_or_path == our_decoder.name_or_path == str(decoder_repo)
    ours = KandinskyV22CombinedPipeline.from_pretrained(decoder_repo)
    ref = diffusers.KandinskyV22CombinedPipeline.from_pretrained(decoder_repo)
    assert entries(ours) == entries(ref) and len(ours.config) == 10
    assert KandinskyV22Pipeline(**our_decoder.components).name_or_path is None


def test_numpy_to_pil_and_get_zero_embed_are_the_references(our_decoder, ref_decoder, our_prior, ref_prior):
    array = np.random.default_rng(0).random((2, 8, 8, 3), dtype=np.float32)
    for ours, ref in zip(our_decoder.numpy_to_pil(array), ref_decoder.numpy_to_pil(array)):
        assert np.array_equal(np.asarray(ours), np.asarray(ref))
    assert KandinskyV22Pipeline.numpy_to_pil(array[:1, ..., :1])[0].mode == "L"
    ours = our_prior.get_zero_embed(3)
    ref = ref_prior.get_zero_embed(3)
    assert ours.shape == (3, 32) and (ours - ref).abs().max() < 1e-6
    assert our_prior.get_zero_embed(device="cpu").shape == (1, 32)
    with pytest.raises(ValueError, match=r"`batch_size` must be an integer >= 1, got 0"):
        our_prior.get_zero_embed(0)


def test_maybe_free_model_hooks_sends_the_active_model_back(decoder_repo):
    pipe = KandinskyV22Pipeline.from_pretrained(decoder_repo)
    pipe.enable_model_cpu_offload(device="cpu")
    pipe._use("unet")
    assert pipe._offload.active is pipe.unet
    pipe.maybe_free_model_hooks()
    assert pipe._offload.active is None
    KandinskyV22Pipeline(**pipe.components).maybe_free_model_hooks()  # without offloading: nothing to do
