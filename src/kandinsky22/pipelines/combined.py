"""Prompt → image in one call: the prior pipeline followed by a decoder pipeline (text2img, img2img or inpaint).

A combined pipeline holds the decoder's components under their own names and the prior's under ``prior_<name>``
(the reference's layout, also on disk). Loading a decoder repository follows its model card's ``prior:`` field to
the prior repository, unless ``prior_path=`` or the ``prior_*`` components are given; a folder saved by a combined
pipeline holds everything and loads on its own.

One generator (or list) serves both stages, the prior's draws first, as in the reference (§5.4).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from kandinsky22 import loading
from kandinsky22.pipelines.base import (
    Generator,
    ImagePipelineOutput,
    Pipeline,
    _ModelOffload,
    check_callback,
    check_callback_inputs,
    check_guidance_scale,
    check_positive_int,
    hub_options,
    offload_device,
    prompt_list,
    split_load_options,
)
from kandinsky22.pipelines.images import check_keep_unmasked
from kandinsky22.pipelines.prior import KandinskyV22PriorPipeline

DECODER_NAMES = ("unet", "scheduler", "movq")
PRIOR_NAMES = tuple(f"prior_{name}" for name in KandinskyV22PriorPipeline.component_names)


def _component(pipe_attr: str, name: str) -> property:
    """A component stored in a sub-pipeline, so that replacing ``combined.scheduler`` replaces the decoder's."""
    return property(
        lambda self: getattr(getattr(self, pipe_attr), name),
        lambda self, value: setattr(getattr(self, pipe_attr), name, value),
    )


def _card_prior(folder: Path) -> str | None:
    """The prior repository named by a decoder repository's model card (a hub id, or a folder path)."""
    names = loading.read_model_card_list(folder, "prior")
    if not names:
        return None
    relative = folder / names[0]
    return str(relative) if relative.exists() else names[0]


