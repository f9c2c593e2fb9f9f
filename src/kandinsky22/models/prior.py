"""The Kandinsky 2.2 prior: a causal transformer that denoises a CLIP image embedding given the prompt.

Each sample is an 81-token sequence — 77 projected text tokens, the pooled text embedding, the timestep embedding,
the noisy image embedding x_t, and a learned "prd" token — run through pre-LN transformer blocks. The prd token's
output, projected back to CLIP width, is the predicted clean embedding x_0 in normalized CLIP space
(``post_process_latents`` un-normalizes it). This is the DALL-E 2 prior design (Ramesh et al. 2022).

Attribute paths equal the official checkpoint keys, so loading is a strict copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..loading import Config, ModelMixin
from .layers import FusibleProjections

MASK_VALUE = -10000.0  # the reference's additive mask value (not -inf), kept for bit-compatible attention


@dataclass
class PriorTransformerOutput:
    predicted_image_embedding: torch.Tensor


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (B,) → (B, dim), cosines first, frequencies 10000^(-i/half) (DDPM; flip_sin_to_cos)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    angles = timesteps.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return F.pad(emb, (0, dim % 2))  # an odd width gets one zero column


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim, hidden)
        self.linear_2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class SelfAttention(FusibleProjections):
    """Multi-head self-attention with biases; one SDPA call."""

    projection_groups = {"qkv": ("to_q", "to_k", "to_v")}

    def __init__(self, dim: int, heads: int, head_dim: int, dropout: float):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, batch: int) -> torch.Tensor:
        """``x``: the tokens as rows (B·L, D), as the blocks keep them (see ``PriorTransformer.forward``)."""
        q, k, v = (
            t.view(batch, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2) for t in self.project("qkv", x)
        )
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, L, head_dim)
        return self.to_out(h.transpose(1, 2).reshape(x.shape[0], -1))  # (B·L, inner)


class GELUProjection(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))  # exact (erf) GELU, as the reference


class FeedForward(nn.Module):
    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(GELUProjection(dim, 4 * dim), nn.Dropout(dropout), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-LN block: x + attn(LN(x)), then x + FF(LN(x)). The second norm is ``norm3`` in the checkpoint (the
    reference's block has a cross-attention slot ``norm2`` that the prior leaves empty)."""

    def __init__(self, dim: int, heads: int, head_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = SelfAttention(dim, heads, head_dim, dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, batch: int) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), mask, batch)
        return x + self.ff(self.norm3(x))


