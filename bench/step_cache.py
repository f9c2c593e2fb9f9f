"""Does an eager run before ``enable_fast_path`` slow the fast path's UNet step? A diagnostic of the twenty-first
GPU call's question (bench/README.md, run 11).

PyTorch keeps one cuDNN plan per convolution shape for the whole process, found by its heuristics when
``torch.backends.cudnn.benchmark`` is off and by timing when it is on, and it does not look again once one is there.
The fast path turns the timing on, but in ``bench_pipeline.py`` our eager pipeline runs first at the same shapes
(the equality check): its heuristic plans would then stay. Run 10's ``graph_step.py`` (timing on from the first call)
replayed the uncompiled step in 10.29 ms, run 11's benchmark (eager first) in 12.65 ms.

One process per order, the decoder pipeline at full size with random weights, the fast path without compilation:

    python bench/step_cache.py --order eager-first --out a.json   # an eager decoder call, then enable_fast_path
    python bench/step_cache.py --order fast-first --out b.json    # enable_fast_path first
    python bench/step_cache.py --tiny --order eager-first         # CPU: checks the script only

Each measures the UNet CFG step as the benchmark calls it (latents NCHW, as the pipelines' loops pass them) and with
channels_last latents, their kernels (the 25 longest, with counts), and the decoder loop per step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import DECODER_SCHEDULER, MOVQ, UNET, kernel_times, per_call_ms, rounded  # noqa: E402

import kandinsky22  # noqa: E402
from kandinsky22 import tiny  # noqa: E402


def build(tiny_config: bool, device: str, dtype: torch.dtype) -> kandinsky22.KandinskyV22Pipeline:
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            unet = kandinsky22.UNet2DConditionModel(**(tiny.tiny_unet_config(4, "image") if tiny_config else UNET))
            movq = kandinsky22.VQModel(**(tiny.tiny_movq_config() if tiny_config else MOVQ))
    finally:
        torch.set_default_dtype(default_dtype)
    for model in (unet, movq):
        model.eval().requires_grad_(False)
    pipe = kandinsky22.KandinskyV22Pipeline(
        unet=unet, scheduler=kandinsky22.DDPMScheduler(**DECODER_SCHEDULER), movq=movq
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--order", choices=["eager-first", "fast-first"], required=True)
    parser.add_argument("--size", type=int, default=768)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    size = 64 if args.tiny else args.size
    start = time.perf_counter()
    pipe = build(args.tiny, device, dtype)
    width = pipe.unet.config.encoder_hid_dim
    gen = torch.Generator(device).manual_seed(3)
    emb = torch.randn(1, width, device=device, dtype=dtype, generator=gen)
    neg = torch.randn(1, width, device=device, dtype=dtype, generator=gen)

    def decode_loop(steps: int) -> None:
        pipe(
            image_embeds=emb,
            negative_image_embeds=neg,
            height=size,
            width=size,
            num_inference_steps=steps,
            generator=torch.Generator(device).manual_seed(0),
            output_type="latent",
        )

    out: dict[str, Any] = {
        "meta": {
            "order": args.order,
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "torch": torch.__version__,
            "size": size,
            "cudnn_benchmark_at_start": torch.backends.cudnn.benchmark,
            "command": " ".join(sys.argv),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        },
        "results": {},
    }
    res = out["results"]
    with torch.no_grad():
        if args.order == "eager-first":
            t0 = time.perf_counter()
            decode_loop(2)  # as the benchmark's equality check: eager, cuDNN's heuristics
            res["eager_call_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        pipe.enable_fast_path(shapes=[(size, size, 1)], compile_scope="none")
        res["warmup_s"] = time.perf_counter() - t0

        latent = size // 8
        sample = torch.randn(2, 4, latent, latent, device=device, dtype=dtype, generator=gen)
        cond = {"image_embeds": torch.randn(2, width, device=device, dtype=dtype, generator=gen)}
        t = torch.tensor(500, device=device)
        conditioning = pipe.unet.prepare_conditioning(cond, t.reshape(1)).at(0)
        samples = {"nchw": sample, "channels_last": sample.contiguous(memory_format=torch.channels_last)}
        for name, x in samples.items():

            def step(x: torch.Tensor = x) -> Any:
                return pipe.unet(x, t, encoder_hidden_states=None, conditioning=conditioning, return_dict=False)

            step()
            step()
            ms = per_call_ms(step, 10 if args.tiny else 30, cuda)
            times = kernel_times(step, 3 if args.tiny else 5, cuda)
            top = sorted(times.items(), key=lambda item: -item[1][0])[:25]
            res[f"unet_step_{name}"] = {
                "ms_per_call": ms,
                "busy_ms": sum(v for v, _ in times.values()),
                "kernels": sum(n for _, n in times.values()),
                "top": {key: {"ms": v, "count": n} for key, (v, n) in top},
            }
            print(f"unet step, {name:13s} latents: {ms:8.3f} ms, busy {res[f'unet_step_{name}']['busy_ms']:.3f} ms")
        decode_loop(args.steps)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        decode_loop(args.steps)
        if cuda:
            torch.cuda.synchronize()
        res["decoder_loop_ms_per_step"] = (time.perf_counter() - t0) * 1000 / args.steps
        print(f"decoder loop: {res['decoder_loop_ms_per_step']:.3f} ms a step")
    res["total_s"] = time.perf_counter() - start
    if args.out:
        args.out.write_text(json.dumps(rounded(out), indent=1) + "\n")
        print("results:", args.out)


if __name__ == "__main__":
    main()
