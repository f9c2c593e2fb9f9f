"""Tiny random checkpoints built WITH THE REFERENCE LIBRARY (diffusers + transformers) in the official repo layouts.

Every test that compares our pipelines with the reference loads both from the same folder, so the weights are
whatever the reference initialisation produced (seeded) and the parity check covers loading too. The layouts match
``kandinsky-community/kandinsky-2-2-{prior,decoder,decoder-inpaint,controlnet-depth}``: ``model_index.json`` is written
by the reference pipelines' ``save_pretrained``; the decoder repos carry a README whose ``prior:`` front-matter field
names the prior folder (the reference's "connected pipes" mechanism).

Sizes are tiny for speed: CLIP towers of width 32 with 2 layers, a 32 px vision tower with 4 px patches, a one-layer
prior of width 24, a (32, 64) UNet, and a MoVQ with scale factor 2 (8 for the controlnet repo, as in the reference
tests) so 64 px images have 32x32 (8x8) latents.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kandinsky22.tiny import tiny_vocab_size, write_tiny_tokenizer

EMBED_DIM = 32  # CLIP projection width = prior embedding width = decoder `encoder_hid_dim`
IMAGE_SIZE = 32  # tiny vision tower input size (the official one is 224)

# The official scheduler configs (reference-behaviour.md §3). The decoder and controlnet-depth DDPM schedulers clamp
# the predicted clean latent (clip_sample true); the decoder-inpaint one does not.
PRIOR_SCHEDULER_CONFIG = {
    "clip_sample": True,
    "clip_sample_range": 10.0,
    "num_train_timesteps": 1000,
    "prediction_type": "sample",
    "variance_type": "fixed_small_log",
}
DECODER_SCHEDULER_CONFIG = {
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
INPAINT_SCHEDULER_CONFIG = {**DECODER_SCHEDULER_CONFIG, "clip_sample": False}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def build_prior_repo(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny ``kandinsky-2-2-prior`` layout: prior, text/image encoders, tokenizer, scheduler, processor."""
    from diffusers import KandinskyV22PriorPipeline, PriorTransformer, UnCLIPScheduler
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    folder = Path(folder)
    torch.manual_seed(seed)
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=EMBED_DIM, num_layers=1)
    # Non-trivial normalisation statistics, so that a missed post_process_latents (or a wrong one) shows up.
    with torch.no_grad():
        prior.clip_mean.copy_(0.5 * torch.randn(1, EMBED_DIM))
        prior.clip_std.copy_(0.5 + torch.rand(1, EMBED_DIM))
    text_config = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=2,  # as in the official config: transformers then pools at input_ids.argmax(-1) (legacy path)
        pad_token_id=1,
        hidden_size=EMBED_DIM,
        projection_dim=EMBED_DIM,
        intermediate_size=37,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=tiny_vocab_size(),
    )
    text_encoder = CLIPTextModelWithProjection(text_config).eval()
    vision_config = CLIPVisionConfig(
        hidden_size=EMBED_DIM,
        image_size=IMAGE_SIZE,
        projection_dim=EMBED_DIM,
        intermediate_size=37,
        num_attention_heads=4,
        num_channels=3,
        num_hidden_layers=2,
        patch_size=4,
    )
    image_encoder = CLIPVisionModelWithProjection(vision_config).eval()
    tokenizer = CLIPTokenizer.from_pretrained(write_tiny_tokenizer(folder / "tokenizer"))
    image_processor = CLIPImageProcessor(
        crop_size=IMAGE_SIZE,
        do_center_crop=True,
        do_normalize=True,
        do_resize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        resample=3,
        size=IMAGE_SIZE,
    )
    pipe = KandinskyV22PriorPipeline(
        prior=prior,
        image_encoder=image_encoder,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=UnCLIPScheduler(**PRIOR_SCHEDULER_CONFIG),
        image_processor=image_processor,
    )
    pipe.save_pretrained(folder)
    # Without torchvision transformers hands out (and the reference then records) CLIPImageProcessorPil; the official
    # model_index names CLIPImageProcessor, so write that, as published.
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["image_processor"] = ["transformers", "CLIPImageProcessor"]
    index_path.write_text(json.dumps(index, indent=2) + "\n")
    return folder


