"""The fast path: ``pipe.enable_fast_path()`` on any pipeline (the CLI's ``--fast``, the server's default on CUDA).

What it does to the pipeline's own models (the UNet, the MoVQ decoder, the prior; the CLIP towers run once per call
and stay as they are), in place, so every pipeline sharing these modules gets it:

* **channels_last** weights for the convolutional models: cuDNN's and Inductor's fast convolutions are NHWC.
* **Fused projections**: each attention's Q/K/V (and the UNet's added K/V) become one GEMM
  (``FusibleProjections``); the state dict keeps the official keys, so ``save_pretrained`` still writes them.
* **torch.compile(fullgraph=True, dynamic=False)**, specialised to each shape it sees, in one of two scopes (or none;
  ``"auto"``, the default, is ``"none"`` where the Triton norms run on CUDA, else ``"blocks"``):
  ``"blocks"`` compiles each repeated block (the UNet's resnets and attentions, MoVQ's resnets and
  attentions, the prior's transformer blocks) as a graph of its own, and blocks of one structure and shape share one
  compilation: the warm-up generates code for the distinct blocks only. ``"model"`` compiles each model as one graph
  (Inductor may fuse across block boundaries; the warm-up generates code for every block). ``"none"`` compiles
  nothing: the rest of the fast path (layout, fused projections, CUDA graphs), with the UNet's and MoVQ's GroupNorms
  as Triton kernels on CUDA (``use_triton_norms``) where Triton is installed, and with them the resnets' biases
  folded into the norms and one residual kernel (``models.residual``) and, uncompiled, the attentions' keys and
  values written in place after the context's (``AddedKVAttention``); its warm-up is graph captures, cuDNN's
  autotuning and, with a cold Triton cache, compiling those kernels (27 variants at 768², ``bench/unet_norms.py``;
  26 took about 10 s on an H200). It keeps the other eager kernels; with the bias folds and the in-place keys it took
  0.711 s a call after a 15.6 s warm-up with a cold Triton cache (768², H200 run 11), where "blocks" took 0.716 s
  after 80.6 s (run 10), and the upsampling resnets' phase kernels are now kept for its graphs
  (``UpsampleConv2d.keep_phase_weight``; about 1 ms of a 10.9 ms step's kernels in run 12, not timed end to end).
  Where those Triton norms run, the MoVQ decoder is not compiled in any scope: eager with them it decoded faster
  than compiled, and at once (20.2 against 26.0 ms at 768², first call 1.0 against 37.5 s, H200 run 8).
* **cuDNN autotuning** (``torch.backends.cudnn.benchmark``) on CUDA, process-wide. PyTorch keeps one plan per
  convolution shape for the process, chosen at the shape's first use: shapes run before the fast path keep cuDNN's
  heuristic choice (H200 run 12: a UNet step's kernels took 12.4 ms after an eager image, 10.9 ms with the fast path
  first). Turn the fast path on before the first image, or autotuning on at the start of the process.
* **CUDA graphs** for the UNet and the prior on CUDA (``CudaGraphCall``): the whole denoising step, ~700 kernels
  with the glue between the blocks, is captured once per input shape and replayed with one launch, so no Python runs
  per step inside the model. Not with model offloading, which moves the weights a graph would have baked in; the MoVQ
  decoder, which runs once per call, has no graph, so that no graph pool holds its full-resolution activations.

``shapes`` lists the ``(height, width)`` or ``(height, width, images_per_call)`` to compile ahead of time, so the
first request at those sizes does not pay for compilation (the prior also for twice the images, unless
``negative_prompts=False``: a negative prompt runs it on both prompts in one batch). Any other shape compiles on
first use.

The results equal the eager path's up to floating-point rounding (fusion changes GEMM shapes, Inductor fuses
elementwise ops). The eager path stays the library's default; the CLI's ``--fast`` and the server turn it on.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os
import time
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kandinsky22.models import movq, norms, prior
from kandinsky22.models.layers import AddedKVAttention, FusibleProjections, ResnetBlock2D
from kandinsky22.models.movq import VQModel
from kandinsky22.models.prior import PriorTransformer
from kandinsky22.models.unet import UNet2DConditionModel

COMPILE_SCOPES = ("auto", "blocks", "model", "none")
# The repeated blocks of each model, compiled one by one with compile_scope="blocks".
BLOCKS: dict[type[nn.Module], tuple[type[nn.Module], ...]] = {
    UNet2DConditionModel: (ResnetBlock2D, AddedKVAttention),
    VQModel: (movq.ResnetBlock, movq.SelfAttention),
    PriorTransformer: (prior.TransformerBlock,),
}
# Compiled graphs kept per code object before dynamo falls back to eager. Every compiled module shares one code
# object (``Module._call_impl``), so this counts all distinct (block structure, shape) pairs of all models: ~35 per
# (size, batch) with compile_scope="blocks".
_RECOMPILE_LIMIT = 2048
# CUDA graphs kept per model (one per input shape, the least recently used dropped first): each holds a memory pool
# the size of one step's activations.
_GRAPHS_PER_MODEL = 8
# False inside only_warmed_up_graphs(): a call of a signature without a graph runs directly instead of capturing one.
_NEW_GRAPHS: contextvars.ContextVar[bool] = contextvars.ContextVar("kandinsky22_new_cuda_graphs", default=True)
# Calls per model and shape at warm-up: on CUDA the first captures the graph (after two runs on a side stream), the
# others replay it; elsewhere the first compiles.
_WARMUP_CALLS = 3


def enable_fast_path(
    pipe: Any,
    shapes: Iterable[Sequence[int]] | None = None,
    backend: str = "inductor",
    negative_prompts: bool = True,
    compile_scope: str = "auto",
) -> dict[str, float]:
    """Apply the fast path to ``pipe``'s models and compile them for ``shapes``; returns the warm-up seconds per model.

    ``backend`` is torch.compile's backend: "inductor" generates kernels; "eager" / "aot_eager" only trace (no
    speed-up; for checking that the models compile without graph breaks). Call it after moving the pipeline to its
    device, or after ``enable_model_cpu_offload()``. Calling it again only warms up the new shapes.
    ``negative_prompts``: also warm the prior up for twice the images (a negative prompt runs it on both prompts in
    one batch); without it the first call with a negative prompt compiles that batch size.
    ``compile_scope``: "blocks" (each repeated block compiled on its own, shared by the blocks of one structure and
    shape: the shorter compiled warm-up), "model" (each model as one graph), "none" (no compilation: the layout, the
    fused projections and the CUDA graphs, with the Triton GroupNorms on CUDA where Triton is installed) or "auto"
    (the default): "none" where the UNet and MoVQ run the Triton GroupNorms (on CUDA, with Triton, compute capability
    7.0 and up, not offloaded), else "blocks"; a pipeline already on the fast path keeps its scope. On an H200 at 768²
    (``bench/README.md``, runs 10 and 11) "none" took 0.711 s an image after a 15.6 s warm-up, "blocks" 0.716 s
    after 80.6 s.
    """
    targets = _shape_list(shapes)
    if compile_scope not in COMPILE_SCOPES:
        raise ValueError(f"compile_scope must be one of {', '.join(COMPILE_SCOPES)}; got {compile_scope!r}")
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
    if compile_scope == "auto":
        compile_scope = _auto_scope(models, offloaded)

    for name, model in models.items():
        scope = getattr(model, "_fast_path_scope", None)
        if scope is not None and scope != compile_scope:
            raise ValueError(
                f"{name} is already on the fast path with compile_scope={scope!r}; got compile_scope={compile_scope!r}"
            )
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, name):  # recompile_limit was cache_size_limit before torch 2.6
            setattr(config, name, max(getattr(config, name), _RECOMPILE_LIMIT))
    for model in models.values():
        _prepare(model, backend, offloaded, compile_scope)
    if any(_on_cuda(model) for model in models.values()):
        untimed = [n for n, m in models.items() if getattr(m, "_ran_untimed_convolutions", False)]
        if untimed and not torch.backends.cudnn.benchmark:
            warnings.warn(
                f"enable_fast_path(): the {untimed[0]} already ran on CUDA without cuDNN autotuning, and PyTorch "
                "keeps the convolution plans chosen then for the rest of the process, so the fast path cannot time "
                "better ones for those shapes (on an H200 a 768x768 UNet step's kernels took 12.4 ms so, 10.9 ms "
                "with the fast path turned on first). Turn it on before the first image, or set "
                "torch.backends.cudnn.benchmark = True at the start of the process.",
                stacklevel=3,
            )
        # Compiled convolutions call cuDNN; with the shapes fixed per graph, timing its algorithms once per shape
        # (at warm-up) beats its heuristics. A process-wide setting, as everything here is opt-in.
        torch.backends.cudnn.benchmark = True
    if offloaded:
        return {}  # the models are on the CPU between uses: they compile on first use on the execution device
    return _warm_up(components, models, targets, negative_prompts)


def drop_cuda_graphs(model: nn.Module) -> None:
    """Call ``model`` without its CUDA graphs from now on (compiled as before), freeing their memory pools. The
    pipelines do it when offloading is turned on after the fast path: offloaded weights move at every call, and a graph
    would be captured again each time they land elsewhere."""
    graphs = getattr(model, "_compiled_call_impl", None)
    if isinstance(graphs, CudaGraphCall):
        model._compiled_call_impl = None if graphs.fn == model._call_impl else graphs.fn
    for conv in getattr(model, "_upsampling_convs", ()):
        conv.keep_phase_weight(False)  # kept for the graphs only (offloading would move them at every call)


def use_triton_norms(pipe: Any, enabled: bool = True) -> int:
    """Run the GroupNorms of ``pipe``'s UNet and MoVQ through Triton kernels that keep channels_last and fold the time
    modulation and the SiLU in (``kandinsky22.models.norms``), where they apply (CUDA, channels_last, not compiling;
    the fast path's compiled models keep Inductor's own); ``enabled=False`` switches them back. Off by default in the
    eager path: on an H200 (``bench/README.md``, run 8) they took the eager pipeline to 0.93 × its time, the host the
    limit, and their first call in a process with a cold Triton cache compiles them (11.4 s at 768²). On by default
    in the fast path without compilation (``compile_scope="none"``), where a CUDA graph replays them and only their
    GPU time counts, and for MoVQ in every scope of the fast path. Returns how many norms were switched."""
    models = [c for c in pipe.components.values() if isinstance(c, (UNet2DConditionModel, VQModel))]
    if not models:
        raise ValueError(f"{type(pipe).__name__} has no UNet or MoVQ whose norms could use Triton")
    return sum(norms.use_triton_norms(model, enabled) for model in models)


@contextlib.contextmanager
def only_warmed_up_graphs() -> Iterator[None]:
    """Within: a model call of a shape that has no CUDA graph yet runs directly instead of capturing one (the warm-up
    of ``enable_fast_path`` still captures). The server runs requests so: with torch.compile's stance
    "eager_on_recompile" an odd size runs eagerly, and this keeps it from leaving a graph's memory pool behind."""
    token = _NEW_GRAPHS.set(False)
    try:
        yield
    finally:
        _NEW_GRAPHS.reset(token)


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


