"""The prior pipelines: text (and images) → CLIP image embeddings for the decoders.

``KandinskyV22PriorPipeline`` samples an embedding from noise; ``KandinskyV22PriorEmb2EmbPipeline`` starts from a
noised image embedding (img2img in embedding space). Both share the prompt encoding, the denoising loop, the
zero-image negative embedding and ``interpolate`` (weighted mixing of text and image conditions).

Random draws follow the reference (reference-behaviour.md §1.1, §5.4): the start latents, then one noise draw per
step with t > 0, all from the caller's generator(s).
"""

from __future__ import annotations

import logging
import math
import numbers
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch

from kandinsky22.pipelines.base import (
    Generator,
    GuidedLoop,
    KandinskyPriorPipelineOutput,
    Pipeline,
    check_callback,
    check_callback_inputs,
    check_choice,
    check_generator,
    check_guidance_scale,
    check_positive_int,
    prompt_list,
    run_callback,
)
from kandinsky22.schedulers.noise import randn_tensor

logger = logging.getLogger(__name__)

PRIOR_OUTPUT_TYPES = ("pt", "np")
ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor

# The zero-image embedding is a constant of the image encoder (the reference recomputes it with a full ViT-bigG pass
# on every call). Cached per encoder object, and keyed by the device and dtype it ran in.
_ZERO_EMBEDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _PriorBase(GuidedLoop, Pipeline):
    component_names = ("prior", "image_encoder", "text_encoder", "tokenizer", "scheduler", "image_processor")

    def __init__(
        self,
        prior: Any,
        image_encoder: Any,
        text_encoder: Any,
        tokenizer: Any,
        scheduler: Any,
        image_processor: Any,
    ) -> None:
        super().__init__(
            prior=prior,
            image_encoder=image_encoder,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            scheduler=scheduler,
            image_processor=image_processor,
        )

    # -- conditions -------------------------------------------------------------------------------------------

    def _encode_prompt(
        self, prompts: list[str], n: int, uncond_prompts: list[str] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pooled embeddings (B·n, D), hidden states (B·n, 77, D) and token mask (B·n, 77), each sample repeated n
        times; with ``uncond_prompts`` (CFG) the unconditional batch comes first: [uncond; cond]."""
        device = self._execution_device
        text_encoder = self._use("text_encoder")
        texts = (uncond_prompts or []) + prompts
        max_length = self.tokenizer.model_max_length
        tokens = self.tokenizer(
            texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        )
        untruncated = self.tokenizer(texts, truncation=False)["input_ids"]
        for text, ids in zip(texts, untruncated):
            if len(ids) > max_length:
                # The start only: a prompt of tens of thousands of characters would fill the terminal.
                shown = text if len(text) <= 120 else text[:120] + "…"
                logger.warning(
                    "The prompt %r (%d characters, %d tokens) is longer than CLIP's %d tokens and was truncated",
                    shown,
                    len(text),
                    len(ids),
                    max_length,
                )
        # The reference runs the text tower without the padding mask (CLIP's causal mask only).
        out = text_encoder(tokens.input_ids.to(device))
        dtype = self.prior.dtype
        embeds = out.text_embeds.to(dtype).repeat_interleave(n, dim=0)
        hidden = out.last_hidden_state.to(dtype).repeat_interleave(n, dim=0)
        mask = tokens.attention_mask.bool().to(device).repeat_interleave(n, dim=0)
        return embeds, hidden, mask

    def _pixel_values(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        pixels = self.image_processor(list(images), return_tensors="pt").pixel_values
        return pixels.to(device=self._execution_device, dtype=self.image_encoder.dtype)

    def _check_pixels(self, pixels: torch.Tensor, name: str) -> None:
        """CLIP-preprocessed pixels must be (B, 3, S, S) at the image encoder's size S."""
        size = self.image_encoder.config.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(
                f"`{name}` pixels must have shape (B, 3, {size}, {size}) (CLIP-preprocessed for this image encoder), "
                f"got {tuple(pixels.shape)}"
            )

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        encoder = self._use("image_encoder")
        return encoder(pixels.to(device=self._execution_device, dtype=encoder.dtype)).image_embeds

    def get_zero_embed(self, batch_size: int = 1, device: torch.device | str | None = None) -> torch.Tensor:
        """The reference's name for ``zero_image_embeds``, on ``device`` (default: where the pipeline runs)."""
        check_positive_int("batch_size", batch_size)
        embeds = self.zero_image_embeds(batch_size)
        return embeds if device is None else embeds.to(device)

    def zero_image_embeds(self, batch_size: int = 1) -> torch.Tensor:
        """The CLIP embedding of an all-zero (normalized) image, the default negative; computed once per encoder,
        device and dtype."""
        encoder = self.image_encoder
        key = (self._execution_device, encoder.dtype)
        cached = _ZERO_EMBEDS.get(encoder)
        if cached is None or cached[0] != key:
            size = encoder.config.image_size
            zeros = torch.zeros(1, 3, size, size, device=key[0], dtype=key[1])
            with torch.no_grad():  # a cached constant: it must not keep the encoder's autograd graph alive
                cached = (key, self._encode_pixels(zeros))
            _ZERO_EMBEDS[encoder] = cached
        return cached[1].repeat(batch_size, 1)

    # -- sampling ---------------------------------------------------------------------------------------------

    def _check_embedding_width(self, embeds: torch.Tensor, name: str) -> None:
        width = self.prior.config.embedding_dim
        if embeds.ndim != 2 or embeds.shape[1] != width:
            raise ValueError(f"`{name}` must be image embeddings of shape (batch, {width}), got {tuple(embeds.shape)}")

    def _denoise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        text: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        guidance_scale: float,
        generator: Generator,
        callback_on_step_end: Callable | None = None,
        callback_tensor_names: Sequence[str] = (),
    ) -> torch.Tensor:
        """The prior loop over ``timesteps`` (a host table); returns un-normalized image embeddings."""
        check_callback("callback_on_step_end", callback_on_step_end)
        prior = self._use("prior")
        self._start_loop(guidance_scale, timesteps)
        names = ("prompt_embeds", "text_encoder_hidden_states", "text_mask")
        state = dict(zip(names, text), latents=latents)
        prior_timesteps = timesteps.to(latents.device)  # one copy, not a blocking one per step (see the decoder loop)
        # What the prior derives from the prompt (its tokens, their keys and values in every layer, the mask) and the
        # time tokens of every step: prepared once per run, and again only if a callback swaps a prompt tensor.
        prompt, context = None, None
        for i, t in enumerate(self.progress_bar(timesteps)):
            latents = state["latents"]
            guidance_scale = self._step_guidance(i, latents.shape[0], state, names)
            cfg = guidance_scale > 1
            x = torch.cat([latents, latents]) if cfg else latents
            if context is None or any(state[name] is not current for name, current in zip(names, prompt)):
                prompt = tuple(state[name] for name in names)
                context = prior.prepare_context(*prompt, timesteps=prior_timesteps)
            (pred,) = prior(x, timestep=prior_timesteps[i], context=context.at(i), return_dict=False)
            if cfg:
                uncond, cond = pred.chunk(2)
                pred = uncond + guidance_scale * (cond - uncond)
            prev_t = timesteps[i + 1] if i + 1 < len(timesteps) else None
            state["latents"] = self.scheduler.step(
                pred, timestep=t, sample=latents, generator=generator, prev_timestep=prev_t
            ).prev_sample
            run_callback(callback_on_step_end, self, i, t, callback_tensor_names, state)
        return prior.post_process_latents(state["latents"])

    def _prepare_prompts(
        self,
        prompt: Any,
        negative_prompt: Any,
        n: int,
        guidance_scale: float,
        generator: Generator,
        allow_empty: bool = False,
    ) -> tuple[list[str], list[str] | None, Generator]:
        """Check the prompts; return the batch prompts, the CFG unconditional prompts, and the generator(s).

        A negative prompt joins the batch, so that its own embedding comes out of the same run (reference §5.5),
        and is the CFG unconditional of both halves. A generator list of one per output embedding is reused for the
        negative half; a list covering the doubled batch (as the reference requires), or a list of one (which acts
        as its generator), is used as given.
        ``allow_empty`` admits the empty prompt, which ``interpolate`` runs internally as the reference does.
        """
        prompts = list(prompt) if allow_empty else prompt_list(prompt)
        if negative_prompt is None:
            uncond = [""] * len(prompts) if guidance_scale > 1 else None
            check_generator(generator, len(prompts) * n, "embedding")
            return prompts, uncond, generator
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
        if not isinstance(negatives, (list, tuple)) or not all(isinstance(p, str) for p in negatives):
            raise ValueError(f"`negative_prompt` must be a string or a list of strings, got {negative_prompt!r}")
        if len(negatives) != len(prompts):
            raise ValueError(
                f"`negative_prompt` has {len(negatives)} entries but `prompt` has {len(prompts)}: pass one negative "
                "prompt, or one per prompt"
            )
        negatives = list(negatives)
        if isinstance(generator, list) and len(generator) == len(prompts) * n > 1:
            generator = generator + generator
        check_generator(generator, 2 * len(prompts) * n, "embedding")
        return prompts + negatives, 2 * negatives if guidance_scale > 1 else None, generator

    def _sample_from_text(
        self,
        prompts: list[str],
        uncond: list[str] | None,
        has_negative: bool,
        n: int,
        num_inference_steps: int,
        generator: Generator,
        latents: torch.Tensor | None,
        guidance_scale: float,
        callback_on_step_end: Callable | None = None,
        callback_tensor_names: Sequence[str] = (),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings for ``prompts`` from noise, and their negatives (the negative half, or the zero embedding)."""
        text = self._encode_prompt(prompts, n, uncond)
        self.scheduler.set_timesteps(num_inference_steps)
        shape = (len(prompts) * n, self.prior.config.embedding_dim)
        device = self._execution_device
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=text[0].dtype)
        elif not isinstance(latents, torch.Tensor):
            raise ValueError(f"`latents` must be a torch.Tensor of shape {shape}, got {type(latents).__name__}")
        elif tuple(latents.shape) != shape:
            raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}")
        else:
            latents = latents.to(device=device, dtype=text[0].dtype)
        latents = latents * self.scheduler.init_noise_sigma
        embeds = self._denoise(
            latents,
            self.scheduler.timesteps,
            text,
            guidance_scale,
            generator,
            callback_on_step_end,
            callback_tensor_names,
        )
        if has_negative:
            return embeds.chunk(2)
        return embeds, self.zero_image_embeds(embeds.shape[0]).to(embeds.dtype)

    def _finish(
        self, embeds: torch.Tensor, negative: torch.Tensor, output_type: str, return_dict: bool
    ) -> KandinskyPriorPipelineOutput | tuple:
        self._end_of_call()
        if output_type == "np":
            embeds, negative = embeds.cpu().numpy(), negative.cpu().numpy()
        return KandinskyPriorPipelineOutput(embeds, negative) if return_dict else (embeds, negative)

    # -- interpolate ------------------------------------------------------------------------------------------

    def _condition_embeds(self, cond: Any, index: int, n: int) -> torch.Tensor:
        """One image condition of ``interpolate`` → (n, D): a PIL image, pixels (1, 3, H, W) or an embedding."""
        if isinstance(cond, PIL.Image.Image):
            embeds = self._encode_pixels(self._pixel_values([cond]))
        elif isinstance(cond, torch.Tensor) and cond.ndim == 4 and cond.shape[0] == 1:
            self._check_pixels(cond, f"images_and_prompts[{index}]")
            embeds = self._encode_pixels(cond)
        elif isinstance(cond, torch.Tensor) and cond.ndim in (1, 2) and cond.reshape(-1, cond.shape[-1]).shape[0] == 1:
            embeds = cond.reshape(1, -1).to(self._execution_device)
            self._check_embedding_width(embeds, f"images_and_prompts[{index}]")
        else:
            shape = tuple(cond.shape) if isinstance(cond, torch.Tensor) else None
            raise ValueError(
                f"`images_and_prompts[{index}]` must be a string, a PIL image, a (1, 3, H, W) pixel tensor or a (1, D) "
                f"image embedding, got {type(cond).__name__}{'' if shape is None else f' of shape {shape}'}"
            )
        return embeds.repeat(n, 1)

    @torch.no_grad()
    def interpolate(
        self,
        images_and_prompts: list[str | PIL.Image.Image | torch.Tensor],
        weights: list[float],
        num_images_per_prompt: int = 1,
        num_inference_steps: int = 25,
        generator: Generator = None,
        latents: torch.Tensor | None = None,
        negative_prior_prompt: str | None = None,
        negative_prompt: str | list[str] | None = "",
        guidance_scale: float = 4.0,
        device: torch.device | str | None = None,
    ) -> KandinskyPriorPipelineOutput:
        """The weighted sum of the embeddings of texts (a prior run each) and images (the CLIP image tower).

        The negative is the zero-image embedding when ``negative_prompt`` is empty (or None) and no
        ``negative_prior_prompt`` is given (no prior run is spent on it), else the prior's embedding of that text, as
        the reference's. ``negative_prompt`` may also be a list of one string, as in the reference: its text's own
        embedding, even for ``[""]`` (the reference compares only a string with ``""``).
        ``device`` is accepted for compatibility; the pipeline's execution device is used.
        """
        if not isinstance(images_and_prompts, (list, tuple)) or not images_and_prompts:
            raise ValueError(f"`images_and_prompts` must be a non-empty list, got {images_and_prompts!r}")
        if not isinstance(weights, (list, tuple)) or len(weights) != len(images_and_prompts):
            count = len(weights) if isinstance(weights, (list, tuple)) else weights
            raise ValueError(
                f"`weights` must be a list with one weight per item: {len(images_and_prompts)} items in "
                f"`images_and_prompts`, weights: {count!r}"
            )
        bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w)]
        if bad:
            raise ValueError(f"`weights` must be finite numbers, got {bad}")
        check_positive_int("num_images_per_prompt", num_images_per_prompt)
        check_positive_int("num_inference_steps", num_inference_steps)
        check_guidance_scale("guidance_scale", guidance_scale)
        if negative_prior_prompt is not None and not isinstance(negative_prior_prompt, str):
            raise ValueError(f"`negative_prior_prompt` must be a string or None, got {negative_prior_prompt!r}")
        # None is the default (the reference's prior fails on it, its emb2emb ignores it). A list gives one negative
        # per item, but the interpolated embedding is one per image: only a list of one string lines up with it.
        negative_is_list = isinstance(negative_prompt, (list, tuple))
        negative_text = "" if negative_prompt is None else negative_prompt
        if negative_is_list and len(negative_prompt) == 1:
            negative_text = negative_prompt[0]
        if not isinstance(negative_text, str):
            raise ValueError(
                f"`negative_prompt` must be a string, a list of one string, or None, got {negative_prompt!r}"
            )
        n = num_images_per_prompt

        def text_run(text: str) -> tuple[torch.Tensor, torch.Tensor]:
            negative = None if negative_prior_prompt is None else [negative_prior_prompt]
            prompts, uncond, gen = self._prepare_prompts([text], negative, n, guidance_scale, generator, True)
            return self._sample_from_text(
                prompts, uncond, negative is not None, n, num_inference_steps, gen, latents, guidance_scale
            )

        total = None
        for i, (cond, weight) in enumerate(zip(images_and_prompts, weights)):
            if isinstance(cond, str):
                prompt_list(cond, f"images_and_prompts[{i}]")
                embeds = text_run(cond)[0]
            else:
                embeds = self._condition_embeds(cond, i, n)
            total = embeds * weight if total is None else total + embeds * weight

        if negative_text == "" and not negative_is_list and negative_prior_prompt is None:
            negative = self.zero_image_embeds(n)
        elif negative_text == "" and not negative_is_list:
            # The reference runs the prior on "" with the negative prior prompt and returns that run's negative half.
            negative = text_run("")[1]
        else:
            negative = text_run(negative_text)[0]
        self._end_of_call()
        return KandinskyPriorPipelineOutput(total, negative.to(total.dtype))


class KandinskyV22PriorPipeline(_PriorBase):
    """Text → CLIP image embedding (and its negative) for the Kandinsky 2.2 decoders."""

    _callback_tensor_inputs = ["latents", "prompt_embeds", "text_encoder_hidden_states", "text_mask"]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        num_inference_steps: int = 25,
        generator: Generator = None,
        latents: torch.Tensor | None = None,
        guidance_scale: float = 4.0,
        output_type: str | None = "pt",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (the reference's signature)
    ) -> KandinskyPriorPipelineOutput | tuple:
        """Image embeddings for ``prompt`` (B·n of them) and negatives: the embeddings of ``negative_prompt``, or
        the zero-image embedding when there is none. ``latents``: the start noise, (B·n, D) (2·B·n with a negative
        prompt)."""
        check_positive_int("num_images_per_prompt", num_images_per_prompt)
        check_positive_int("num_inference_steps", num_inference_steps)
        check_guidance_scale("guidance_scale", guidance_scale)
        check_choice("output_type", output_type, PRIOR_OUTPUT_TYPES)
        names = check_callback_inputs(
            callback_on_step_end_tensor_inputs, self._callback_tensor_inputs, "callback_on_step_end_tensor_inputs"
        )
        prompts, uncond, generator = self._prepare_prompts(
            prompt, negative_prompt, num_images_per_prompt, guidance_scale, generator
        )
        embeds, negative = self._sample_from_text(
            prompts,
            uncond,
            negative_prompt is not None,
            num_images_per_prompt,
            num_inference_steps,
            generator,
            latents,
            guidance_scale,
            callback_on_step_end,
            names,
        )
        return self._finish(embeds, negative, output_type, return_dict)


class KandinskyV22PriorEmb2EmbPipeline(_PriorBase):
    """Text + a start image (or image embedding) → image embedding: the prior run from a noised image embedding."""

    def _start_embeds(self, image: Any, n: int, num_prompts: int) -> torch.Tensor:
        """``image`` → CLIP image embeddings (B_img·n, D), each repeated n times."""
        images = image if isinstance(image, (list, tuple)) else [image]
        if not images:
            raise ValueError("`image` must not be empty")
        if all(isinstance(i, torch.Tensor) for i in images):
            if any(i.ndim not in (2, 4) for i in images) or len({i.shape[1:] for i in images}) > 1:
                raise ValueError(
                    "`image` tensors must be image embeddings (B, D) or CLIP-preprocessed pixels (B, 3, H, W), all "
                    f"of one kind and size; got shapes {[tuple(i.shape) for i in images]}"
                )
            tensor = torch.cat(list(images))
            if tensor.ndim == 2:  # image embeddings, as the reference accepts
                self._check_embedding_width(tensor, "image")
                embeds = tensor.to(self._execution_device)
            else:  # pixels already preprocessed for CLIP
                self._check_pixels(tensor, "image")
                embeds = self._encode_pixels(tensor)
        elif all(isinstance(i, (PIL.Image.Image, np.ndarray)) for i in images):
            # Arrays go to the CLIP image processor as they are, as in the reference (HWC uint8, or float: the
            # processor reads the range), so that they give the reference's embeddings.
            arrays = [i for i in images if isinstance(i, np.ndarray)]
            if any(a.ndim not in (3, 4) for a in arrays):
                shapes = [a.shape for a in arrays]
                raise ValueError(f"`image` numpy arrays must be HWC images (or NHWC batches), got shapes {shapes}")
            embeds = self._encode_pixels(self._pixel_values(images))
        else:
            kinds = sorted({type(i).__name__ for i in images})
            raise ValueError(
                f"`image` must be PIL images and numpy arrays, or tensors (not mixed with them), got {kinds}"
            )
        if embeds.shape[0] not in (1, num_prompts):
            raise ValueError(
                f"`image` holds {embeds.shape[0]} images for {num_prompts} prompts: pass one image, or one per prompt"
            )
        return embeds.repeat_interleave(n, dim=0)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        image: ImageInput | list[ImageInput],
        strength: float = 0.3,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        num_inference_steps: int = 25,
        generator: Generator = None,
        guidance_scale: float = 4.0,
        output_type: str | None = "pt",
        return_dict: bool = True,
    ) -> KandinskyPriorPipelineOutput | tuple:
        """Like the prior pipeline, but the run starts at ``strength`` of the way from ``image``'s embedding.

        As in the reference, the raw CLIP embedding is noised (reference-behaviour.md §5.7).
        """
        check_positive_int("num_images_per_prompt", num_images_per_prompt)
        check_positive_int("num_inference_steps", num_inference_steps)
        check_guidance_scale("guidance_scale", guidance_scale)
        check_choice("output_type", output_type, PRIOR_OUTPUT_TYPES)
        if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0 < strength <= 1:
            raise ValueError(f"`strength` must be in (0, 1], got {strength!r}")
        run_steps = min(int(num_inference_steps * strength), num_inference_steps)
        if run_steps < 1:
            raise ValueError(
                f"`strength` {strength} × `num_inference_steps` {num_inference_steps} leaves no denoising step; "
                "raise one of them"
            )
        n = num_images_per_prompt
        prompts, uncond, generator = self._prepare_prompts(prompt, negative_prompt, n, guidance_scale, generator)
        num_prompts = len(prompts) // 2 if negative_prompt is not None else len(prompts)
        start = self._start_embeds(image, n, num_prompts)
        text = self._encode_prompt(prompts, n, uncond)

        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps[num_inference_steps - run_steps :]
        batch = len(prompts) * n
        start = start.to(text[0].dtype)
        start = torch.cat([start] * (batch // start.shape[0]))  # tiled, as the reference (not interleaved)
        noise = randn_tensor(start.shape, generator=generator, device=start.device, dtype=start.dtype)
        latents = self.scheduler.add_noise(start, noise, timesteps[:1].repeat(batch))
        embeds = self._denoise(latents, timesteps, text, guidance_scale, generator)
        if negative_prompt is not None:
            embeds, negative = embeds.chunk(2)
        else:
            negative = self.zero_image_embeds(embeds.shape[0]).to(embeds.dtype)
        return self._finish(embeds, negative, output_type, return_dict)
