"""The full-size MoVQ decoder on the CPU with its SpatialNorms as they are (1x1 convolutions on the latents, broadcast
over each block of pixels) against the previous form (latents resized to every feature map, then the convolutions),
patched in for the comparison, alternating; and the largest difference of the two images.

    python bench/movq_spatial_norm.py              # 256x256 (32x32 latents), fp32, 2 rounds
    python bench/movq_spatial_norm.py --latent 48  # 384x384

Random weights, official config (67.8 M parameters); about half a minute at 256x256 on two cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import MOVQ  # noqa: E402

from kandinsky22.models import movq  # noqa: E402


def resized_first(self: movq.SpatialNorm, x: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
    """The previous SpatialNorm: zq resized to x's size, both 1x1 convolutions at that size."""
    zq = F.interpolate(zq, size=x.shape[-2:], mode="nearest")
    return torch.addcmul(self.conv_b(zq), self.norm_layer(x), self.conv_y(zq))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latent", type=int, default=32, help="latent side (image side / 8; default 32)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = movq.VQModel(**MOVQ).eval()
    latents = torch.randn(1, 4, args.latent, args.latent)
    forms = {"resized_first": resized_first, "on_the_latents": movq.SpatialNorm.forward}
    best: dict[str, float] = {}
    images: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for _ in range(args.rounds):
                for name, forward in forms.items():
                    movq.SpatialNorm.forward = forward
                    start = time.perf_counter()
                    images[name] = model.decode(latents, force_not_quantize=True).sample
                    seconds = time.perf_counter() - start
                    best[name] = min(seconds, best.get(name, seconds))
                    print(f"{name:15s} {seconds:7.3f} s", flush=True)
    finally:
        movq.SpatialNorm.forward = forms["on_the_latents"]
    diff = float((images["resized_first"] - images["on_the_latents"]).abs().max())
    print(f"best: {best}; max |difference| {diff:.2e} (images in [-1, 1]); threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
