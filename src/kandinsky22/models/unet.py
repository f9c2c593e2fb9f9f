"""The Kandinsky 2.2 decoder UNet: a latent-diffusion UNet conditioned only on a CLIP image embedding.

The image embedding enters twice: added to the time embedding (``add_embedding``) and as 32 context tokens
(``encoder_hid_proj``) that every attention layer prepends to its keys and values. The controlnet-depth variant
(``addition_embed_type="image_hint"``) also encodes a 3-channel hint at 8× the latent size into 4 channels that are
concatenated to the input. Module paths equal the official state-dict keys; the config keys and their defaults are
the reference's, so ``config.json`` files are shared with it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kandinsky22.loading import ModelMixin, ModelOutput
from kandinsky22.lora import LoraModelMixin
from kandinsky22.models.layers import AddedKVAttention, ContextKV, ResnetBlock2D, TimestepEmbedding, Timesteps
from kandinsky22.models.norms import norm_act

# Block type → whether it has attention layers.
_DOWN_BLOCKS = {"ResnetDownsampleBlock2D": False, "SimpleCrossAttnDownBlock2D": True}
_UP_BLOCKS = {"ResnetUpsampleBlock2D": False, "SimpleCrossAttnUpBlock2D": True}

# Keys whose other values select machinery outside the K2.2 family; only these values are accepted.
_ALLOWED_VALUES: dict[str, tuple[Any, ...]] = {
    "mid_block_type": ("UNetMidBlock2DSimpleCrossAttn",),
    "addition_embed_type": ("image", "image_hint"),
    "encoder_hid_dim_type": ("image_proj",),
    "resnet_time_scale_shift": ("scale_shift",),
    "time_embedding_type": ("positional",),
    "act_fn": ("silu",),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "center_input_sample": (False,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "mid_block_scale_factor": (1.0,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "num_attention_heads": (None,),
    "attention_type": ("default",),
    "dropout": (0.0,),
}


@dataclass
class UNet2DConditionOutput(ModelOutput):
    sample: torch.Tensor  # (B, out_channels, H, W)


# Largest per-run table of time modulations (bytes); a run that would need more computes them at each step instead.
_MODULATION_TABLE_BYTES = 256 * 2**20


@dataclass
class UNetConditioning:
    """What the UNet derives from ``added_cond_kwargs`` alone, the same at every denoising step: the addition to the
    time embedding, the keys and values of the context tokens for each attention layer (in call order), and the
    encoded hint. ``UNet2DConditionModel.prepare_conditioning`` builds it; the denoising loop builds it once per run
    and passes it to every step, where the reference recomputes all of it each step.

    Given the run's timesteps, it also holds ``modulation``: every resnet's ``(1 + scale, shift)`` for every step,
    (steps, 2, B, ΣC, 1, 1) with the resnets' channels side by side in call order — the time embedding, its MLP and
    the 36 projections of a full-size UNet become one batch of work per run instead of ~100 small kernels per step.
    ``at(i)`` selects step ``i``'s row, which ``forward`` then uses in place of its ``timestep``.

    ``phase_weights``: the 2x2 phase kernels of each upsampling resnet's ``conv1`` (``UpsampleConv2d.phase_weight``),
    derived from its weights once per run instead of at each step."""

    time_addition: torch.Tensor  # (B, time_dim)
    context_kv: list[ContextKV]  # per attention layer: keys and values side by side, and each as views of that
    hint: torch.Tensor | None = None  # (B, 4, H, W), concatenated to the sample (image_hint UNets)
    modulation: torch.Tensor | None = None  # (steps, 2, B, ΣC, 1, 1) for a run, or (2, B, ΣC, 1, 1) for one step
    phase_weights: list[tuple[torch.Tensor, torch.Tensor | None]] | None = None  # per upsampling resnet, call order

    def at(self, step: int) -> UNetConditioning:
        """The conditioning of denoising step ``step`` (the same object without a per-run table)."""
        if self.modulation is None or self.modulation.ndim != 6:
            return self
        return dataclasses.replace(self, modulation=self.modulation[step])


def _per_level(config: Mapping[str, Any], key: str, levels: int) -> list[int]:
    """An int (same at every level) or a list with one int per level."""
    value = config[key]
    if isinstance(value, int):
        return [value] * levels
    if isinstance(value, (list, tuple)) and len(value) == levels and all(isinstance(v, int) for v in value):
        return list(value)
    raise ValueError(f"{key}={value!r} must be an int or a list of {levels} ints (one per level)")


def _check_config(config: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the key and value of anything outside the K2.2 decoder family."""
    for key, allowed in _ALLOWED_VALUES.items():
        if config[key] not in allowed:
            raise ValueError(
                f"UNet2DConditionModel does not support {key}={config[key]!r}; supported: "
                + ", ".join(map(repr, allowed))
            )
    only_cross = config["only_cross_attention"]
    if any(only_cross) if isinstance(only_cross, (list, tuple)) else only_cross:
        raise ValueError(f"UNet2DConditionModel does not support only_cross_attention={only_cross!r}; supported: False")
    channels = config["block_out_channels"]
    if not isinstance(channels, (list, tuple)) or not channels or not all(isinstance(c, int) for c in channels):
        raise ValueError(f"block_out_channels={channels!r} must be a non-empty list of ints (one width per level)")
    levels = len(channels)
    for key, known in (("down_block_types", _DOWN_BLOCKS), ("up_block_types", _UP_BLOCKS)):
        types = list(config[key])
        if len(types) != levels:
            raise ValueError(f"{key}={types!r} must have one entry per block_out_channels ({levels})")
        for block_type in types:
            if block_type not in known:
                raise ValueError(f"{key} contains unsupported block type {block_type!r}; supported: {list(known)}")
    for key in ("cross_attention_dim", "encoder_hid_dim", "norm_num_groups"):
        if not isinstance(config[key], int):
            raise ValueError(f"UNet2DConditionModel needs an int {key}, got {key}={config[key]!r}")

    # Heads are channels // attention_head_dim; the reference's attention only runs when that division is exact.
    # Up blocks take attention_head_dim[i] without reversing it, as the reference does.
    head_dims = _per_level(config, "attention_head_dim", levels)
    down_types, up_types = list(config["down_block_types"]), list(config["up_block_types"])
    attended = [(channels[i], head_dims[i]) for i in range(levels) if _DOWN_BLOCKS[down_types[i]]]
    attended += [(channels[-1 - i], head_dims[i]) for i in range(levels) if _UP_BLOCKS[up_types[i]]]
    attended.append((channels[-1], head_dims[-1]))
    for width, head_dim in attended:
        if head_dim <= 0 or width % head_dim:
            raise ValueError(f"attention_head_dim={config['attention_head_dim']!r} must divide the width {width}")


