"""Img2img: the shared decoder loop started from an encoded image, noised to the first timestep ``strength`` keeps.

As the reference (reference-behaviour.md §1.4): MoVQ-encode the image (unquantized, unscaled latents), keep the last
``int(steps · strength)`` timesteps, draw one noise tensor of the latents' shape (the first draw of the generator)
and ``add_noise`` it at the first kept timestep; the loop is text2img's. Unlike the reference, the image is resized to
``height`` × ``width`` (the reference swaps them), PIL images of any mode and numpy arrays are accepted, a
``strength`` that leaves no step is refused (the reference fails inside ``add_noise`` with a RuntimeError), a run that
starts on a timestep listed twice (Karras σ rounded to the same integer) starts at its own index (the reference looks
the timestep up, takes the later entry and runs past the table), and one image given for several embeddings gets its
own noise per output image, as if it were given once per embedding (the reference draws the noise for the one image and
broadcasts it: all its samples start from the same noised latents, and a list of generators uses only the first).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import torch

from kandinsky22.pipelines.base import Generator, ImagePipelineOutput
from kandinsky22.pipelines.decoder import DecoderPipeline, Embeds
from kandinsky22.pipelines.images import ImageInput, cat_same_size, check_count, check_sizes, image_to_tensor
from kandinsky22.schedulers.noise import randn_tensor


def strength_start(num_inference_steps: int, strength: float) -> int:
    """Index of the first timestep run: the last ``int(num_inference_steps · strength)`` timesteps are run."""
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0 <= strength <= 1:
        raise ValueError(f"`strength` must be a number in [0, 1], got {strength!r}")
    steps_run = min(int(num_inference_steps * strength), num_inference_steps)
    if steps_run == 0:
        raise ValueError(
            f"`strength`={strength} with `num_inference_steps`={num_inference_steps} leaves no denoising step "
            f"(int({num_inference_steps} * {strength}) = 0); raise `strength` or `num_inference_steps`"
        )
    return num_inference_steps - steps_run


class KandinskyV22Img2ImgPipeline(DecoderPipeline):
    """Image + CLIP image embeddings → image: img2img on the shared decoder loop."""

    def _pixels_or_latents(
        self, image: ImageInput, latent_size: tuple[int, int], batch: int
    ) -> tuple[torch.Tensor, bool]:
        """``image`` as pixels (B, 3, H, W) in [-1, 1] at the output size, or as given latents (B, C, h, w); B must
        be 1 or ``batch``.

        Tensors with the MoVQ's latent channel count are latents (the reference's rule) and are not encoded again.
        """
        channels = self.movq.config.latent_channels
        items = list(image) if isinstance(image, (list, tuple)) else [image]
        if items and all(isinstance(x, torch.Tensor) and x.ndim in (3, 4) and x.shape[-3] == channels for x in items):
            latents = cat_same_size([x if x.ndim == 4 else x[None] for x in items], "image")
            check_sizes(latent_size, "the latent size for this height and width", image=tuple(latents.shape[-2:]))
            pixels, are_latents = latents, True
        else:
            sf = self.movq_scale_factor
            size = (latent_size[0] * sf, latent_size[1] * sf)
            pixels, are_latents = image_to_tensor(image, size, resize=True, unit_tensors=True), False
        check_count(pixels.shape[0], batch, "image")
        return pixels, are_latents

    def _check_inputs(
        self,
        batch: int,
        height: int,
        width: int,
        num_inference_steps: int,
        *,
        image: ImageInput,
        strength: float,
        **legacy: Any,
    ) -> None:
        first = strength_start(num_inference_steps, strength)
        self._pixels_or_latents(image, self._latent_size(height, width, warn=False), batch)
        super()._check_inputs(batch, height, width, num_inference_steps, first, **legacy)

    def _image_latents(self, image: ImageInput, latent_size: tuple[int, int], batch: int, n: int) -> torch.Tensor:
        """Clean image latents, one per output image (``batch · n``), on the execution device in the UNet's dtype."""
        pixels, are_latents = self._pixels_or_latents(image, latent_size, batch)
        device = self._execution_device
        if are_latents:
            latents = pixels
        else:
            movq = self._use("movq")
            latents = movq.encode(pixels.to(device=device, dtype=movq.dtype)).latents
        latents = latents.to(device=device, dtype=self.unet.dtype)
        return latents.expand(batch, *latents.shape[1:]).repeat_interleave(n, dim=0)

    def _kept_timesteps(self, num_inference_steps: int, first: int) -> torch.Tensor:
        """The timesteps from index ``first`` (see :func:`strength_start`); the scheduler is told where the run
        begins, so a multistep solver starts its step counter there.

        A second-order sampler lists two timesteps per step, and ``first`` indexes that table as the reference does
        (not ``first · order``). An odd ``first`` is a step's second evaluation: there the reference's Heun starts
        one entry later and runs one evaluation past the table (NaN), its DPM2 takes zero-length steps. We start at
        the next entry — the noise level the reference's ``add_noise`` used — and stop at the table's end."""
        timesteps = self._timesteps(num_inference_steps)
        if getattr(self.scheduler, "order", 1) == 2 and first % 2 == 1:
            first += 1
        timesteps = timesteps[first:]
        self._check_timesteps(timesteps)  # before `add_noise` looks the first one up
        self.scheduler.set_begin_index(first)
        return timesteps

    def _noised(self, image_latents: torch.Tensor, timesteps: torch.Tensor, generator: Generator) -> torch.Tensor:
        """The start latents: the image latents noised to the first kept timestep (the run's first random draw)."""
        noise = randn_tensor(image_latents.shape, generator, image_latents.device, image_latents.dtype)
        first = timesteps[:1].repeat(image_latents.shape[0])
        return self.scheduler.add_noise(image_latents, noise, first)

    @torch.no_grad()
    def __call__(
        self,
        image_embeds: Embeds,
        image: ImageInput,
        negative_image_embeds: Embeds,
        height: int = 512,
        width: int = 512,
        num_inference_steps: int = 100,
        guidance_scale: float = 4.0,
        strength: float = 0.3,
        num_images_per_prompt: int = 1,
        generator: Generator = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (the reference's signature)
        **kwargs: Any,
    ) -> ImagePipelineOutput | tuple:
        """Transform ``image`` (one, or one per embedding) towards ``image_embeds``.

        ``image``: PIL images (any mode), numpy HWC arrays (uint8, or float in [0, 1]), tensors (B, 3, H, W) in
        [0, 1] (or in [-1, 1] if any value is negative, the reference's rule), or MoVQ latents (B, 4, h, w); a list
        may mix kinds and sizes: each item is resized to ``height`` × ``width`` (rounded up to a multiple of 64 px
        for the official MoVQ). ``strength`` in [0, 1]: the share of the ``num_inference_steps`` schedule that is
        run (1 ignores the image). ``kwargs``: the deprecated ``callback`` and ``callback_steps``.
        """
        callback, callback_steps = self._legacy_callback(kwargs)
        image_embeds, negative_image_embeds = self._check_embeds(image_embeds, negative_image_embeds)
        batch = image_embeds.shape[0]
        names = self._check_run(
            batch,
            num_inference_steps,
            num_images_per_prompt,
            guidance_scale,
            output_type,
            generator,
            callback_on_step_end_tensor_inputs,
        )
        first = strength_start(num_inference_steps, strength)
        latent_size = self._latent_size(height, width)
        image_latents = self._image_latents(image, latent_size, batch, num_images_per_prompt)
        timesteps = self._kept_timesteps(num_inference_steps, first)
        start = self._noised(image_latents, timesteps, generator)
        state = self._conditioning(image_embeds, negative_image_embeds, num_images_per_prompt, guidance_scale)
        latents = self._denoise(
            start, timesteps, state, guidance_scale, generator, callback_on_step_end, names, callback, callback_steps
        )
        return self._finish(latents, output_type, return_dict)
