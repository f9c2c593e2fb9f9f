"""Image, mask and hint inputs of the decoder pipelines: PIL / numpy / torch in, one tensor layout out.

Conventions (those of the reference pipelines, made uniform):

* **Images** become ``(B, 3, H, W)`` float32 in [-1, 1]. PIL images of any mode are resized (bicubic) and converted
  to RGB; numpy arrays are HWC (or HW) ``uint8`` in 0..255 or float in [0, 1]; tensors are ``(B, 3, H, W)`` or
  ``(3, H, W)`` already in [-1, 1] (for img2img, as in the reference, a tensor with no negative value is in [0, 1]).
* **Masks** become ``(B, 1, H, W)`` float32 in {0, 1} with **1 = repaint** (white in a PIL image), binarized at 0.5.
  PIL masks are resized (Lanczos) and converted to "L"; numpy masks are HW (or HW1) ``uint8`` 0..255, bool or float in
  [0, 1]; tensors are ``(H, W)``, ``(1, H, W)``, ``(B, H, W)`` or ``(B, 1, H, W)`` in [0, 1]. The caller's object is
  never modified.
* **Hints** (controlnet) become ``(B, 3, H, W)`` float32 in [0, 1]: tensors as they are, PIL images and numpy arrays
  converted like images but not normalized to [-1, 1].

Every input may also be a list of the above; the items are concatenated along the batch.
Bad input raises ``ValueError`` naming the parameter and what was wrong with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

ImageInput = Union[
    PIL.Image.Image, np.ndarray, torch.Tensor, Sequence[Union[PIL.Image.Image, np.ndarray, torch.Tensor]]
]

# The neighbours whose value decides whether a latent pixel stays "keep" in the reference's `prepare_mask`: a pixel
# that is not 1 clears these six offsets of itself; the set is point-symmetric, so a pixel is cleared exactly when one
# of the same six neighbours is not 1. The anti-diagonal corners (-1, +1) and (+1, -1) are not part of it.
_EROSION_OFFSETS = ((-1, 0), (0, -1), (-1, -1), (1, 0), (0, 1), (1, 1))


def _as_list(value: ImageInput, param: str) -> list:
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise ValueError(f"`{param}` is an empty list; pass at least one image")
    for item in items:
        if not isinstance(item, (PIL.Image.Image, np.ndarray, torch.Tensor)):
            raise ValueError(
                f"`{param}` must be a PIL image, a numpy array, a torch tensor or a list of them, "
                f"got {type(item).__name__}"
            )
    return items


def _check_range(values: torch.Tensor, low: float, high: float, param: str, note: str = "") -> None:
    lo, hi = values.min().item(), values.max().item()
    if not (low <= lo and hi <= high):  # written so that NaN (false in every comparison) fails too
        raise ValueError(f"`{param}` values must lie in [{low:g}, {high:g}]{note}, got [{lo:g}, {hi:g}]")


def _array_to_unit(array: np.ndarray, param: str) -> torch.Tensor:
    """A numpy array as a float32 tensor in [0, 1]: uint8 is scaled by 1/255, bool taken as 0/1, floats checked."""
    if array.dtype == np.uint8:
        return torch.from_numpy(array.astype(np.float32) / 255.0)
    if array.dtype == np.bool_ or np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer):
        tensor = torch.from_numpy(array.astype(np.float32))
        _check_range(tensor, 0.0, 1.0, param)
        return tensor
    raise ValueError(f"`{param}` arrays must be uint8 (0..255), bool or float in [0, 1], got dtype {array.dtype}")


def _pil_to_unit(image: PIL.Image.Image, mode: str, size: tuple[int, int], resample: int) -> torch.Tensor:
    """Resize to ``size``, then convert to ``mode`` (so palette, alpha and 16-bit images work), scale to [0, 1].

    The reference's order, which matters for images that are not already in ``mode``: PIL resizes palette and 1-bit
    images nearest whatever ``resample`` says, and RGBA ones with premultiplied alpha. Bicubic image resizing uses
    ``reducing_gap=1`` as the reference does; the result is (C, H, W) or (H, W).
    """
    height, width = size
    if image.size != (width, height):
        reducing_gap = 1 if resample == PIL.Image.BICUBIC else None
        image = image.resize((width, height), resample=resample, reducing_gap=reducing_gap)
    if image.mode != mode:
        image = image.convert(mode)
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    return array.permute(2, 0, 1) if array.ndim == 3 else array


def _rgb_array(array: np.ndarray, param: str) -> torch.Tensor:
    """HW, HWC (C in 1, 3, 4) or NHWC numpy image → (N, 3, H, W) in [0, 1]; alpha is dropped like PIL's RGB."""
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"`{param}` numpy arrays must be HW, HWC or NHWC with 1, 3 or 4 channels, got shape {array.shape}"
        )
    tensor = _array_to_unit(array, param).permute(0, 3, 1, 2)  # (N, C, H, W)
    return tensor[:, :3] if tensor.shape[1] >= 3 else tensor.expand(-1, 3, -1, -1)


