"""MoVQ (``VQModel``): the image autoencoder of Kandinsky 2.2.

A VQ-GAN encoder/decoder whose decoder norms are *spatially conditioned* on the 4-channel latents (MoVQ, Zheng et al.
2022, https://arxiv.org/abs/2209.09002). The pipelines decode unquantized latents (``force_not_quantize=True``); the
codebook lookup is kept for ``decode(z)`` and ``forward`` as in the reference.

Attribute paths equal the official checkpoint keys (``encoder.down_blocks.0.resnets.0.norm1.weight``, ...), so
loading is a strict copy. Group norms use eps 1e-6 throughout; the spatial norms use 32 groups whatever
``norm_num_groups`` says, as the reference does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..loading import Config, ModelMixin, ModelOutput
from .layers import FusibleProjections, UpsampleConv2d
from .norms import group_norm_nhwc, norm_act, uses_triton
from .residual import conv_before_norm, conv_residual

ENCODER_BLOCKS = ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")
DECODER_BLOCKS = ("UpDecoderBlock2D", "AttnUpDecoderBlock2D")
NORM_EPS = 1e-6


@dataclass
class VQEncoderOutput(ModelOutput):
    latents: torch.Tensor


@dataclass
class DecoderOutput(ModelOutput):
    sample: torch.Tensor


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks. ``zq`` is the latent that conditions the decoder's norms; it is None in the encoder.
# ----------------------------------------------------------------------------------------------------------------------


class SpatialNorm(nn.Module):
    """GroupNorm whose scale and shift are 1x1 convolutions of the latents, resized to the feature map (MoVQ eq. 5)."""

    def __init__(self, channels: int, zq_channels: int):
        super().__init__()
        self.norm_layer = nn.GroupNorm(32, channels, eps=NORM_EPS)  # 32 groups hard-coded in the reference
        self.conv_y = nn.Conv2d(zq_channels, channels, 1)
        self.conv_b = nn.Conv2d(zq_channels, channels, 1)

    def forward(
        self, x: torch.Tensor, zq: torch.Tensor, silu: bool = False, in_bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``norm(x) * conv_y(zq') + conv_b(zq')``, zq' being ``zq`` resized (nearest) to ``x``'s size; then SiLU if
        ``silu``. ``in_bias`` (C,): the norm of ``x + in_bias`` (see ``norms.norm_act``)."""
        if in_bias is not None and not uses_triton(self.norm_layer, x):
            x, in_bias = x + in_bias.view(-1, 1, 1), None
        (height, width), (zq_height, zq_width) = x.shape[-2:], zq.shape[-2:]
        fh, fw = height // zq_height, width // zq_width
        if fh * zq_height != height or fw * zq_width != width or (fh & (fh - 1)) or (fw & (fw - 1)):
            zq = F.interpolate(zq, size=x.shape[-2:], mode="nearest")
            # norm(x) * y + b in one pass
            h = torch.addcmul(self.conv_b(zq), norm_act(self.norm_layer, x, in_bias=in_bias), self.conv_y(zq))
            return F.silu(h) if silu else h
        # Nearest resizing by a power-of-two factor repeats each latent pixel in an fh × fw block (exactly: the source
        # index i / f is exact in floating point). A 1x1 convolution commutes with that, so both run on the latents
        # and broadcast over each block: no full-size scale and shift maps are written and read back.
        scale, shift = self.conv_y(zq), self.conv_b(zq)
        if uses_triton(self.norm_layer, x):  # the norm, the modulation and the SiLU in one pass over x's pixels
            norm = self.norm_layer
            return group_norm_nhwc(
                x, norm.num_groups, norm.weight, norm.bias, norm.eps, silu=silu, spatial=(scale, shift), in_bias=in_bias
            )
        norm = self.norm_layer(x).unflatten(3, (zq_width, fw)).unflatten(2, (zq_height, fh))  # (B, C, h, fh, w, fw)
        scale, shift = scale[:, :, :, None, :, None], shift[:, :, :, None, :, None]
        h = torch.addcmul(shift, norm, scale).flatten(4, 5).flatten(2, 3)
        return F.silu(h) if silu else h


NormFactory = Callable[[int], nn.Module]  # channels -> norm layer


def group_norm(groups: int) -> NormFactory:
    return lambda channels: nn.GroupNorm(groups, channels, eps=NORM_EPS)


def spatial_norm(zq_channels: int) -> NormFactory:
    return lambda channels: SpatialNorm(channels, zq_channels)


