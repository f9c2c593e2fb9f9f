"""Where the uncompiled fast path's UNet step goes: the same step's kernels in eager mode and in a CUDA graph replay,
with cuDNN's autotuning (``torch.backends.cudnn.benchmark``) off and on.

H200 run 8 timed the uncompiled fast path's UNet CFG step (``compile_scope="none"``: channels_last, fused
projections, the Triton norms, cuDNN autotuned, one CUDA graph replay) at 14.10 ms, where the eager step with the
same norms kept the GPU busy 12.49 ms (without autotuning, without fused projections). This script times one
official-size UNet (random weights, fp16, laid out and fused as the fast path does, the Triton norms on) in four
ways, in this order, each after its own warm-up:

* ``eager``: called directly, cuDNN's heuristics;
* ``graph``: its call captured in a CUDA graph (``fast.CudaGraphCall``) and replayed;
* ``eager_autotuned``, ``graph_autotuned``: the same with cuDNN's autotuning on (the fast path's setting; the graph
  captured afresh).

For each: ms per call (CUDA events over ``--iters`` calls), then under ``torch.profiler`` the GPU's busy time (the sum
of its kernels' times), the kernel count and the costliest kernels; and per kernel name, where the graph's kernels
took longer than the eager ones. The gap between a replay's time and its busy time is what the GPU idles between
kernels.

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
from kandinsky22.models import norms  # noqa: E402
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


def slower(graph: dict[str, Any], eager: dict[str, Any], count: int = 12) -> dict[str, Any]:
    """Kernel names whose time per call grew most from eager to the graph (ms in each, and the counts)."""
    names = set(graph["_per_name"]) | set(eager["_per_name"])
    rows = []
    for key in names:
        g_ms, g_n = graph["_per_name"].get(key, (0.0, 0))
        e_ms, e_n = eager["_per_name"].get(key, (0.0, 0))
        rows.append((g_ms - e_ms, key, g_ms, e_ms, g_n, e_n))
    rows.sort(reverse=True)
    return {
        key: {"graph_ms": g, "eager_ms": e, "graph_count": gn, "eager_count": en}
        for _, key, g, e, gn, en in rows[:count]
    }


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
    with torch.no_grad():
        for autotune in (False, True):
            torch.backends.cudnn.benchmark = autotune
            suffix = "_autotuned" if autotune else ""
            results[f"eager{suffix}"] = measure(f"eager{suffix}", call, args, cuda)
            unet._compiled_call_impl = graph_call(unet, cuda)
            try:
                results[f"graph{suffix}"] = measure(f"graph{suffix}", call, args, cuda)
            finally:
                fast.drop_cuda_graphs(unet)
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
    torch.backends.cudnn.benchmark = False
    compare = {}
    for suffix in ("", "_autotuned"):
        if f"graph{suffix}" in results:
            compare[f"graph_vs_eager{suffix}"] = slower(results[f"graph{suffix}"], results[f"eager{suffix}"])
    if "eager_autotuned" in results:
        compare["eager_autotuned_vs_eager"] = slower(results["eager_autotuned"], results["eager"])
    for row in results.values():
        del row["_per_name"]
    meta = {
        "what": "the uncompiled fast path's UNet CFG step: eager and CUDA-graph replay, cuDNN autotuning off and on",
        "device": torch.cuda.get_device_name() if cuda else platform.machine(),
        "torch": torch.__version__,
        "triton": getattr(sys.modules.get("triton"), "__version__", None),
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "size": size,
        "dtype": str(dtype).removeprefix("torch."),
        "iters": args.iters,
        "profile_iters": args.profile_iters,
        "small_group": norms._SMALL_GROUP,
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
