"""The fast path: ``pipe.enable_fast_path()`` on any pipeline (the CLI's ``--fast``, the server's default on CUDA).

What it does to the pipeline's own models (the UNet, the MoVQ decoder, the prior; the CLIP towers run once per call
and stay as they are), in place, so every pipeline sharing these modules gets it:

* **channels_last** weights for the convolutional models: cuDNN's and Inductor's fast convolutions are NHWC.
* **Fused projections**: each attention's Q/K/V (and the UNet's added K/V) become one GEMM
  (``FusibleProjections``); the state dict keeps the official keys, so ``save_pretrained`` still writes them.
* **torch.compile(fullgraph=True, dynamic=False)**: one graph per model, specialised to each shape it sees.
* **cuDNN autotuning** (``torch.backends.cudnn.benchmark``) on CUDA, process-wide.
* **CUDA graphs** for the UNet and the prior on CUDA: the denoising step's ~1,000 kernels are replayed with one
  launch instead of being launched one by one from Python (Inductor's ``triton.cudagraphs``, a graph per shape).
  Not with model offloading, which moves the weights a graph would have baked in; the MoVQ decoder, which runs
  once per call, is compiled without graphs so that no graph pool holds its full-resolution activations.

``shapes`` lists the ``(height, width)`` or ``(height, width, images_per_call)`` to compile ahead of time, so the
first request at those sizes does not pay for compilation (the prior also for twice the images, unless
``negative_prompts=False``: a negative prompt runs it on both prompts in one batch). Any other shape compiles on
first use.

The results equal the eager path's up to floating-point rounding (fusion changes GEMM shapes, Inductor fuses
elementwise ops). The eager path stays the default: compilation takes a minute or more on full-size models.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kandinsky22.models.layers import FusibleProjections
from kandinsky22.models.movq import VQModel
from kandinsky22.models.prior import PriorTransformer
from kandinsky22.models.unet import UNet2DConditionModel

# Compiled calls of one model at distinct shapes (sizes × batch sizes) kept before dynamo falls back to eager.
_RECOMPILE_LIMIT = 64
# Calls per model and shape at warm-up: Inductor's CUDA graphs run once eagerly, record on the second, replay after.
_WARMUP_CALLS = 3


def enable_fast_path(
    pipe: Any, shapes: Iterable[Sequence[int]] | None = None, backend: str = "inductor", negative_prompts: bool = True
) -> dict[str, float]:
    """Apply the fast path to ``pipe``'s models and compile them for ``shapes``; returns the warm-up seconds per model.

    ``backend`` is torch.compile's backend: "inductor" generates kernels; "eager" / "aot_eager" only trace (no
    speed-up; for checking that the models compile without graph breaks). Call it after moving the pipeline to its
    device, or after ``enable_model_cpu_offload()``. Calling it again only warms up the new shapes.
    ``negative_prompts``: also warm the prior up for twice the images (a negative prompt runs it on both prompts in
    one batch); without it the first call with a negative prompt compiles that batch size.
    """
    targets = _shape_list(shapes)
    if getattr(pipe, "_sequential_device", None) is not None:
        raise ValueError(
            "enable_fast_path() does not combine with enable_sequential_cpu_offload(): compiled models need their "
            "weights in place; use enable_model_cpu_offload() (compiled without CUDA graphs) or neither"
        )
    offloaded = getattr(pipe, "_offload", None) is not None
    components = pipe.components
    models = {
        name: c for name, c in components.items() if isinstance(c, (UNet2DConditionModel, VQModel, PriorTransformer))
    }
    if not models:
        raise ValueError(f"{type(pipe).__name__} has no UNet, MoVQ or prior to put on the fast path")

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # renamed in torch 2.6
    setattr(config, name, max(getattr(config, name), _RECOMPILE_LIMIT))
    for model in models.values():
        _prepare(model, backend, offloaded)
    if any(_on_cuda(model) for model in models.values()):
        # Compiled convolutions call cuDNN; with the shapes fixed per graph, timing its algorithms once per shape
        # (at warm-up) beats its heuristics. A process-wide setting, as everything here is opt-in.
        torch.backends.cudnn.benchmark = True
    if offloaded:
        return {}  # the models are on the CPU between uses: they compile on first use on the execution device
    return _warm_up(components, models, targets, negative_prompts)


def use_compile_cache(folder: str | os.PathLike) -> Path:
    """Keep torch.compile's caches (the compiled graphs and kernels of the fast path) in ``folder`` instead of
    torch's default, ``$TMPDIR/torchinductor_$USER``; returns the absolute folder.

    A later process that compiles the same models for the same shapes with the same torch reads them back instead of
    compiling again: its warm-up takes seconds where the first takes minutes (dynamo still traces the models). A folder
    that outlives the machine's temporary files (a volume of a container, a folder shipped with a deployment) keeps
    that for restarts. Process-wide (it sets ``TORCHINDUCTOR_CACHE_DIR``): call it before the first compilation.
    """
    path = Path(folder).expanduser().absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"compile cache folder {str(folder)!r} cannot be created: {err.strerror or err}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"compile cache folder {str(folder)!r} is not writable")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Preparing the models
# ----------------------------------------------------------------------------------------------------------------------


def _prepare(model: nn.Module, backend: str, offloaded: bool) -> None:
    """Fuse, lay out and compile ``model`` in place (once: a model shared by several pipelines is left as it is)."""
    for module in model.modules():
        if isinstance(module, FusibleProjections):
            module.fuse_projections()
    if isinstance(model, PriorTransformer):
        _compile(model, backend, cuda_graphs=_on_cuda(model) and not offloaded)
        return
    model.to(memory_format=torch.channels_last)
    if isinstance(model, UNet2DConditionModel):
        _compile(model, backend, cuda_graphs=_on_cuda(model) and not offloaded)
    else:
        _compile(model.decoder, backend, cuda_graphs=False)


def _on_cuda(model: nn.Module) -> bool:
    return next(model.parameters()).device.type == "cuda"


def _compile(module: nn.Module, backend: str, cuda_graphs: bool) -> None:
    if getattr(module, "_compiled_call_impl", None) is not None:
        return
    options = None
    if backend == "inductor":
        # 1x1 convolutions as matmuls (diffusion-fast's setting for channels_last UNets and VAEs).
        options = {"triton.cudagraphs": cuda_graphs, "conv_1x1_as_mm": True}
    module.compile(fullgraph=True, dynamic=False, backend=backend, options=options)


# ----------------------------------------------------------------------------------------------------------------------
# Warm-up: each model called as the pipelines call it, at each requested shape
# ----------------------------------------------------------------------------------------------------------------------


def _shape_list(shapes: Iterable[Sequence[int]] | None) -> list[tuple[int, int, int]]:
    out = []
    for shape in shapes or ():
        values = tuple(shape)
        valid = len(values) in (2, 3) and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)
        if not valid:
            raise ValueError(
                f"`shapes` entries must be (height, width) or (height, width, images_per_call) positive ints, got "
                f"{shape!r}"
            )
        out.append((*values, 1) if len(values) == 2 else values)
    return out


@torch.no_grad()
def _warm_up(
    components: dict[str, Any], models: dict[str, nn.Module], shapes: list[tuple[int, int, int]], negative: bool
) -> dict[str, float]:
    seconds: dict[str, float] = {}
    done: set[tuple] = set()
    movq = next((m for m in models.values() if isinstance(m, VQModel)), None)
    scale = 2 ** (len(movq.config.block_out_channels) - 1) if movq is not None else 8
    for height, width, images in shapes:
        latent = (math.ceil(height / scale**2) * scale, math.ceil(width / scale**2) * scale)
        for name, model in models.items():
            # A negative prompt runs the prior on both prompts in one batch: it is warmed up for both batch sizes.
            prior = isinstance(model, PriorTransformer)
            for batch in (images, 2 * images) if prior and negative else (images,):
                key = (name, batch) if prior else (name, batch, latent)
                if key in done:  # the prior's inputs do not depend on the image size
                    continue
                done.add(key)
                calls = _warm_up_call(model, components, latent, batch)
                start = time.perf_counter()
                for _ in range(_WARMUP_CALLS):
                    calls()
                _synchronize(model)
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
    return seconds


def _warm_up_call(model: nn.Module, components: dict[str, Any], latent: tuple[int, int], images: int):
    """A function calling ``model`` with inputs shaped, typed and placed as in the pipelines' loops (classifier-free
    guidance on, so the UNet and the prior see a doubled batch)."""
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    if isinstance(model, UNet2DConditionModel):
        cfg = model.config
        hint = cfg.addition_embed_type == "image_hint"
        channels = cfg.in_channels - (4 if hint else 0)  # the hint encoder adds 4 channels
        sample = torch.randn(2 * images, channels, *latent, device=device, dtype=dtype)
        cond = {"image_embeds": torch.randn(2 * images, cfg.encoder_hid_dim, device=device, dtype=dtype)}
        if hint:
            cond["hint"] = torch.rand(2 * images, 3, 8 * latent[0], 8 * latent[1], device=device, dtype=dtype)
        timestep = _first_timestep(components.get("scheduler"), device)
        # As the decoder loop passes it: prepared once per run with the run's timesteps, one step's row per call.
        conditioning = model.prepare_conditioning(cond, timestep.reshape(1)).at(0)
        return lambda: model(sample, timestep, encoder_hidden_states=None, conditioning=conditioning, return_dict=False)
    if isinstance(model, VQModel):
        latents = torch.randn(images, model.config.latent_channels, *latent, device=device, dtype=dtype)
        return lambda: model.decode(latents, force_not_quantize=True)
    cfg = model.config
    batch, width = 2 * images, cfg.embedding_dim
    x, pooled = torch.randn(2, batch, width, device=device, dtype=dtype)
    hidden = torch.randn(batch, cfg.num_embeddings, width, device=device, dtype=dtype)
    mask = torch.ones(batch, cfg.num_embeddings, dtype=torch.bool, device=device)
    scheduler = components.get("prior_scheduler", components.get("scheduler"))
    timestep = _first_timestep(scheduler, device)
    # As the prior loop passes it: prepared once per run (the prompt's keys and values), one step's row per call.
    context = model.prepare_context(pooled, hidden, mask, timesteps=timestep.reshape(1)).at(0)
    return lambda: model(x, timestep=timestep, context=context, return_dict=False)


def _first_timestep(scheduler: Any, device: torch.device) -> torch.Tensor:
    """A 0-d timestep of the scheduler's table dtype on ``device``: the loops pass one element of a device table."""
    table = getattr(scheduler, "timesteps", None)
    dtype = table.dtype if isinstance(table, torch.Tensor) else torch.int64
    return torch.tensor(999, device=device).to(dtype)


def _synchronize(model: nn.Module) -> None:
    if _on_cuda(model):
        torch.cuda.synchronize()
