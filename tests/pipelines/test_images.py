"""images.py against the reference's own image, mask and erosion functions, plus the input fixes and errors."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.kandinsky2_2.pipeline_kandinsky2_2_inpainting import (
    prepare_mask as reference_prepare_mask,
)
from diffusers.pipelines.kandinsky2_2.pipeline_kandinsky2_2_inpainting import (
    prepare_mask_and_masked_image as reference_mask_and_image,
)

from kandinsky22.pipelines.images import (
    check_mask_shape,
    check_sizes,
    erode_keep_mask,
    hint_to_tensor,
    image_to_tensor,
    mask_to_tensor,
    match_batch,
)

NAN = float("nan")


def _rgb(seed: int, size: tuple[int, int] = (48, 40)) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def _binary(seed: int, size: tuple[int, int] = (64, 64), p: float = 0.3) -> np.ndarray:
    return (np.random.default_rng(seed).random(size) < p).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------------
# Erosion: the reference's Python double loop, vectorized
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.02, 0.3, 0.7])
@pytest.mark.parametrize("shape", [(1, 1, 9, 9), (3, 1, 12, 7), (2, 1, 1, 5)])
def test_erosion_matches_reference(shape, p):
    gen = torch.Generator().manual_seed(int(p * 100) + shape[0])
    # Values 0, 0.5 and 1: a non-binary pixel also clears its neighbours and keeps its own value in the reference.
    mask = (torch.rand(shape, generator=gen) > p).float()
    mask[torch.rand(shape, generator=gen) < 0.05] = 0.5
    expected = reference_prepare_mask(mask.clone())
    assert torch.equal(erode_keep_mask(mask), expected)


def test_erosion_single_hole_pattern():
    keep = torch.ones(1, 1, 7, 7)
    keep[0, 0, 3, 3] = 0
    cleared = {(2, 2), (2, 3), (3, 2), (3, 3), (3, 4), (4, 3), (4, 4)}
    out = erode_keep_mask(keep)[0, 0]
    for i in range(7):
        for j in range(7):
            assert out[i, j] == (0 if (i, j) in cleared else 1)


def test_erosion_multichannel_uses_channel_zero():
    keep = torch.ones(1, 2, 6, 6)
    keep[0, 0, 2, 2] = 0
    keep[0, 1, 4, 4] = 0  # ignored by the rule, kept as its own value
    assert torch.equal(erode_keep_mask(keep), reference_prepare_mask(keep.clone()))


# ---------------------------------------------------------------------------------------------------------------------
# Inpaint inputs against prepare_mask_and_masked_image
# ---------------------------------------------------------------------------------------------------------------------


def _ours(image, mask, size):
    return 1 - mask_to_tensor(mask, size), image_to_tensor(image, size, resize=False)


def test_pil_image_and_mask_match_reference():
    image = _rgb(0, (50, 70))
    mask = PIL.Image.fromarray((_binary(1, (50, 70)) * 255).astype(np.uint8))  # mode "L"
    ref_mask, ref_image = reference_mask_and_image(image, mask, 64, 48)
    keep, ours = _ours(image, mask, (64, 48))
    assert ours.shape == (1, 3, 64, 48)
    torch.testing.assert_close(ours, ref_image, atol=1e-6, rtol=0)
    assert torch.equal(keep, ref_mask.float())


@pytest.mark.parametrize(
    ("image_mode", "mask_mode"), [("RGBA", "1"), ("P", "P"), ("LA", "I"), ("1", "F"), ("CMYK", "RGBA")]
)
def test_pil_images_and_masks_of_any_mode_resized_match_reference(image_mode, mask_mode):
    """The reference resizes first and converts after (PIL resizes "P" and "1" images nearest, and RGBA ones with
    premultiplied alpha): a 1-bit PNG mask or an RGBA image at another size must give the reference's tensors."""
    rgba = np.concatenate([np.asarray(_rgb(5, (50, 70))), np.asarray(_rgb(6, (50, 70)))[..., :1]], axis=-1)
    image = PIL.Image.fromarray(rgba).convert(image_mode)
    mask = PIL.Image.fromarray((_binary(7, (50, 70)) * 255).astype(np.uint8)).convert(mask_mode)
    ref_mask, ref_image = reference_mask_and_image(image, mask, 64, 48)
    keep, ours = _ours(image, mask, (64, 48))
    torch.testing.assert_close(ours, ref_image, atol=1e-6, rtol=0)
    assert torch.equal(keep, ref_mask.float())