class _CombinedPipeline(Pipeline):
    component_names = DECODER_NAMES + PRIOR_NAMES

    def __init__(
        self,
        unet: Any,
        scheduler: Any,
        movq: Any,
        prior_prior: Any,
        prior_image_encoder: Any,
        prior_text_encoder: Any,
        prior_tokenizer: Any,
        prior_scheduler: Any,
        prior_image_processor: Any,
    ) -> None:
        self.prior_pipe = KandinskyV22PriorPipeline(
            prior=prior_prior,
            image_encoder=prior_image_encoder,
            text_encoder=prior_text_encoder,
            tokenizer=prior_tokenizer,
            scheduler=prior_scheduler,
            image_processor=prior_image_processor,
        )
        self.decoder_pipe = self._decoder_class()(unet=unet, scheduler=scheduler, movq=movq)
        super().__init__(**{name: getattr(self, name) for name in self.component_names})

    # The decoder pipeline class as (module, name), imported when a pipeline is built: img2img and inpaint live in
    # modules that need not be imported for text2img.
    _decoder: ClassVar[tuple[str, str]] = ("kandinsky22.pipelines.decoder", "KandinskyV22Pipeline")
    _decoder_takes_latents: ClassVar[bool] = True  # img2img starts from the image instead

    @classmethod
    def _decoder_class(cls) -> type:
        module, name = cls._decoder
        return getattr(importlib.import_module(module), name)

    # -- loading ------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike,
        torch_dtype: torch.dtype | None = None,
        variant: str | None = None,
        prior_path: str | os.PathLike | None = None,
        **component_overrides: Any,
    ):
        """Load a decoder repository and its prior (``prior_path``, else the model card's ``prior:``), or a folder
        saved by a combined pipeline. Components may be passed by name (``unet=``, ``prior_text_encoder=``, …), and
        the loading options of :meth:`Pipeline.from_pretrained`; they apply to the prior's repository too, except
        ``revision``, which names a version of ``path_or_id`` only."""
        options, component_overrides = split_load_options(cls, component_overrides)
        folder, index = loading.read_model_index(path_or_id, **hub_options(options))
        prior_components = {k: v for k, v in component_overrides.items() if k in PRIOR_NAMES}
        saved_by_combined = all(name in index for name in PRIOR_NAMES) and prior_path is None
        if not saved_by_combined and len(prior_components) < len(PRIOR_NAMES):
            source = prior_path if prior_path is not None else _card_prior(folder)
            if source is None:
                raise ValueError(
                    f"'{path_or_id}' holds a decoder only and its model card names no prior: pass "
                    "`prior_path=` (e.g. 'kandinsky-community/kandinsky-2-2-prior' or a local folder), or the "
                    f"`prior_*` components {list(PRIOR_NAMES)}"
                )
            given = {k.removeprefix("prior_"): v for k, v in prior_components.items()}
            prior_options = {k: v for k, v in options.items() if k != "revision"}
            prior = KandinskyV22PriorPipeline.from_pretrained(source, torch_dtype, variant, **given, **prior_options)
            prior_components = {f"prior_{k}": v for k, v in prior.components.items()}
        overrides = {**component_overrides, **prior_components}
        pipe = cls(**cls._load_components(path_or_id, folder, index, torch_dtype, variant, overrides, options))
        pipe._name_or_path = str(path_or_id)
        return pipe

    # -- the sub-pipelines share settings -------------------------------------------------------------------------

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        self.prior_pipe.set_progress_bar_config(**kwargs)
        self.decoder_pipe.set_progress_bar_config(**kwargs)

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        offload = _ModelOffload(offload_device(gpu_id, device))  # one for both: using the UNet offloads the prior
        for pipe in (self, self.prior_pipe, self.decoder_pipe):
            pipe._set_model_offload(offload)

    def enable_sequential_cpu_offload(
        self, gpu_id: int | None = None, device: torch.device | str | None = None
    ) -> None:
        self.prior_pipe.enable_sequential_cpu_offload(gpu_id, device)
        self.decoder_pipe.enable_sequential_cpu_offload(gpu_id, device)
        self._sequential_device = self.decoder_pipe._sequential_device

    # -- running ------------------------------------------------------------------------------------------------

    def _run(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None,
        num_images_per_prompt: int,
        num_inference_steps: int,
        guidance_scale: float,
        height: int,
        width: int,
        prior_guidance_scale: float,
        prior_num_inference_steps: int,
        generator: Generator,
        latents: torch.Tensor | None,
        output_type: str,
        return_dict: bool,
        prior_callback_on_step_end: Callable | None,
        prior_callback_on_step_end_tensor_inputs: list[str],
        callback_on_step_end: Callable | None,
        callback_on_step_end_tensor_inputs: list[str],
        decoder_kwargs: dict[str, Any],
        align: dict[str, Any],
    ) -> ImagePipelineOutput | tuple:
        """Check what the decoder will need before the prior runs, run the prior, then the decoder.

        ``latents`` goes where its shape says: (N, D) to the prior (as in the reference), (N, 4, h, w) to the
        decoder (the reference sends every ``latents`` to the prior, so 4-D latents crash there).
        ``align``: image-like decoder inputs, given per prompt, repeated per image to line up with the embeddings.
        """
        prompts = prompt_list(prompt)
        n = num_images_per_prompt
        check_positive_int("num_images_per_prompt", n)
        check_positive_int("height", height)
        check_positive_int("width", width)
        check_guidance_scale("prior_guidance_scale", prior_guidance_scale)
        check_positive_int("prior_num_inference_steps", prior_num_inference_steps)
        try:  # the prior's scheduler has its own limits (UnCLIP needs 2 steps); its message says `num_inference_steps`
            self.prior_scheduler.set_timesteps(prior_num_inference_steps)
        except ValueError as error:
            raise ValueError(f"`prior_num_inference_steps`: {error}") from None
        check_callback("prior_callback_on_step_end", prior_callback_on_step_end)
        check_callback("callback_on_step_end", callback_on_step_end)
        check_callback_inputs(
            prior_callback_on_step_end_tensor_inputs,
            KandinskyV22PriorPipeline._callback_tensor_inputs,
            "prior_callback_on_step_end_tensor_inputs",
        )
        self.decoder_pipe._check_run(
            len(prompts),
            num_inference_steps,
            n,
            guidance_scale,
            output_type,
            generator,
            callback_on_step_end_tensor_inputs,
        )
        prior_latents = decoder_latents = None
        if latents is not None:
            if not isinstance(latents, torch.Tensor) or latents.ndim not in (2, 4):
                shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
                raise ValueError(f"`latents` must be prior latents (N, D) or decoder latents (N, C, h, w), got {shape}")
            if latents.ndim == 4 and not self._decoder_takes_latents:
                raise ValueError(
                    f"`latents` of shape {tuple(latents.shape)} would be decoder latents, but "
                    f"{type(self).__name__} starts from `image`; only prior latents (N, D) are accepted"
                )
            prior_latents, decoder_latents = (latents, None) if latents.ndim == 2 else (None, latents)
        aligned = {name: _per_image(name, value, len(prompts), n) for name, value in align.items()}
        self.decoder_pipe._check_inputs(
            len(prompts) * n, height, width, num_inference_steps, latents=decoder_latents, **aligned, **decoder_kwargs
        )
        image_embeds, negative_image_embeds = self.prior_pipe(
            prompt=prompts,
            negative_prompt=negative_prompt,
            num_images_per_prompt=n,
            num_inference_steps=prior_num_inference_steps,
            generator=generator,
            latents=prior_latents,
            guidance_scale=prior_guidance_scale,
            output_type="pt",
            return_dict=False,
            callback_on_step_end=prior_callback_on_step_end,
            callback_on_step_end_tensor_inputs=prior_callback_on_step_end_tensor_inputs,
        )
        if decoder_latents is not None:
            decoder_kwargs = {**decoder_kwargs, "latents": decoder_latents}
        return self.decoder_pipe(
            image_embeds=image_embeds,
            negative_image_embeds=negative_image_embeds,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
            output_type=output_type,
            return_dict=return_dict,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            **aligned,
            **decoder_kwargs,
        )


