"""Where the uncompiled fast path's UNet step goes, and what the folds into the Triton kernels save: the same step
replayed in a CUDA graph with and without them, in one run.

H200 run 9 (this script's first form) replayed the uncompiled fast path's UNet CFG step (``compile_scope="none"``:
channels_last, fused projections, the Triton norms, one CUDA graph replay) at 12.74 ms for 11.26 ms of kernels, 647
of them; cuDNN's autotuning changed nothing. This script times one official-size UNet (random weights, fp16, laid out
and fused as the fast path does, the Triton norms on, cuDNN autotuned as the fast path sets it), each variant after
its own warm-up and capture:

* ``eager``: everything below on, called directly (the host-bound form);
* ``graph_unfolded``: replayed, the resnets' biases in their convolutions (``residual.FOLD_BIASES`` off) and the
  attentions' keys concatenated (``layers._IN_PLACE_MIN_PIXELS`` out of reach): run 9's form;
* ``graph_folded``: the biases folded into the norms and the residual kernel, keys concatenated;
* ``graph``: both, as the fast path runs.

For each: ms per call (CUDA events over ``--iters`` calls), then under ``torch.profiler`` the GPU's busy time (the sum
of its kernels' times), the kernel count and the costliest kernels; and per kernel name, what changed from one graph
variant to the next and from eager to graph. The gap between a replay's time and its busy time is what the GPU idles
between kernels.

    python bench/graph_step.py                  # CUDA: 768x768, fp16; writes bench/results/graph_step_<gpu>.json
    python bench/graph_step.py --tiny           # CPU: the tiny UNet (checks the script; the "graph" rows re-run
                                                # the call through the test suite's stand-in capture)

``--out`` writes elsewhere.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import UNET, kernel_times, per_call_ms, rounded  # noqa: E402

import kandinsky22  # noqa: E402
from kandinsky22 import fast, tiny  # noqa: E402
from kandinsky22.models import layers, norms, residual  # noqa: E402
from kandinsky22.models.layers import FusibleProjections  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def build(tiny_config: bool, device: str, dtype: torch.dtype) -> kandinsky22.UNet2DConditionModel:
    """The UNet as the fast path leaves it uncompiled: random weights in ``dtype`` on ``device``, fused projections,
    channels_last, the Triton norms where they run (CUDA)."""
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # random init directly in the run dtype, on the device
    try:
        with torch.device(device):
            unet = kandinsky22.UNet2DConditionModel(**(tiny.tiny_unet_config(4, "image") if tiny_config else UNET))
    finally:
        torch.set_default_dtype(default_dtype)
    unet.eval().requires_grad_(False)
    for module in unet.modules():
        if isinstance(module, FusibleProjections):
            module.fuse_projections()
    unet.to(memory_format=torch.channels_last)
    if device == "cuda":
        norms.use_triton_norms(unet)
    return unet


def step_call(unet: Any, size: int, device: str, dtype: torch.dtype) -> Callable[[], Any]:
    """One CFG step (batch 2) as our pipelines' loop calls the UNet: the conditioning prepared once per run."""
    latent = size // 8
    gen = torch.Generator(device).manual_seed(3)
    channels = unet.config.in_channels
    sample = torch.randn(2, channels, latent, latent, device=device, dtype=dtype, generator=gen)
    sample = sample.contiguous(memory_format=torch.channels_last)
    cond = {"image_embeds": torch.randn(2, unet.config.encoder_hid_dim, device=device, dtype=dtype, generator=gen)}
    t = torch.tensor(500, device=device)
    conditioning = unet.prepare_conditioning(cond, t.reshape(1)).at(0)
    return lambda: unet(sample, t, encoder_hidden_states=None, conditioning=conditioning, return_dict=False)


def graph_call(unet: Any, cuda: bool) -> fast.CudaGraphCall:
    """The fast path's CUDA graphs for ``unet``; on the CPU (``--tiny``) the test suite's stand-in capture, which
    re-runs the call at each replay (it checks this script's graph branch, not the graphs' speed)."""
    if cuda:
        return fast.CudaGraphCall(unet, unet._call_impl)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.graph_standin import rerun_capture

    return fast.CudaGraphCall(unet, unet._call_impl, graph_factory=rerun_capture, device_type="cpu")