def _rgb_batch(
    items: list, size: tuple[int, int], param: str, signed: bool, unit_tensors: bool = False, resize: bool = False
) -> torch.Tensor:
    """Items → (B, 3, H, W) in [-1, 1] (``signed``) or [0, 1]; tensors must already be in that range.

    Tensors are used as they are (no round trip through another range, so their values reach the MoVQ unchanged),
    except with ``unit_tensors``: then a tensor with no negative value is taken as [0, 1] and mapped to [-1, 1].
    ``resize``: every array and tensor item is resized to ``size`` (nearest) on its own, before its range is read, as
    the reference preprocesses each item of a list; so items of different sizes and kinds can be mixed.
    """
    low = -1.0 if signed else 0.0
    out = []
    for item in items:
        if isinstance(item, torch.Tensor):
            tensor = item.detach()
            if tensor.ndim == 3:
                tensor = tensor[None]
            if tensor.ndim != 4 or tensor.shape[1] != 3:
                raise ValueError(f"`{param}` tensors must be (B, 3, H, W) or (3, H, W), got shape {tuple(item.shape)}")
            if resize:
                tensor = _resize_nearest(tensor.float(), size)
            if unit_tensors and not tensor.min() < 0:
                _check_range(tensor, 0.0, 1.0, param, " (a tensor with no negative value is taken as [0, 1])")
                tensor = tensor * 2.0 - 1.0
            else:
                _check_range(tensor, low, 1.0, param)
            out.append(tensor.float().cpu())
            continue
        if isinstance(item, PIL.Image.Image):
            unit = _pil_to_unit(item, "RGB", size, PIL.Image.BICUBIC)[None]
        else:
            unit = _rgb_array(item, param)
            if resize:
                unit = _resize_nearest(unit, size)
        out.append(unit * 2.0 - 1.0 if signed else unit)
    # Contiguous whatever the source layout (HWC arrays arrive channels-last), so a PIL image and its numpy array
    # give bit-identical results.
    return cat_same_size(out, param).contiguous()


def cat_same_size(tensors: list[torch.Tensor], param: str) -> torch.Tensor:
    sizes = {tuple(t.shape[-2:]) for t in tensors}
    if len(sizes) > 1:
        listed = ", ".join(f"{h}x{w}" for h, w in sorted(sizes))
        raise ValueError(f"the items of `{param}` have different sizes ({listed}); pass them at one size")
    return torch.cat(tensors)