def _per_image(name: str, value: Any, num_prompts: int, n: int) -> Any:
    """Image-like input given once per prompt → once per image (repeat each item n times), like the embeddings.

    The reference tiles lists instead (``k * list``), which pairs images with the wrong prompts when there are several
    prompts and n > 1 (§5.15). A single item, or one per image, is passed through unchanged.
    """
    if n == 1 or num_prompts == 1:
        return value
    if isinstance(value, (list, tuple)) and len(value) == num_prompts:
        return [item for item in value for _ in range(n)]
    # A batch of tensors is NCHW; only a mask may also be batched without its channel axis, (B, H, W).
    batch_ndims = (3, 4) if name == "mask_image" else (4,)
    if isinstance(value, torch.Tensor) and value.ndim in batch_ndims and value.shape[0] == num_prompts:
        return value.repeat_interleave(n, dim=0)
    if isinstance(value, np.ndarray) and value.ndim == 4 and value.shape[0] == num_prompts:
        return np.repeat(value, n, axis=0)
    return value


def _legacy(callback: Callable | None, callback_steps: int) -> dict[str, Any]:
    return {} if callback is None else {"callback": callback, "callback_steps": callback_steps}


for _name in DECODER_NAMES:
    setattr(_CombinedPipeline, _name, _component("decoder_pipe", _name))
for _name in PRIOR_NAMES:
    setattr(_CombinedPipeline, _name, _component("prior_pipe", _name.removeprefix("prior_")))


