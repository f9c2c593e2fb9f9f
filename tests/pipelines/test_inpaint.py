"""KandinskyV22InpaintPipeline: parity with the reference on the tiny inpaint repo, the fixes, the input errors.

The official inpaint scheduler does not clip x0 (clip_sample false), so with random tiny weights the latents grow to
~25 and the tiny MoVQ decoder turns fp32 rounding differences (1e-6 relative) into 1e-3 in the image. The image
parity tests therefore run both pipelines with the decoder repo's scheduler config (clip_sample true, latents stay
near 1); one test compares the official config at the latent level, relative to the latents' size.
"""

from __future__ import annotations

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch

from kandinsky22 import DDPMScheduler, KandinskyV22InpaintPipeline

ATOL = 1e-4  # fp32, np outputs in [0, 1]


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def official(inpaint_repo):
    """(reference, ours) with the repo's own scheduler."""
    ref = diffusers.KandinskyV22InpaintPipeline.from_pretrained(inpaint_repo)
    return _quiet(ref), _quiet(KandinskyV22InpaintPipeline.from_pretrained(inpaint_repo))


@pytest.fixture(scope="module")
def ref(official):
    pipe = official[0]
    scheduler = diffusers.DDPMScheduler.from_config({**pipe.scheduler.config, "clip_sample": True})
    return _quiet(diffusers.KandinskyV22InpaintPipeline(unet=pipe.unet, scheduler=scheduler, movq=pipe.movq))


@pytest.fixture(scope="module")
def ours(official):
    pipe = official[1]
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config, clip_sample=True)
    return _quiet(KandinskyV22InpaintPipeline(unet=pipe.unet, scheduler=scheduler, movq=pipe.movq))


def _embeds(batch: int = 1) -> dict[str, torch.Tensor]:
    return {
        "image_embeds": torch.randn(batch, 32, generator=torch.Generator().manual_seed(0)),
        "negative_image_embeds": torch.randn(batch, 32, generator=torch.Generator().manual_seed(1)),
    }


