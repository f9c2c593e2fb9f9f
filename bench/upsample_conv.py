"""The convolutions after a nearest ×2 upsampling (the UNet's three up-resnets' ``conv1``, MoVQ's three upsamplers)
computed at the input's resolution (``UpsampleConv2d``: four 2x2 phase kernels in one convolution) against the
two-step form (upsample, then the 3x3 convolution; forced with the layer's own pixel threshold): FLOPs per call
(``FlopCounterMode``), best CPU time of alternating rounds, and the largest difference of the outputs. The UNet is
called as its denoising loop calls it, with the per-run conditioning (which holds the phase kernels) made
beforehand; the time to make the phase kernels, once per run, is reported on its own.

    python bench/upsample_conv.py              # full-size UNet CFG step and MoVQ decode at 256x256 (32x32 latents)
    python bench/upsample_conv.py --latent 48  # 384x384

Random weights, the official configs, fp32; about a minute and a half at 256x256 on two cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import MOVQ, UNET, write_cpu_results  # noqa: E402

from kandinsky22.models import layers  # noqa: E402
from kandinsky22.models.movq import VQModel  # noqa: E402
from kandinsky22.models.unet import UNet2DConditionModel  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latent", type=int, default=32, help="latent side (image side / 8; default 32)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/upsample_conv_cpu.json"))
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET).eval()
    movq = VQModel(**MOVQ).eval()
    sample = torch.randn(2, 4, args.latent, args.latent)
    embeds = torch.randn(2, unet.config.encoder_hid_dim)
    with torch.no_grad():
        conditioning = unet.prepare_conditioning({"image_embeds": embeds}, torch.tensor([500])).at(0)
    calls: dict[str, Callable[[], torch.Tensor]] = {
        "unet_cfg_step": lambda: unet(sample, 500, conditioning=conditioning).sample,
        "movq_decode": lambda: movq.decode(sample[:1], force_not_quantize=True).sample,
    }
    # UpsampleConv2d upsamples first below this many input pixels: the reference's form everywhere, or as shipped
    forms = {"two_step": 2**62, "at_input_resolution": layers._PHASES_MIN_PIXELS}
    results: dict[str, dict] = {}
    try:
        with torch.no_grad():
            for model, call in calls.items():
                entry: dict = {"flops": {}, "best_s": {}}
                outputs = {}
                for name, threshold in forms.items():
                    layers._PHASES_MIN_PIXELS = threshold
                    with FlopCounterMode(display=False) as counter:
                        outputs[name] = call()
                    entry["flops"][name] = counter.get_total_flops()
                for _ in range(args.rounds):
                    for name, threshold in forms.items():
                        layers._PHASES_MIN_PIXELS = threshold
                        start = time.perf_counter()
                        call()
                        seconds = time.perf_counter() - start
                        entry["best_s"][name] = round(min(seconds, entry["best_s"].get(name, seconds)), 3)
                        print(f"{model:14s} {name:20s} {seconds:7.3f} s", flush=True)
                entry["flops_ratio"] = round(entry["flops"]["at_input_resolution"] / entry["flops"]["two_step"], 4)
                entry["time_ratio"] = round(entry["best_s"]["at_input_resolution"] / entry["best_s"]["two_step"], 3)
                entry["max_abs_diff"] = float((outputs["two_step"] - outputs["at_input_resolution"]).abs().max())
                entry["output_max_abs"] = float(outputs["two_step"].abs().max())
                results[model] = entry
                print(model, entry, flush=True)
            start = time.perf_counter()
            [conv.phase_weight() for conv in unet._upsampling_convs]
            results["unet_phase_kernels_per_run_s"] = round(time.perf_counter() - start, 3)
    finally:
        layers._PHASES_MIN_PIXELS = forms["at_input_resolution"]
    write_cpu_results(
        args.out,
        "FLOPs and CPU seconds of the full-size UNet CFG step and MoVQ decode, upsample convolutions at the input's "
        "resolution against upsample-then-convolve (fp32)",
        "upsample_conv.py",
        argv,
        results,
        threads=torch.get_num_threads(),
        latent=args.latent,
        rounds=args.rounds,
    )


if __name__ == "__main__":
    main()