def measure(name: str, fn: Callable[[], Any], args: argparse.Namespace, cuda: bool) -> dict[str, Any]:
    fn()  # warm-up: a graph's capture, cuDNN's autotuning, the Triton variants' compilation
    fn()
    ms = per_call_ms(fn, args.iters, cuda)
    times = kernel_times(fn, args.profile_iters, cuda)
    busy, kernels = sum(t for t, _ in times.values()), sum(count for _, count in times.values())
    top = sorted(times.items(), key=lambda item: -item[1][0])[:12]
    row = {
        "ms_per_call": ms,
        "busy_ms": busy,
        "idle_ms": ms - busy,
        "kernels": kernels,
        "top": {key: {"ms": t, "count": count} for key, (t, count) in top},
    }
    print(f"{name:16s} {ms:8.3f} ms a call, busy {busy:8.3f} ms, {kernels:6.0f} kernels", flush=True)
    row["_per_name"] = times
    return row


def changed(after: dict[str, Any], before: dict[str, Any], count: int = 12) -> dict[str, Any]:
    """Kernel names whose time per call changed most from ``before`` to ``after`` (ms in each, and the counts)."""
    names = set(after["_per_name"]) | set(before["_per_name"])
    rows = []
    for key in names:
        a_ms, a_n = after["_per_name"].get(key, (0.0, 0))
        b_ms, b_n = before["_per_name"].get(key, (0.0, 0))
        rows.append((abs(a_ms - b_ms), key, a_ms, b_ms, a_n, b_n))
    rows.sort(reverse=True)
    return {
        key: {"after_ms": a, "before_ms": b, "after_count": an, "before_count": bn}
        for _, key, a, b, an, bn in rows[:count]
    }


# Graph variants, in the order measured: (bias folds, keys written in place).
VARIANTS = {"graph_unfolded": (False, False), "graph_folded": (True, False), "graph": (True, True)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=768)
    parser.add_argument("--dtype", choices=DTYPES, default="fp16")
    parser.add_argument("--tiny", action="store_true", help="the tiny UNet on the CPU (checks the script)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--profile-iters", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    device, dtype = ("cuda", DTYPES[args.dtype]) if cuda else ("cpu", torch.float32)
    size = 64 if args.tiny else args.size
    unet = build(args.tiny, device, dtype)
    call = step_call(unet, size, device, dtype)
    results: dict[str, Any] = {}
    in_place_min = layers._IN_PLACE_MIN_PIXELS
    torch.backends.cudnn.benchmark = True  # as the fast path sets it (run 9: no effect on this step)
    try:
        with torch.no_grad():
            results["eager"] = measure("eager", call, args, cuda)
            for name, (fold, in_place) in VARIANTS.items():
                residual.FOLD_BIASES = fold
                layers._IN_PLACE_MIN_PIXELS = in_place_min if in_place else 2**62
                unet._compiled_call_impl = graph_call(unet, cuda)
                try:
                    results[name] = measure(name, call, args, cuda)
                finally:
                    fast.drop_cuda_graphs(unet)
                    if cuda:
                        torch.cuda.synchronize()
                        torch.cuda.empty_cache()
    finally:
        residual.FOLD_BIASES, layers._IN_PLACE_MIN_PIXELS = True, in_place_min
        torch.backends.cudnn.benchmark = False
    names = list(VARIANTS)
    compare = {
        f"{after}_vs_{before}": changed(results[after], results[before]) for before, after in zip(names, names[1:])
    }
    compare["graph_vs_eager"] = changed(results["graph"], results["eager"])
    for row in results.values():
        del row["_per_name"]
    meta = {
        "what": "the uncompiled fast path's UNet CFG step: eager, and replayed without and with the folds",
        "device": torch.cuda.get_device_name() if cuda else platform.machine(),
        "torch": torch.__version__,
        "triton": getattr(sys.modules.get("triton"), "__version__", None),
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "size": size,
        "dtype": str(dtype).removeprefix("torch."),
        "iters": args.iters,
        "profile_iters": args.profile_iters,
        "small_group": norms._SMALL_GROUP,
        "in_place_min_pixels": in_place_min,
        "variants": {
            name: {"fold_biases": fold, "keys_in_place": in_place} for name, (fold, in_place) in VARIANTS.items()
        },
        "command": "python bench/graph_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    device_name = "cpu" if not cuda else torch.cuda.get_device_name().split()[-1].lower()
    out = args.out or Path(__file__).resolve().parent / "results" / f"graph_step_{device_name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rounded(results), "compare": rounded(compare)}, indent=1))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
