"""Tiny random-weight checkpoints for offline smoke tests (they draw noise, not pictures).

``write_tiny_tokenizer`` writes a small CLIP BPE tokenizer (byte alphabet + a few merges) in the official layout, so
tests and ``kandinsky22 make-tiny`` never need the hub.
"""

from __future__ import annotations

import json
from pathlib import Path

# A handful of merges so that common words become single tokens; enough for tokenization to be non-trivial.
_MERGES = [
    "h o",
    "ho r",
    "hor s",
    "hors e</w>",
    "c a",
    "ca t</w>",
    "r e",
    "re d</w>",
    "t h",
    "th e</w>",
    "a n",
    "an d</w>",
    "o n</w>",
    "i n",
    "in g</w>",
    "e r</w>",
    "p h",
    "ph o",
    "pho t",
    "phot o</w>",
]


def _bytes_to_unicode() -> dict[int, str]:
    """The byte → printable character table of byte-level BPE (GPT-2 / CLIP)."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def tiny_vocab() -> tuple[dict[str, int], list[str]]:
    """Vocabulary and merges of the tiny tokenizer; ``<|endoftext|>`` has the highest id, as in CLIP."""
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    for merge in _MERGES:
        merged = merge.replace(" ", "")
        if merged not in tokens:
            tokens.append(merged)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, _MERGES


def write_tiny_tokenizer(folder: str | Path, model_max_length: int = 77) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and the config files of a CLIPTokenizer into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = tiny_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "do_lower_case": True,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "errors": "replace",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return folder


def tiny_vocab_size() -> int:
    return len(tiny_vocab()[0])


# ----------------------------------------------------------------------------------------------------------------------
# Tiny random-weight repositories in the official layouts (``kandinsky22 make-tiny``)
# ----------------------------------------------------------------------------------------------------------------------

REPO_NAMES = ("prior", "decoder", "decoder-inpaint", "controlnet-depth")
TINY_EMBED_DIM = 32  # CLIP projection width = prior embedding width = decoder `encoder_hid_dim` (1280 officially)
TINY_IMAGE_SIZE = 32  # vision tower input (224 officially)
_DIFFUSERS_VERSION = "0.17.0.dev0"  # what the official model_index.json files record

# The official scheduler configs: the decoder and controlnet-depth DDPM schedulers clamp the predicted clean latent
# (clip_sample true), the decoder-inpaint one does not.
PRIOR_SCHEDULER = {
    "_class_name": "UnCLIPScheduler",
    "clip_sample": True,
    "clip_sample_range": 10.0,
    "num_train_timesteps": 1000,
    "prediction_type": "sample",
    "variance_type": "fixed_small_log",
}
DECODER_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "linear",
    "beta_start": 0.00085,
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "dynamic_thresholding_ratio": 0.995,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "steps_offset": 1,
    "thresholding": False,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "variance_type": "fixed_small",
}
INPAINT_SCHEDULER = {**DECODER_SCHEDULER, "clip_sample": False}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Decoder repos: (pipeline class, UNet input channels, addition_embed_type, scheduler config).
_DECODERS = {
    "decoder": ("KandinskyV22Pipeline", 4, "image", DECODER_SCHEDULER),
    "decoder-inpaint": ("KandinskyV22InpaintPipeline", 9, "image", INPAINT_SCHEDULER),
    "controlnet-depth": ("KandinskyV22ControlnetPipeline", 8, "image_hint", DECODER_SCHEDULER),
}


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _model_index(class_name: str, components: dict[str, tuple[str, str]]) -> dict:
    return {
        "_class_name": class_name,
        "_diffusers_version": _DIFFUSERS_VERSION,
        **{k: list(v) for k, v in components.items()},
    }


def tiny_unet_config(in_channels: int, addition_embed_type: str) -> dict:
    """A two-level version of the official UNet config (same block types, widths 32/64, one layer per block)."""
    return {
        "in_channels": in_channels,
        "out_channels": 8,  # [epsilon | learned variance], as the official UNet
        "addition_embed_type": addition_embed_type,
        "down_block_types": ["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
        "up_block_types": ["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
        "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "encoder_hid_dim": TINY_EMBED_DIM,
        "encoder_hid_dim_type": "image_proj",
        "cross_attention_dim": 32,
        "attention_head_dim": 4,
        "resnet_time_scale_shift": "scale_shift",
        "class_embed_type": None,
    }


def tiny_movq_config() -> dict:
    """A narrow MoVQ with the official scale factor 8 (four levels), so sizes round to 64 px as with the real one."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "norm_type": "spatial",
        "num_vq_embeddings": 12,
        "vq_embed_dim": 4,
        "block_out_channels": [32, 32, 64, 64],
        "down_block_types": ["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"],
        "up_block_types": ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 3,
    }


def tiny_prior_config() -> dict:
    """The official prior config at width 24 (2 heads of 12), one layer, embedding width 32."""
    return {
        "num_attention_heads": 2,
        "attention_head_dim": 12,
        "embedding_dim": TINY_EMBED_DIM,
        "num_layers": 1,
        "num_embeddings": 77,
        "additional_embeddings": 4,
        "added_emb_type": "prd",
        "encoder_hid_proj_type": "linear",
        "time_embed_act_fn": "silu",
    }


