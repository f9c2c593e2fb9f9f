"""The Kandinsky 2.2 prior: a causal transformer that denoises a CLIP image embedding given the prompt.

Each sample is an 81-token sequence — 77 projected text tokens, the pooled text embedding, the timestep embedding,
the noisy image embedding x_t, and a learned "prd" token — run through pre-LN transformer blocks. The prd token's
output, projected back to CLIP width, is the predicted clean embedding x_0 in normalized CLIP space
(``post_process_latents`` un-normalizes it). This is the DALL-E 2 prior design (Ramesh et al. 2022).

Attribute paths equal the official checkpoint keys, so loading is a strict copy.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..loading import Config, ModelMixin, ModelOutput
from ..lora import LoraModelMixin
from .layers import FusibleProjections

MASK_VALUE = -10000.0  # the reference's additive mask value (not -inf), kept for bit-compatible attention


@dataclass
class PriorTransformerOutput(ModelOutput):
    predicted_image_embedding: torch.Tensor


@dataclass
class PriorContext:
    """What the prior derives from the prompt alone, the same at every denoising step of a run.

    ``PriorTransformer.prepare_context`` builds it once per run; the denoising loop passes it to every step, where the
    reference recomputes it each step. A sample's sequence is [77 text tokens, pooled text, time, x_t, prd] and the
    attention is causal (each token sees itself and the tokens before it), so the 78 prompt tokens never see the three
    per-step tokens: their states in every layer are the same at every step (78 and 81 in the official config:
    ``num_embeddings`` + 1 and + 4 in general). Two forms:

    * ``kv``: each layer's keys and values of the 78 prompt tokens, computed once; a step then runs only its three
      tokens through the layers (3 rows per sample instead of 81). Exact: the causal mask gives the prompt tokens'
      queries no weight on later keys.
    * ``tokens``: the prompt's 78 projected tokens; a step runs all 81 through the layers — the same arithmetic as
      the reference, with the projections and the mask done once. The form for a model called without a causal mask
      (no ``attention_mask``), and for eager runs on a GPU: they are bound by launching kernels, not by arithmetic,
      and the ``kv`` form launches two more per layer (the concatenations of past and new keys and values).

    With the run's timesteps it also holds the time-embedding token of every step (``time``, (steps, D)); ``at(i)``
    selects step ``i``'s, which ``forward`` then uses in place of its ``timestep``.
    """

    mask: torch.Tensor | None  # additive attention mask of a step's queries: (B, 1, 3, 81) with kv, else (B, 1, 81, 81)
    kv: torch.Tensor | None = None  # (layers, 2, B, heads, 78, head_dim): keys, values of the prompt's tokens
    tokens: torch.Tensor | None = None  # (B, 78, D): the prompt's tokens, positions added (the form without kv)
    time: torch.Tensor | None = None  # (steps, D) for a run, or (D,) for one step: time tokens, no position

    def at(self, step: int) -> PriorContext:
        """The context of denoising step ``step`` (the same object without a per-run time table)."""
        if self.time is None or self.time.ndim != 2:
            return self
        return dataclasses.replace(self, time=self.time[step])


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

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, batch: int, past: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x``: the tokens as rows (B·L, D), as the blocks keep them (see ``PriorTransformer.forward``). ``past``:
        keys and values of earlier tokens, (2, B, heads, L_past, head_dim), placed before this call's. Returns the
        output rows and this call's keys and values (B, heads, L, head_dim)."""
        q, k, v = (
            t.view(batch, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2) for t in self.project("qkv", x)
        )
        keys, values = (k, v) if past is None else (torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2))
        h = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (B, heads, L, head_dim)
        return self.to_out(h.transpose(1, 2).reshape(x.shape[0], -1)), k, v  # (B·L, inner)


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

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, batch: int, past: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The new rows, and the attention's keys and values of ``x``'s tokens (see ``SelfAttention.forward``)."""
        h, k, v = self.attn1(self.norm1(x), mask, batch, past)
        x = x + h
        return x + self.ff(self.norm3(x)), k, v


class PriorTransformer(LoraModelMixin, ModelMixin):
    """Predicts the clean (normalized) CLIP image embedding from x_t, the timestep and the text encoder outputs."""

    _lora_target = "prior"
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

    # ``prepare_context``'s form when its caller does not choose: None decides by device (see there), True / False
    # force the kv / tokens form.
    cache_prompt: bool | None = None

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
        proj_embedding: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
        context: PriorContext | None = None,
    ) -> PriorTransformerOutput | tuple[torch.Tensor]:
        """One denoising prediction.

        Args:
            hidden_states: noisy image embedding x_t, (B, embedding_dim).
            timestep: a number, a 0-d tensor, or a (B,) or (1,) tensor.
            proj_embedding: pooled text embedding, (B, embedding_proj_dim).
            encoder_hidden_states: text encoder last hidden states, (B, num_embeddings, embedding_dim).
            attention_mask: (B, num_embeddings) bool, True for real text tokens. When it is None the reference applies
                no mask at all — not even the causal one — and neither do we.
            context: ``prepare_context(proj_embedding, encoder_hidden_states, attention_mask)``, in place of those
                three (a denoising loop builds it once per run); one made with the run's timesteps and selected with
                ``.at(i)`` also replaces ``timestep`` (its value is then not read).
        """
        if context is None:
            if proj_embedding is None or encoder_hidden_states is None:
                raise ValueError(
                    "PriorTransformer needs `proj_embedding` and `encoder_hidden_states` (or a `context` from "
                    "prepare_context)"
                )
            context = self.prepare_context(proj_embedding, encoder_hidden_states, attention_mask, cache_prompt=False)
        batch = hidden_states.shape[0]
        dtype = hidden_states.dtype
        time = context.time
        if time is None or time.ndim != 1:
            timesteps = torch.as_tensor(timestep, device=hidden_states.device).reshape(-1)  # (1,) or (B,)
            time = self._time_tokens(timesteps)
        tokens = torch.cat(
            [
                time.expand(batch, -1)[:, None],
                self.proj_in(hidden_states)[:, None],
                self.prd_embedding.to(dtype).expand(batch, -1, -1),
            ],
            dim=1,
        ) + self.positional_embedding[:, -3:].to(dtype)  # (B, 3, D): the step's tokens
        if context.kv is None:
            tokens = torch.cat([context.tokens, tokens], dim=1)  # (B, 81, D)

        # The blocks work on the tokens as rows (B·L, D): every linear layer is then one GEMM with its bias and no
        # reshapes around it (eager runs are bound by launching ops). Only attention views them per sample.
        length = tokens.shape[1]
        x = tokens.reshape(-1, tokens.shape[-1])
        for i, block in enumerate(self.transformer_blocks):
            x = block(x, context.mask, batch, None if context.kv is None else context.kv[i])[0]
        # LayerNorm is per token, so normalizing only the prd token (the last) gives the reference's output.
        predicted = self.proj_to_clip_embeddings(self.norm_out(x.view(batch, length, -1)[:, -1]))
        return PriorTransformerOutput(predicted) if return_dict else (predicted,)

    def prepare_context(
        self,
        proj_embedding: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        cache_prompt: bool | None = None,
    ) -> PriorContext:
        """Everything ``forward`` derives from the prompt (see ``PriorContext``); pass it as ``context`` to every step
        of a run with that prompt. ``cache_prompt``: run the prompt's tokens through the layers here, once, and keep
        their keys and values (the ``kv`` form; needs ``attention_mask``, whose causal mask makes it exact), instead
        of running them again at every step. By default everywhere but in eager runs on a GPU, which are bound by
        launching kernels rather than by arithmetic (the ``kv`` form launches two more per layer); a compiled prior
        (the fast path) replays its steps as CUDA graphs, where only the arithmetic counts. ``timesteps`` (the run's
        1-d table): also compute every step's time token here; pass ``context.at(i)`` at step ``i``. The model's
        ``cache_prompt`` attribute, when set, overrides the default."""
        if cache_prompt is None:
            cache_prompt = self.caches_prompt()
        batch = proj_embedding.shape[0]
        dtype = self.proj_in.weight.dtype
        tokens = (
            torch.cat(
                [
                    self.encoder_hidden_states_proj(encoder_hidden_states.to(dtype)),  # (B, 77, D)
                    self.embedding_proj(proj_embedding.to(dtype))[:, None],  # (B, 1, D)
                ],
                dim=1,
            )
            + self.positional_embedding[:, :-3].to(dtype)
        )
        time = None if timesteps is None else self._time_tokens(torch.as_tensor(timesteps, device=tokens.device))

        mask = None
        if attention_mask is not None:
            padding = (1 - attention_mask.to(dtype)) * MASK_VALUE  # (B, 77)
            padding = F.pad(padding, (0, self.config.additional_embeddings))  # (B, 81): extra tokens are never masked
            length = padding.shape[1]
            causal = torch.full((length, length), MASK_VALUE, dtype=dtype, device=tokens.device).triu_(1)
            # Both masks add up (a padded, future key gets -20000), as in the reference. The same mask serves every
            # head; the reference repeats it per head, broadcasting is equivalent.
            mask = (padding[:, None, :] + causal)[:, None]  # (B, 1, 81, 81)
        if not cache_prompt or mask is None:
            return PriorContext(mask=mask, tokens=tokens, time=time)

        # The prompt's tokens through every layer, with the causal mask among themselves: their keys and values.
        x = tokens.reshape(-1, tokens.shape[-1])
        kv = []
        for block in self.transformer_blocks:
            x, k, v = block(x, mask[:, :, :-3, :-3], batch)
            kv.append(torch.stack([k, v]))
        # The step's three queries see every prompt key (but padding) and, causally, each other.
        return PriorContext(mask=mask[:, :, -3:].contiguous(), kv=torch.stack(kv), time=time)

    def caches_prompt(self) -> bool:
        """``prepare_context``'s default form: the ``cache_prompt`` attribute if set, else the kv form unless the model
        is on a GPU and not compiled."""
        if self.cache_prompt is not None:
            return self.cache_prompt
        compiled = getattr(self, "_compiled_call_impl", None) is not None
        return compiled or self.proj_in.weight.device.type != "cuda"

    def _time_tokens(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(N,) timesteps → (N, D) time-embedding tokens (sinusoidal embedding through the MLP), without position."""
        emb = timestep_embedding(timesteps.reshape(-1), self.proj_in.out_features)
        return self.time_embedding(emb.to(self.time_embedding.linear_1.weight.dtype))

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
