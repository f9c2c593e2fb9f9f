"""GroupNorm followed by what the models do right after it, as one call: ``norm_act``.

By default it runs PyTorch's ops, exactly as written out (``F.group_norm``, then the time modulation's
``addcmul``, then ``F.silu``). Opt-in (``use_triton_norms``), on a CUDA tensor laid out channels_last and outside
torch.compile, it runs three Triton kernels instead (kernels in ``norm_kernels``; MoVQ's spatial norm,
``movq.SpatialNorm``, calls them with its per-pixel scale and shift maps):

1. partial statistics: each program takes a run of pixels and a block of channels and keeps a per-channel mean and
   sum of squared deviations (fp32, merged tile by tile with Chan's formula);
2. per (sample, group): merges the partials into the group's mean and variance, and folds them with the norm's
   weight and bias and the time modulation ``(1 + scale, shift)`` into one fp32 factor and offset per channel;
3. per pixel tile: ``y = x · factor + offset`` (then MoVQ's spatial modulation, read at the latents' resolution,
   then SiLU), written channels_last.

A small group (``_SMALL_GROUP`` elements at most: the UNet's coarse levels) takes one kernel instead, a program per
(sample, group) doing both passes.

``in_bias`` folds in the bias of the convolution that made ``x``: the norm is of ``x + in_bias``. The bias shifts
each channel's means (kernel 2, or the one kernel's first pass) and joins the offset, so the convolution runs without
it and PyTorch's separate pass that adds a convolution's bias goes away. A resnet (the UNet's ``ResnetBlock2D``,
MoVQ's ``ResnetBlock``) passes its first convolution's bias to its second norm where these kernels run, and its
other biases to the residual kernel (``residual.add_residual``).

PyTorch's CUDA GroupNorm works on NCHW only: for a channels_last input it copies to NCHW, normalises there and
returns NCHW, which the next convolution copies back to channels_last; the modulation and the activation are one pass
each. The kernels read the input twice and write the output once, and launch three kernels where PyTorch launches
five or six. Their rounding differs from PyTorch's sequence as Inductor's fused kernels' does: one rounding to the
output dtype instead of one per op.

The Triton path is off by default in the eager path; the fast path switches it on where a model stays uncompiled on
CUDA (``fast.py``). On an H200 (``bench/README.md``, run 6) it cut the eager UNet step's kernel time from 20.0 to
13.3 ms, but the step went only from 26.2 to 23.9 ms: the host became the limit, Triton's dispatch at each launch
being the likely cost (inferred from those totals, not measured alone). Repeated launches now skip that dispatch
(``_Launch``), and each distinct call's checks, arithmetic and launch arguments are made once (``_Plan``): in H200
run 8 the eager step took 17.6 ms for 12.5 ms of kernels (23.9 for 13.3 in run 6), and the pipeline with the norms
took 0.93 × the time of our eager one with PyTorch's; the direct launches took 0.88 × the time of Triton's dispatch
at each launch. On the CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``) in the tests.
Triton compiles each kernel variant (per dtype, group width, modulation and activation) at its first use in a
process; its disk cache (``~/.triton/cache``) serves later processes.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Elements per program of the statistics and apply kernels (fp32 in registers: 4,096 × 4 bytes over 4 warps).
_TILE = 4096
# Programs the statistics kernel aims at: a few per streaming multiprocessor of a large GPU.
_STATS_PROGRAMS = 2048
# Partial statistics the finalize kernel merges per loop iteration (parts × channels of the group).
_FINALIZE_TILE = 2048
# Elements per (sample, group) up to which one kernel does the whole norm, a program per (sample, group): the UNet's
# coarsest level and its middle at 768² (144 pixels × 36 or 48 channels). One launch instead of three. Only batch ×
# groups programs run, so larger groups take the three kernels: in H200 run 8 (bench/norm_paths.py) the one kernel
# took 6.9-8.7 µs against the three's 8.8-9.5 at 144 × 36-48, but 11.9-21.9 µs against 8.6-13.4 from 13,824 up to
# 32,768 elements per group (576 × 24, 144 × 96, ...). Summed over a UNet step's calls, that gives its norms 1.47 ms of
# GPU time with this threshold, 1.68 with 32,768 (the previous one, timed as it ran).
_SMALL_GROUP = 8192
# Elements per tile of that kernel (padded to powers of two), with 16 warps: the whole group in one tile at 768²
# (H200 run 6 timed the one-kernel norms at 1.52 ms of a 13.3 ms step with 4,096-element tiles and scalar loads).
_SMALL_TILE = 16384


def use_triton_norms(model: nn.Module, enabled: bool = True) -> int:
    """Run ``model``'s GroupNorms through the Triton kernels (when they apply: CUDA, channels_last, not compiling)
    or, with ``enabled=False``, through PyTorch again; returns how many norms were switched. Raises ``ValueError``
    when Triton is not installed. Where the kernels run, the norm modules' own forward hooks do not (the kernels read
    their weights directly); a norm whose weights are not on the input's device runs PyTorch's norm."""
    if enabled and not triton_available():
        raise ValueError("use_triton_norms needs the triton package (it comes with PyTorch's CUDA builds)")
    count = 0
    for module in model.modules():
        if isinstance(module, nn.GroupNorm):
            module.triton_norm = enabled
            count += 1
    return count


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def norm_act(
    norm: nn.GroupNorm,
    x: torch.Tensor,
    scale_1: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    silu: bool = False,
    in_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``norm(x)``, then ``· scale_1 + shift`` ((B, C, 1, 1) each, both or neither), then SiLU if ``silu``.
    ``in_bias`` (C,): normalise ``x + in_bias`` instead (the bias of the convolution that made ``x``, left out of it
    where the Triton kernels run: they fold it in, where PyTorch adds it in a pass of its own)."""
    if uses_triton(norm, x):
        return group_norm_nhwc(
            x, norm.num_groups, norm.weight, norm.bias, norm.eps, scale_1, shift, silu, in_bias=in_bias
        )
    if in_bias is not None:
        x = x + in_bias.view(-1, 1, 1)
    h = norm(x)
    if scale_1 is not None:
        h = torch.addcmul(shift, h, scale_1)  # norm(h) * (1 + scale) + shift in one kernel
    return F.silu(h) if silu else h