# ----------------------------------------------------------------------------------------------------------------------
# Conditioning on the CLIP image embedding
# ----------------------------------------------------------------------------------------------------------------------


class ImageProjection(nn.Module):
    """CLIP image embedding (B, D) → ``tokens`` LayerNorm-ed context tokens (B, tokens, context_dim)."""

    def __init__(self, image_dim: int, context_dim: int, tokens: int = 32) -> None:
        super().__init__()
        self.tokens = tokens
        self.image_embeds = nn.Linear(image_dim, tokens * context_dim)
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        x = self.image_embeds(image_embeds.to(self.image_embeds.weight.dtype))
        return self.norm(x.unflatten(-1, (self.tokens, -1)))  # (B, tokens, context_dim)


def _hint_encoder() -> nn.Sequential:
    """3-channel hint → 4 channels at 1/8 of its size (three stride-2 convs), SiLU between the convs.

    The convs sit at Sequential indices 0, 2, …, 14, as in the checkpoint.
    """
    widths = (3, 16, 16, 32, 32, 96, 96, 256, 4)
    strides = (1, 1, 2, 1, 2, 1, 2, 1)
    layers: list[nn.Module] = []
    for c_in, c_out, stride in zip(widths[:-1], widths[1:], strides):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.SiLU()]
    return nn.Sequential(*layers[:-1])