def test_numpy_image_and_mask_match_reference():
    image = np.asarray(_rgb(2, (32, 32)))
    mask = _binary(3, (32, 32))
    ref_mask, ref_image = reference_mask_and_image(image, mask.copy(), 32, 32)
    keep, ours = _ours(image, mask, (32, 32))
    torch.testing.assert_close(ours, ref_image, atol=1e-6, rtol=0)
    assert torch.equal(keep, ref_mask.float())


def test_tensor_image_and_mask_match_reference_without_mutating():
    gen = torch.Generator().manual_seed(4)
    image = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    mask = torch.rand(2, 16, 16, generator=gen)
    before = mask.clone()
    ref_mask, ref_image = reference_mask_and_image(image, mask.clone(), 16, 16)
    keep, ours = _ours(image, mask, (16, 16))
    assert torch.equal(mask, before)  # the reference binarizes the caller's tensor in place
    torch.testing.assert_close(ours, ref_image)
    assert torch.equal(keep, ref_mask)


def test_lists_are_batched():
    images = [_rgb(5), _rgb(6)]
    masks = [_binary(7, (16, 16)), _binary(8, (16, 16))]
    ref_mask, ref_image = reference_mask_and_image(images, [m.copy() for m in masks], 16, 16)
    keep, ours = _ours(images, masks, (16, 16))
    torch.testing.assert_close(ours, ref_image, atol=1e-6, rtol=0)
    assert torch.equal(keep, ref_mask.float())


def test_numpy_mask_not_mutated_and_uint8_is_white_repaint():
    mask = np.array([[0.2, 0.7], [0.5, 0.49]], dtype=np.float32)
    before = mask.copy()
    out = mask_to_tensor(mask, (2, 2))
    assert np.array_equal(mask, before)
    assert out.tolist() == [[[[0.0, 1.0], [1.0, 0.0]]]]
    white = np.array([[0, 255], [128, 127]], dtype=np.uint8)
    assert mask_to_tensor(white, (2, 2)).tolist() == [[[[0.0, 1.0], [1.0, 0.0]]]]
    assert mask_to_tensor(np.array([[True, False]]), (1, 2)).tolist() == [[[[1.0, 0.0]]]]


@pytest.mark.parametrize("shape", [(8, 8), (1, 8, 8), (1, 1, 8, 8)])
def test_tensor_mask_shapes(shape):
    assert mask_to_tensor(torch.ones(shape), (8, 8)).shape == (1, 1, 8, 8)
    assert mask_to_tensor(torch.ones(3, 8, 8), (8, 8)).shape == (3, 1, 8, 8)


@pytest.mark.parametrize("mode", ["L", "1", "RGB", "RGBA", "P"])
def test_pil_mask_any_mode(mode):
    base = PIL.Image.fromarray((_binary(9, (16, 16)) * 255).astype(np.uint8))
    out = mask_to_tensor(base.convert(mode), (16, 16))
    assert torch.equal(out, mask_to_tensor(base, (16, 16)))


# ---------------------------------------------------------------------------------------------------------------------
# Img2img inputs against VaeImageProcessor.preprocess (as the reference pipeline configures it)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae_processor():
    return VaeImageProcessor(vae_scale_factor=2, vae_latent_channels=4, resample="bicubic", reducing_gap=1)


def test_pil_resize_matches_vae_processor(vae_processor):
    image = _rgb(10, (50, 70))
    expected = vae_processor.preprocess(image, 40, 40)
    torch.testing.assert_close(image_to_tensor(image, (40, 40), resize=True), expected, atol=1e-6, rtol=0)


def test_tensor_resize_matches_vae_processor(vae_processor):
    image = torch.rand(2, 3, 20, 12, generator=torch.Generator().manual_seed(11)) * 2 - 1
    with pytest.warns(FutureWarning):  # the reference deprecates [-1, 1] tensors; ours are always [-1, 1]
        expected = vae_processor.preprocess(image, 16, 16)
    torch.testing.assert_close(image_to_tensor(image, (16, 16), resize=True), expected)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA"])
def test_any_pil_mode_becomes_rgb(mode):
    image = _rgb(12, (16, 16)).convert(mode)
    out = image_to_tensor(image, (16, 16), resize=True)
    expected = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    torch.testing.assert_close(out[0], expected)


def test_numpy_images_uint8_float_gray_rgba_agree():
    rgb = np.asarray(_rgb(13, (8, 8)))
    ref = image_to_tensor(rgb, (8, 8), resize=False)
    torch.testing.assert_close(image_to_tensor(rgb.astype(np.float32) / 255, (8, 8), resize=False), ref)
    rgba = np.concatenate([rgb, np.full((8, 8, 1), 7, np.uint8)], axis=-1)
    assert torch.equal(image_to_tensor(rgba, (8, 8), resize=False), ref)
    gray = image_to_tensor(rgb[..., 0], (8, 8), resize=False)
    assert torch.equal(gray[:, 0], ref[:, 0]) and torch.equal(gray[:, 1], ref[:, 0])


