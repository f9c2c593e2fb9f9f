"""Building blocks of the decoder UNet: timestep embedding, scale-shift ResnetBlock, added-KV attention, and the
3x3 convolution of a nearest ×2 upsampling that the UNet and MoVQ share.

Attribute names equal the official checkpoint keys (``norm1``, ``time_emb_proj``, ``add_k_proj``, ``to_out.0``, …),
so a diffusers-format state dict loads as a strict copy.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from kandinsky22.models.norms import norm_act, uses_triton
from kandinsky22.models.residual import conv_before_norm, conv_residual


def timestep_embedding(
    timesteps: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Sinusoidal embedding (DDPM, Ho et al. 2020) of 1-d ``timesteps``, shape (B, dim), always float32.

    The frequencies are ``exp(-ln(max_period) * k / (dim // 2 - freq_shift))``, computed in float32 in the
    reference's order so the result matches it bit for bit; callers cast to the model dtype.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = timesteps[:, None].float() * freqs[None, :]  # (B, half)
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class Timesteps(nn.Module):
    """:func:`timestep_embedding` with fixed settings, as a module (it has no weights)."""

    def __init__(self, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0) -> None:
        super().__init__()
        self.dim, self.flip_sin_to_cos, self.freq_shift = dim, flip_sin_to_cos, freq_shift

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(timesteps, self.dim, self.flip_sin_to_cos, self.freq_shift)


class TimestepEmbedding(nn.Module):
    """Linear → SiLU → Linear on the sinusoidal embedding."""

    def __init__(self, in_features: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_features, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


# Below this many input pixels (batch × height × width) the phase kernels' 16/9 more weights cost more than the
# arithmetic they save (CPU, full-size UNet widths: 1.38× the time at 2 × 4², 0.95× at 2 × 8², 0.63× at 2 × 16²), and
# UpsampleConv2d upsamples first instead.
_PHASES_MIN_PIXELS = 128


class UpsampleConv2d(nn.Conv2d):
    """``conv(nearest ×2 upsampling of x)`` for a 3x3 convolution with padding 1, computed at ``x``'s resolution.

    Along one axis, output pixel ``2i`` of the upsampled input sees ``x[i-1], x[i], x[i]`` under the kernel's taps
    0, 1, 2, and pixel ``2i + 1`` sees ``x[i], x[i], x[i+1]``: each output phase is a 2-tap convolution of ``x`` with
    taps (0, 1 + 2) or (0 + 1, 2). So each of the four phases (pixel ``(2i + a, 2j + c)``) is a 2x2 convolution of
    ``x``, and the four run as one with four times the output channels: 16 multiply-adds per output pixel and input
    channel instead of 36, and no upsampled input is written and read back. The phases are then interleaved in one
    copy, in the memory format the convolution chose. Equal to the two-step form up to rounding (the combined taps sum
    before they multiply). The parameters, and so the checkpoint keys, are the 3x3 convolution's.

    The phase kernels are derived from the weights at each call (a few passes over them), unless the caller passes
    :meth:`phase_weight`'s result, as the UNet does from its per-run conditioning, or they are kept in this module's
    buffers (:meth:`keep_phase_weight`, the fast path's CUDA graphs). Inputs of fewer than ``_PHASES_MIN_PIXELS``
    pixels, where reading the weights costs more than the arithmetic, are upsampled first.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 3, padding=1)
        # keep_phase_weight(): the phase kernels and bias at fixed addresses (not in the state dict)
        self.register_buffer("phase_kernel", None, persistent=False)
        self.register_buffer("phase_bias", None, persistent=False)

    def keep_phase_weight(self, keep: bool = True) -> None:
        """Keep the phase kernels in this module's buffers (``keep=False`` drops them), for calls that pass none:
        a CUDA graph reads them where they are instead of deriving them at every replay (about 1 ms of kernels in a
        10.9 ms UNet step, H200 run 12: bench/README.md). They follow the weights only through
        :meth:`refresh_phase_weight`, which the UNet's ``prepare_conditioning`` calls once per run."""
        if keep:
            self.refresh_phase_weight()
        else:
            self.phase_kernel = self.phase_bias = None

    @torch.no_grad()
    def refresh_phase_weight(self) -> None:
        """The kept phase kernels derived again from the current weights, in place where their shape, layout, dtype
        and device still match (a captured graph keeps reading them there)."""
        kernel, bias = self.phase_weight()
        same = (
            self.phase_kernel is not None
            and (self.phase_kernel.shape, self.phase_kernel.stride()) == (kernel.shape, kernel.stride())
            and (self.phase_kernel.dtype, self.phase_kernel.device) == (kernel.dtype, kernel.device)
            and (self.phase_bias is None) == (bias is None)
        )
        if not same:
            self.phase_kernel, self.phase_bias = kernel, bias
            return
        self.phase_kernel.copy_(kernel)
        if bias is not None:
            self.phase_bias.copy_(bias)

    def phase_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The four phases' 2x2 kernels, (4 · out, in, 2, 2) ordered ``(a, c, out)``, and the bias repeated to match."""
        out, inp = self.out_channels, self.in_channels
        # With a zero tap on each side (z, w0, w1, w2, z), sums of neighbours are w0, w0 + w1, w1 + w2, w2: tap t of
        # phase a is sum 2t + a. Both axes at once: (out, in, 4, 4) = (out, in, t, a, s, c). Half-precision weights
        # are summed in fp32 (exactly) and rounded once.
        w = F.pad(self.weight.to(torch.promote_types(self.weight.dtype, torch.float32)), (1, 1, 1, 1))
        w = w[:, :, 1:] + w[:, :, :-1]
        w = (w[..., 1:] + w[..., :-1]).to(self.weight.dtype).view(out, inp, 2, 2, 2, 2)
        if self.weight.is_contiguous(memory_format=torch.channels_last):  # keep the layout the fast path chose
            weight = w.permute(3, 5, 0, 2, 4, 1).reshape(4 * out, 2, 2, inp).permute(0, 3, 1, 2)
        else:
            weight = w.permute(3, 5, 0, 1, 2, 4).reshape(4 * out, inp, 2, 2)
        return weight, None if self.bias is None else self.bias.repeat(4)

    def forward(
        self, x: torch.Tensor, phase_weight: tuple[torch.Tensor, torch.Tensor | None] | None = None
    ) -> torch.Tensor:
        batch, _, height, width = x.shape
        if batch * height * width < _PHASES_MIN_PIXELS:
            return super().forward(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        out = self.out_channels
        # (B, 4 · out, H + 1, W + 1): phase (a, c)'s pixel (i, j) at row i + a, column j + c of its channels
        if phase_weight is None and self.phase_kernel is not None:
            phase_weight = (self.phase_kernel, self.phase_bias)
        y = F.conv2d(x, *(phase_weight or self.phase_weight()), padding=1)
        # (b, o, i, a, j, c): one strided view of y, interleaved by the copy below
        sb, sch, sh, sw = y.stride()
        phases = y.as_strided((batch, out, height, 2, width, 2), (sb, sch, sh, 2 * out * sch + sh, sw, out * sch + sw))
        if y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous():  # the conv's choice
            rows = phases.permute(0, 2, 3, 4, 5, 1).reshape(batch, 2 * height, 2 * width, out)
            return rows.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        # contiguous(): a no-op after the copy, which reshape skips where a view will do (1x1 inputs)
        return phases.reshape(batch, out, 2 * height, 2 * width).contiguous()


class ResnetBlock2D(nn.Module):
    """Pre-norm residual block with a scale-shift time conditioning (``norm2(h) * (1 + scale) + shift``).

    ``resample`` "up" (nearest ×2) or "down" (average pool 2×2) is applied to both the residual input and the
    hidden state after the first norm, as the reference does, so the block changes the resolution ("up": ``conv1`` is
    an :class:`UpsampleConv2d`, which upsamples the hidden state itself).
    The time conditioning arrives as ``(1 + scale, shift)`` (see :meth:`time_modulation`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        groups: int = 32,
        eps: float = 1e-5,
        resample: Literal["up", "down"] | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = (
            UpsampleConv2d(in_channels, out_channels)
            if resample == "up"
            else nn.Conv2d(in_channels, out_channels, 3, padding=1)
        )
        self.time_emb_proj = nn.Linear(temb_channels, 2 * out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.resample = resample

    def time_modulation(self, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(1 + scale, shift)``, (B, C_out, 1, 1) each, from the activated time embedding (B, temb_channels)."""
        scale, shift = self.time_emb_proj(temb).unflatten(1, (2, -1, 1, 1)).unbind(1)
        return 1 + scale, shift

    def forward(
        self,
        x: torch.Tensor,
        modulation: tuple[torch.Tensor, torch.Tensor],
        phase_weight: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """``modulation`` is :meth:`time_modulation`'s ``(1 + scale, shift)`` (the UNet computes them for all blocks,
        once per step or once per run); ``phase_weight``, for an "up" block, ``conv1.phase_weight()`` made ahead."""
        h = norm_act(self.norm1, x, silu=True)
        # Where the Triton norms run, conv1's bias goes into norm2 (its in_bias), and conv2's and the shortcut's into
        # one residual kernel that also upsamples x as it reads it (see norms and residual): PyTorch's convolutions
        # would each add their bias in a pass of their own over their output.
        fold = uses_triton(self.norm2, h)
        if self.resample == "down":
            x, h = F.avg_pool2d(x, 2), F.avg_pool2d(h, 2)
        scale_1, shift = modulation
        if phase_weight is None:
            h, in_bias = conv_before_norm(self.conv1, h, fold)
        else:
            h, in_bias = self.conv1(h, phase_weight), None
        # silu(norm2(h) * (1 + scale) + shift)
        h = norm_act(self.norm2, h, scale_1, shift, silu=True, in_bias=in_bias)
        # "up": conv1 upsamples the hidden state itself, conv_residual the residual input
        return conv_residual(x, h, self.conv2, self.conv_shortcut, fold, upsample=self.resample == "up")


class FusibleProjections(nn.Module):
    """Base of attention layers whose sibling projections (e.g. ``to_q``, ``to_k``, ``to_v``) can run as one GEMM.

    ``projection_groups`` maps a group name to the ``nn.Linear`` children it holds. ``project(group, x)`` returns one
    output per child. After ``fuse_projections()`` the children are replaced by one concatenated weight and bias
    held by the layer itself (``<group>_weight``, ``<group>_bias``), so a group costs one matmul and one read of its
    input instead of several; the outputs are views of that one result. The state dict still reads and writes the
    children's keys (``to_q.weight``, …): checkpoints keep the official layout whether or not a model is fused.
    """

    projection_groups: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __init__(self) -> None:
        super().__init__()
        self.fused_sizes: dict[str, list[int]] = {}  # group → output width of each fused child, in order

    def fuse_projections(self) -> None:
        """Concatenate each group's weights and biases (idempotent)."""
        for group, names in self.projection_groups.items():
            if group in self.fused_sizes:
                continue
            linears: list[nn.Linear] = [getattr(self, name) for name in names]
            weight = torch.cat([linear.weight.detach() for linear in linears])  # (sum of out, in)
            bias = torch.cat([linear.bias.detach() for linear in linears])
            for name in names:
                delattr(self, name)
            self.register_parameter(f"{group}_weight", nn.Parameter(weight, requires_grad=False))
            self.register_parameter(f"{group}_bias", nn.Parameter(bias, requires_grad=False))
            self.fused_sizes[group] = [linear.out_features for linear in linears]

    def project(self, group: str, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sizes = self.fused_sizes.get(group)
        if sizes is None:
            return tuple(getattr(self, name)(x) for name in self.projection_groups[group])
        return F.linear(x, getattr(self, f"{group}_weight"), getattr(self, f"{group}_bias")).split(sizes, dim=-1)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        # Write a fused group under its children's keys, so saved checkpoints keep the official layout. Each part is
        # a copy: safetensors refuses tensors that share storage.
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for group, sizes in self.fused_sizes.items():
            for kind in ("weight", "bias"):
                fused = destination.pop(f"{prefix}{group}_{kind}")
                for name, part in zip(self.projection_groups[group], fused.split(sizes)):
                    destination[f"{prefix}{name}.{kind}"] = part.detach().clone()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # The inverse: a fused layer reads its children's keys and concatenates them.
        for group in self.fused_sizes:
            for kind in ("weight", "bias"):
                keys = [f"{prefix}{name}.{kind}" for name in self.projection_groups[group]]
                if all(key in state_dict for key in keys):
                    state_dict[f"{prefix}{group}_{kind}"] = torch.cat([state_dict.pop(key) for key in keys])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# Pixels per sample from which a fused attention's projection writes its keys and values in place, a GEMM per sample,
# instead of concatenating them to the context's (H200 run 9: the 44 concatenations took 0.54 ms of the UNet step's
# 11.26 ms of kernels at 768²). Below it a GEMM per sample would fill few of a large GPU's multiprocessors, and the
# copies are small: the 12x12 level at 768² (144 pixels) concatenates. A choice from those sizes, not yet timed.
_IN_PLACE_MIN_PIXELS = 256

# An attention layer's context keys and values: side by side (B, L, 2C), then the keys and the values as views of it,
# (B, L, heads, head_dim) each (``AddedKVAttention.context_kv``).
ContextKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class AddedKVAttention(FusibleProjections):
    """Self-attention over the pixels of a feature map whose keys and values are prefixed with context tokens.

    This is the reference's ``Attention`` + ``AttnAddedKVProcessor2_0`` ("SimpleCrossAttn"): the pixels are
    group-normed, the context tokens are projected by ``add_k_proj``/``add_v_proj`` without a norm and placed
    *before* the pixel keys/values, and everything is one ``scaled_dot_product_attention`` call (scale
    ``head_dim**-0.5``). The output projection is added to the un-normed input.
    """

    projection_groups = {"qkv": ("to_q", "to_k", "to_v"), "added_kv": ("add_k_proj", "add_v_proj")}

    def __init__(self, channels: int, context_dim: int, head_dim: int, groups: int = 32, eps: float = 1e-5) -> None:
        super().__init__()
        self.heads, self.head_dim = channels // head_dim, head_dim
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.add_k_proj = nn.Linear(context_dim, channels)
        self.add_v_proj = nn.Linear(context_dim, channels)
        # A list so the key reads ``to_out.0``; the reference keeps a no-op Dropout at index 1, which has no weights.
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def context_kv(self, context: torch.Tensor) -> ContextKV:
        """Keys and values of the context tokens: side by side, (B, L, 2 · channels), and as views of that, (B, L,
        heads, head_dim) each. They depend on the conditioning only, not on the denoised sample, so the UNet computes
        them once per denoising run (``prepare_conditioning``), and the views with them: no per-step op makes them."""
        if "added_kv" in self.fused_sizes:
            both = F.linear(context, self.added_kv_weight, self.added_kv_bias)
        else:
            both = torch.cat(self.project("added_kv", context), dim=-1)
        keys, values = both.unflatten(-1, (2, self.heads, self.head_dim)).unbind(2)
        return both, keys, values

    def forward(self, x: torch.Tensor, context_kv: ContextKV) -> torch.Tensor:
        # Eager runs are bound by launching ops, so this works on 2-d rows: one copy of the normed pixels to (B·HW, C)
        # (free when x is channels_last) makes each projection a single GEMM with its bias, without the reshapes a
        # 3-d input costs around every projection.
        b, c, h, w = x.shape
        pixels = norm_act(self.group_norm, x).permute(0, 2, 3, 1).reshape(-1, c)  # (B·HW, C)
        heads = (self.heads, self.head_dim)
        context_both, context_k, context_v = context_kv
        if self._in_place(pixels, context_both, h * w):
            q, kv = self._project_after_context(pixels, context_both, b)
            q = q.view(b, h * w, *heads)
            k, v = kv.unflatten(-1, (2, *heads)).unbind(2)  # (B, L + HW, heads, d): the context tokens first
        else:
            q, k, v = (t.view(b, h * w, *heads) for t in self.project("qkv", pixels))
            k, v = torch.cat([context_k, k], dim=1), torch.cat([context_v, v], dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = self.to_out[0](out.transpose(1, 2).reshape(-1, c))  # (B·HW, C)
        # (B, C, H, W) as a view with channels_last strides: the residual add reads it without a copy
        return x + out.view(b, h, w, c).permute(0, 3, 1, 2)

    def _in_place(self, pixels: torch.Tensor, context_kv: torch.Tensor, pixels_per_sample: int) -> bool:
        """Whether the projection writes the keys in place (``_project_after_context``): fused, large enough, not
        compiling (Inductor plans the copies itself), and not recording gradients (GEMMs into a given output have
        none)."""
        return (
            "qkv" in self.fused_sizes
            and pixels_per_sample >= _IN_PLACE_MIN_PIXELS
            and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (pixels.requires_grad or context_kv.requires_grad))
        )

    def _project_after_context(
        self, pixels: torch.Tensor, context_kv: torch.Tensor, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The queries (B, HW, C) and the keys and values (B, L + HW, 2C), the context's first, as views of one
        (B, L + HW, 3C) buffer that the projection GEMM writes in place, one GEMM per sample (a sample's rows are
        contiguous there, the batch's are not) after the context's rows: no concatenation copies them again. The
        context rows' query columns are left unwritten and not read."""
        c, context_len = pixels.shape[1], context_kv.shape[1]
        n = pixels.shape[0] // batch
        qkv = torch.empty(batch, context_len + n, 3 * c, device=pixels.device, dtype=pixels.dtype)
        qkv[:, :context_len, c:] = context_kv
        weight = self.qkv_weight.t()
        for i in range(batch):
            torch.addmm(self.qkv_bias, pixels[i * n : (i + 1) * n], weight, out=qkv[i, context_len:])
        return qkv[:, context_len:, :c], qkv[:, :, c:]