class ImageTimeEmbedding(nn.Module):
    """CLIP image embedding → an addition to the time embedding; with ``hint``, also holds the hint encoder."""

    def __init__(self, image_dim: int, time_dim: int, hint: bool) -> None:
        super().__init__()
        self.image_proj = nn.Linear(image_dim, time_dim)
        self.image_norm = nn.LayerNorm(time_dim)
        self.input_hint_block = _hint_encoder() if hint else None

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        # The reference does not cast here (mixed dtypes fail there); casting as ImageProjection does is harmless.
        return self.image_norm(self.image_proj(image_embeds.to(self.image_proj.weight.dtype)))


# ----------------------------------------------------------------------------------------------------------------------
# Blocks: one resolution level each
# ----------------------------------------------------------------------------------------------------------------------

# The attention layers' precomputed context keys and values, consumed in call order (down, mid, up).
ContextKVs = Iterator[ContextKV]
# The resnets' (1 + scale, shift), consumed in call order (down: resnets then downsampler; mid; up: resnets, upsampler).
Modulations = Iterator[tuple[torch.Tensor, torch.Tensor]]
# The upsampling resnets' conv1 phase kernels (UpsampleConv2d.phase_weight), in call order, or None (made at the call).
PhaseWeights = Iterator[tuple[torch.Tensor, torch.Tensor | None] | None]


