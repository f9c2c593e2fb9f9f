"""A resnet's last steps as one pass: ``shortcut + conv2(h)`` with both convolutions' biases (``add_residual``).

PyTorch's CUDA convolutions add their bias in a pass of their own over the output, and the residual sum is another:
a UNet resnet with a 1x1 shortcut makes three passes over its output after its convolutions (conv2's bias, the
shortcut's bias, the sum), one without a shortcut two, and an upsampling resnet one more to write its upsampled
input. Where a model runs the Triton norms (``norms.uses_triton``: switched on, CUDA, channels_last, not compiling),
its resnets run conv2 and the shortcut without their biases and ``add_residual`` adds everything in one kernel,
reading an upsampling resnet's input at its own resolution. The sum is taken in fp32 and rounded once, where PyTorch
rounds after each of its passes. In H200 run 9 (``bench/README.md``), the UNet step's 93 bias passes took 0.80 ms of
11.26 ms of kernels; resnets fold 55 of them here (conv2 and the shortcut), and 33 more into their second norm
(``norms.norm_act``'s ``in_bias``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kandinsky22.models import norms
from kandinsky22.models.norms import _interpreting, _Launch, _next_power_of_2

# Elements per program (as the norms' apply kernel).
_TILE = 4096
# Whether resnets fold their convolutions' biases into the kernels (``bias_folds``); bench/graph_step.py switches it
# off to time the difference in one run.
FOLD_BIASES = True


def bias_folds(conv: nn.Module | None) -> bool:
    """Whether ``conv`` may run without its bias, for a later kernel to add it: a plain ``nn.Conv2d`` with a bias, no
    hooks (a bias-less call skips them) and no gradient to record for the bias (the kernels record none). ``None`` (no
    shortcut) folds trivially."""
    if not FOLD_BIASES:
        return False
    return conv is None or (
        type(conv) is nn.Conv2d
        and conv.bias is not None
        and not (conv._forward_hooks or conv._forward_pre_hooks)
        and not (torch.is_grad_enabled() and conv.bias.requires_grad)
    )


def conv_without_bias(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return conv._conv_forward(x, conv.weight, None)


def conv_before_norm(conv: nn.Module, h: torch.Tensor, fold: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(conv(h), None)``; where ``fold`` (the next norm runs the Triton kernels) and ``conv`` allows it
    (``bias_folds``), ``conv(h)`` without its bias, and the bias, for the norm to add (``norms.norm_act``'s
    ``in_bias``)."""
    if fold and bias_folds(conv):
        return conv_without_bias(conv, h), conv.bias
    return conv(h), None


def conv_residual(
    x: torch.Tensor, h: torch.Tensor, conv: nn.Module, shortcut: nn.Module | None, fold: bool, upsample: bool = False
) -> torch.Tensor:
    """A resnet's output ``shortcut(x) + conv(h)`` (``x`` itself without a shortcut), ``x`` read as its nearest ×2
    upsampling with ``upsample``. Where ``fold`` (the Triton kernels run) and the convolutions allow it, they run
    without their biases and ``add_residual`` adds both and the sum in one pass (a 1x1 shortcut commutes with the
    upsampling, so it runs on ``x`` at its own resolution)."""
    if fold and bias_folds(conv) and bias_folds(shortcut):
        h = conv_without_bias(conv, h)
        if shortcut is None:
            return add_residual(x, h, conv.bias, upsample=upsample)
        return add_residual(conv_without_bias(shortcut, x), h, conv.bias, shortcut.bias, upsample=upsample)
    if upsample:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
    return (x if shortcut is None else shortcut(x)) + conv(h)


def add_residual(
    x: torch.Tensor, h: torch.Tensor, bias: torch.Tensor, bias2: torch.Tensor | None = None, upsample: bool = False
) -> torch.Tensor:
    """``x + h + bias (+ bias2)``: ``h`` (N, C, H, W), the biases (C,) per channel, ``x`` like ``h`` or, with
    ``upsample``, (N, C, H / 2, W / 2) and read as its nearest ×2 upsampling. One Triton kernel, whose result is
    channels_last, when ``x`` and ``h`` are channels_last on CUDA (or under Triton's interpreter), else PyTorch's
    ops."""
    batch, channels, height, width = h.shape
    x_shape = (batch, channels, height // 2, width // 2) if upsample else tuple(h.shape)
    if tuple(x.shape) != x_shape or (upsample and (height % 2 or width % 2)):
        raise ValueError(f"add_residual: x must be {x_shape} for h of {tuple(h.shape)}; got {tuple(x.shape)}")
    for name, b in (("bias", bias), ("bias2", bias2)):
        if b is not None and tuple(b.shape) != (channels,):
            raise ValueError(f"add_residual: {name} must be ({channels},); got {tuple(b.shape)}")
    if not _kernel_applies(x, h, bias, bias2):
        if upsample:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        out = x + h + bias.view(-1, 1, 1)
        return out if bias2 is None else out + bias2.view(-1, 1, 1)
    device = -1
    if h.is_cuda:
        device = torch.cuda.current_device()
        if h.device.index != device:
            with torch.cuda.device(h.device):  # Triton launches on the current device: make it h's
                return add_residual(x, h, bias, bias2, upsample)
    out = torch.empty_like(h, memory_format=torch.channels_last)
    if out.numel() == 0:
        return out
    key = (h.shape, h.dtype, bias.dtype, None if bias2 is None else bias2.dtype, upsample)
    launch = _LAUNCHES.get(key)
    if launch is None:
        block_c = min(_next_power_of_2(channels), 64)
        block_r = _TILE // block_c
        rows = batch * height * width
        launch = _Launch(
            norms._kernels().residual,
            (-(-rows // block_r), -(-channels // block_c), 1),
            (rows, channels, height, width),
            {"TWO_BIASES": bias2 is not None, "UPSAMPLE": upsample, "BLOCK_R": block_r, "BLOCK_C": block_c},
            tensors=5,
        )
        if len(_LAUNCHES) >= 1024:
            _LAUNCHES.clear()
        _LAUNCHES[key] = launch
    bias = bias.contiguous()
    launch(device, x, h, bias, bias if bias2 is None else bias2.contiguous(), out)
    return out


def _kernel_applies(x: torch.Tensor, h: torch.Tensor, *biases: torch.Tensor | None) -> bool:
    tensors = [x, h, *(b for b in biases if b is not None)]
    return (
        (h.is_cuda or _interpreting())
        and x.dtype == h.dtype
        and h.is_contiguous(memory_format=torch.channels_last)
        and x.is_contiguous(memory_format=torch.channels_last)
        and all(t.device == h.device for t in tensors)
        and not torch.compiler.is_compiling()
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
    )


# Launches by shape, dtypes and options (a model has a few dozen distinct resnet shapes per image size).
_LAUNCHES: dict[tuple, _Launch] = {}