class KandinskyV22CombinedPipeline(_CombinedPipeline):
    """Text → image: prior, then the text2img decoder."""

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 100,
        guidance_scale: float = 4.0,
        num_images_per_prompt: int = 1,
        height: int = 512,
        width: int = 512,
        prior_guidance_scale: float = 4.0,
        prior_num_inference_steps: int = 25,
        generator: Generator = None,
        latents: torch.Tensor | None = None,
        output_type: str | None = "pil",
        callback: Callable | None = None,
        callback_steps: int = 1,
        return_dict: bool = True,
        prior_callback_on_step_end: Callable | None = None,
        prior_callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (the reference's signature)
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006
    ) -> ImagePipelineOutput | tuple:
        """Images for ``prompt``; ``negative_prompt`` steers the prior (its embedding is the decoder's negative)."""
        return self._run(
            prompt,
            negative_prompt,
            num_images_per_prompt,
            num_inference_steps,
            guidance_scale,
            height,
            width,
            prior_guidance_scale,
            prior_num_inference_steps,
            generator,
            latents,
            output_type,
            return_dict,
            prior_callback_on_step_end,
            prior_callback_on_step_end_tensor_inputs,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            _legacy(callback, callback_steps),
            {},
        )


class KandinskyV22Img2ImgCombinedPipeline(_CombinedPipeline):
    """Text + image → image: prior, then the img2img decoder."""

    _decoder = ("kandinsky22.pipelines.img2img", "KandinskyV22Img2ImgPipeline")
    _decoder_takes_latents = False

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        image: Any,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 100,
        guidance_scale: float = 4.0,
        strength: float = 0.3,
        num_images_per_prompt: int = 1,
        height: int = 512,
        width: int = 512,
        prior_guidance_scale: float = 4.0,
        prior_num_inference_steps: int = 25,
        generator: Generator = None,
        latents: torch.Tensor | None = None,
        output_type: str | None = "pil",
        callback: Callable | None = None,
        callback_steps: int = 1,
        return_dict: bool = True,
        prior_callback_on_step_end: Callable | None = None,
        prior_callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (the reference's signature)
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006
    ) -> ImagePipelineOutput | tuple:
        """Images for ``prompt`` starting from ``image`` (one, or one per prompt); ``strength`` as in img2img."""
        return self._run(
            prompt,
            negative_prompt,
            num_images_per_prompt,
            num_inference_steps,
            guidance_scale,
            height,
            width,
            prior_guidance_scale,
            prior_num_inference_steps,
            generator,
            latents,
            output_type,
            return_dict,
            prior_callback_on_step_end,
            prior_callback_on_step_end_tensor_inputs,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            {"strength": strength, **_legacy(callback, callback_steps)},
            {"image": image},
        )


class KandinskyV22InpaintCombinedPipeline(_CombinedPipeline):
    """Text + image + mask → image: prior, then the inpaint decoder (white / 1 in the mask = repaint)."""

    _decoder = ("kandinsky22.pipelines.inpaint", "KandinskyV22InpaintPipeline")

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        image: Any,
        mask_image: Any,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 100,
        guidance_scale: float = 4.0,
        num_images_per_prompt: int = 1,
        height: int = 512,
        width: int = 512,
        prior_guidance_scale: float = 4.0,
        prior_num_inference_steps: int = 25,
        generator: Generator = None,
        latents: torch.Tensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        prior_callback_on_step_end: Callable | None = None,
        prior_callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (the reference's signature)
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006
        keep_unmasked: bool = False,
        **kwargs: Any,
    ) -> ImagePipelineOutput | tuple:
        """Inpaint ``image`` where ``mask_image`` is white / 1, guided by ``prompt``. ``keep_unmasked``: the result is
        ``image`` itself where the mask is 0 (see :class:`KandinskyV22InpaintPipeline`). ``kwargs``: the decoder's
        deprecated ``callback`` / ``callback_steps``."""
        check_keep_unmasked(keep_unmasked, output_type)  # before the prior runs
        return self._run(
            prompt,
            negative_prompt,
            num_images_per_prompt,
            num_inference_steps,
            guidance_scale,
            height,
            width,
            prior_guidance_scale,
            prior_num_inference_steps,
            generator,
            latents,
            output_type,
            return_dict,
            prior_callback_on_step_end,
            prior_callback_on_step_end_tensor_inputs,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            {**kwargs, "keep_unmasked": keep_unmasked},
            {"image": image, "mask_image": mask_image},
        )