def _image(seed: int = 0, size: tuple[int, int] = (64, 64)) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def _mask(seed: int = 0, size: tuple[int, int] = (64, 64)) -> np.ndarray:
    """1 (repaint) in a random rectangle."""
    rng = np.random.default_rng(seed + 100)
    mask = np.zeros(size, dtype=np.float32)
    top, left = rng.integers(0, size[0] // 2), rng.integers(0, size[1] // 2)
    mask[top : top + size[0] // 2, left : left + size[1] // 2] = 1
    return mask


def _seed(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _close(ours_out: np.ndarray, ref_out: np.ndarray) -> None:
    assert ours_out.shape == ref_out.shape
    np.testing.assert_allclose(ours_out, ref_out, atol=ATOL, rtol=0)


def _common(steps: int, guidance_scale: float = 4.0, **extra) -> dict:
    return {"height": 64, "width": 64, "num_inference_steps": steps, "guidance_scale": guidance_scale, **extra}


# ---------------------------------------------------------------------------------------------------------------------
# Parity
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("image_mode", "mask_mode"), [("RGB", "L"), ("RGBA", "1")])
def test_parity_pil(ref, ours, image_mode, mask_mode):
    """PIL inputs, resized by both (96 px mask, 80x56 image); ours also takes RGBA images and mode "1" masks."""
    image = _image(0, (80, 56))
    mask = PIL.Image.fromarray((_mask(0, (96, 96)) * 255).astype(np.uint8))
    kwargs = {**_embeds(), **_common(3), "output_type": "np"}
    expected = ref(**kwargs, image=image, mask_image=mask, generator=_seed()).images
    out = ours(**kwargs, image=image.convert(image_mode), mask_image=mask.convert(mask_mode), generator=_seed())
    _close(out.images, expected)


def test_parity_numpy_without_guidance(ref, ours):
    """uint8 HWC image; a float mask at twice the size (both resize it to the latents); guidance_scale 1."""
    image = np.asarray(_image(1))
    mask = _mask(1, (128, 128))
    kwargs = {**_embeds(), **_common(2, guidance_scale=1.0), "output_type": "np"}
    expected = ref(**kwargs, image=image, mask_image=mask.copy(), generator=_seed()).images
    _close(ours(**kwargs, image=image, mask_image=mask, generator=_seed()).images, expected)


def test_parity_tensors_images_per_prompt(ref, ours):
    """[-1, 1] image tensor, a non-binary mask tensor (left unchanged), 2 images per embedding, 2 generators."""
    image = torch.rand(1, 3, 64, 64, generator=_seed(3)) * 2 - 1
    mask = torch.from_numpy(_mask(3)) * 0.4 + torch.rand(64, 64, generator=_seed(4)) * 0.6
    before = mask.clone()
    kwargs = {**_embeds(), **_common(2), "num_images_per_prompt": 2, "output_type": "np"}
    expected = ref(**kwargs, image=image, mask_image=mask.clone(), generator=[_seed(0), _seed(1)]).images
    out = ours(**kwargs, image=image, mask_image=mask, generator=[_seed(0), _seed(1)]).images
    assert torch.equal(mask, before)  # the reference binarizes the caller's mask in place
    _close(out, expected)


def test_parity_official_scheduler_latents(official):
    """The repo's unclipped scheduler: latents agree to fp32 precision relative to their size."""
    ref, ours = official
    kwargs = {**_embeds(), **_common(3), "image": _image(2), "mask_image": _mask(2), "output_type": "latent"}
    expected = ref(**kwargs, generator=_seed()).images
    out = ours(**kwargs, generator=_seed()).images
    assert out.shape == expected.shape
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()


# ---------------------------------------------------------------------------------------------------------------------
# Fixes
# ---------------------------------------------------------------------------------------------------------------------


def test_keep_unmasked_returns_the_input_outside_the_mask(ours):
    """keep_unmasked: the input's own pixels where the mask is 0 (without it, MoVQ's round trip changes them), the
    usual result where it is 1, a mix where a soft mask lies in between; batches and images per prompt alike."""
    images = [_image(6), _image(7)]
    mask = _mask(6)
    mask[:8, :8] = 0.25  # a soft corner: a quarter of the way to the generated image
    kwargs = {**_embeds(2), **_common(2), "image": images, "mask_image": mask, "num_images_per_prompt": 2}
    plain = ours(**kwargs, generator=_seed(), output_type="pt").images
    kept = ours(**kwargs, generator=_seed(), output_type="pt", keep_unmasked=True).images
    originals = torch.stack([torch.from_numpy(np.array(i)).permute(2, 0, 1) for i in images]).float() / 255
    originals = originals.repeat_interleave(2, dim=0)
    repaint = torch.from_numpy(mask)[None, None]
    outside, inside = repaint == 0, repaint == 1
    assert (plain - originals).abs().amax(dim=1, keepdim=True)[outside.expand_as(plain[:, :1])].max() > 0.01
    assert (kept - originals).abs().amax(dim=1, keepdim=True)[outside.expand_as(kept[:, :1])].max() <= 1e-6
    assert torch.equal(kept[inside.expand_as(kept)], plain[inside.expand_as(plain)])
    expected_corner = 0.75 * originals[..., :8, :8] + 0.25 * plain[..., :8, :8]
    torch.testing.assert_close(kept[..., :8, :8], expected_corner, atol=1e-6, rtol=0)
    # uint8 pictures: the kept region is the input's bytes exactly
    pil = ours(**{**kwargs, "num_images_per_prompt": 1}, generator=_seed(), keep_unmasked=True).images
    for image, original in zip(pil, images):
        got, want = np.asarray(image), np.asarray(original)
        assert np.array_equal(got[mask == 0], want[mask == 0])


def test_batch_keeps_each_image_and_mask(ref, ours):
    """Sample k of a batch equals the reference's single-sample run k (the reference blends all with sample 0)."""
    embeds = _embeds(2)
    images, masks = [_image(4), _image(5)], [_mask(4), _mask(5)]
    out = ours(**embeds, **_common(2), image=images, mask_image=masks, generator=[_seed(0), _seed(1)], output_type="np")
    for k in range(2):
        single = {name: value[k : k + 1] for name, value in embeds.items()}
        expected = ref(
            **single, **_common(2), image=images[k], mask_image=masks[k], generator=_seed(k), output_type="np"
        )
        _close(out.images[k : k + 1], expected.images)


def test_callback_on_step_end_sees_and_replaces_mask(ours):
    """The reference's callback test: zero the latents and the mask at the last step; the output is all zeros."""
    seen = []

    def zero_last(pipe, i, t, tensors):
        seen.append(sorted(tensors))
        if i == 1:
            return {name: torch.zeros_like(value) for name, value in tensors.items()}
        return {}

    out = ours(
        **_embeds(),
        **_common(2),
        image=_image(),
        mask_image=_mask(),
        output_type="latent",
        callback_on_step_end=zero_last,
        callback_on_step_end_tensor_inputs=["latents", "mask_image", "masked_image"],
        generator=_seed(),
    ).images
    assert seen == [["latents", "mask_image", "masked_image"]] * 2
    assert out.shape == (1, 4, 32, 32) and out.abs().sum() == 0


def test_inpaint_with_a_sigma_scheduler_renoises_the_kept_region_at_each_steps_level(ours):
    """After step i the kept region holds the image latents plus the start noise at step i + 1's level: x₀ + σ·ε for
    Euler, with ε the unit noise drawn from the generator. The reference adds its start latents there, ε times init_noise_sigma."""
    from kandinsky22 import EulerDiscreteScheduler
    from kandinsky22.schedulers.noise import randn_tensor

    pipe = _quiet(KandinskyV22InpaintPipeline(**{**ours.components, "scheduler": EulerDiscreteScheduler.from_config(
        ours.scheduler.config)}))  # fmt: skip
    kept = []

    def record(pipe, i, t, tensors):
        keep = tensors["mask_image"][:1]
        kept.append(((tensors["latents"] - tensors["masked_image"][:1]) * keep, keep))
        return {}

    pipe(**_embeds(), **_common(3), image=_image(), mask_image=_mask(), output_type="latent", generator=_seed(),
         callback_on_step_end=record, callback_on_step_end_tensor_inputs=["latents", "masked_image", "mask_image"])  # fmt: skip
    noise = randn_tensor((1, 4, 32, 32), generator=_seed())  # the generator's first draw: the start noise
    sigmas = pipe.scheduler.sigmas
    assert pipe.scheduler.init_noise_sigma > 4  # of a 3-step run: the reference's kept region is that much too noisy
    for i, (difference, keep) in enumerate(kept[:-1]):
        assert keep.sum() > 100
        assert (difference - noise * keep * float(sigmas[i + 1])).abs().max() < 1e-5
    assert kept[-1][0].abs().max() == 0  # after the last step: the clean image latents


# ---------------------------------------------------------------------------------------------------------------------
# Input errors (all raised before any model runs)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"image": np.zeros((32, 32, 3), np.uint8)}, r"size mismatch: `image` is 32x32; expected 64x64 \(height=64"),
        (
            {"mask_image": np.zeros((64, 32))},
            r"`mask_image` is 64x32, which does not have the aspect ratio of the 64x64",
        ),
        ({"mask_image": [_mask(0)] * 3}, "`mask_image` has 3 items but there are 2 image embeddings"),
        ({"image": [_image(0)] * 3}, "`image` has 3 items but there are 2 image embeddings"),
        ({"mask_image": torch.full((64, 64), 1.5)}, r"`mask_image` values must lie in \[0, 1\]"),
        ({"image": torch.full((1, 3, 64, 64), -2.0)}, r"`image` values must lie in \[-1, 1\]"),
        ({"mask_image": None}, "`mask_image` must be a PIL image, a numpy array, a torch tensor or a list of them"),
        ({"latents": torch.zeros(2, 4, 16, 16)}, r"`latents` must have shape \(2, 4, 32, 32\)"),
        ({"callback_on_step_end_tensor_inputs": ["noise"]}, "may only name"),
        ({"guidance_scale": float("nan")}, r"`guidance_scale` must be a finite number, got nan"),
        ({"mask_image": torch.full((64, 64), float("nan"))}, r"`mask_image` values must lie in \[0, 1\], got \[nan"),
        ({"keep_unmasked": 1}, "keep_unmasked must be True or False, got 1"),
        ({"keep_unmasked": True, "output_type": "latent"}, "keep_unmasked=True needs images: it cannot be used with"),
    ],
)
def test_bad_inputs(ours, change, match):
    kwargs = {**_embeds(2), **_common(2), "image": _image(), "mask_image": _mask(), **change}
    with pytest.raises(ValueError, match=match):
        ours(**kwargs)
