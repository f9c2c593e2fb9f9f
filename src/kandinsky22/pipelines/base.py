"""What every pipeline shares: components, loading and saving, devices, offloading, progress bars, outputs, noise.

A pipeline is a named set of components (models, a scheduler, transformers objects) plus a ``__call__``. Component
names and the ``model_index.json`` layout are the reference's, so a folder saved by either library loads in the other
and ``OtherPipeline(**pipe.components)`` shares the modules without copying them.
"""

from __future__ import annotations

import inspect
import math
import numbers
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import PIL.Image
import torch
from torch import nn
from tqdm.auto import tqdm

from kandinsky22 import fast, loading
from kandinsky22.lora import LoraPipelineMixin
from kandinsky22.models.movq import VQModel
from kandinsky22.models.unet import UNet2DConditionModel

Generator = torch.Generator | list[torch.Generator] | None


# ----------------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------------


class _Output:
    """Attribute, index (``out[0]``), key (``out["images"]``) and tuple (``out.to_tuple()``) access to the fields."""

    _fields: ClassVar[tuple[str, ...]] = ()

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, name) for name in self._fields)

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]  # an IndexError past the end also makes `a, b = out` unpack the fields

    def __len__(self) -> int:
        return len(self._fields)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self._fields)})"


class ImagePipelineOutput(_Output):
    """``images``: a list of PIL images, an (N, H, W, 3) float array in [0, 1], an (N, 3, H, W) tensor in [0, 1], or
    latents (``output_type="latent"``)."""

    _fields = ("images",)

    def __init__(self, images: Any) -> None:
        self.images = images


class KandinskyPriorPipelineOutput(_Output):
    """CLIP image embeddings for the prompts and for the negative (both (N, D), tensors or arrays)."""

    _fields = ("image_embeds", "negative_image_embeds")

    def __init__(self, image_embeds: Any, negative_image_embeds: Any) -> None:
        self.image_embeds = image_embeds
        self.negative_image_embeds = negative_image_embeds


# ----------------------------------------------------------------------------------------------------------------------
# Input checks shared by the pipelines (raised where user input enters)
# ----------------------------------------------------------------------------------------------------------------------


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}")


def check_guidance_scale(name: str, value: Any) -> None:
    """A real, finite number (NaN compares false with everything, so it would silently turn guidance off); as in the
    reference, a value <= 1 runs without classifier-free guidance."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}")


def split_load_options(cls: type, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``from_pretrained``'s keyword arguments as (loading options, components by name); anything else is refused."""
    names = (*loading.HUB_OPTIONS, "use_safetensors")
    unknown = [k for k in kwargs if k not in names and k not in cls.component_names]
    if unknown:
        raise ValueError(
            f"{cls.__name__}.from_pretrained got unknown components or options {unknown}; its components are "
            f"{list(cls.component_names)}, its options torch_dtype, variant, {', '.join(names)}"
        )
    options = {k: v for k, v in kwargs.items() if k in names}
    loading.weight_formats(options.get("use_safetensors"))  # checked before anything is read
    return options, {k: v for k, v in kwargs.items() if k not in names}


def hub_options(options: dict[str, Any]) -> dict[str, Any]:
    """The hub's share of the loading options (``use_safetensors`` is for the weight files)."""
    return {k: v for k, v in options.items() if k in loading.HUB_OPTIONS}


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {list(allowed)}, got {value!r}")


def check_callback(name: str, value: Any) -> None:
    """Checked before the loop: calling a non-callable fails only after the first step has run."""
    if value is not None and not callable(value):
        raise ValueError(f"`{name}` must be a callable or None, got {type(value).__name__}")


def check_callback_inputs(names: Iterable[str] | None, allowed: Sequence[str], name: str) -> list[str]:
    if names is not None and (isinstance(names, str) or not isinstance(names, Iterable)):
        raise ValueError(f"`{name}` must be a list of names from {list(allowed)}, got {names!r}")
    names = list(names or [])
    unknown = [k for k in names if k not in allowed]
    if unknown:
        raise ValueError(f"`{name}` may only name {list(allowed)}; unknown: {unknown}")
    return names