def apply_norm(
    norm: nn.Module, x: torch.Tensor, zq: torch.Tensor | None, silu: bool = False, in_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The encoder's group norm or the decoder's spatial norm of ``x`` (+ ``in_bias``), then SiLU if ``silu``."""
    return norm_act(norm, x, silu=silu, in_bias=in_bias) if zq is None else norm(x, zq, silu=silu, in_bias=in_bias)


class ResnetBlock(nn.Module):
    """norm → SiLU → conv3x3, twice, plus a (1x1-projected when the width changes) shortcut. No time embedding."""

    def __init__(self, in_channels: int, out_channels: int, norm: NormFactory):
        super().__init__()
        self.norm1 = norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        h = apply_norm(self.norm1, x, zq, silu=True)
        # Where the Triton norms run, conv1's bias goes into norm2 and conv2's and the shortcut's into the residual
        # kernel (as in the UNet's resnets, layers.ResnetBlock2D)
        fold = uses_triton(self.norm2.norm_layer if isinstance(self.norm2, SpatialNorm) else self.norm2, h)
        h, in_bias = conv_before_norm(self.conv1, h, fold)
        h = apply_norm(self.norm2, h, zq, silu=True, in_bias=in_bias)
        return conv_residual(x, h, self.conv2, self.conv_shortcut, fold)


class SelfAttention(FusibleProjections):
    """Single-head self-attention over all pixels, with a residual connection.

    The reference sets the head dim to the channel count, so there is always one head (scale 1/sqrt(C)). The
    checkpoint names the norm ``group_norm`` in the encoder and ``spatial_norm`` in the decoder.
    """

    projection_groups = {"qkv": ("to_q", "to_k", "to_v")}

    def __init__(self, channels: int, norm: NormFactory):
        super().__init__()
        layer = norm(channels)
        if isinstance(layer, SpatialNorm):
            self.spatial_norm = layer
        else:
            self.group_norm = layer
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Sequential(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        h = norm_act(self.group_norm, x) if zq is None else self.spatial_norm(x, zq)
        # One copy to (B, HW, C) rows, so each projection is a single GEMM with its bias (see AddedKVAttention).
        h = h.flatten(2).transpose(1, 2).contiguous()  # (B, HW, C)
        q, k, v = (t.unsqueeze(1) for t in self.project("qkv", h))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B, HW, C)
        return x + self.to_out(h).transpose(1, 2).unflatten(2, x.shape[-2:])  # a view: no copy before the add


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one zero row and column at the bottom/right (the taming-transformers layout)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv (one :class:`UpsampleConv2d`, at the input's resolution)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = UpsampleConv2d(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ResolutionBlock(nn.Module):
    """One resolution level: ``num_layers`` resnets, each followed by attention when ``attention``, then an optional
    resampler. Encoder levels (Down/AttnDownEncoderBlock2D) hold ``downsamplers``, decoder levels
    (Up/AttnUpDecoderBlock2D) ``upsamplers``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        norm: NormFactory,
        attention: bool,
        resample: Literal["down", "up"] | None,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, norm) for i in range(num_layers)
        )
        self.attentions = (
            nn.ModuleList(SelfAttention(out_channels, norm) for _ in range(num_layers)) if attention else None
        )
        self.downsamplers = nn.ModuleList([Downsample(out_channels)]) if resample == "down" else None
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if resample == "up" else None

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, zq)
            if self.attentions is not None:
                x = self.attentions[i](x, zq)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    """resnet → attention → resnet at the lowest resolution."""

    def __init__(self, channels: int, norm: NormFactory):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(channels, channels, norm) for _ in range(2))
        self.attentions = nn.ModuleList([SelfAttention(channels, norm)])

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        x = self.resnets[0](x, zq)
        x = self.attentions[0](x, zq)
        return self.resnets[1](x, zq)