def _prepare(model: nn.Module, backend: str, offloaded: bool, scope: str) -> None:
    """Fuse, lay out, compile and (on CUDA) graph ``model`` in place, once: a model shared by several pipelines is
    left as it is the second time."""
    if getattr(model, "_fast_path_scope", None) is not None:
        return
    for module in model.modules():
        if isinstance(module, FusibleProjections):
            module.fuse_projections()
    if not isinstance(model, PriorTransformer):
        model.to(memory_format=torch.channels_last)
    target = model.decoder if isinstance(model, VQModel) else model
    triton_norms = _on_cuda(model) and not isinstance(model, PriorTransformer) and _triton_runs_on(model)
    if triton_norms and (scope == "none" or isinstance(model, VQModel)):
        # Uncompiled, the GroupNorms would be PyTorch's, which copy channels_last maps to NCHW and back; the Triton
        # kernels keep the layout and fold the modulation and the SiLU in. Inside a CUDA graph only their GPU time
        # counts: the eager UNet step's kernels took 12.5 ms with them, 20.2 without (H200, run 8). MoVQ, which runs
        # once per call, is not compiled when they run, in any scope: in one run (H200, run 8) its eager decode with
        # them took 20.2 ms and its first call 1.0 s, compiled block by block 26.0 ms after a 37.5 s first call.
        norms.use_triton_norms(model)
    elif scope == "model":
        _compile(target, backend)
    elif scope == "blocks":
        blocks = BLOCKS[next(kind for kind in BLOCKS if isinstance(model, kind))]
        for module in target.modules():
            if isinstance(module, blocks):
                _compile(module, backend)
    if _on_cuda(model) and not offloaded and not isinstance(model, VQModel):
        if scope == "none" and isinstance(model, UNet2DConditionModel):
            # The upsampling resnets' phase kernels at fixed addresses for the graphs, refreshed once per run;
            # derived inside the graph, they took about 1 ms of a 10.9 ms step's kernels (H200, run 12). Compiled,
            # Inductor fuses their derivation into one pass.
            for conv in model._upsampling_convs:
                conv.keep_phase_weight()
        model._compiled_call_impl = CudaGraphCall(model, model._compiled_call_impl or model._call_impl)
    model._fast_path_scope = scope


