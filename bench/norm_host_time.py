"""Host time of one Triton GroupNorm call (``kandinsky22.models.norms.norm_act``) as the eager UNet makes it, with the
kernels stubbed: what the wrapper and its launches cost the CPU before any kernel runs, on the paths a GPU takes.

``direct``: the repeated launches of a compiled specialisation (``norms._Launch`` calls Triton's compiled kernel);
``dispatch stubbed``: ``kernel[grid](...)`` answered by a stub at once, so the figure holds the wrapper's own time only
and not Triton's dispatch (binding, specialisation, cache key), which needs a GPU to measure: the bench's
``ours_triton_norms_dispatched`` against ``ours_triton_norms`` end to end measures it there. Shapes: a 768² UNet
level with three kernels (2 × 320 × 96 × 96) and a coarse one with one kernel (2 × 1280 × 12 × 12), fp32 on the CPU
(only the pointers' alignment and the shapes reach the kernels' launch).

    python bench/norm_host_time.py           # writes bench/results/norm_host_time_cpu.json
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import write_cpu_results  # noqa: E402

from kandinsky22.models import norm_kernels, norms  # noqa: E402

SHAPES = {"three_kernels": (2, 320, 96, 96), "one_kernel": (2, 1280, 12, 12)}


class Stub:
    """A kernel: ``[grid](*args, **constants)`` returns a compiled kernel whose ``[grid](*values)`` does nothing."""

    def __init__(self, arg_names: list[str]) -> None:
        self.arg_names = arg_names

    def __getitem__(self, grid: tuple[int, ...]) -> Any:
        compiled = self

        def dispatch(*args: Any, **constants: Any) -> Any:
            return compiled

        return dispatch  # also the compiled kernel's launcher


def per_call_us(call: Any, calls: int) -> float:
    for _ in range(100):
        call()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "norm_host_time_cpu.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for name in ("small", "stats", "finalize", "apply"):  # the module norms._kernels() returns, its kernels stubbed
        setattr(norm_kernels, name, Stub(getattr(norm_kernels, name).arg_names))
    norms._interpreting = lambda: False  # the GPU's path: direct launches (norms._Launch)
    torch.cuda.current_device = lambda: 0
    applies = norms._triton_applies
    norms._triton_applies = lambda norm, x: applies(norm, x) or x.device.type == "cpu"
    results: dict[str, Any] = {}
    with torch.no_grad():
        for path, shape in SHAPES.items():
            x = torch.randn(*shape).contiguous(memory_format=torch.channels_last)
            norm = torch.nn.GroupNorm(32, shape[1])
            norm.triton_norm = True
            scale_1, shift = (t[:, :, None, None] for t in torch.randn(2, 2 * shape[1]).chunk(2, dim=1))
            for mode in ("direct", "dispatch stubbed"):
                norms._direct_launch = mode == "direct"
                norms._LAUNCHERS.clear()
                call = functools.partial(norms.norm_act, norm, x, scale_1, shift, silu=True)
                us = per_call_us(call, args.calls)
                results[f"{path} {shape}: {mode}"] = round(us, 1)
                print(f"{path} {shape}, {mode}: {us:.1f} µs per call", flush=True)
    write_cpu_results(
        args.out,
        "host µs per Triton GroupNorm call (norm_act with time modulation and SiLU), kernels stubbed, best of 5",
        "norm_host_time.py",
        argv,
        results,
        threads=1,
    )


if __name__ == "__main__":
    main()
