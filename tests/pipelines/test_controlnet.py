"""The controlnet-depth pipelines (text2img and img2img): parity with the reference, the fixes, the input errors.

The tiny controlnet repo's MoVQ has scale factor 8, as the official one: 64 px images have 8x8 latents and the hint
is 64 px too.
"""

from __future__ import annotations

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch

from kandinsky22 import KandinskyV22ControlnetImg2ImgPipeline, KandinskyV22ControlnetPipeline

ATOL = 1e-4  # fp32, np outputs in [0, 1]


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def text2img(controlnet_repo):
    """(reference, ours)."""
    ref = diffusers.KandinskyV22ControlnetPipeline.from_pretrained(controlnet_repo)
    return _quiet(ref), _quiet(KandinskyV22ControlnetPipeline.from_pretrained(controlnet_repo))


@pytest.fixture(scope="module")
def img2img(text2img):
    """(reference, ours), sharing the text2img pipelines' components."""
    ref, ours = text2img
    return (
        _quiet(diffusers.KandinskyV22ControlnetImg2ImgPipeline(**ref.components)),
        _quiet(KandinskyV22ControlnetImg2ImgPipeline(**ours.components)),
    )


def _embeds(batch: int = 1) -> dict[str, torch.Tensor]:
    return {
        "image_embeds": torch.randn(batch, 32, generator=torch.Generator().manual_seed(0)),
        "negative_image_embeds": torch.randn(batch, 32, generator=torch.Generator().manual_seed(1)),
    }