def _auto_scope(models: dict[str, nn.Module], offloaded: bool) -> str:
    """compile_scope="auto": the scope the models are already on, else "none" where the convolutional models (UNet,
    MoVQ) will run the Triton norms inside CUDA graphs (on CUDA, Triton generating code for the GPU, not offloaded),
    else "blocks"."""
    scopes = {getattr(model, "_fast_path_scope", None) for model in models.values()} - {None}
    if len(scopes) == 1:
        return scopes.pop()
    convolutional = [model for model in models.values() if not isinstance(model, PriorTransformer)]
    if convolutional and not offloaded and all(_on_cuda(m) and _triton_runs_on(m) for m in convolutional):
        return "none"
    return "blocks"


def _on_cuda(model: nn.Module) -> bool:
    return next(model.parameters()).device.type == "cuda"


def _triton_runs_on(model: nn.Module) -> bool:
    """Whether Triton is installed and generates code for the GPU holding ``model`` (compute capability 7.0 and up:
    a Pascal card keeps PyTorch's norms rather than fail at the first call)."""
    device = next(model.parameters()).device
    return norms.triton_available() and torch.cuda.get_device_capability(device) >= (7, 0)


def _compile(module: nn.Module, backend: str) -> None:
    # 1x1 convolutions as matmuls (diffusion-fast's setting for channels_last UNets and VAEs). Inductor's own CUDA
    # graphs stay off: CudaGraphCall captures the whole step, glue included.
    options = {"triton.cudagraphs": False, "conv_1x1_as_mm": True} if backend == "inductor" else None
    module.compile(fullgraph=True, dynamic=False, backend=backend, options=options)