def check_generator(generator: Generator, batch_size: int, what: str = "image") -> None:
    """A generator list needs one generator per sample (``batch_size``), or is a list of one, which acts as that
    generator (as in the reference and ``randn_tensor``)."""
    if isinstance(generator, list):
        if len(generator) not in (1, batch_size) or not all(isinstance(g, torch.Generator) for g in generator):
            raise ValueError(
                f"`generator` is a list of {len(generator)} items, but {batch_size} {what}s are generated: pass one "
                f"torch.Generator, or a list of exactly {batch_size} torch.Generators (one per {what})"
            )
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"`generator` must be a torch.Generator or a list of them, got {type(generator).__name__}")


def prompt_list(prompt: Any, name: str = "prompt") -> list[str]:
    """``prompt`` as a non-empty list of non-empty strings."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"`{name}` must be a non-empty string or a non-empty list of strings, got {prompt!r}")
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"`{name}` must contain only non-empty strings, got {p!r} in {prompt!r}")
    return list(prompts)


# ----------------------------------------------------------------------------------------------------------------------
# Images out
# ----------------------------------------------------------------------------------------------------------------------


def numpy_to_pil(images: np.ndarray) -> list[PIL.Image.Image]:
    """(N, H, W, C) floats in [0, 1] → PIL images, rounding as the reference (``(x * 255).round()``)."""
    images = (images * 255).round().astype("uint8")
    if images.shape[-1] == 1:
        return [PIL.Image.fromarray(image[..., 0], mode="L") for image in images]
    return [PIL.Image.fromarray(image) for image in images]


def convert_images(images: torch.Tensor, output_type: str) -> Any:
    """Decoded images in [-1, 1] (N, 3, H, W) → ``"pt"`` (float, [0, 1], NCHW), ``"np"`` (NHWC float32) or ``"pil"``."""
    images = (images.float() * 0.5 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images
    array = images.cpu().permute(0, 2, 3, 1).numpy()
    return array if output_type == "np" else numpy_to_pil(array)


# ----------------------------------------------------------------------------------------------------------------------
# CPU offloading (our own, no accelerate)
# ----------------------------------------------------------------------------------------------------------------------


class _ModelOffload:
    """Keep every model on the CPU and move one whole model to the execution device when the pipeline uses it.

    Shared by the sub-pipelines of a combined pipeline, so that using the UNet sends the prior back to the CPU.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.active: nn.Module | None = None

    def use(self, module: nn.Module) -> nn.Module:
        if module is not self.active:
            self.release()
            module.to(self.device)
            self.active = module
        return module

    def release(self) -> None:
        if self.active is not None:
            self.active.to("cpu")
            self.active = None


def _move_own_tensors(module: nn.Module, device: torch.device) -> None:
    """Move the parameters and buffers that ``module`` itself holds (not its children's)."""
    for param in module._parameters.values():
        if param is not None:
            param.data = param.data.to(device)
    for name, buffer in module._buffers.items():
        if buffer is not None:
            module._buffers[name] = buffer.to(device)


def _attach_sequential_offload(model: nn.Module, device: torch.device) -> None:
    """Each submodule's own weights visit ``device`` only while its ``forward`` runs.

    The root's own tensors (e.g. the prior's positional embedding and CLIP statistics, which ``post_process_latents``
    reads outside ``forward``) are small and stay on ``device``.
    """
    model.to("cpu")
    _move_own_tensors(model, device)
    for sub in model.modules():
        if sub is model or not (sub._parameters or sub._buffers):
            continue
        sub.register_forward_pre_hook(lambda m, args: _move_own_tensors(m, device))
        sub.register_forward_hook(lambda m, args, out: _move_own_tensors(m, torch.device("cpu")))