def _hint(batch: int = 1, seed: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _image(seed: int = 0, size: tuple[int, int] = (64, 64)) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


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


@pytest.mark.parametrize("hint_kind", ["tensor", "pil"])
def test_parity_text2img(text2img, hint_kind):
    ref, ours = text2img
    hint = _hint()
    # A PIL hint of exactly these pixel values (the reference takes tensors only).
    pil = PIL.Image.fromarray((hint[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    hint = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    kwargs = {**_embeds(), **_common(3), "output_type": "np"}
    expected = ref(**kwargs, hint=hint, generator=_seed()).images
    _close(ours(**kwargs, hint=hint if hint_kind == "tensor" else pil, generator=_seed()).images, expected)


def test_parity_text2img_batch(text2img):
    ref, ours = text2img
    kwargs = {**_embeds(2), **_common(2), "hint": _hint(2), "output_type": "np"}
    _close(ours(**kwargs, generator=_seed()).images, ref(**kwargs, generator=_seed()).images)


@pytest.mark.parametrize(("steps", "strength"), [(10, 0.3), (4, 0.5), (2, 1.0)])
def test_parity_img2img(img2img, steps, strength):
    ref, ours = img2img
    kwargs = {**_embeds(), **_common(steps), "image": _image(0, (72, 90)), "hint": _hint(), "strength": strength}
    kwargs["output_type"] = "np"
    _close(ours(**kwargs, generator=_seed()).images, ref(**kwargs, generator=_seed()).images)


def test_parity_img2img_unit_range_tensor(img2img):
    """An image tensor with no negative value is in [0, 1], as in the reference (which normalizes it)."""
    ref, ours = img2img
    image = torch.rand(1, 3, 64, 64, generator=_seed(3))
    kwargs = {**_embeds(), **_common(4), "image": image, "hint": _hint(), "strength": 0.5, "output_type": "np"}
    _close(ours(**kwargs, generator=_seed()).images, ref(**kwargs, generator=_seed()).images)


def test_parity_img2img_list_mixing_kinds_and_sizes(img2img):
    """Each item of an `image` list is resized to the output size on its own, as in the reference."""
    ref, ours = img2img
    image = [_image(0, (72, 90)), torch.rand(3, 48, 48, generator=_seed(4))]
    kwargs = {**_embeds(2), **_common(4), "hint": _hint(2), "strength": 0.5, "output_type": "np"}
    expected = ref(**kwargs, image=image, generator=_seed()).images
    _close(ours(**kwargs, image=image, generator=_seed()).images, expected)


# ---------------------------------------------------------------------------------------------------------------------
# Fixes
# ---------------------------------------------------------------------------------------------------------------------


def test_no_guidance_with_images_per_prompt(text2img):
    """guidance_scale 1 with 2 images per embedding (the reference crashes): image k is the reference's
    single-image run with generator k."""
    ref, ours = text2img
    kwargs = {**_embeds(), **_common(2, guidance_scale=1.0), "hint": _hint(), "output_type": "np"}
    out = ours(**kwargs, num_images_per_prompt=2, generator=[_seed(0), _seed(1)]).images
    with pytest.raises(RuntimeError):
        ref(**kwargs, num_images_per_prompt=2, generator=[_seed(0), _seed(1)])
    for k in range(2):
        _close(out[k : k + 1], ref(**kwargs, generator=_seed(k)).images)


@pytest.mark.parametrize("which", ["text2img", "img2img"])
def test_callback_on_step_end_and_latent_output(text2img, img2img, which):
    ours = {"text2img": text2img, "img2img": img2img}[which][1]
    extra = {"image": _image()} if which == "img2img" else {}
    seen = []

    def zero_last(pipe, i, t, tensors):
        seen.append((tuple(tensors["hint"].shape), tuple(tensors["latents"].shape)))
        return {"latents": torch.zeros_like(tensors["latents"])} if i == 1 else {}

    out = ours(
        **_embeds(),
        **_common(4 if which == "img2img" else 2),
        **extra,
        **({"strength": 0.5} if which == "img2img" else {}),
        hint=_hint(),
        num_images_per_prompt=2,
        output_type="latent",
        callback_on_step_end=zero_last,
        callback_on_step_end_tensor_inputs=["latents", "hint"],
        generator=_seed(),
    ).images
    assert seen == [((4, 3, 64, 64), (2, 4, 8, 8))] * 2  # the hint as the UNet sees it: per image, CFG-doubled
    assert out.shape == (2, 4, 8, 8) and out.abs().sum() == 0


def test_legacy_callback_every_callback_steps(text2img):
    calls = []
    text2img[1](
        **_embeds(),
        **_common(3),
        hint=_hint(),
        output_type="latent",
        callback=lambda step, t, latents: calls.append((step, int(t), tuple(latents.shape))),
        callback_steps=2,
        generator=_seed(),
    )
    timesteps = text2img[1].scheduler.timesteps.tolist()
    assert calls == [(0, timesteps[0], (1, 4, 8, 8)), (2, timesteps[2], (1, 4, 8, 8))]


# ---------------------------------------------------------------------------------------------------------------------
# Input errors (all raised before any model runs)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"hint": _hint(1)[..., :32, :]}, r"size mismatch: `hint` is 32x64; expected 64x64 \(8x the 8x8 latents"),
        ({"height": 128, "width": 128}, r"size mismatch: `hint` is 64x64; expected 128x128"),
        ({"hint": _hint(3)}, "`hint` has 3 items but there are 2 image embeddings"),
        ({"hint": _hint(1) * 2 - 1}, r"`hint` values must lie in \[0, 1\]"),
        ({"hint": torch.rand(1, 1, 64, 64)}, r"`hint` tensors must be \(B, 3, H, W\)"),
        ({"callback_steps": 0}, "`callback_steps` must be an integer >= 1, got 0"),
        ({"output_type": "jpg"}, "`output_type` must be one of"),
        ({"callback_on_step_end_tensor_inputs": ["mask_image"]}, "may only name"),
        ({"guidance_scale": float("nan")}, r"`guidance_scale` must be a finite number, got nan"),
    ],
)
@pytest.mark.parametrize("which", ["text2img", "img2img"])
def test_bad_inputs(text2img, img2img, which, change, match):
    ours = {"text2img": text2img, "img2img": img2img}[which][1]
    extra = {"image": _image(), "strength": 0.5} if which == "img2img" else {}
    kwargs = {**_embeds(2), **_common(2), **extra, "hint": _hint(1), **change}
    with pytest.raises(ValueError, match=match):
        ours(**kwargs)


def test_img2img_strength_without_steps_raises(img2img):
    with pytest.raises(ValueError, match=r"`strength`=0.1 with `num_inference_steps`=5 leaves no denoising step"):
        img2img[1](**_embeds(), **_common(5), image=_image(), hint=_hint(), strength=0.1)