def _write_prior_repo(folder: Path) -> Path:
    import torch
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from kandinsky22.models.prior import PriorTransformer

    prior = PriorTransformer.from_config(tiny_prior_config())
    # The reference initialises clip_std to zeros, which would collapse every embedding onto clip_mean.
    with torch.no_grad():
        prior.clip_mean.copy_(0.5 * torch.randn(1, TINY_EMBED_DIM))
        prior.clip_std.copy_(0.5 + torch.rand(1, TINY_EMBED_DIM))
    prior.save_pretrained(folder / "prior")
    vocab, _ = tiny_vocab()
    text_config = CLIPTextConfig(
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        hidden_size=TINY_EMBED_DIM,
        projection_dim=TINY_EMBED_DIM,
        intermediate_size=37,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        vocab_size=len(vocab),
    )
    CLIPTextModelWithProjection(text_config).save_pretrained(folder / "text_encoder")
    vision_config = CLIPVisionConfig(
        hidden_size=TINY_EMBED_DIM,
        image_size=TINY_IMAGE_SIZE,
        projection_dim=TINY_EMBED_DIM,
        intermediate_size=37,
        num_attention_heads=4,
        num_channels=3,
        num_hidden_layers=2,
        patch_size=4,
        layer_norm_eps=1e-5,
    )
    CLIPVisionModelWithProjection(vision_config).save_pretrained(folder / "image_encoder")
    write_tiny_tokenizer(folder / "tokenizer")
    _write_json(
        folder / "image_processor" / "preprocessor_config.json",
        {
            "crop_size": TINY_IMAGE_SIZE,
            "do_center_crop": True,
            "do_normalize": True,
            "do_resize": True,
            "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD,
            "resample": 3,
            "size": TINY_IMAGE_SIZE,
            "image_processor_type": "CLIPImageProcessor",
        },
    )
    _write_json(
        folder / "scheduler" / "scheduler_config.json", {**PRIOR_SCHEDULER, "_diffusers_version": _DIFFUSERS_VERSION}
    )
    components = {
        "image_encoder": ("transformers", "CLIPVisionModelWithProjection"),
        "image_processor": ("transformers", "CLIPImageProcessor"),
        "prior": ("diffusers", "PriorTransformer"),
        "scheduler": ("diffusers", "UnCLIPScheduler"),
        "text_encoder": ("transformers", "CLIPTextModelWithProjection"),
        "tokenizer": ("transformers", "CLIPTokenizer"),
    }
    _write_json(folder / "model_index.json", _model_index("KandinskyV22PriorPipeline", components))
    return folder


def _write_decoder_repo(folder: Path, name: str, prior_folder: Path) -> Path:
    from kandinsky22.models.movq import VQModel
    from kandinsky22.models.unet import UNet2DConditionModel

    pipeline_class, in_channels, addition_embed_type, scheduler = _DECODERS[name]
    UNet2DConditionModel.from_config(tiny_unet_config(in_channels, addition_embed_type)).save_pretrained(
        folder / "unet"
    )
    VQModel.from_config(tiny_movq_config()).save_pretrained(folder / "movq")
    _write_json(folder / "scheduler" / "scheduler_config.json", {**scheduler, "_diffusers_version": _DIFFUSERS_VERSION})
    components = {
        "scheduler": ("diffusers", "DDPMScheduler"),
        "unet": ("diffusers", "UNet2DConditionModel"),
        "movq": ("diffusers", "VQModel"),
    }
    _write_json(folder / "model_index.json", _model_index(pipeline_class, components))
    # The official decoder model cards name their prior in the front matter; the reference's combined and auto
    # pipelines follow it ("connected pipes").
    (folder / "README.md").write_text(
        f"---\nlicense: apache-2.0\nprior:\n- {prior_folder.resolve()}\ntags:\n- kandinsky22-tiny\n---\n\n"
        "Tiny random-weight checkpoint written by `kandinsky22 make-tiny`: it draws noise, not pictures.\n"
    )
    return folder


def make_tiny_repos(root: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write tiny random-weight ``prior``, ``decoder``, ``decoder-inpaint`` and ``controlnet-depth`` repositories.

    They have the official layouts (``model_index.json``, one folder per component, ``config.json`` + safetensors,
    the official scheduler configs, a CLIP tokenizer, CLIP towers and image processor), are built with this package's
    model classes, load in this package and in the reference library, and draw noise. Deterministic for a ``seed``;
    the global RNG state is left as it was. Returns ``{name: folder}``.
    """
    import torch
    from transformers.utils import logging as transformers_logging

    root = Path(root).expanduser().resolve()
    repos: dict[str, Path] = {}
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # a "Writing model shards" bar per tiny file is noise
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            repos["prior"] = _write_prior_repo(root / "prior")
            for name in _DECODERS:
                repos[name] = _write_decoder_repo(root / name, name, repos["prior"])
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
    return repos
