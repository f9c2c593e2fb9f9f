"""Controlnet-depth: text2img and img2img on the shared loop, with a depth hint handed to the UNet's hint encoder.

The controlnet-depth UNet (``addition_embed_type="image_hint"``) encodes the hint (B, 3, H, W) in [0, 1] to 4
channels at 1/8 of its size and concatenates them to the latents, so the hint must be 8× the latent size (the output
size for the official MoVQ). As the reference (reference-behaviour.md §1.6, §1.7), the hint is repeated per image and,
under guidance, doubled like the latents. Unlike the reference, the hint is also repeated without guidance (the
reference crashes for ``guidance_scale <= 1`` with a hint batch that does not match, and for
``num_images_per_prompt > 1``), both pipelines take ``callback_on_step_end`` and ``output_type="latent"``, a single
hint serves every embedding, PIL hints are accepted, and a hint of the wrong size is refused naming both sizes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kandinsky22.pipelines.base import Generator, ImagePipelineOutput
from kandinsky22.pipelines.decoder import DecoderPipeline, Embeds
from kandinsky22.pipelines.images import ImageInput, check_count, check_sizes, hint_to_tensor
from kandinsky22.pipelines.img2img import KandinskyV22Img2ImgPipeline, strength_start

HINT_DOWNSCALE = 8  # the UNet's hint encoder: three stride-2 convolutions


class _HintConditioning:
    """The hint half of both controlnet pipelines: input checks, the loop state, and the UNet's extra input."""

    _callback_tensor_inputs = ["latents", "image_embeds", "negative_image_embeds", "hint"]
    _unet_inputs = (1, 4)  # the latents and the encoded hint (the UNet's hint encoder gives 4 channels)
    _guided_inputs = ("image_embeds", "hint")
    _unet_takes_hint = True
    _unet_repository = "kandinsky-2-2-controlnet-depth"

    def _added_cond_kwargs(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"image_embeds": state["image_embeds"], "hint": state["hint"]}

    def _check_hint(self, hint: ImageInput, latent_size: tuple[int, int], batch: int) -> torch.Tensor:
        """``hint`` as (B, 3, H, W) in [0, 1] at 8× the latent size (PIL hints resized to it), B in (1, ``batch``)."""
        size = (latent_size[0] * HINT_DOWNSCALE, latent_size[1] * HINT_DOWNSCALE)
        pixels = hint_to_tensor(hint, size)
        how = f"{HINT_DOWNSCALE}x the {latent_size[0]}x{latent_size[1]} latents of this height and width"
        check_sizes(size, how, hint=tuple(pixels.shape[-2:]))
        check_count(pixels.shape[0], batch, "hint")
        return pixels

    def _hint_state(self, hint: torch.Tensor, batch: int, n: int, guidance_scale: float) -> torch.Tensor:
        """One hint per output image, on the UNet's device and dtype, doubled for guidance ([negative; positive])."""
        hint = hint.to(device=self._execution_device, dtype=self.unet.dtype)
        hint = hint.expand(batch, *hint.shape[1:]).repeat_interleave(n, dim=0)
        return torch.cat([hint, hint]) if guidance_scale > 1 else hint


class KandinskyV22ControlnetPipeline(_HintConditioning, DecoderPipeline):
    """CLIP image embeddings + depth hint → image (controlnet-depth UNet)."""

    @torch.no_grad()
    def __call__(
        self,
        image_embeds: Embeds,
        negative_image_embeds: Embeds,
        hint: ImageInput,
        height: int = 512,
        width: int = 512,
        num_inference_steps: int = 100,
        guidance_scale: float = 4.0,
        num_images_per_prompt: int = 1,
        generator: Generator = None,
        latents: torch.Tensor | None = None,
        output_type: str | None = "pil",
        callback: Callable | None = None,
        callback_steps: int = 1,
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (as the other decoders)
    ) -> ImagePipelineOutput | tuple:
        """Images for ``image_embeds`` following the depth ``hint``: tensors (B, 3, H, W) in [0, 1], or PIL images
        (resized), one or one per embedding, at the output size (``height`` × ``width`` rounded up to a multiple of
        64 px). ``latents``: the start noise, (B·n, 4, h, w). ``callback(step, t, latents)`` runs every
        ``callback_steps`` steps; ``callback_on_step_end`` as in text2img."""
        image_embeds, negative_image_embeds = self._check_embeds(image_embeds, negative_image_embeds)
        batch = image_embeds.shape[0]
        n = num_images_per_prompt
        names = self._check_run(
            batch,
            num_inference_steps,
            n,
            guidance_scale,
            output_type,
            generator,
            callback_on_step_end_tensor_inputs,
            callback_steps,
        )
        latent_size = self._latent_size(height, width)
        hint = self._check_hint(hint, latent_size, batch)
        state = self._conditioning(image_embeds, negative_image_embeds, n, guidance_scale)
        state["hint"] = self._hint_state(hint, batch, n, guidance_scale)
        timesteps = self._timesteps(num_inference_steps)
        start = self._start_noise((batch * n, self.movq.config.latent_channels, *latent_size), generator, latents)
        latents = self._denoise(
            start, timesteps, state, guidance_scale, generator, callback_on_step_end, names, callback, callback_steps
        )
        return self._finish(latents, output_type, return_dict)


class KandinskyV22ControlnetImg2ImgPipeline(_HintConditioning, KandinskyV22Img2ImgPipeline):
    """Image + CLIP image embeddings + depth hint → image: img2img's start, controlnet's hint."""

    @torch.no_grad()
    def __call__(
        self,
        image_embeds: Embeds,
        image: ImageInput,
        negative_image_embeds: Embeds,
        hint: ImageInput,
        height: int = 512,
        width: int = 512,
        num_inference_steps: int = 100,
        guidance_scale: float = 4.0,
        strength: float = 0.3,
        num_images_per_prompt: int = 1,
        generator: Generator = None,
        output_type: str | None = "pil",
        callback: Callable | None = None,
        callback_steps: int = 1,
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (as the other decoders)
    ) -> ImagePipelineOutput | tuple:
        """Transform ``image`` towards ``image_embeds`` following the depth ``hint``. ``image`` and ``strength`` as
        in :class:`KandinskyV22Img2ImgPipeline`, ``hint`` and the callbacks as in
        :class:`KandinskyV22ControlnetPipeline`."""
        image_embeds, negative_image_embeds = self._check_embeds(image_embeds, negative_image_embeds)
        batch = image_embeds.shape[0]
        n = num_images_per_prompt
        names = self._check_run(
            batch,
            num_inference_steps,
            n,
            guidance_scale,
            output_type,
            generator,
            callback_on_step_end_tensor_inputs,
            callback_steps,
        )
        first = strength_start(num_inference_steps, strength)
        latent_size = self._latent_size(height, width)
        hint = self._check_hint(hint, latent_size, batch)
        image_latents = self._image_latents(image, latent_size, batch, n)
        timesteps = self._kept_timesteps(num_inference_steps, first)
        start = self._noised(image_latents, timesteps, generator)
        state = self._conditioning(image_embeds, negative_image_embeds, n, guidance_scale)
        state["hint"] = self._hint_state(hint, batch, n, guidance_scale)
        latents = self._denoise(
            start, timesteps, state, guidance_scale, generator, callback_on_step_end, names, callback, callback_steps
        )
        return self._finish(latents, output_type, return_dict)
