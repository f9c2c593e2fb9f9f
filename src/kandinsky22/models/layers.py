"""Building blocks of the decoder UNet: timestep embedding, scale-shift ResnetBlock, added-KV attention.

Attribute names equal the official checkpoint keys (``norm1``, ``time_emb_proj``, ``add_k_proj``, ``to_out.0``, …),
so a diffusers-format state dict loads as a strict copy.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


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


class ResnetBlock2D(nn.Module):
    """Pre-norm residual block with a scale-shift time conditioning (``norm2(h) * (1 + scale) + shift``).

    ``resample`` "up" (nearest ×2) or "down" (average pool 2×2) is applied to both the residual input and the
    hidden state after the first norm, as the reference does, so the block changes the resolution.
    ``temb`` is the already activated time embedding, ``silu(emb)``: the UNet computes it once for all blocks.
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
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, 2 * out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.resample: nn.Module | None = None
        if resample == "up":
            self.resample = nn.Upsample(scale_factor=2.0, mode="nearest")
        elif resample == "down":
            self.resample = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(x))
        if self.resample is not None:
            x, h = self.resample(x), self.resample(h)
        h = self.conv1(h)
        scale, shift = self.time_emb_proj(temb)[:, :, None, None].chunk(2, dim=1)  # (B, C_out, 1, 1) each
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class AddedKVAttention(nn.Module):
    """Self-attention over the pixels of a feature map whose keys and values are prefixed with context tokens.

    This is the reference's ``Attention`` + ``AttnAddedKVProcessor2_0`` ("SimpleCrossAttn"): the pixels are
    group-normed, the context tokens are projected by ``add_k_proj``/``add_v_proj`` without a norm and placed
    *before* the pixel keys/values, and everything is one ``scaled_dot_product_attention`` call (scale
    ``head_dim**-0.5``). The output projection is added to the un-normed input.
    """

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

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        pixels = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C); a view when x is channels_last
        q = self.to_q(pixels)
        k = torch.cat([self.add_k_proj(context), self.to_k(pixels)], dim=1)  # (B, L + HW, C)
        v = torch.cat([self.add_v_proj(context), self.to_v(pixels)], dim=1)
        q, k, v = (
            t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2) for t in (q, k, v)
        )  # (B, heads, T, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        out = self.to_out[0](out.transpose(1, 2).flatten(2))  # (B, HW, C)
        return x + out.transpose(1, 2).reshape(b, c, h, w)