def uses_triton(norm: nn.GroupNorm, x: torch.Tensor) -> bool:
    """Whether ``norm`` on ``x`` runs the Triton kernels: switched on, not compiling, and they apply."""
    return getattr(norm, "triton_norm", False) and not torch.compiler.is_compiling() and _triton_applies(norm, x)


def _triton_applies(norm: nn.GroupNorm, x: torch.Tensor) -> bool:
    return (
        (x.is_cuda or _interpreting())
        and x.dim() == 4
        and x.is_contiguous(memory_format=torch.channels_last)
        and norm.affine
        # sequential offloading moves a norm's weights to x's device in a hook on its forward, which the kernels skip
        and norm.weight.device == x.device
        and not (torch.is_grad_enabled() and (x.requires_grad or norm.weight.requires_grad))
    )


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def group_norm_nhwc(
    x: torch.Tensor,
    groups: int,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    scale_1: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    silu: bool = False,
    spatial: tuple[torch.Tensor, torch.Tensor] | None = None,
    in_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The three Triton kernels on a channels_last (N, C, H, W) ``x``; the result is channels_last, in ``x``'s dtype.
    ``scale_1`` / ``shift``: (N or 1, C, 1, 1) time modulation applied after the norm's own affine.
    ``spatial``: MoVQ's ``(scale, shift)`` maps (N, C, h, w), applied after the norm as if resized to (H, W) by
    repeating each of their pixels in an (H / h) × (W / w) block (nearest resizing by whole factors).
    ``in_bias``: (C,), the norm is of ``x + in_bias``."""
    device = -1
    if x.is_cuda:
        device = torch.cuda.current_device()
        if x.device.index != device:
            with torch.cuda.device(x.device):  # Triton launches on the current device: make it x's
                return group_norm_nhwc(x, groups, weight, bias, eps, scale_1, shift, silu, spatial, in_bias)
    if spatial is not None:
        spatial = tuple(t.contiguous(memory_format=torch.channels_last) for t in spatial)
    key = (
        x.shape,
        x.dtype,
        groups,
        weight.dtype,
        bias.dtype,
        eps,
        silu,
        None if scale_1 is None else (scale_1.shape, scale_1.stride(), scale_1.dtype),
        None if shift is None else (shift.shape, shift.stride(), shift.dtype),
        None if spatial is None else (spatial[0].shape, spatial[0].dtype, spatial[1].shape, spatial[1].dtype),
        None if in_bias is None else (in_bias.shape, in_bias.dtype),
    )
    plan = _PLANS.get(key)
    if plan is None:
        plan = _plan(x.shape, groups, eps, silu, scale_1, shift, spatial, in_bias)
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan
    out = torch.empty_like(x, memory_format=torch.channels_last)
    if not plan.launches:  # no elements
        return out
    if scale_1 is None:
        scale_1 = shift = x  # not read
    elif plan.contiguous_modulation:
        scale_1, shift = scale_1.contiguous(), shift.contiguous()
    in_bias = bias if in_bias is None else in_bias.contiguous()  # (not read without one)
    if plan.parts == 0:  # one kernel
        plan.launches[0](device, x, weight, bias, in_bias, scale_1, shift, out)
        return out
    stats, finalize, apply = plan.launches
    batch, channels = x.shape[:2]
    mean = torch.empty(batch, plan.parts, channels, device=x.device, dtype=torch.float32)
    m2 = torch.empty_like(mean)
    stats(device, x, mean, m2)
    factor = torch.empty(batch, channels, device=x.device, dtype=torch.float32)
    offset = torch.empty_like(factor)
    finalize(device, mean, m2, weight, bias, in_bias, scale_1, shift, factor, offset)
    spatial_scale, spatial_shift = spatial or (x, x)  # not read without spatial
    apply(device, x, factor, offset, spatial_scale, spatial_shift, out)
    return out


@dataclass(eq=False)
class _Launch:
    """One kernel launch of a :class:`_Plan`: the kernel, its grid, and its arguments after the tensors (the integer
    and float ones, then the compile-time constants and Triton's launch options by name). Called with the current
    device's index and the tensors."""

    kernel: Any
    grid: tuple[int, ...]
    scalars: tuple[Any, ...]
    constants: dict[str, Any]
    tensors: int  # how many tensors come first

    def __post_init__(self) -> None:
        names = self.kernel.arg_names[self.tensors + len(self.scalars) :]
        self.trailing = (*self.scalars, *(self.constants[name] for name in names))  # in the kernel's order

    def __call__(self, device: int, *tensors: torch.Tensor) -> None:
        global _direct_launch
        if not _direct_launch or _interpreting():
            self.kernel[self.grid](*tensors, *self.scalars, **self.constants)
            return
        # Triton compiles a variant per what the plan's key holds or derives (shapes, dtypes, strides, options) and per
        # tensor's 16-byte alignment: the alignment joins the key only where a tensor lacks it (a view at an offset).
        address = 0
        for t in tensors:
            address |= t.data_ptr()
        key = (self, device) if address % 16 == 0 else (self, device, tuple(t.data_ptr() % 16 == 0 for t in tensors))
        launcher = _LAUNCHERS.get(key)
        if launcher is None:
            compiled = self.kernel[self.grid](*tensors, *self.scalars, **self.constants)  # compiles if it is new
            if hasattr(compiled, "result"):  # a Triton compiling in the background returns a future
                compiled = compiled.result()
            if hasattr(compiled, "__getitem__"):
                _LAUNCHERS[key] = compiled[(*self.grid, 1, 1)[:3]]  # a compiled kernel's launcher takes three sizes
            return
        try:
            launcher(*tensors, *self.trailing)
        except Exception:  # raised before launching: dispatch this launch and all later ones
            _direct_launch = False
            _LAUNCHERS.clear()
            self.kernel[self.grid](*tensors, *self.scalars, **self.constants)


@dataclass(eq=False)
class _Plan:
    """What ``group_norm_nhwc`` derives from its inputs' shapes, dtypes and options: the launches, and the statistics'
    parts per sample (0: the one-kernel path). Made once per distinct call: a UNet makes the same calls at every
    step."""

    launches: tuple[_Launch, ...]
    parts: int
    contiguous_modulation: bool  # the modulation is not laid out with unit channel stride


# Plans by the key ``group_norm_nhwc`` computes (a model has a few dozen distinct norm calls per image size).
_PLANS: dict[tuple, _Plan] = {}
_MAX_PLANS = 4096


def _plan(
    shape: torch.Size,
    groups: int,
    eps: float,
    silu: bool,
    scale_1: torch.Tensor | None,
    shift: torch.Tensor | None,
    spatial: tuple[torch.Tensor, torch.Tensor] | None,
    in_bias: torch.Tensor | None = None,
) -> _Plan:
    """Check the arguments (``ValueError`` naming the one at fault) and derive the launches."""
    batch, channels, height, width = shape
    if channels % groups:
        raise ValueError(f"group norm: {channels} channels do not split into {groups} groups")
    if in_bias is not None and in_bias.shape != (channels,):
        raise ValueError(f"group norm: in_bias must be ({channels},); got {tuple(in_bias.shape)}")
    if (scale_1 is None) != (shift is None):
        raise ValueError("group norm: scale_1 and shift come together")
    small_h, small_w = height, width
    if spatial is not None:
        spatial_scale, spatial_shift = spatial
        small_h, small_w = spatial_scale.shape[-2:]
        if (
            spatial_scale.shape != spatial_shift.shape
            or spatial_scale.shape[:2] != (batch, channels)
            or height % small_h
            or width % small_w
        ):
            raise ValueError(
                f"group norm: spatial scale and shift must be ({batch}, {channels}, h, w) with h, w dividing "
                f"{height}, {width}; got {tuple(spatial_scale.shape)} and {tuple(spatial_shift.shape)}"
            )
    modulated = scale_1 is not None
    scale_stride = shift_stride = 0
    contiguous = False
    if modulated:
        scale_stride, contiguous_scale = _per_channel(scale_1, batch, channels, "scale_1")
        shift_stride, contiguous_shift = _per_channel(shift, batch, channels, "shift")
        contiguous = contiguous_scale or contiguous_shift
    if batch * channels * height * width == 0:
        return _Plan((), 0, contiguous)
    kernels = _kernels()
    pixels = height * width
    group_size = channels // groups
    block_g = _next_power_of_2(group_size)
    inverse_count = 1.0 / (pixels * group_size)
    # (32-bit offsets within a sample in that kernel: pixels × channels is at most groups × _SMALL_GROUP there)
    if spatial is None and pixels * group_size <= _SMALL_GROUP and pixels * channels < 2**31:
        block_hw = min(_next_power_of_2(pixels), max(1, _SMALL_TILE // block_g))
        small = _Launch(
            kernels.small,
            (groups, batch, 1),
            (pixels, channels, scale_stride, shift_stride, inverse_count, eps),
            {
                "GROUP": group_size,
                "MODULATED": modulated,
                "IN_BIAS": in_bias is not None,
                "SILU": silu,
                "BLOCK_HW": block_hw,
                "BLOCK_G": block_g,
                # a warp per 1,024 elements of the tile: 32 per thread, as the other kernels hold
                "num_warps": min(16, max(4, block_hw * block_g // 1024)),
            },
            tensors=7,
        )
        return _Plan((small,), 0, contiguous)

    block_c = min(_next_power_of_2(channels), 64)
    block_hw = _TILE // block_c
    channel_blocks = -(-channels // block_c)
    target = max(1, _STATS_PROGRAMS // (batch * channel_blocks))
    rows = -(-max(1, -(-pixels // target)) // block_hw) * block_hw  # pixels per statistics program, whole tiles
    parts = -(-pixels // rows)
    stats = _Launch(
        kernels.stats,
        (parts, channel_blocks, batch),
        (pixels, channels, rows, parts),
        {"BLOCK_HW": block_hw, "BLOCK_C": block_c},
        tensors=3,
    )
    finalize = _Launch(
        kernels.finalize,
        (groups, batch, 1),
        (pixels, channels, group_size, rows, parts, scale_stride, shift_stride, inverse_count, eps),
        # BLOCK_P is not fitted to ``parts``: one compiled variant per group width
        {
            "MODULATED": modulated,
            "IN_BIAS": in_bias is not None,
            "BLOCK_P": max(1, _FINALIZE_TILE // block_g),
            "BLOCK_G": block_g,
        },
        tensors=9,
    )
    apply = _Launch(
        kernels.apply,
        (-(-pixels // block_hw), channel_blocks, batch),
        (pixels, channels, width, height // small_h, width // small_w, small_h * small_w, small_w),
        {"SPATIAL": spatial is not None, "SILU": silu, "BLOCK_HW": block_hw, "BLOCK_C": block_c},
        tensors=6,
    )
    return _Plan((stats, finalize, apply), parts, contiguous)


def _per_channel(t: torch.Tensor, batch: int, channels: int, name: str) -> tuple[int, bool]:
    """Check a (N or 1, C, 1, 1) modulation; return its batch stride once laid out with unit channel stride (0 for
    one row shared by the batch), and whether it must be copied to get there (the time modulations need not: no op is
    queued)."""
    if t.dim() != 4 or t.shape[2:] != (1, 1) or t.shape[1] != channels or t.shape[0] not in (1, batch):
        raise ValueError(f"group norm: {name} must be (N or 1, {channels}, 1, 1); got {tuple(t.shape)}")
    copy = t.stride(1) != 1 and channels > 1
    stride = channels if copy else t.stride(0)  # a contiguous copy's batch stride is C
    return (stride if t.shape[0] == batch and batch > 1 else 0), copy


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


# Launching through Triton's ``kernel[grid](...)`` binds the arguments, computes their specialisation and formats the
# compile options into a cache key at every launch, host time that an eager UNet step with 183 norm launches pays
# each time (run 6 on an H200: 13.3 ms of kernels took 23.9 ms; run 8: the pipeline took 0.88 × as long without it). A
# repeated launch calls the kernel Triton compiled for it directly instead (``CompiledKernel[grid]``, which since
# Triton 3.3 takes every argument, the compile-time ones included, in the kernel's order), found under a key of what
# Triton specialises on (``_Launch.__call__``).
_LAUNCHERS: dict[tuple, Any] = {}
# Whether repeated launches take the direct call; off for good in a process where a direct call raised (a Triton whose
# compiled kernels take their arguments otherwise: they raise before launching anything), which then dispatches.
_direct_launch = True


def _kernels() -> Any:
    """The kernels' module, imported at first use: only a run that switches the norms on imports Triton."""
    from kandinsky22.models import norm_kernels

    return norm_kernels