def _resize_nearest(tensor: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # Nearest, as the reference resizes array and tensor images (VaeImageProcessor.resize).
    return tensor if tuple(tensor.shape[-2:]) == size else F.interpolate(tensor, size=size, mode="nearest")


def image_to_tensor(
    image: ImageInput, size: tuple[int, int], resize: bool, param: str = "image", unit_tensors: bool = False
) -> torch.Tensor:
    """``image`` as a (B, 3, H, W) float32 tensor in [-1, 1].

    PIL images are always resized to ``size`` = (height, width). Arrays and tensors are resized (nearest), each item
    on its own, only when ``resize`` is true; otherwise they keep their size and the caller checks it with
    :func:`check_sizes`.
    ``unit_tensors``: a tensor with no negative value is in [0, 1] and is mapped to [-1, 1] — the reference's rule
    for img2img (its ``VaeImageProcessor`` normalizes a tensor unless its minimum is negative).
    """
    return _rgb_batch(_as_list(image, param), size, param, signed=True, unit_tensors=unit_tensors, resize=resize)


def mask_to_tensor(
    mask: ImageInput, size: tuple[int, int], param: str = "mask_image", binary: bool = True
) -> torch.Tensor:
    """``mask`` as a (B, 1, H, W) float32 tensor in {0, 1}, 1 = repaint (``binary=False``: its values in [0, 1]).

    PIL masks are resized to ``size`` (Lanczos, as the reference); arrays and tensors keep their size (the pipeline
    resizes the mask to the latents, see :func:`check_mask_shape`).
    """
    out = []
    for item in _as_list(mask, param):
        if isinstance(item, PIL.Image.Image):
            out.append(_pil_to_unit(item, "L", size, PIL.Image.LANCZOS)[None, None])
            continue
        if isinstance(item, np.ndarray):
            if item.ndim == 3 and item.shape[-1] == 1:
                item = item[..., 0]
            if item.ndim != 2:
                raise ValueError(f"`{param}` numpy arrays must be HW or HW1, got shape {item.shape}")
            out.append(_array_to_unit(item, param)[None, None])
            continue
        tensor = item.detach()
        if tensor.ndim == 2:
            tensor = tensor[None, None]
        elif tensor.ndim == 3:
            tensor = tensor[:, None]  # (1, H, W) and (B, H, W) alike: the leading dim is the batch
        if tensor.ndim != 4 or tensor.shape[1] != 1:
            raise ValueError(
                f"`{param}` tensors must be (H, W), (B, H, W) or (B, 1, H, W), got shape {tuple(item.shape)}"
            )
        tensor = tensor.float().cpu()
        _check_range(tensor, 0.0, 1.0, param)
        out.append(tensor)
    masks = cat_same_size(out, param).clamp(0, 1)
    return binarize_mask(masks) if binary else masks


def binarize_mask(mask: torch.Tensor) -> torch.Tensor:
    """1 (repaint) where ``mask`` is at least 0.5, else 0: the reference's rule, into a new tensor (the reference
    binarizes in place, changing the caller's mask)."""
    return (mask >= 0.5).float()


def check_keep_unmasked(keep_unmasked: object, output_type: str | None = None) -> None:
    """The inpaint pipelines' ``keep_unmasked``: a bool, and only for image outputs."""
    if not isinstance(keep_unmasked, bool):
        raise ValueError(f"keep_unmasked must be True or False, got {keep_unmasked!r}")
    if keep_unmasked and output_type == "latent":
        raise ValueError("keep_unmasked=True needs images: it cannot be used with output_type='latent'")


def overlay_unmasked(generated: torch.Tensor, original: torch.Tensor, repaint: torch.Tensor) -> torch.Tensor:
    """``generated`` where ``repaint`` is 1, ``original`` where it is 0, mixed in proportion in between (a soft mask's
    edge): the image outside the mask comes back unchanged, instead of through the MoVQ round trip that shifts it a
    little at every pass. ``generated`` (N, 3, H, W) and ``original`` (1 or N, 3, H, W) in [-1, 1]; ``repaint``
    (1 or N, 1, h, w) in [0, 1], resized (bilinear) to H × W where its size differs. Float32."""
    repaint = repaint.to(device=generated.device, dtype=torch.float32)
    if repaint.shape[-2:] != generated.shape[-2:]:
        repaint = F.interpolate(repaint, generated.shape[-2:], mode="bilinear", align_corners=False).clamp(0, 1)
    original = original.to(device=generated.device, dtype=torch.float32)
    return torch.lerp(original, generated.float(), repaint)  # exactly ``original`` where the weight is 0


def hint_to_tensor(hint: ImageInput, size: tuple[int, int], param: str = "hint") -> torch.Tensor:
    """``hint`` as a (B, 3, H, W) float32 tensor in [0, 1]; PIL hints are resized to ``size``, others keep theirs."""
    return _rgb_batch(_as_list(hint, param), size, param, signed=False)


def erode_keep_mask(keep: torch.Tensor) -> torch.Tensor:
    """The reference's latent-space mask erosion (``prepare_mask``), vectorized.

    ``keep`` is (B, C, h, w) with 1 = keep. A pixel keeps its value only if its six neighbours at
    ``_EROSION_OFFSETS`` (inside the image) are all exactly 1; otherwise it becomes 0. This grows the repainted
    region by one latent pixel, except towards the anti-diagonal corners. Channel 0 decides for all channels, as in
    the reference.
    """
    height, width = keep.shape[-2:]
    is_one = (keep[:, :1] == 1).to(keep.dtype)
    padded = F.pad(is_one, (1, 1, 1, 1), value=1.0)  # outside the image counts as "keep"
    neighbours = [padded[..., 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width] for dy, dx in _EROSION_OFFSETS]
    return keep * torch.stack(neighbours).amin(dim=0)


def check_sizes(expected: tuple[int, int], how: str, **sizes: tuple[int, int]) -> None:
    """Raise ``ValueError`` if any named (height, width) differs from ``expected``, naming every size.

    ``how`` says where ``expected`` comes from (e.g. ``"height=500, width=500 rounded up to a multiple of 64"``).
    """
    if all(tuple(size) == tuple(expected) for size in sizes.values()):
        return
    listed = ", ".join(f"`{name}` is {h}x{w}" for name, (h, w) in sizes.items())
    raise ValueError(f"size mismatch: {listed}; expected {expected[0]}x{expected[1]} ({how})")


def check_mask_shape(expected: tuple[int, int], how: str, mask_size: tuple[int, int]) -> None:
    """A mask is resized to the latents (nearest), as in the reference, so any size with the image's aspect ratio
    (within a pixel) works; another aspect ratio would stretch it, so it raises ``ValueError`` naming both sizes."""
    (height, width), (mask_h, mask_w) = expected, mask_size
    if abs(mask_h * width / mask_w - height) > 1:
        raise ValueError(
            f"`mask_image` is {mask_h}x{mask_w}, which does not have the aspect ratio of the {height}x{width} image "
            f"({how}); pass a mask of {height}x{width} (or any size with that aspect ratio)"
        )


def check_count(count: int, batch: int, param: str) -> None:
    """``param`` must give one item for all ``batch`` image embeddings, or one item per embedding."""
    if count not in (1, batch):
        raise ValueError(f"`{param}` has {count} items but there are {batch} image embeddings; pass 1 or {batch}")


def match_batch(tensor: torch.Tensor, batch: int, param: str) -> torch.Tensor:
    """Broadcast a single item to ``batch`` items, or check that there is one item per embedding."""
    check_count(tensor.shape[0], batch, param)
    return tensor.expand(batch, *tensor.shape[1:]) if tensor.shape[0] != batch else tensor
