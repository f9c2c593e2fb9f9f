"""THE decoder denoising loop, shared by text2img, img2img, inpaint and controlnet, and the text2img pipeline.

Every decoder pipeline subclasses ``DecoderPipeline`` and writes a ``__call__`` that (1) validates its inputs with
the ``_check_*`` helpers, (2) builds the loop ``state`` with ``_conditioning``, (3) makes the start latents and the
timestep table, (4) runs ``_denoise`` and (5) returns ``_finish``. The variants differ only through three hooks,
each a method to override, all reading the per-call tensors from ``state``:

* ``_unet_input(latent_input, state, i)`` — what the UNet sees besides the (CFG-doubled) latents. Default: the
  latents; inpaint concatenates ``state["masked_image"]`` and ``state["mask_image"]`` on the channel axis.
* ``_added_cond_kwargs(state)`` — the UNet's ``added_cond_kwargs``. Default: ``{"image_embeds": ...}``;
  controlnet adds ``"hint": state["hint"]``. The UNet turns them into its per-run ``conditioning`` once per call
  (again if a callback replaces one of these tensors).
* ``_after_step(latents, state, i, timesteps)`` — applied to the scheduler's result of step ``i``. Default: none;
  inpaint blends the re-noised original back into the kept region.

How latents start is not a hook: each ``__call__`` passes its own start latents and timestep table (img2img: the
encoded image noised to the first of the remaining timesteps).

``state`` is a dict of tensors: ``latents``, ``image_embeds`` (the UNet conditioning: ``[negative; positive]`` under
classifier-free guidance, each repeated per image), ``negative_image_embeds``, ``timesteps_on_device`` (the loop's
device copy of the timestep table, made once) and whatever a variant adds. The names
listed in ``callback_on_step_end_tensor_inputs`` are handed to the callback after each step, and the tensors it
returns replace those in ``state`` — so the hooks see what the callback set.

The loop never reads a tensor value on the host: the timesteps come from the scheduler's host table, and the
guidance decision is a Python float comparison made once.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch

from kandinsky22.pipelines.base import (
    Generator,
    GuidedLoop,
    ImagePipelineOutput,
    Pipeline,
    check_callback,
    check_callback_inputs,
    check_choice,
    check_generator,
    check_guidance_scale,
    check_positive_int,
    convert_images,
    run_callback,
    step_accepts_generator,
)
from kandinsky22.schedulers.noise import randn_tensor

DECODER_OUTPUT_TYPES = ("pil", "np", "pt", "latent")
Embeds = torch.Tensor | list[torch.Tensor]


def untrained_timestep(scheduler: Any, timesteps: torch.Tensor) -> int | None:
    """The first of ``timesteps`` (the scheduler's table for a run, from the step the run starts at) when it lies past
    the timesteps the UNet was trained on (0..T-1), else ``None``.

    "leading" spacing with a ``steps_offset`` reaches T when ``num_inference_steps`` = T (the official DDPM config at
    1000 steps): DDPM and DDIM then index past their tables inside the first step (an IndexError, in the reference
    too). The pipelines refuse such a run before it starts; :func:`kandinsky22.jobs.check_steps` asks the same of a
    scheduler built from a decoder's config before the models load.
    """
    first = int(timesteps[0])  # the largest; a host table, no device read
    return first if first >= scheduler.config.num_train_timesteps else None


class DecoderPipeline(GuidedLoop, Pipeline):
    """Base of the decoder pipelines: components ``unet``, ``scheduler``, ``movq``; the loop and its helpers."""

    component_names = ("unet", "scheduler", "movq")
    _callback_tensor_inputs = ["latents", "image_embeds", "negative_image_embeds"]
    # The loop state's tensors that guidance doubles ([negative; positive]), as the UNet takes them
    _guided_inputs: ClassVar[tuple[str, ...]] = ("image_embeds",)
    output_types: Sequence[str] = DECODER_OUTPUT_TYPES
    # The UNet this pipeline drives: its input channels (a · latent channels + b), whether it encodes a depth hint, and
    # the official repository that holds one.
    _unet_inputs: ClassVar[tuple[int, int]] = (1, 0)
    _unet_takes_hint: ClassVar[bool] = False
    _unet_repository: ClassVar[str] = "kandinsky-2-2-decoder"

    def __init__(self, unet: Any, scheduler: Any, movq: Any) -> None:
        super().__init__(unet=unet, scheduler=scheduler, movq=movq)

    @property
    def movq_scale_factor(self) -> int:
        return 2 ** (len(self.movq.config.block_out_channels) - 1)

    # -- input checks (each raises ValueError naming the parameter) -----------------------------------------------

    def _check_unet(self) -> None:
        """The UNet must be of this pipeline's kind: another checkpoint's fails deep inside the first step (a channel
        mismatch), or, a plain decoder's under controlnet, ignores the hint."""
        config = self.unet.config
        per_latent_channel, extra = self._unet_inputs
        channels = per_latent_channel * self.movq.config.latent_channels + extra
        hint = config.get("addition_embed_type") == "image_hint"
        if config.in_channels != channels or hint != self._unet_takes_hint:
            raise ValueError(
                f"{type(self).__name__} needs a UNet with {channels} input channels"
                f"{' and a depth-hint encoder' if self._unet_takes_hint else ''}, but this one has "
                f"{config.in_channels}{' and a depth-hint encoder' if hint else ''}: load a "
                f"{self._unet_repository} repository"
            )

    def _check_embeds(self, image_embeds: Embeds, negative_image_embeds: Embeds) -> tuple[torch.Tensor, torch.Tensor]:
        """Both embeddings as (B, D) tensors of the UNet's width; a single negative is used for every positive."""
        width = self.unet.config.encoder_hid_dim
        tensors = []
        for name, value in (("image_embeds", image_embeds), ("negative_image_embeds", negative_image_embeds)):
            if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
                for i, item in enumerate(value):
                    if item.ndim != 2 or item.shape[1] != width:
                        raise ValueError(
                            f"`{name}[{i}]` must have shape (batch, {width}) for this UNet, got {tuple(item.shape)}"
                        )
                value = torch.cat(list(value))
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"`{name}` must be a tensor or a list of tensors, got {type(value).__name__}")
            if value.ndim != 2 or value.shape[1] != width:
                raise ValueError(f"`{name}` must have shape (batch, {width}) for this UNet, got {tuple(value.shape)}")
            tensors.append(value)
        positive, negative = tensors
        if negative.shape[0] not in (1, positive.shape[0]):
            raise ValueError(
                f"`negative_image_embeds` has batch {negative.shape[0]} but `image_embeds` has {positive.shape[0]}: "
                "pass one negative embedding, or one per positive"
            )
        return positive, negative.expand(positive.shape[0], -1)

    def _check_run(
        self,
        batch_size: int,
        num_inference_steps: int,
        num_images_per_prompt: int,
        guidance_scale: float,
        output_type: str,
        generator: Generator,
        callback_on_step_end_tensor_inputs: Sequence[str] | None,
        callback_steps: int | None = None,
    ) -> list[str]:
        """Checks every decoder shares; returns the callback tensor names."""
        self._check_unet()
        check_positive_int("num_inference_steps", num_inference_steps)
        check_positive_int("num_images_per_prompt", num_images_per_prompt)
        check_guidance_scale("guidance_scale", guidance_scale)
        if callback_steps is not None:
            check_positive_int("callback_steps", callback_steps)
        check_choice("output_type", output_type, self.output_types)
        check_generator(generator, batch_size * num_images_per_prompt)
        return check_callback_inputs(
            callback_on_step_end_tensor_inputs, self._callback_tensor_inputs, "callback_on_step_end_tensor_inputs"
        )

    def _latent_size(self, height: int, width: int, warn: bool = True) -> tuple[int, int]:
        """Latent (h, w) for an image of ``height`` × ``width``, rounded up as the reference does (a multiple of
        ``scale_factor²`` pixels, i.e. 64 for the official MoVQ); one warning (``warn``) names the size produced."""
        for name, value in (("height", height), ("width", width)):
            check_positive_int(name, value)
        sf = self.movq_scale_factor
        latent = (math.ceil(height / sf**2) * sf, math.ceil(width / sf**2) * sf)
        if warn and (latent[0] * sf, latent[1] * sf) != (height, width):
            warnings.warn(
                f"height={height} and width={width} are not both multiples of {sf**2}: the image will be "
                f"{latent[0] * sf}x{latent[1] * sf} (height x width)",
                stacklevel=3,
            )
        return latent

    @staticmethod
    def _legacy_callback(kwargs: dict[str, Any]) -> tuple[Callable | None, int]:
        """The deprecated ``callback`` / ``callback_steps`` keywords (``callback_steps`` defaults to 1)."""
        callback = kwargs.pop("callback", None)
        callback_steps = kwargs.pop("callback_steps", None)
        if kwargs:
            raise TypeError(f"unexpected keyword arguments {sorted(kwargs)}")
        if callback_steps is not None:
            check_positive_int("callback_steps", callback_steps)
        return callback, callback_steps or 1

    def _check_inputs(
        self,
        batch: int,
        height: int,
        width: int,
        num_inference_steps: int,
        first_step: int = 0,
        latents: torch.Tensor | None = None,
        **legacy: Any,
    ) -> None:
        """Refuse, as ``__call__`` would, start ``latents`` of the wrong shape, the deprecated ``callback`` /
        ``callback_steps`` in ``legacy`` and a ``num_inference_steps`` the scheduler refuses (from index
        ``first_step`` of its table), without running a model. The combined pipelines call this before the prior runs
        (seconds to minutes with real weights); subclasses add their image-like inputs. ``batch``: the number of image
        embeddings."""
        if latents is not None:
            shape = (batch, self.movq.config.latent_channels, *self._latent_size(height, width, warn=False))
            self._check_latents(latents, shape)
        callback, _ = self._legacy_callback(dict(legacy))
        check_callback("callback", callback)
        self._check_timesteps(self._timesteps(num_inference_steps)[first_step:])
        if first_step:  # a sampler that cannot start mid-schedule (PNDM's Runge–Kutta warm-up) refuses it here
            self.scheduler.set_begin_index(first_step)

    # -- building blocks of __call__ ------------------------------------------------------------------------------

    def _conditioning(
        self, image_embeds: torch.Tensor, negative_image_embeds: torch.Tensor, n: int, guidance_scale: float
    ) -> dict[str, torch.Tensor]:
        """The loop state's embeddings, each repeated per image and cast to the UNet's device and dtype — also
        without guidance (the reference skips that there, so n > 1 or a dtype mismatch crash; §5.1)."""
        to = {"device": self._execution_device, "dtype": self.unet.dtype}
        positive = image_embeds.repeat_interleave(n, dim=0).to(**to)
        negative = negative_image_embeds.repeat_interleave(n, dim=0).to(**to)
        cond = torch.cat([negative, positive]) if guidance_scale > 1 else positive
        return {"image_embeds": cond, "negative_image_embeds": negative}

    def _timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """The scheduler's timestep table for this run, on the host."""
        self.scheduler.set_timesteps(num_inference_steps)
        return self.scheduler.timesteps

    def _check_timesteps(self, timesteps: torch.Tensor) -> None:
        """See :func:`untrained_timestep`: a table that reaches past the trained timesteps is refused here."""
        first = untrained_timestep(self.scheduler, timesteps)
        if first is not None:
            config = self.scheduler.config
            steps = getattr(self.scheduler, "num_inference_steps", len(timesteps))
            spacing, offset = config.get("timestep_spacing"), config.get("steps_offset")
            raise ValueError(
                f"`num_inference_steps`={steps} gives timestep {first} with this scheduler (timestep_spacing="
                f"{spacing!r}, steps_offset={offset}), past the {config.num_train_timesteps} trained timesteps: use "
                "fewer steps"
            )

    def _start_noise(self, shape: tuple[int, ...], generator: Generator, latents: torch.Tensor | None) -> torch.Tensor:
        """Start latents: ``_noise`` times the scheduler's ``init_noise_sigma``. Call it after ``_timesteps``, as the
        reference: a σ scheduler's ``init_noise_sigma`` is that of the run's timestep table (Euler with "leading"
        spacing: σ of the first step), not that of the table installed before (the full range, or the previous run's)."""
        return self._noise(shape, generator, latents) * self.scheduler.init_noise_sigma

    def _noise(self, shape: tuple[int, ...], generator: Generator, latents: torch.Tensor | None) -> torch.Tensor:
        """Unit noise: drawn from the generator(s), or the caller's ``latents`` (checked, moved and cast)."""
        to = {"device": self._execution_device, "dtype": self.unet.dtype}
        if latents is None:
            return randn_tensor(shape, generator=generator, **to)
        self._check_latents(latents, shape)
        return latents.to(**to)

    @staticmethod
    def _check_latents(latents: Any, shape: tuple[int, ...]) -> None:
        if not isinstance(latents, torch.Tensor):
            raise ValueError(f"`latents` must be a torch.Tensor of shape {tuple(shape)}, got {type(latents).__name__}")
        if tuple(latents.shape) != tuple(shape):
            raise ValueError(f"`latents` must have shape {tuple(shape)}, got {tuple(latents.shape)}")

    # -- hooks ----------------------------------------------------------------------------------------------------

    def _unet_input(self, latent_input: torch.Tensor, state: dict[str, torch.Tensor], i: int) -> torch.Tensor:
        return latent_input

    def _added_cond_kwargs(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"image_embeds": state["image_embeds"]}

    def _after_step(
        self, latents: torch.Tensor, state: dict[str, torch.Tensor], i: int, timesteps: torch.Tensor
    ) -> torch.Tensor:
        return latents

    # -- the loop -------------------------------------------------------------------------------------------------

    def _denoise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        state: dict[str, torch.Tensor],
        guidance_scale: float,
        generator: Generator,
        callback_on_step_end: Callable | None = None,
        callback_tensor_names: Sequence[str] = (),
        callback: Callable | None = None,
        callback_steps: int = 1,
    ) -> torch.Tensor:
        """Denoise ``latents`` over ``timesteps``; returns the final latents (also left in ``state["latents"]``)."""
        self._check_timesteps(timesteps)
        check_callback("callback_on_step_end", callback_on_step_end)
        check_callback("callback", callback)
        unet = self._use("unet")
        self._start_loop(guidance_scale, timesteps)
        channels = latents.shape[1]
        # Only a learned-variance scheduler uses the UNet's variance channels (none of the official configs does).
        learned_variance = self.scheduler.config.get("variance_type") in ("learned", "learned_range")
        # The reference passes the generator to every sampler: UniPC's step, which takes none, raises a TypeError there.
        step_kwargs = {"generator": generator} if step_accepts_generator(self.scheduler) else {}
        order = getattr(self.scheduler, "order", 1)
        # The UNet reads the timestep from a device copy of the table made once: a per-step host-to-device copy would
        # block until the GPU has caught up, so the host could not queue the next step's kernels ahead of it. The
        # scheduler and the callbacks keep the host values.
        unet_timesteps = state["timesteps_on_device"] = timesteps.to(latents.device)
        # What the UNet derives from its conditioning (the context tokens' keys and values in every attention layer,
        # the time-embedding addition, an encoded hint) is the same at every step, and its time modulations depend on
        # the step only: all prepared once per run, and again only if a callback swaps a conditioning tensor.
        added: dict[str, torch.Tensor] = {}
        conditioning = None
        state["latents"] = latents
        for i, t in enumerate(self.progress_bar(timesteps)):
            latents = state["latents"]
            guidance_scale = self._step_guidance(i, latents.shape[0], state, self._guided_inputs)
            cfg = guidance_scale > 1
            latent_input = torch.cat([latents, latents]) if cfg else latents
            latent_input = self.scheduler.scale_model_input(latent_input, t)
            current = self._added_cond_kwargs(state)
            if conditioning is None or current.keys() != added.keys() or any(current[k] is not added[k] for k in added):
                added, conditioning = current, unet.prepare_conditioning(current, unet_timesteps)
            (out,) = unet(
                self._unet_input(latent_input, state, i),
                unet_timesteps[i],
                encoder_hidden_states=None,
                conditioning=conditioning.at(i),
                return_dict=False,
            )
            eps, variance = out[:, :channels], out[:, channels:]
            if cfg:  # one batch of 2: [negative; positive]
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
                variance = variance.chunk(2)[1]
            model_output = torch.cat([eps, variance], dim=1) if learned_variance else eps
            latents = self.scheduler.step(model_output, t, latents, **step_kwargs).prev_sample
            state["latents"] = self._after_step(latents, state, i, timesteps)
            run_callback(callback_on_step_end, self, i, t, callback_tensor_names, state)
            if callback is not None and i % callback_steps == 0:
                callback(i // order, t, state["latents"])
        return state["latents"]

    # -- output ---------------------------------------------------------------------------------------------------

    def _finish(
        self,
        latents: torch.Tensor,
        output_type: str,
        return_dict: bool,
        pixels: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Decode with MoVQ and convert: ``pt`` is a float tensor in [0, 1], NCHW, for every decoder pipeline.
        ``pixels``: applied to the decoded images (in [-1, 1]) before the conversion."""
        if output_type == "latent":
            images = latents
        else:
            movq = self._use("movq")
            decoded = movq.decode(latents, force_not_quantize=True).sample
            images = convert_images(decoded if pixels is None else pixels(decoded), output_type)
        self._end_of_call()
        return ImagePipelineOutput(images) if return_dict else (images,)


class KandinskyV22Pipeline(DecoderPipeline):
    """Text2img decoder: CLIP image embeddings (from the prior) → images."""

    @torch.no_grad()
    def __call__(
        self,
        image_embeds: Embeds,
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
        **kwargs: Any,
    ) -> ImagePipelineOutput | tuple:
        """Images for ``image_embeds`` (B of them, n images each). Sizes round up to multiples of 64 px (with a
        warning). ``latents``: the start noise, (B·n, 4, h/8, w/8). ``kwargs``: the deprecated ``callback`` and
        ``callback_steps``."""
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
        latent_size = self._latent_size(height, width)
        shape = (batch * num_images_per_prompt, self.unet.config.in_channels, *latent_size)
        timesteps = self._timesteps(num_inference_steps)
        start = self._start_noise(shape, generator, latents)
        state = self._conditioning(image_embeds, negative_image_embeds, num_images_per_prompt, guidance_scale)
        latents = self._denoise(
            start, timesteps, state, guidance_scale, generator, callback_on_step_end, names, callback, callback_steps
        )
        return self._finish(latents, output_type, return_dict)
