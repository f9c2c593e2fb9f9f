"""Inpainting: the shared decoder loop with the masked image at the UNet input and the kept region blended back.

As the reference (reference-behaviour.md §1.5): the user's mask (white / 1 = repaint) is inverted to a keep mask,
resized to the latents (nearest) and eroded by one latent pixel (``erode_keep_mask``); the UNet sees
``[latents | image latents · keep | keep]`` (4 + 4 + 1 channels); after every step the image latents, re-noised to
the next timestep with the *start noise*, replace the kept region; after the last step the clean image latents do.
Unlike the reference, the kept region is re-noised with unit noise (the reference uses the start latents, which a σ
scheduler such as Euler has multiplied by its ``init_noise_sigma``), every sample uses its own image and mask (the
reference blends all with the first), masks given as tensors are not binarized in place, and an image array or tensor
of the wrong size, or a mask of another aspect ratio, is refused naming the sizes (the reference crashes inside the
loop, or stretches the mask).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from kandinsky22.pipelines.base import Generator, ImagePipelineOutput
from kandinsky22.pipelines.decoder import DecoderPipeline, Embeds
from kandinsky22.pipelines.images import (
    ImageInput,
    binarize_mask,
    check_count,
    check_keep_unmasked,
    check_mask_shape,
    check_sizes,
    erode_keep_mask,
    image_to_tensor,
    mask_to_tensor,
    overlay_unmasked,
)


class KandinskyV22InpaintPipeline(DecoderPipeline):
    """Image + mask + CLIP image embeddings → image repainted where the mask is white / 1 (9-channel UNet)."""

    _callback_tensor_inputs = ["latents", "image_embeds", "negative_image_embeds", "masked_image", "mask_image"]
    _unet_inputs = (2, 1)  # the latents, the masked image's latents, the mask
    _guided_inputs = ("image_embeds", "masked_image", "mask_image")
    _unet_repository = "kandinsky-2-2-decoder-inpaint"

    # -- hooks of the shared loop ---------------------------------------------------------------------------------

    def _unet_input(self, latent_input: torch.Tensor, state: dict[str, torch.Tensor], i: int) -> torch.Tensor:
        return torch.cat([latent_input, state["masked_image"], state["mask_image"]], dim=1)

    def _after_step(
        self, latents: torch.Tensor, state: dict[str, torch.Tensor], i: int, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """Put the image back where it is kept, noised to the level the next step expects (clean after the last)."""
        original = state["image_latents"]
        if i < len(timesteps) - 1:  # the device copy of the timesteps: a host one would be copied at every step
            original = self.scheduler.add_noise(original, state["noise"], state["timesteps_on_device"][i + 1 : i + 2])
        return _blend(original, latents, state["mask_image"])

    # -- __call__ -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        image_embeds: Embeds,
        image: ImageInput,
        mask_image: ImageInput,
        negative_image_embeds: Embeds,
        height: int = 512,
        width: int = 512,
        num_inference_steps: int = 100,
        guidance_scale: float = 4.0,
        num_images_per_prompt: int = 1,
        generator: Generator = None,
        latents: torch.Tensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (the reference's signature)
        keep_unmasked: bool = False,
        **kwargs: Any,
    ) -> ImagePipelineOutput | tuple:
        """Repaint ``image`` where ``mask_image`` is white / 1, keep it where black / 0 (one image and mask, or one
        per embedding).

        ``keep_unmasked`` (not in the reference, off by default as there): the result is ``image`` itself wherever
        the mask is 0, pixel for pixel, and mixes the two where a soft mask lies between 0 and 1. Otherwise, as in the
        reference, the whole image comes back through MoVQ, which changes the kept region a little (each inpainting
        pass adds to it). Not with ``output_type="latent"``.

        ``image``: PIL (any mode), numpy HWC (uint8, or float in [0, 1]) or tensors (B, 3, H, W) in [-1, 1].
        ``mask_image``: PIL (converted to "L"), numpy HW (uint8 0..255, bool or float in [0, 1]) or tensors
        ((B, 1,) H, W) in [0, 1]; binarized at 0.5. PIL inputs are resized to ``height`` × ``width`` (rounded up to a
        multiple of 64 px for the official MoVQ); image arrays and tensors must already have that size, mask arrays
        and tensors its aspect ratio (the mask is resized to the latents, nearest, as in the reference).
        ``latents``: the start noise, (B·n, 4, h, w). ``kwargs``: the deprecated ``callback`` and ``callback_steps``.
        """
        callback, callback_steps = self._legacy_callback(kwargs)
        image_embeds, negative_image_embeds = self._check_embeds(image_embeds, negative_image_embeds)
        batch = image_embeds.shape[0]
        n = num_images_per_prompt
        names = self._check_run(
            batch, num_inference_steps, n, guidance_scale, output_type, generator, callback_on_step_end_tensor_inputs
        )
        check_keep_unmasked(keep_unmasked, output_type)
        latent_size = self._latent_size(height, width)
        pixels, soft = self._pixels_and_mask(image, mask_image, height, width, latent_size, batch)

        state = self._conditioning(image_embeds, negative_image_embeds, n, guidance_scale)
        state.update(self._masked_image(pixels, binarize_mask(soft), batch, n))
        shape = (batch * n, self.movq.config.latent_channels, *latent_size)
        timesteps = self._timesteps(num_inference_steps)
        self.scheduler.set_begin_index(0)
        # The kept region is re-noised with the unit noise: add_noise scales it to each step's level. The reference
        # re-noises with the start latents, already times init_noise_sigma: the same for the DDPM family (1), but
        # for the σ schedulers a kept region that many times too noisy until the last blend (Euler on the official
        # decoder config: 4.6 times at 3 steps, 22.6 at 50).
        state["noise"] = self._noise(shape, generator, latents)
        if guidance_scale > 1:  # the UNet input is one batch of 2: [negative; positive]
            for name in ("masked_image", "mask_image"):
                state[name] = torch.cat([state[name], state[name]])
        latents = self._denoise(
            state["noise"] * self.scheduler.init_noise_sigma,
            timesteps,
            state,
            guidance_scale,
            generator,
            callback_on_step_end,
            names,
            callback,
            callback_steps,
        )
        latents = _blend(state["image_latents"], latents, state["mask_image"])
        overlay = None
        if keep_unmasked:
            originals, soft = (x.expand(batch, *x.shape[1:]).repeat_interleave(n, dim=0) for x in (pixels, soft))

            def overlay(decoded: torch.Tensor) -> torch.Tensor:
                return overlay_unmasked(decoded, originals, soft)

        return self._finish(latents, output_type, return_dict, overlay)

    def _pixels_and_mask(
        self,
        image: ImageInput,
        mask_image: ImageInput,
        height: int,
        width: int,
        latent_size: tuple[int, int],
        batch: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The image (B, 3, H, W) in [-1, 1] and the repaint mask (B, 1, h, w) with its values in [0, 1] (the model
        takes it binarized, ``keep_unmasked`` as it is), checked: sizes, counts."""
        sf = self.movq_scale_factor
        size = (latent_size[0] * sf, latent_size[1] * sf)
        pixels = image_to_tensor(image, size, resize=False)
        repaint = mask_to_tensor(mask_image, size, binary=False)
        how = f"height={height}, width={width}" + ("" if size == (height, width) else " rounded up")
        check_sizes(size, how, image=tuple(pixels.shape[-2:]))
        check_mask_shape(size, how, tuple(repaint.shape[-2:]))
        check_count(pixels.shape[0], batch, "image")
        check_count(repaint.shape[0], batch, "mask_image")
        return pixels, repaint

    def _check_inputs(
        self,
        batch: int,
        height: int,
        width: int,
        num_inference_steps: int,
        *,
        image: ImageInput,
        mask_image: ImageInput,
        keep_unmasked: bool = False,
        **legacy: Any,
    ) -> None:
        check_keep_unmasked(keep_unmasked)
        latent_size = self._latent_size(height, width, warn=False)
        self._pixels_and_mask(image, mask_image, height, width, latent_size, batch)
        super()._check_inputs(batch, height, width, num_inference_steps, **legacy)

    def _masked_image(self, pixels: torch.Tensor, repaint: torch.Tensor, batch: int, n: int) -> dict[str, torch.Tensor]:
        """Image latents, the eroded keep mask at latent size and the masked image latents, one per output image."""
        device, dtype = self._execution_device, self.unet.dtype
        movq = self._use("movq")
        image_latents = movq.encode(pixels.to(device=device, dtype=movq.dtype)).latents.to(dtype)
        keep = (1 - repaint).to(device=device, dtype=dtype)
        keep = erode_keep_mask(F.interpolate(keep, image_latents.shape[-2:], mode="nearest"))
        image_latents = image_latents.expand(batch, *image_latents.shape[1:])
        keep = keep.expand(batch, *keep.shape[1:])
        per_image = {"image_latents": image_latents, "mask_image": keep, "masked_image": image_latents * keep}
        return {name: value.repeat_interleave(n, dim=0) for name, value in per_image.items()}


def _blend(original: torch.Tensor, latents: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``original`` where kept, ``latents`` elsewhere; ``keep`` may be CFG-doubled (its first half is used)."""
    keep = keep[: latents.shape[0]]
    return keep * original + (1 - keep) * latents
