"""The GroupNorm calls of one UNet CFG step at full size, by the kernels the Triton norms would use for them.

Builds the official decoder UNet on the meta device (no weights, no GPU), lays it out channels_last as the CUDA
pipelines do, calls it once on a CFG batch and records each norm's input. A norm whose groups hold at most
``kandinsky22.models.norms._SMALL_GROUP`` elements takes the one-kernel path; the others take three kernels.

    python bench/unet_norms.py                # 768x768
    python bench/unet_norms.py --size 1024
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from kandinsky22.models import norms
from kandinsky22.models.unet import UNet2DConditionModel

CONFIG = (
    Path(__file__).parents[2] / "shared" / "reference" / "configs" / "kandinsky-2-2-decoder" / "unet" / "config.json"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=768, help="image side (latents: size / 8)")
    parser.add_argument("--config", type=Path, default=CONFIG, help="the decoder UNet's config.json")
    args = parser.parse_args()
    config = json.loads(args.config.read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    unet.to(memory_format=torch.channels_last)
    inputs: list[tuple[tuple[int, ...], int]] = []
    for module in unet.modules():
        if isinstance(module, nn.GroupNorm):
            module.register_forward_pre_hook(lambda m, a: inputs.append((tuple(a[0].shape), m.num_groups)))
    latent = args.size // 8
    sample = torch.empty(2, config["in_channels"], latent, latent, device="meta")
    cond = {"image_embeds": torch.empty(2, config["encoder_hid_dim"], device="meta")}
    with torch.no_grad():
        unet(
            sample.contiguous(memory_format=torch.channels_last),
            torch.tensor(500, device="meta"),
            added_cond_kwargs=cond,
        )
    small = [s for s, g in inputs if s[1] // g * s[2] * s[3] <= norms._SMALL_GROUP]
    print(
        f"{args.size}x{args.size}: {len(inputs)} GroupNorm calls per CFG step, {len(small)} of them with at most "
        f"{norms._SMALL_GROUP} elements per group (one kernel), {len(inputs) - len(small)} with three kernels"
    )


if __name__ == "__main__":
    main()