def _unet(in_channels: int, addition_embed_type: str):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        in_channels=in_channels,
        out_channels=8,  # [epsilon | learned variance], as the official UNet
        addition_embed_type=addition_embed_type,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(32, 64),
        layers_per_block=1,
        encoder_hid_dim=EMBED_DIM,
        encoder_hid_dim_type="image_proj",
        cross_attention_dim=32,
        attention_head_dim=4,
        resnet_time_scale_shift="scale_shift",
        class_embed_type=None,
    ).eval()


def _movq(scale_factor: int):
    from diffusers import VQModel

    if scale_factor == 2:
        blocks = {
            "block_out_channels": [32, 64],
            "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
            "up_block_types": ["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
        }
    else:  # scale factor 8: the reference controlnet tests' MoVQ
        blocks = {
            "block_out_channels": [32, 32, 64, 64],
            "down_block_types": ["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"],
            "up_block_types": ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 3,
        }
    return VQModel(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        norm_type="spatial",
        num_vq_embeddings=12,
        vq_embed_dim=4,
        **blocks,
    ).eval()


def _write_prior_card(folder: Path, prior_folder: str | Path | None) -> None:
    """The decoder repos' model card: a ``prior:`` list in the front matter, read by the connected-pipe loaders."""
    if prior_folder is None:
        return
    (folder / "README.md").write_text(f"---\nlicense: apache-2.0\nprior:\n- {Path(prior_folder).resolve()}\n---\n")


def _build_decoder(
    folder: str | Path,
    pipeline_class: str,
    in_channels: int,
    addition_embed_type: str,
    movq_scale_factor: int,
    scheduler_config: dict,
    prior_folder: str | Path | None,
    seed: int,
) -> Path:
    import diffusers

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = _unet(in_channels, addition_embed_type)
    movq = _movq(movq_scale_factor)
    scheduler = diffusers.DDPMScheduler(**scheduler_config)
    getattr(diffusers, pipeline_class)(unet=unet, scheduler=scheduler, movq=movq).save_pretrained(folder)
    _write_prior_card(folder, prior_folder)
    return folder


def build_decoder_repo(folder: str | Path, prior_folder: str | Path | None = None, seed: int = 1) -> Path:
    """Tiny ``kandinsky-2-2-decoder``: 4-channel "image" UNet, MoVQ (scale 2), DDPM with the official config."""
    return _build_decoder(folder, "KandinskyV22Pipeline", 4, "image", 2, DECODER_SCHEDULER_CONFIG, prior_folder, seed)


def build_inpaint_repo(folder: str | Path, prior_folder: str | Path | None = None, seed: int = 2) -> Path:
    """Tiny ``kandinsky-2-2-decoder-inpaint``: 9-channel UNet, MoVQ (scale 2), DDPM with clip_sample false."""
    return _build_decoder(
        folder, "KandinskyV22InpaintPipeline", 9, "image", 2, INPAINT_SCHEDULER_CONFIG, prior_folder, seed
    )


def build_controlnet_repo(folder: str | Path, prior_folder: str | Path | None = None, seed: int = 3) -> Path:
    """Tiny ``kandinsky-2-2-controlnet-depth``: 8-channel "image_hint" UNet, MoVQ with scale factor 8, DDPM."""
    return _build_decoder(
        folder, "KandinskyV22ControlnetPipeline", 8, "image_hint", 8, DECODER_SCHEDULER_CONFIG, prior_folder, seed
    )


def build_all(root: str | Path) -> dict[str, Path]:
    """All four repos under ``root`` (prior, decoder, decoder-inpaint, controlnet-depth), decoders linked to the prior."""
    root = Path(root)
    prior = build_prior_repo(root / "prior")
    return {
        "prior": prior,
        "decoder": build_decoder_repo(root / "decoder", prior),
        "inpaint": build_inpaint_repo(root / "decoder-inpaint", prior),
        "controlnet": build_controlnet_repo(root / "controlnet-depth", prior),
    }