# ----------------------------------------------------------------------------------------------------------------------
# CUDA graphs: a model's call captured once per input signature, replayed after
# ----------------------------------------------------------------------------------------------------------------------


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``value`` with ``fn`` applied to every tensor inside its tuples, lists, dicts and dataclasses."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _map_tensors(getattr(value, f.name), fn) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **fields)
    return value


def _signature(value: Any, tensors: list[torch.Tensor]) -> Any:
    """A hashable description of ``value``'s structure, flags and tensor layouts; appends its tensors to ``tensors``
    (dicts in key order, so that keyword order does not matter). Raises ``TypeError`` on a value it does not key:
    a Python number among the arguments would be baked into the graph (a timestep passed as an int: a graph per
    step), so a call with one runs directly."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return ("tensor", tuple(value.shape), value.stride(), value.dtype, value.device, value.requires_grad)
    if isinstance(value, (tuple, list)):
        return (type(value), tuple(_signature(v, tensors) for v in value))
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda item: str(item[0]))
        return (dict, tuple((k, _signature(v, tensors)) for k, v in items))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = tuple((f.name, _signature(getattr(value, f.name), tensors)) for f in dataclasses.fields(value))
        return (type(value), fields)
    if value is None or isinstance(value, (bool, str)):
        return (type(value), value)
    raise TypeError(f"no CUDA-graph key for a {type(value).__name__}")


class _Replay:
    """One captured call: static copies of its inputs, the graph, its static outputs.

    ``replay`` copies the new inputs into the static ones (skipping a tensor that is the very object copied last time,
    unmodified since: the per-run conditioning, passed again at every step) and returns clones of the outputs, which
    the next replay overwrites."""

    def __init__(self, fn: Callable, args: tuple, kwargs: dict, graph_factory: Callable | None = None) -> None:
        self.static_args, self.static_kwargs = _map_tensors((args, kwargs), torch.clone)
        self.static: list[torch.Tensor] = []
        _signature((self.static_args, self.static_kwargs), self.static)
        self.last_source: list[torch.Tensor | None] = [None] * len(self.static)
        self.last_version: list[int] = [-1] * len(self.static)
        self.graph, self.output = (graph_factory or _capture)(lambda: fn(*self.static_args, **self.static_kwargs))

    def replay(self, tensors: list[torch.Tensor]) -> Any:
        for i, (static, tensor) in enumerate(zip(self.static, tensors)):
            if tensor is self.last_source[i] and tensor._version == self.last_version[i]:
                continue
            static.copy_(tensor)
            self.last_source[i], self.last_version[i] = tensor, tensor._version
        self.graph.replay()
        return _map_tensors(self.output, torch.clone)


def _capture(call: Callable[[], Any]) -> tuple[Any, Any]:
    """``torch.cuda.CUDAGraph`` of ``call``: two runs on a side stream first (compilation, cuDNN's and Triton's
    autotuning, lazy initialisation: nothing of that may happen while capturing), then the capture."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        output = call()
    return graph, output