def offload_device(gpu_id: int | None, device: torch.device | str | None) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if gpu_id is not None:
        device = torch.device(device.type, gpu_id)
    elif device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    return device


# ----------------------------------------------------------------------------------------------------------------------
# The pipeline base
# ----------------------------------------------------------------------------------------------------------------------


# Device types on which the pipelines keep the UNet's and MoVQ's weights channels_last (see
# Pipeline._prefer_channels_last). Not the CPU: there the tiny benchmark's eager pipeline took 1.015-1.05x its NCHW
# time in channels_last (bench/README.md).
CHANNELS_LAST_DEVICES = {"cuda"}


class Pipeline(LoraPipelineMixin):
    """Components by name, ``from_pretrained`` / ``save_pretrained``, ``to``, offloading and the progress bar.

    A subclass lists its components in ``component_names`` (the reference's constructor order) and calls
    ``super().__init__(**components)``. Inside ``__call__`` it fetches models through ``self._use(name)``, the one place
    where model offloading moves a model to the execution device.
    """

    component_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **components: Any) -> None:
        missing = [name for name in self.component_names if name not in components]
        unknown = [name for name in components if name not in self.component_names]
        if missing or unknown:
            raise TypeError(
                f"{type(self).__name__} takes {list(self.component_names)}; missing {missing}, got {unknown}"
            )
        for name in self.component_names:
            setattr(self, name, components[name])
        self._progress_bar_config: dict[str, Any] = {}
        self._name_or_path: str | None = None
        self._offload: _ModelOffload | None = None
        self._sequential_device: torch.device | None = None
        self._prefer_channels_last()

    # -- components --------------------------------------------------------------------------------------------

    @property
    def components(self) -> dict[str, Any]:
        """The components by constructor name: ``OtherPipeline(**pipe.components)`` shares them."""
        return {name: getattr(self, name) for name in self.component_names}

    def _modules(self) -> list[nn.Module]:
        return [c for c in self.components.values() if isinstance(c, nn.Module)]

    # -- loading and saving ------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike,
        torch_dtype: torch.dtype | None = None,
        variant: str | None = None,
        **component_overrides: Any,
    ):
        """Load a folder or hub repository in the reference layout (``model_index.json`` + one folder per component).

        Components passed by name (``scheduler=...``) are used instead of loading them; on the hub only the files of
        the components still needed are downloaded. The reference's loading options are taken too: ``use_safetensors``
        and the hub's ``revision``, ``cache_dir``, ``token``, ``local_files_only``, ``force_download``, ``proxies``.
        """
        options, components = split_load_options(cls, component_overrides)
        folder, index = loading.read_model_index(path_or_id, **hub_options(options))
        pipe = cls(**cls._load_components(path_or_id, folder, index, torch_dtype, variant, components, options))
        pipe._name_or_path = str(path_or_id)
        return pipe

    @classmethod
    def from_pipe(cls, pipeline: Pipeline, torch_dtype: torch.dtype | None = None, **components: Any):
        """A ``cls`` pipeline sharing ``pipeline``'s components (no copy), e.g.
        ``KandinskyV22Img2ImgPipeline.from_pipe(text2img_pipe)``; ``components`` replace or add some by name, and
        ``torch_dtype`` casts the new pipeline's models (the shared modules are the same objects, so the original's
        too, as in the reference)."""
        if not isinstance(pipeline, Pipeline):
            raise ValueError(f"{cls.__name__}.from_pipe takes a kandinsky22 pipeline, got {type(pipeline).__name__}")
        unknown = [k for k in components if k not in cls.component_names]
        if unknown:
            raise ValueError(f"{cls.__name__} has no components {unknown}; it has {list(cls.component_names)}")
        available = {**pipeline.components, **components}
        missing = [k for k in cls.component_names if k not in available]
        if missing:
            raise ValueError(
                f"{cls.__name__}.from_pipe: {type(pipeline).__name__} has no {missing}; pass them by name "
                f"(it has {list(pipeline.component_names)})"
            )
        pipe = cls(**{name: available[name] for name in cls.component_names})
        pipe._name_or_path = pipeline.name_or_path
        if torch_dtype is not None:
            if not isinstance(torch_dtype, torch.dtype):
                raise ValueError(f"`torch_dtype` must be a torch.dtype or None, got {torch_dtype!r}")
            pipe.to(torch_dtype)
        return pipe

    @property
    def name_or_path(self) -> str | None:
        """The folder or hub id this pipeline was loaded from (None for one built from components)."""
        return self._name_or_path

    @property
    def config(self) -> loading.Config:
        """As the reference's: each component's ``(library, class name)``, and ``_name_or_path``."""
        entries = {name: (loading.component_library(c), type(c).__name__) for name, c in self.components.items()}
        return loading.Config({**entries, "_name_or_path": self.name_or_path})

    @classmethod
    def _load_components(
        cls,
        path_or_id: str | os.PathLike,
        folder: Path,
        index: dict,
        torch_dtype: torch.dtype | None,
        variant: str | None,
        overrides: dict[str, Any],
        options: dict[str, Any],
        names: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        if torch_dtype is not None and not isinstance(torch_dtype, torch.dtype):
            # `Module.to` would take a string for a device name ("Invalid device string: 'float16'")
            raise ValueError(f"`torch_dtype` must be a torch.dtype (e.g. torch.float16) or None, got {torch_dtype!r}")
        components = {}
        for name in names or cls.component_names:
            if name in overrides:
                components[name] = overrides[name]
                continue
            if name not in index:
                raise ValueError(
                    f"'{path_or_id}' has no component '{name}' in its model_index.json (it has "
                    f"{sorted(k for k in index if not k.startswith('_'))}); pass `{name}=` to {cls.__name__}.from_pretrained"
                )
            library, class_name = index[name]
            components[name] = loading.load_component(
                path_or_id, name, library, class_name, torch_dtype, variant, **options
            )
        return components

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
    ) -> None:
        """Write ``model_index.json`` and one folder per component, in the layout the reference loads.

        As the reference, each option goes to the components whose ``save_pretrained`` takes it: ``variant`` names
        the weight files (``diffusion_pytorch_model.fp16.safetensors``, ``model.fp16.safetensors``; load them with
        ``variant="fp16"``), ``safe_serialization=False`` writes ``.bin`` files for the diffusion models (the CLIP
        encoders of transformers 5 always write safetensors), ``max_shard_size`` (bytes, or a size such as ``"10GB"``)
        splits large weights.
        """
        if not isinstance(safe_serialization, bool):
            raise ValueError(f"`safe_serialization` must be True or False, got {safe_serialization!r}")
        if variant is not None and (not isinstance(variant, str) or not variant):
            raise ValueError(f"`variant` must be a name such as 'fp16' or None, got {variant!r}")
        loading.shard_size_bytes(max_shard_size)  # checked before anything is written
        options = {"safe_serialization": safe_serialization, "variant": variant, "max_shard_size": max_shard_size}
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        for name, component in self.components.items():
            accepted = inspect.signature(component.save_pretrained).parameters
            kwargs = {k: v for k, v in options.items() if k in accepted and v is not None}
            component.save_pretrained(folder / name, **kwargs)
        loading.write_model_index(folder, type(self).__name__, self.components)

    # -- devices and dtypes ------------------------------------------------------------------------------------

    def to(self, *args: Any, **kwargs: Any):
        """``to(device)``, ``to(dtype)`` or ``to(device, dtype)`` on every model; returns the pipeline."""
        for module in self._modules():
            module.to(*args, **kwargs)
        self._prefer_channels_last()
        return self

    def _prefer_channels_last(self) -> None:
        """Where the models run on CUDA, lay the convolutional ones (UNet, MoVQ) out channels_last. cuDNN's
        tensor-core convolutions are NHWC: given NCHW inputs and weights they convert both at every call, a quarter of
        an eager 768x768 UNet step's GPU time on an H200 (`bench/bench_pipeline.py`'s kernel profile). PyTorch's CUDA
        GroupNorm still returns NCHW, so the inputs that follow a norm are converted anyway; the weights are not, and
        the end-to-end eager time drops (H200: 0.94x the NCHW time, in each of two runs). The values are the same;
        only the order of the sums in a convolution may change, as it may between cuDNN's algorithms."""
        if self._execution_device.type not in CHANNELS_LAST_DEVICES:
            return
        for module in self._modules():
            if not isinstance(module, (UNet2DConditionModel, VQModel)):
                continue
            weight = next((p for p in module.parameters() if p.dim() == 4), None)
            if weight is not None and not weight.is_contiguous(memory_format=torch.channels_last):
                module.to(memory_format=torch.channels_last)

    @property
    def device(self) -> torch.device:
        for module in self._modules():
            return next(module.parameters()).device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for module in self._modules():
            return next(module.parameters()).dtype
        return torch.float32

    @property
    def _execution_device(self) -> torch.device:
        if self._offload is not None:
            return self._offload.device
        if self._sequential_device is not None:
            return self._sequential_device
        return self.device

    def _use(self, name: str) -> Any:
        """Component ``name``, on the execution device if model offloading is on (else as it is)."""
        component = getattr(self, name)
        if self._offload is not None and isinstance(component, nn.Module):
            self._offload.use(component)
        return component

    def _end_of_call(self) -> None:
        """Send the last used model back to the CPU when model offloading is on."""
        if self._offload is not None:
            self._offload.release()

    def maybe_free_model_hooks(self) -> None:
        """With model offloading, send the model still on the execution device back to the CPU (every call does this
        when it ends; call it after an interrupted one). Without offloading, nothing to do."""
        self._end_of_call()

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        """Keep models on the CPU; move each whole model to ``device`` (default ``cuda``) while it is used."""
        self._set_model_offload(_ModelOffload(offload_device(gpu_id, device)))

    def _set_model_offload(self, offload: _ModelOffload) -> None:
        self._drop_cuda_graphs()
        self.to("cpu")
        self._offload = offload
        self._sequential_device = None
        self._prefer_channels_last()

    def enable_sequential_cpu_offload(
        self, gpu_id: int | None = None, device: torch.device | str | None = None
    ) -> None:
        """Keep weights on the CPU; each submodule's weights visit ``device`` only while its ``forward`` runs."""
        target = offload_device(gpu_id, device)
        self._drop_cuda_graphs()
        self._offload = None
        self._sequential_device = target
        self._prefer_channels_last()
        for module in self._modules():
            _attach_sequential_offload(module, target)

    # -- fast path ---------------------------------------------------------------------------------------------

    def _drop_cuda_graphs(self) -> None:
        """Offloading moves the weights a CUDA graph of the fast path has baked in: the models run without graphs."""
        for module in self._modules():
            fast.drop_cuda_graphs(module)

    def enable_fast_path(
        self,
        shapes: Iterable[Sequence[int]] | None = None,
        backend: str = "inductor",
        negative_prompts: bool = True,
        compile_scope: str = "auto",
    ) -> dict[str, float]:
        """channels_last, fused attention projections, ``torch.compile(fullgraph=True)`` and, on CUDA, CUDA graphs for
        this pipeline's UNet, MoVQ decoder and prior (see ``kandinsky22.fast``); call it after ``to(device)``.

        ``shapes``: ``(height, width)`` or ``(height, width, images_per_call)`` to compile now rather than on first
        use; ``negative_prompts=False`` skips warming the prior up for the doubled batch a negative prompt gives.
        ``compile_scope``: "blocks" (each repeated block compiled once per structure and shape), "model" (each model
        as one graph), "none" (no compilation: channels_last, fused projections, CUDA graphs and the Triton
        GroupNorms, nothing compiled at warm-up) or "auto" (the default: "none" on CUDA where Triton runs, else
        "blocks"). Call it before the first image of the process: PyTorch keeps, per convolution shape, the cuDNN plan
        it chose at that shape's first use, and only the fast path turns cuDNN's timing on. Returns the warm-up
        seconds per component.
        """
        return fast.enable_fast_path(self, shapes, backend, negative_prompts, compile_scope)

    # -- images ------------------------------------------------------------------------------------------------

    numpy_to_pil = staticmethod(numpy_to_pil)

    # -- progress bar ------------------------------------------------------------------------------------------

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """Options for the tqdm bar of each denoising loop, e.g. ``disable=True``."""
        self._progress_bar_config = dict(kwargs)

    def progress_bar(self, iterable: Iterable) -> Iterable:
        return tqdm(iterable, **self._progress_bar_config)


