"""The CPU share of the fast path's compile warm-up: torch.compile's tracing of each full-size model, ours and the
reference's UNet, on the ``meta`` device (no weights, no GPU).

A warm-up is dynamo's bytecode tracing, AOT autograd's functionalization and decompositions, then Inductor's
lowering, code generation and Triton builds. The first two are Python work on the host whatever the GPU; this script
times them with the "eager" backend (dynamo only) and "aot_eager" (dynamo + AOT), for the models as the fast path
compiles them (fused projections, channels_last, fp16, called as the pipelines call them at 768²). The Inductor and
Triton share needs a GPU (``bench_pipeline.py``'s warm-up rows).

    python bench/compile_trace.py             # ~2 min on a 2-core VM; writes bench/results/compile_trace_cpu.json
    python bench/compile_trace.py --inductor  # also the whole compile with Inductor's CPU backend (~5 min more)

``--inductor`` compiles the UNet, ours and the reference's, with Inductor on the CPU as the fast path configures it
(fused projections, channels_last, 1×1 convolutions as matmuls) — with thin widths (``host_overhead.py``'s models:
the official structure, small tensors), since C++ code generation for the full size would take long: compile
seconds, kernels generated, and the compiled step's CPU time. Inductor fuses the same way for GPUs, so the kernel
count carries over; the times do not.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import MOVQ, PRIOR, UNET, write_cpu_results  # noqa: E402

from kandinsky22.models.movq import VQModel  # noqa: E402
from kandinsky22.models.prior import PriorTransformer  # noqa: E402
from kandinsky22.models.unet import UNet2DConditionModel  # noqa: E402

META = torch.device("meta")
DTYPE = torch.float16


def t(*shape: int) -> torch.Tensor:
    return torch.empty(*shape, device=META, dtype=DTYPE)


def calls() -> dict[str, tuple[torch.nn.Module, Callable[[Callable], Any]]]:
    """(module the fast path compiles, a call of it as the pipelines make it) per model."""
    import diffusers

    with torch.device(META):
        unet = UNet2DConditionModel(**UNET).to(DTYPE).eval()
        movq = VQModel(**MOVQ).to(DTYPE).eval()
        prior = PriorTransformer(**PRIOR).to(DTYPE).eval()
        ref_unet = diffusers.UNet2DConditionModel.from_config(UNET).to(DTYPE).eval()
    for model in (unet, movq, prior):
        for module in model.modules():
            if hasattr(module, "fuse_projections"):
                module.fuse_projections()
    for model in (unet, movq, ref_unet):
        model.to(memory_format=torch.channels_last)
    step = torch.zeros((), dtype=torch.int64, device=META)
    embeds = t(2, UNET["encoder_hid_dim"])
    conditioning = unet.prepare_conditioning({"image_embeds": embeds}, step.reshape(1)).at(0)
    width = PRIOR["embedding_dim"]
    mask = torch.ones(2, PRIOR["num_embeddings"], dtype=torch.bool, device=META)
    # As the fast path calls it: the prompt's keys and values prepared once per run (the kv form), one step's row.
    prior_context = prior.prepare_context(
        t(2, width), t(2, 77, width), mask, timesteps=step.reshape(1), cache_prompt=True
    ).at(0)
    return {
        "unet": (unet, lambda f: f(t(2, 4, 96, 96), step, None, conditioning=conditioning, return_dict=False)),
        "movq_decoder": (movq.decoder, lambda f: f(t(1, 4, 96, 96), t(1, 4, 96, 96))),
        "prior": (prior, lambda f: f(t(2, width), timestep=step, context=prior_context, return_dict=False)),
        "reference_unet": (
            ref_unet,
            lambda f: f(t(2, 4, 96, 96), step, None, added_cond_kwargs={"image_embeds": embeds}, return_dict=False),
        ),
    }


def inductor_on_cpu() -> dict[str, dict[str, float]]:
    """Compile seconds, generated kernels and compiled ms per call of the thin UNets with Inductor on the CPU."""
    import diffusers
    from host_overhead import LATENT, THIN_UNET
    from torch._inductor import metrics
    from torch._inductor.utils import fresh_cache

    torch.set_num_threads(1)
    out = {}
    for name in ("unet", "reference_unet"):
        torch._dynamo.reset()
        metrics.reset()
        torch.manual_seed(0)
        if name == "unet":
            model = UNet2DConditionModel(**THIN_UNET).eval()
            for module in model.modules():
                if hasattr(module, "fuse_projections"):
                    module.fuse_projections()
        else:
            model = diffusers.UNet2DConditionModel.from_config(THIN_UNET).eval()
        model.to(memory_format=torch.channels_last)
        sample = torch.randn(2, 4, LATENT, LATENT).to(memory_format=torch.channels_last)
        embeds, step = torch.randn(2, THIN_UNET["encoder_hid_dim"]), torch.tensor(999)
        if name == "unet":
            kwargs = {"conditioning": model.prepare_conditioning({"image_embeds": embeds}, step.reshape(1)).at(0)}
        else:
            kwargs = {"added_cond_kwargs": {"image_embeds": embeds}}
        compiled = torch.compile(model, fullgraph=True, dynamic=False, options={"conv_1x1_as_mm": True})
        with fresh_cache(delete=False):  # cold: no graph or kernel compiled by an earlier run is reused
            start = time.perf_counter()
            compiled(sample, step, None, return_dict=False, **kwargs)
            seconds = time.perf_counter() - start
        times = []
        for _ in range(5):
            start = time.perf_counter()
            compiled(sample, step, None, return_dict=False, **kwargs)
            times.append(time.perf_counter() - start)
        out[name] = {
            "compile_s": round(seconds, 1),
            "generated_kernels": metrics.generated_kernel_count,
            "compiled_ms": round(1000 * min(times), 2),
        }
        print(f"{name:15s} Inductor (CPU, thin): {out[name]}", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "compile_trace_cpu.json")
    parser.add_argument("--inductor", action="store_true", help="also compile thin UNets with Inductor on the CPU")
    args = parser.parse_args(argv)

    results: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for name, (module, call) in calls().items():
            results[name] = {}
            for backend in ("eager", "aot_eager"):
                torch._dynamo.reset()
                compiled = torch.compile(module, backend=backend, fullgraph=True, dynamic=False)
                start = time.perf_counter()
                call(compiled)  # traces, then runs the graph on meta tensors (shapes only)
                results[name][backend] = round(time.perf_counter() - start, 2)
            print(
                f"{name:15s} dynamo {results[name]['eager']:6.2f} s   dynamo + AOT {results[name]['aot_eager']:6.2f} s"
            )
    if args.inductor:
        with torch.no_grad():
            results["inductor_cpu_thin"] = inductor_on_cpu()
    what = "seconds to trace each model with torch.compile backends eager and aot_eager, meta device, 768²"
    write_cpu_results(args.out, what, "compile_trace.py", argv, results)


if __name__ == "__main__":
    main()