class DownBlock(nn.Module):
    """``layers`` × [resnet → attention?], then a resnet downsampler unless it is the last level.

    ``head_dim=None`` gives ResnetDownsampleBlock2D, otherwise SimpleCrossAttnDownBlock2D. Every output (and the
    downsampler's) is appended to ``skips`` for the up path.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        layers: int,
        temb_channels: int,
        groups: int,
        eps: float,
        context_dim: int,
        head_dim: int | None,
        downsample: bool,
    ) -> None:
        super().__init__()
        # Attentions are registered before resnets (here and in every block), as in the reference, so the state dict
        # lists keys in its order. Their group norm keeps the default eps: the reference does not pass norm_eps on.
        self.attentions = nn.ModuleList(
            AddedKVAttention(out_channels, context_dim, head_dim, groups) for _ in range(layers if head_dim else 0)
        )
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels, groups, eps)
            for i in range(layers)
        )
        self.downsamplers = nn.ModuleList(
            [ResnetBlock2D(out_channels, out_channels, temb_channels, groups, eps, resample="down")]
            if downsample
            else []
        )

    def forward(
        self, x: torch.Tensor, modulations: Modulations, context_kv: ContextKVs, skips: list[torch.Tensor]
    ) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, next(modulations))
            if self.attentions:
                x = self.attentions[i](x, next(context_kv))
            skips.append(x)
        for downsampler in self.downsamplers:
            x = downsampler(x, next(modulations))
            skips.append(x)
        return x


class MidBlock(nn.Module):
    """UNetMidBlock2DSimpleCrossAttn: resnet → attention → resnet at the lowest resolution."""

    def __init__(
        self, channels: int, temb_channels: int, groups: int, eps: float, context_dim: int, head_dim: int
    ) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([AddedKVAttention(channels, context_dim, head_dim, groups)])
        self.resnets = nn.ModuleList(ResnetBlock2D(channels, channels, temb_channels, groups, eps) for _ in range(2))

    def forward(self, x: torch.Tensor, modulations: Modulations, context_kv: ContextKVs) -> torch.Tensor:
        x = self.resnets[0](x, next(modulations))
        x = self.attentions[0](x, next(context_kv))
        return self.resnets[1](x, next(modulations))


class UpBlock(nn.Module):
    """``layers`` × [concat a skip → resnet → attention?], then a resnet upsampler unless it is the last level.

    ``head_dim=None`` gives ResnetUpsampleBlock2D, otherwise SimpleCrossAttnUpBlock2D. Resnet ``i`` takes
    ``(prev_channels if i == 0 else out_channels) + (skip_channels if i == layers - 1 else out_channels)`` inputs,
    the reference's bookkeeping (``skip_channels`` is the width of the level below).
    """

    def __init__(
        self,
        skip_channels: int,
        prev_channels: int,
        out_channels: int,
        layers: int,
        temb_channels: int,
        groups: int,
        eps: float,
        context_dim: int,
        head_dim: int | None,
        upsample: bool,
    ) -> None:
        super().__init__()
        self.attentions = nn.ModuleList(
            AddedKVAttention(out_channels, context_dim, head_dim, groups) for _ in range(layers if head_dim else 0)
        )
        self.resnets = nn.ModuleList(
            ResnetBlock2D(
                (prev_channels if i == 0 else out_channels) + (skip_channels if i == layers - 1 else out_channels),
                out_channels,
                temb_channels,
                groups,
                eps,
            )
            for i in range(layers)
        )
        self.upsamplers = nn.ModuleList(
            [ResnetBlock2D(out_channels, out_channels, temb_channels, groups, eps, resample="up")] if upsample else []
        )

    def forward(
        self,
        x: torch.Tensor,
        modulations: Modulations,
        context_kv: ContextKVs,
        skips: list[torch.Tensor],
        phase_weights: PhaseWeights,
    ) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), next(modulations))
            if self.attentions:
                x = self.attentions[i](x, next(context_kv))
        for upsampler in self.upsamplers:
            x = upsampler(x, next(modulations), next(phase_weights))
        return x


# ----------------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------------


class UNet2DConditionModel(LoraModelMixin, ModelMixin):
    """Decoder UNet of Kandinsky 2.2 (text2img / img2img: 4 input channels; inpaint: 9; controlnet-depth: 8).

    Builds any number of levels from the reference's config keys; values outside this family raise ``ValueError``.
    """

    # Every key the reference writes to config.json, with the reference's default: a key missing from a file means
    # this value for both libraries. Several defaults (SD-style blocks) are outside this family on purpose.
    _lora_target = "unet"
    config_defaults: ClassVar[dict[str, Any]] = {
        "sample_size": None,
        "in_channels": 4,
        "out_channels": 4,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "only_cross_attention": False,
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "dropout": 0.0,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-05,
        "cross_attention_dim": 1280,
        "transformer_layers_per_block": 1,
        "reverse_transformer_layers_per_block": None,
        "encoder_hid_dim": None,
        "encoder_hid_dim_type": None,
        "attention_head_dim": 8,
        "num_attention_heads": None,
        "dual_cross_attention": False,
        "use_linear_projection": False,
        "class_embed_type": None,
        "addition_embed_type": None,
        "addition_time_embed_dim": None,
        "num_class_embeds": None,
        "upcast_attention": False,
        "resnet_time_scale_shift": "default",
        "resnet_skip_time_act": False,
        "resnet_out_scale_factor": 1.0,
        "time_embedding_type": "positional",
        "time_embedding_dim": None,
        "time_embedding_act_fn": None,
        "timestep_post_act": None,
        "time_cond_proj_dim": None,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "projection_class_embeddings_input_dim": None,
        "attention_type": "default",
        "class_embeddings_concat": False,
        "mid_block_only_cross_attention": None,
        "cross_attention_norm": None,
        "addition_embed_type_num_heads": 64,
    }

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        cfg = self._register_config(kwargs)
        _check_config(cfg)
        channels = list(cfg.block_out_channels)
        levels = len(channels)
        layers = _per_level(cfg, "layers_per_block", levels)
        head_dims = _per_level(cfg, "attention_head_dim", levels)
        time_dim = cfg.time_embedding_dim or 4 * channels[0]
        groups, eps, context_dim = cfg.norm_num_groups, cfg.norm_eps, cfg.cross_attention_dim

        self.conv_in = nn.Conv2d(
            cfg.in_channels, channels[0], cfg.conv_in_kernel, padding=(cfg.conv_in_kernel - 1) // 2
        )
        self.time_proj = Timesteps(channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        self.time_embedding = TimestepEmbedding(channels[0], time_dim)
        self.encoder_hid_proj = ImageProjection(cfg.encoder_hid_dim, context_dim)
        self.add_embedding = ImageTimeEmbedding(cfg.encoder_hid_dim, time_dim, cfg.addition_embed_type == "image_hint")

        self.down_blocks = nn.ModuleList(
            DownBlock(
                channels[max(i - 1, 0)],
                channels[i],
                layers[i],
                time_dim,
                groups,
                eps,
                context_dim,
                head_dims[i] if _DOWN_BLOCKS[block_type] else None,
                downsample=i < levels - 1,
            )
            for i, block_type in enumerate(cfg.down_block_types)
        )
        reversed_channels, reversed_layers = channels[::-1], layers[::-1]
        self.up_blocks = nn.ModuleList(
            UpBlock(
                reversed_channels[min(i + 1, levels - 1)],
                reversed_channels[max(i - 1, 0)],
                reversed_channels[i],
                reversed_layers[i] + 1,
                time_dim,
                groups,
                eps,
                context_dim,
                head_dims[i] if _UP_BLOCKS[block_type] else None,  # not reversed: the reference's quirk
                upsample=i < levels - 1,
            )
            for i, block_type in enumerate(cfg.up_block_types)
        )
        # Registered after up_blocks, as in the reference, so the state dict lists keys in the reference's order.
        self.mid_block = MidBlock(channels[-1], time_dim, groups, eps, context_dim, head_dims[-1])
        self.conv_norm_out = nn.GroupNorm(groups, channels[0], eps=eps)
        self.conv_out = nn.Conv2d(
            channels[0], cfg.out_channels, cfg.conv_out_kernel, padding=(cfg.conv_out_kernel - 1) // 2
        )
        # Every resnet in the order forward calls them (a plain list: not registered twice in the state dict).
        self._resnets_in_call_order: list[ResnetBlock2D] = [
            *(r for block in self.down_blocks for r in (*block.resnets, *block.downsamplers)),
            *self.mid_block.resnets,
            *(r for block in self.up_blocks for r in (*block.resnets, *block.upsamplers)),
        ]
        self._upsampling_convs = [r.conv1 for block in self.up_blocks for r in block.upsamplers]

    def prepare_conditioning(
        self, added_cond_kwargs: Mapping[str, torch.Tensor] | None, timesteps: torch.Tensor | None = None
    ) -> UNetConditioning:
        """Everything ``forward`` derives from ``added_cond_kwargs`` (see ``forward``); pass it as ``conditioning`` to
        skip that work at each step of a run with the same conditioning.

        With ``timesteps`` (the run's 1-d table), the time modulation of every resnet at every step is computed here
        too (unless the table would exceed 256 MiB): pass ``conditioning.at(i)`` at step ``i``."""
        cond = added_cond_kwargs or {}
        image_embeds = cond.get("image_embeds")
        if image_embeds is None:
            raise ValueError(
                "UNet2DConditionModel needs added_cond_kwargs['image_embeds'] (the CLIP image embedding); "
                f"got keys {sorted(cond)}"
            )
        width = self.config.encoder_hid_dim
        if not isinstance(image_embeds, torch.Tensor) or image_embeds.ndim != 2 or image_embeds.shape[1] != width:
            shape = tuple(image_embeds.shape) if isinstance(image_embeds, torch.Tensor) else type(image_embeds).__name__
            raise ValueError(f"added_cond_kwargs['image_embeds'] must be (B, {width}) for this UNet, got {shape}")
        hint = None
        hint_encoder = self.add_embedding.input_hint_block
        if hint_encoder is not None:
            hint = cond.get("hint")
            if hint is None:
                raise ValueError(
                    "UNet2DConditionModel with addition_embed_type='image_hint' needs added_cond_kwargs['hint'] "
                    f"(B, 3, 8H, 8W); got keys {sorted(cond)}"
                )
            if hint.ndim != 4 or hint.shape[0] != image_embeds.shape[0] or hint.shape[1] != 3:
                raise ValueError(
                    f"added_cond_kwargs['hint'] must be (B, 3, 8H, 8W) with the image_embeds' batch "
                    f"{image_embeds.shape[0]}, got {tuple(hint.shape)}"
                )
            hint = hint_encoder(hint.to(self.conv_in.weight.dtype))
        context = self.encoder_hid_proj(image_embeds)  # (B, 32, cross_attention_dim)
        attentions = [attn for block in self.down_blocks for attn in block.attentions]
        attentions += [*self.mid_block.attentions, *(attn for block in self.up_blocks for attn in block.attentions)]
        time_addition = self.add_embedding(image_embeds)
        if time_addition.is_cuda and not torch.backends.cudnn.benchmark:
            # PyTorch keeps the cuDNN plans chosen now for the process: enable_fast_path() warns that it cannot time
            # them (torch.backends.cudnn.benchmark)
            self._ran_untimed_convolutions = True
        upsamplers = self._upsampling_convs
        # The phase kernels, once per run: not for a compiled UNet, whose graph derives them (fused into one pass over
        # the weights; as inputs, a CUDA graph would keep a copy of them per shape), nor where the weights are not on
        # the inputs' device (sequential offload brings them in for each call only).
        # Kept in the convolutions' buffers (the uncompiled fast path's CUDA graphs read them there): refreshed here,
        # once per run, and not passed.
        kept = bool(upsamplers) and all(conv.phase_kernel is not None for conv in upsamplers)
        for conv in upsamplers if kept else ():
            conv.refresh_phase_weight()
        compiled = getattr(self, "_compiled_call_impl", None) is not None
        per_run = not kept and not compiled and all(conv.weight.device == time_addition.device for conv in upsamplers)
        return UNetConditioning(
            time_addition=time_addition,
            context_kv=[attn.context_kv(context) for attn in attentions],  # the order forward calls them in
            hint=hint,
            modulation=None if timesteps is None else self._modulation_table(timesteps, time_addition),
            phase_weights=[conv.phase_weight() for conv in upsamplers] if per_run else None,
        )

    def _activated_time_embedding(self, timesteps: torch.Tensor, time_addition: torch.Tensor) -> torch.Tensor:
        """``silu(time_embedding(timesteps) + time_addition)``, (B, time_dim): every resnet activates the time
        embedding before projecting it, so it is done once here. ``timesteps`` is (B,) or broadcasts to it."""
        dtype = self.time_embedding.linear_1.weight.dtype
        return F.silu(self.time_embedding(self.time_proj(timesteps).to(dtype)) + time_addition)

    def _modulation_table(self, timesteps: torch.Tensor, time_addition: torch.Tensor) -> torch.Tensor | None:
        """Every resnet's ``(1 + scale, shift)`` at every step: (steps, 2, B, ΣC, 1, 1), or None if over the cap."""
        timesteps = torch.as_tensor(timesteps, device=time_addition.device).reshape(-1)
        steps, batch = timesteps.shape[0], time_addition.shape[0]
        width = sum(r.time_emb_proj.out_features for r in self._resnets_in_call_order)  # 2 ΣC
        if steps * batch * width * time_addition.element_size() > _MODULATION_TABLE_BYTES:
            return None
        # (steps · B, time_dim): row s·B + b is sample b at step s
        temb = self._activated_time_embedding(timesteps.repeat_interleave(batch), time_addition.repeat(steps, 1))
        parts = [r.time_modulation(temb) for r in self._resnets_in_call_order]  # (steps · B, C, 1, 1) pairs
        table = torch.stack([torch.cat([part[k] for part in parts], dim=1) for k in (0, 1)])  # (2, steps · B, ΣC, 1, 1)
        # (steps, 2, B, ΣC, 1, 1), contiguous: each step's row then has the same strides whatever the number of steps
        # (a compiled UNet guards on them)
        return table.unflatten(1, (steps, batch)).transpose(0, 1).contiguous()

    def _modulations(
        self, conditioning: UNetConditioning, timestep: torch.Tensor | float | int, batch: int, device: torch.device
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each resnet's ``(1 + scale, shift)`` for this step, in call order: slices of the conditioning's per-step
        row, or computed from ``timestep``."""
        resnets = self._resnets_in_call_order
        if conditioning.modulation is None:
            timesteps = torch.as_tensor(timestep, device=device).reshape(-1).expand(batch)  # (B,), no host sync
            temb = self._activated_time_embedding(timesteps, conditioning.time_addition)
            return [r.time_modulation(temb) for r in resnets]
        if conditioning.modulation.ndim != 5:
            raise ValueError(
                "this conditioning holds the time modulation of every step of a run: pass conditioning.at(step)"
            )
        scale_1, shift = conditioning.modulation.unbind(0)  # (B, ΣC, 1, 1) each
        out, start = [], 0
        for resnet in resnets:
            end = start + resnet.time_emb_proj.out_features // 2
            out.append((scale_1[:, start:end], shift[:, start:end]))
            start = end
        return out

    def _check_sample(self, sample: torch.Tensor, conditioning: UNetConditioning) -> None:
        """Channels, batch and (with a hint) size, named here rather than as a shape error inside a layer. Shapes
        only: nothing is read from the device, and a compiled graph resolves these at tracing."""
        hint = conditioning.hint
        channels = self.conv_in.in_channels - (0 if hint is None else hint.shape[1])
        batch = conditioning.time_addition.shape[0]
        if sample.shape[1] != channels or sample.shape[0] != batch:
            raise ValueError(
                f"UNet2DConditionModel needs a sample of {channels} channels with the conditioning's batch {batch}, "
                f"got shape {tuple(sample.shape)}"
            )
        if hint is not None and hint.shape[-2:] != sample.shape[-2:]:
            raise ValueError(
                f"the hint's size {tuple(hint.shape[-2:])} after its encoder (1/8 of the hint's pixels) must equal "
                f"the sample's {tuple(sample.shape[-2:])}"
            )

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor | None = None,
        added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
        return_dict: bool = True,
        conditioning: UNetConditioning | None = None,
    ) -> UNet2DConditionOutput | tuple[torch.Tensor]:
        """Predict the ``out_channels`` (for K2.2: [noise | variance]) for ``sample`` (B, C, H, W) at ``timestep``.

        ``added_cond_kwargs`` holds ``image_embeds`` (B, encoder_hid_dim) and, for "image_hint", ``hint``
        (B, 3, 8H, 8W); C is ``in_channels`` minus the hint's 4 channels. ``conditioning``, from
        ``prepare_conditioning(added_cond_kwargs)``, replaces ``added_cond_kwargs``; one made with the run's timesteps
        and selected with ``.at(i)`` also replaces ``timestep`` (its value is then not read). ``timestep`` is a number,
        a 0-d tensor or a (1,) / (B,) tensor, broadcast to the batch on the device without a host sync.
        ``encoder_hidden_states`` is ignored, as in the reference: the context tokens come from ``image_embeds``.
        H and W must be divisible by 2 ** (levels - 1).
        """
        factor = 2 ** (len(self.down_blocks) - 1)
        if sample.ndim != 4 or sample.shape[-2] % factor or sample.shape[-1] % factor:
            # Otherwise a size mismatch deep in the up path, where a skip connection is concatenated
            raise ValueError(
                f"UNet2DConditionModel needs a sample (B, C, H, W) with H and W divisible by {factor}, got shape "
                f"{tuple(sample.shape)}"
            )
        if conditioning is None:
            conditioning = self.prepare_conditioning(added_cond_kwargs)
        self._check_sample(sample, conditioning)
        if conditioning.hint is not None:
            sample = torch.cat([sample, conditioning.hint.to(sample.dtype)], dim=1)

        modulations = iter(self._modulations(conditioning, timestep, sample.shape[0], sample.device))
        context_kv = iter(conditioning.context_kv)
        phase_weights = iter(conditioning.phase_weights or [None] * len(self._upsampling_convs))

        x = self.conv_in(sample)
        skips = [x]
        for down_block in self.down_blocks:
            x = down_block(x, modulations, context_kv, skips)
        x = self.mid_block(x, modulations, context_kv)
        for up_block in self.up_blocks:
            x = up_block(x, modulations, context_kv, skips, phase_weights)
        x = self.conv_out(norm_act(self.conv_norm_out, x, silu=True))
        return UNet2DConditionOutput(sample=x) if return_dict else (x,)