class CudaGraphCall:
    """Calls a model through a CUDA graph per input signature (shapes, strides, dtypes, non-tensor arguments):
    captured at the first call with that signature, replayed at later ones.

    A call with autograd on, with a tensor off the GPU, with a Python number or another argument it does not key
    (see ``_signature``), or made while another graph is being captured runs ``fn`` directly. The graphs bake in the
    weights' addresses, so they are keyed on them too: a model moved or cast since is captured afresh. At most
    ``_GRAPHS_PER_MODEL`` graphs are kept; ``enabled = False`` turns them off.
    ``graph_factory`` and ``device_type`` replace the capture and the device (tests on the CPU: any callable
    returning ``(object with replay(), output)`` that re-runs the call in place on the static tensors)."""

    def __init__(
        self, model: nn.Module, fn: Callable, graph_factory: Callable | None = None, device_type: str = "cuda"
    ) -> None:
        self.model_ref = weakref.ref(model)
        self.fn = fn
        self.graph_factory = graph_factory
        self.device_type = device_type
        self.replays: OrderedDict[Any, _Replay] = OrderedDict()
        self.captures = 0
        self.enabled = True  # False: every call runs ``fn`` directly (the compiled model without graphs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        tensors: list[torch.Tensor] = []
        try:
            key = _signature((args, kwargs), tensors)
        except TypeError:
            return self.fn(*args, **kwargs)
        on_gpu = all(t.device.type == self.device_type for t in tensors)
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        if not self.enabled or torch.is_grad_enabled() or not on_gpu or capturing:
            return self.fn(*args, **kwargs)
        model = self.model_ref()
        weights = tuple(t.data_ptr() for t in [*model.parameters(), *model.buffers()]) if model is not None else ()
        key = (key, weights)
        replay = self.replays.get(key)
        if replay is None and not _NEW_GRAPHS.get():
            return self.fn(*args, **kwargs)
        if replay is None:
            replay = _Replay(self.fn, args, kwargs, self.graph_factory)
            self.captures += 1
            self.replays[key] = replay
            while len(self.replays) > _GRAPHS_PER_MODEL:
                self.replays.popitem(last=False)
        else:
            self.replays.move_to_end(key)
        return replay.replay(tensors)


# ----------------------------------------------------------------------------------------------------------------------
# Warm-up: each model called as the pipelines call it, at each requested shape
# ----------------------------------------------------------------------------------------------------------------------


def _shape_list(shapes: Iterable[Sequence[int]] | None) -> list[tuple[int, int, int]]:
    if isinstance(shapes, str) or not isinstance(shapes, (Iterable, type(None))):
        raise ValueError(
            f"`shapes` must be a list of (height, width) or (height, width, images_per_call), got shapes={shapes!r}"
        )
    out = []
    for shape in shapes or ():
        # Not taken apart: a lone (height, width) among them, or a "512x512" string, is an error
        values = tuple(shape) if isinstance(shape, Sequence) and not isinstance(shape, str) else ()
        valid = len(values) in (2, 3) and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)
        if not valid:
            raise ValueError(
                f"`shapes` entries must be (height, width) or (height, width, images_per_call) positive ints, got "
                f"{shape!r} in shapes={shapes!r}"
            )
        out.append((*values, 1) if len(values) == 2 else values)
    return out


@torch.no_grad()
def _warm_up(
    components: dict[str, Any], models: dict[str, nn.Module], shapes: list[tuple[int, int, int]], negative: bool
) -> dict[str, float]:
    # The warm-up compiles and captures, also when called where a caller has asked for neither (a model loaded while
    # the server runs a request: the "eager_on_recompile" stance, only_warmed_up_graphs()).
    token = _NEW_GRAPHS.set(True)
    try:
        with torch.compiler.set_stance("default"):
            return _warm_up_shapes(components, models, shapes, negative)
    finally:
        _NEW_GRAPHS.reset(token)


def _warm_up_shapes(
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
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()