class PriorTransformer(ModelMixin):
    """Predicts the clean (normalized) CLIP image embedding from x_t, the timestep and the text encoder outputs."""

    config_defaults: ClassVar[dict[str, Any]] = {
        "num_attention_heads": 32,
        "attention_head_dim": 64,
        "num_layers": 20,
        "embedding_dim": 768,
        "num_embeddings": 77,
        "additional_embeddings": 4,
        "dropout": 0.0,
        "time_embed_act_fn": "silu",
        "norm_in_type": None,
        "embedding_proj_norm_type": None,
        "encoder_hid_proj_type": "linear",
        "added_emb_type": "prd",
        "time_embed_dim": None,
        "embedding_proj_dim": None,
        "clip_embed_dim": None,
    }

    def __init__(self, **kwargs: Any):
        super().__init__()
        cfg = self._register_config(kwargs)
        _check_config(cfg)
        inner = cfg.num_attention_heads * cfg.attention_head_dim
        clip_dim = cfg.clip_embed_dim or cfg.embedding_dim
        self.time_embedding = TimestepEmbedding(inner, cfg.time_embed_dim or inner)
        self.proj_in = nn.Linear(cfg.embedding_dim, inner)
        self.embedding_proj = nn.Linear(cfg.embedding_proj_dim or cfg.embedding_dim, inner)
        self.encoder_hidden_states_proj = nn.Linear(cfg.embedding_dim, inner)
        self.positional_embedding = nn.Parameter(torch.zeros(1, cfg.num_embeddings + cfg.additional_embeddings, inner))
        self.prd_embedding = nn.Parameter(torch.zeros(1, 1, inner))
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(inner, cfg.num_attention_heads, cfg.attention_head_dim, cfg.dropout)
            for _ in range(cfg.num_layers)
        )
        self.norm_out = nn.LayerNorm(inner)
        self.proj_to_clip_embeddings = nn.Linear(inner, clip_dim)
        # Statistics of the CLIP image embeddings the prior was trained to predict in normalized form.
        self.clip_mean = nn.Parameter(torch.zeros(1, clip_dim))
        self.clip_std = nn.Parameter(torch.zeros(1, clip_dim))

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | int,
        proj_embedding: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> PriorTransformerOutput | tuple[torch.Tensor]:
        """One denoising prediction.

        Args:
            hidden_states: noisy image embedding x_t, (B, embedding_dim).
            timestep: a number, a 0-d tensor, or a (B,) or (1,) tensor.
            proj_embedding: pooled text embedding, (B, embedding_proj_dim).
            encoder_hidden_states: text encoder last hidden states, (B, num_embeddings, embedding_dim).
            attention_mask: (B, num_embeddings) bool, True for real text tokens. When it is None the reference applies
                no mask at all — not even the causal one — and neither do we.
        """
        batch = hidden_states.shape[0]
        dtype = hidden_states.dtype
        timesteps = torch.as_tensor(timestep, device=hidden_states.device).reshape(-1).expand(batch)  # (B,)
        time_emb = timestep_embedding(timesteps, self.proj_in.out_features)
        time_emb = self.time_embedding(time_emb.to(self.time_embedding.linear_1.weight.dtype))

        tokens = torch.cat(
            [
                self.encoder_hidden_states_proj(encoder_hidden_states),  # (B, 77, D)
                self.embedding_proj(proj_embedding)[:, None],  # (B, 1, D)
                time_emb[:, None],
                self.proj_in(hidden_states)[:, None],
                self.prd_embedding.to(dtype).expand(batch, -1, -1),
            ],
            dim=1,
        )  # (B, 81, D)
        x = tokens + self.positional_embedding.to(dtype)

        mask = None
        if attention_mask is not None:
            padding = (1 - attention_mask.to(dtype)) * MASK_VALUE  # (B, 77)
            padding = F.pad(padding, (0, self.config.additional_embeddings))  # (B, 81): extra tokens are never masked
            length = padding.shape[1]
            causal = torch.full((length, length), MASK_VALUE, dtype=dtype, device=x.device).triu_(1)
            # Both masks add up (a padded, future key gets -20000), as in the reference. The same mask serves every
            # head; the reference repeats it per head, broadcasting is equivalent.
            mask = (padding[:, None, :] + causal)[:, None]  # (B, 1, 81, 81)

        # The blocks work on the tokens as rows (B·81, D): every linear layer is then one GEMM with its bias and no
        # reshapes around it (eager runs are bound by launching ops). Only attention views them per sample.
        length = x.shape[1]
        x = x.reshape(-1, x.shape[-1])
        for block in self.transformer_blocks:
            x = block(x, mask, batch)
        # LayerNorm is per token, so normalizing only the prd token (the last) gives the reference's output.
        predicted = self.proj_to_clip_embeddings(self.norm_out(x.view(batch, length, -1)[:, -1]))
        return PriorTransformerOutput(predicted) if return_dict else (predicted,)

    def post_process_latents(self, prior_latents: torch.Tensor) -> torch.Tensor:
        """Normalized CLIP space → CLIP image embedding."""
        return prior_latents * self.clip_std.to(prior_latents.device) + self.clip_mean.to(prior_latents.device)


def _check_config(cfg: Config) -> None:
    """Reject settings the official prior does not use, with a ValueError naming the key and the value."""
    fixed = {
        "added_emb_type": "prd",
        "encoder_hid_proj_type": "linear",
        "norm_in_type": None,
        "embedding_proj_norm_type": None,
        "time_embed_act_fn": "silu",
        # text tokens + pooled text + time + x_t + prd: the only layout the "prd" sequence has
        "additional_embeddings": 4,
    }
    for key, wanted in fixed.items():
        if cfg[key] != wanted:
            raise ValueError(f"PriorTransformer supports only {key}={wanted!r}, got {key}={cfg[key]!r}")