class GuidedLoop:
    """What the reference shows a ``callback_on_step_end`` of the running call: ``pipe.guidance_scale``,
    ``pipe.do_classifier_free_guidance`` and ``pipe.num_timesteps`` (they keep the last call's values after it).

    As in the reference, a callback may set ``pipe._guidance_scale`` to change the guidance of the steps after it,
    e.g. to 0 to skip guidance in the last steps; it then returns the tensors that guidance doubles
    ([negative; positive]) for the new batch (``image_embeds.chunk(2)[1]``). A batch that does not fit is refused
    at the next step, naming the tensors, instead of a shape error inside the model.
    """

    _guidance_scale: float | None = None
    _num_timesteps: int | None = None

    @property
    def guidance_scale(self) -> float | None:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale is not None and self._guidance_scale > 1

    @property
    def num_timesteps(self) -> int | None:
        return self._num_timesteps

    def _start_loop(self, guidance_scale: float, timesteps: torch.Tensor) -> None:
        self._guidance_scale, self._num_timesteps = guidance_scale, len(timesteps)

    def _step_guidance(self, step: int, batch: int, state: dict[str, torch.Tensor], doubled: Sequence[str]) -> float:
        """This step's guidance scale (a callback may have changed it), after checking that the tensors of ``state``
        named in ``doubled`` have the batch it needs: ``2 * batch`` with guidance, ``batch`` without."""
        scale = self._guidance_scale
        check_guidance_scale("pipe._guidance_scale", scale)
        wanted = 2 * batch if scale > 1 else batch
        wrong = {name: state[name].shape[0] for name in doubled if state[name].shape[0] != wanted}
        if wrong:
            raise ValueError(
                f"at step {step}, guidance_scale={scale} needs a batch of {wanted} in {list(doubled)} "
                f"({'[negative; positive] for ' if scale > 1 else ''}{batch} latents), got batches {wrong}: a "
                "callback_on_step_end that turns guidance on or off with `pipe._guidance_scale` must return those "
                "tensors for the new batch (e.g. image_embeds.chunk(2)[1] to turn it off)"
            )
        return scale


def step_accepts_generator(scheduler: Any) -> bool:
    """Whether ``scheduler.step`` takes a ``generator`` (ancestral samplers do; UniPC, for one, does not)."""
    return "generator" in inspect.signature(scheduler.step).parameters


def run_callback(
    callback: Callable | None,
    pipe: Pipeline,
    step: int,
    timestep: Any,
    tensor_names: Sequence[str],
    state: dict[str, torch.Tensor],
) -> None:
    """``callback_on_step_end(pipe, step, t, {name: tensor})``; the tensors it returns replace those in ``state``."""
    if callback is None:
        return
    outputs = callback(pipe, step, timestep, {name: state[name] for name in tensor_names}) or {}
    for name, value in outputs.items():
        if name in state:
            state[name] = value