class Encoder(nn.Module):
    """Image → latents: conv_in, one level per ``block_out_channels`` entry (all but the last halve the size), mid."""

    def __init__(self, cfg: Config):
        super().__init__()
        channels = list(cfg.block_out_channels)
        norm = group_norm(cfg.norm_num_groups)
        self.conv_in = nn.Conv2d(cfg.in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            ResolutionBlock(
                channels[max(i - 1, 0)],
                channels[i],
                cfg.layers_per_block,
                norm,
                attention=block_type == "AttnDownEncoderBlock2D",
                resample="down" if i < len(channels) - 1 else None,
            )
            for i, block_type in enumerate(cfg.down_block_types)
        )
        self.mid_block = MidBlock(channels[-1], norm)
        self.conv_norm_out = norm(channels[-1])
        self.conv_out = nn.Conv2d(channels[-1], cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(apply_norm(self.conv_norm_out, x, None, silu=True))


class Decoder(nn.Module):
    """Latents → image, mirroring the encoder; every norm is a SpatialNorm conditioned on ``zq``."""

    def __init__(self, cfg: Config):
        super().__init__()
        channels = list(reversed(cfg.block_out_channels))
        norm = spatial_norm(cfg.latent_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, channels[0], 3, padding=1)
        self.mid_block = MidBlock(channels[0], norm)
        self.up_blocks = nn.ModuleList(
            ResolutionBlock(
                channels[max(i - 1, 0)],
                channels[i],
                cfg.layers_per_block + 1,  # one resnet more per level than the encoder, as in the reference
                norm,
                attention=block_type == "AttnUpDecoderBlock2D",
                resample="up" if i < len(channels) - 1 else None,
            )
            for i, block_type in enumerate(cfg.up_block_types)
        )
        self.conv_norm_out = norm(channels[-1])
        self.conv_out = nn.Conv2d(channels[-1], cfg.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        x = self.mid_block(x, zq)
        for block in self.up_blocks:
            x = block(x, zq)  # each SpatialNorm brings zq to its feature map's size
        return self.conv_out(self.conv_norm_out(x, zq, silu=True))


class VectorQuantizer(nn.Module):
    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Replace each latent pixel by its nearest codebook vector (Euclidean), passing gradients straight through."""
        b, c, height, width = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)  # (B*H*W, C)
        codes = self.embedding(torch.cdist(flat, self.embedding.weight).argmin(dim=1))
        codes = codes.view(b, height, width, c).permute(0, 3, 1, 2)  # (B, C, H, W)
        return z + (codes - z).detach()


# ----------------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------------


class VQModel(ModelMixin):
    """MoVQ autoencoder. ``encode(x).latents`` → unquantized latents; ``decode(z, force_not_quantize).sample`` → image.

    ``scaling_factor`` is stored but unused: the Kandinsky 2.2 pipelines neither scale nor unscale the latents.
    """

    # The reference's defaults (a config.json missing a key means the same to both libraries); the K2.2 MoVQ values
    # come from its config.json. The default norm_type "group" is outside the family and is rejected.
    config_defaults: ClassVar[dict[str, Any]] = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",),
        "up_block_types": ("UpDecoderBlock2D",),
        "block_out_channels": (64,),
        "layers_per_block": 1,
        "act_fn": "silu",
        "latent_channels": 3,
        "sample_size": 32,
        "num_vq_embeddings": 256,
        "norm_num_groups": 32,
        "vq_embed_dim": None,
        "scaling_factor": 0.18215,
        "norm_type": "group",
        "mid_block_add_attention": True,
        "lookup_from_codebook": False,
        "force_upcast": False,
    }

    def __init__(self, **kwargs: Any):
        super().__init__()
        cfg = self._register_config(kwargs)
        _check_config(cfg)
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        self.quantize = VectorQuantizer(cfg.num_vq_embeddings, cfg.latent_channels)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        self.decoder = Decoder(cfg)

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> VQEncoderOutput | tuple[torch.Tensor]:
        """Image (B, C, H, W) in [-1, 1] → latents (B, 4, H/f, W/f), neither quantized nor scaled."""
        latents = self.quant_conv(self.encoder(x))
        return VQEncoderOutput(latents) if return_dict else (latents,)

    def decode(
        self, z: torch.Tensor, force_not_quantize: bool = False, return_dict: bool = True
    ) -> DecoderOutput | tuple[torch.Tensor]:
        """Latents → image. The decoder's spatial norms are conditioned on the (possibly quantized) latents."""
        quant = z if force_not_quantize else self.quantize(z)
        sample = self.decoder(self.post_quant_conv(quant), quant)
        return DecoderOutput(sample) if return_dict else (sample,)

    def forward(self, sample: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        """Reconstruct an image: encode, then decode through the codebook (as the reference's forward)."""
        return self.decode(self.encode(sample).latents, return_dict=return_dict)


def _check_config(cfg: Config) -> None:
    """Reject settings outside the MoVQ family with a ValueError naming the key and the value."""
    fixed = {"norm_type": "spatial", "act_fn": "silu", "mid_block_add_attention": True, "lookup_from_codebook": False}
    for key, wanted in fixed.items():
        if cfg[key] != wanted:
            raise ValueError(f"VQModel supports only {key}={wanted!r}, got {key}={cfg[key]!r}")
    if cfg.vq_embed_dim not in (None, cfg.latent_channels):
        raise ValueError(
            f"VQModel needs vq_embed_dim equal to latent_channels ({cfg.latent_channels}) or None, "
            f"got vq_embed_dim={cfg.vq_embed_dim!r}"
        )
    for key, allowed in (("down_block_types", ENCODER_BLOCKS), ("up_block_types", DECODER_BLOCKS)):
        for block_type in cfg[key]:
            if block_type not in allowed:
                raise ValueError(f"Unsupported {key}={list(cfg[key])!r}: {block_type!r} is not one of {allowed}")
        if len(cfg[key]) != len(cfg.block_out_channels):
            raise ValueError(
                f"{key}={list(cfg[key])!r} must have one entry per block_out_channels={list(cfg.block_out_channels)!r}"
            )