def test_hints_pil_numpy_tensor_agree():
    pil = _rgb(14, (16, 16))
    tensor = hint_to_tensor(pil, (16, 16))
    assert tensor.shape == (1, 3, 16, 16) and tensor.min() >= 0 and tensor.max() <= 1
    torch.testing.assert_close(hint_to_tensor(np.asarray(pil), (16, 16)), tensor)
    torch.testing.assert_close(hint_to_tensor([tensor[0], tensor[0]], (16, 16)), tensor.repeat(2, 1, 1, 1))
    assert hint_to_tensor(pil.convert("L"), (8, 8)).shape == (1, 3, 8, 8)


# ---------------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: image_to_tensor("cat.png", (8, 8), True), "`image` must be a PIL image.*str"),
        (lambda: image_to_tensor([], (8, 8), True), "`image` is an empty list"),
        (lambda: image_to_tensor(torch.rand(1, 3, 8, 8) * 3, (8, 8), True), r"`image` values must lie in \[-1, 1\]"),
        (lambda: image_to_tensor(torch.rand(1, 2, 8, 8), (8, 8), True), r"`image` tensors must be \(B, 3, H, W\)"),
        (lambda: image_to_tensor(np.full((8, 8, 3), 2.0), (8, 8), True), r"`image` values must lie in \[0, 1\]"),
        (lambda: image_to_tensor(np.zeros((8, 8, 2)), (8, 8), True), "`image` numpy arrays must be HW, HWC"),
        (
            lambda: image_to_tensor([np.zeros((8, 8, 3)), np.zeros((4, 4, 3))], (8, 8), False),
            "different sizes",
        ),
        (lambda: mask_to_tensor(torch.full((8, 8), 2.0), (8, 8)), r"`mask_image` values must lie in \[0, 1\]"),
        (lambda: mask_to_tensor(np.zeros((8, 8, 3)), (8, 8)), "`mask_image` numpy arrays must be HW or HW1"),
        (lambda: mask_to_tensor(torch.zeros(1, 3, 8, 8), (8, 8)), "`mask_image` tensors must be"),
        (lambda: mask_to_tensor(np.zeros((2, 2), dtype=np.complex64), (2, 2)), "dtype complex64"),
        (lambda: hint_to_tensor(torch.full((1, 3, 8, 8), -0.5), (8, 8)), r"`hint` values must lie in \[0, 1\]"),
        # NaN compares false with both bounds: it must not pass the range checks (a NaN mask pixel became "keep")
        (lambda: image_to_tensor(torch.full((1, 3, 8, 8), NAN), (8, 8), True), r"`image` values .*got \[nan, nan\]"),
        (
            lambda: image_to_tensor(torch.full((1, 3, 8, 8), NAN), (8, 8), True, unit_tensors=True),
            r"`image` values .*got \[nan, nan\]",
        ),
        (lambda: image_to_tensor(np.full((8, 8, 3), NAN), (8, 8), True), r"`image` values .*got \[nan, nan\]"),
        (lambda: mask_to_tensor(torch.full((8, 8), NAN), (8, 8)), r"`mask_image` values .*got \[nan, nan\]"),
        (lambda: mask_to_tensor(np.full((8, 8), NAN), (8, 8)), r"`mask_image` values .*got \[nan, nan\]"),
        (lambda: hint_to_tensor(torch.full((1, 3, 8, 8), NAN), (8, 8)), r"`hint` values .*got \[nan, nan\]"),
        (
            lambda: check_sizes((64, 64), "height=64, width=64", image=(64, 64), mask_image=(32, 48)),
            "`image` is 64x64, `mask_image` is 32x48; expected 64x64 \\(height=64, width=64\\)",
        ),
        (lambda: match_batch(torch.zeros(2, 3), 3, "image"), "`image` has 2 items but there are 3 image embeddings"),
        (
            lambda: check_mask_shape((64, 96), "height=64, width=96", (64, 64)),
            "`mask_image` is 64x64, which does not have the aspect ratio of the 64x96 image",
        ),
    ],
)
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_masks_of_the_image_aspect_ratio_pass():
    check_mask_shape((512, 768), "height=512, width=768", (500, 750))
    check_mask_shape((64, 64), "height=64, width=64", (768, 768))


def test_match_batch_broadcasts_one():
    assert match_batch(torch.zeros(1, 3), 4, "image").shape == (4, 3)
    same = torch.zeros(4, 3)
    assert match_batch(same, 4, "image") is same
