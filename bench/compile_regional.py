"""Regional compilation against whole-model compilation: how much of the fast path's compile warm-up it would save.

The fast path compiles each model whole (``torch.compile(fullgraph=True)`` on the UNet, the MoVQ decoder, the prior).
Its warm-up on an H200 was 121 s against the reference's 65 s (which compiles its UNet only). Regional compilation
compiles each repeated block (the UNet's resnets and attentions, MoVQ's resnets and attentions, the prior's
transformer blocks) on its own: instances of one block class with the same shapes share one compiled graph, so there
is less to trace and generate; what runs between the blocks stays eager. This script measures the compile side only,
on this CPU:

* tracing, full size, on the ``meta`` device (no weights): dynamo alone ("eager" backend) and dynamo + AOT autograd
  ("aot_eager"), whole against regional, with the number of graphs compiled;
* ``--inductor``: a whole cold Inductor compile of the thin official-structure UNet of ``host_overhead.py`` on the CPU,
  whole against regional: compile seconds, generated kernels, the compiled call's CPU time.

What regional compilation costs at run time on a GPU (eager glue between the blocks, a CUDA graph per block, fusions
lost at block boundaries) needs a GPU run; it is not measured here.

    python bench/compile_regional.py              # ~3 min on a 2-core VM; writes bench/results/compile_regional_cpu.json
    python bench/compile_regional.py --inductor   # also the thin UNet with Inductor on the CPU (~4 min more)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import write_cpu_results  # noqa: E402
from compile_trace import calls  # noqa: E402

from kandinsky22 import PriorTransformer, UNet2DConditionModel, VQModel, fast  # noqa: E402

# The repeated blocks of each model, compiled one by one in the regional form (compile_scope="blocks").
BLOCKS: dict[str, tuple[type[nn.Module], ...]] = {
    "unet": fast.BLOCKS[UNet2DConditionModel],
    "movq_decoder": fast.BLOCKS[VQModel],
    "prior": fast.BLOCKS[PriorTransformer],
}


def compile_model(module: nn.Module, name: str, regional: bool, backend: str, options: dict | None = None) -> None:
    """Whole: ``module.compile``; regional: each instance of the model's block classes compiled on its own (one
    block class compiles once per distinct structure and shapes: more than dynamo's default of 8 recompilations)."""
    torch._dynamo.config.recompile_limit = 256
    if not regional:
        module.compile(fullgraph=True, dynamic=False, backend=backend, options=options)
        return
    for sub in module.modules():
        if isinstance(sub, BLOCKS[name]):
            sub.compile(fullgraph=True, dynamic=False, backend=backend, options=options)


def uncompile(module: nn.Module) -> None:
    for sub in module.modules():
        sub._compiled_call_impl = None


def graphs_compiled() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def tracing() -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, (module, call) in calls().items():
        if name not in BLOCKS:
            continue
        out[name] = {}
        for form in ("whole", "regional"):
            for backend in ("eager", "aot_eager"):
                torch._dynamo.reset()
                torch._dynamo.utils.counters.clear()
                uncompile(module)
                compile_model(module, name, form == "regional", backend)
                start = time.perf_counter()
                with torch.no_grad():
                    call(module)
                seconds = time.perf_counter() - start
                out[name][f"{form}_{backend}"] = {"seconds": round(seconds, 2), "graphs": graphs_compiled()}
                print(f"{name:13s} {form:8s} {backend:9s} {seconds:6.2f} s, {graphs_compiled()} graphs", flush=True)
        uncompile(module)
    return out


def inductor_on_cpu() -> dict[str, dict[str, float]]:
    """The thin UNet compiled with Inductor on the CPU (as the fast path configures it), whole and regional."""
    from host_overhead import LATENT, THIN_UNET
    from torch._inductor import metrics
    from torch._inductor.utils import fresh_cache

    torch.set_num_threads(1)
    out = {}
    for form in ("whole", "regional"):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        metrics.reset()
        torch.manual_seed(0)
        model = UNet2DConditionModel(**THIN_UNET).eval()
        for module in model.modules():
            if hasattr(module, "fuse_projections"):
                module.fuse_projections()
        model.to(memory_format=torch.channels_last)
        sample = torch.randn(2, 4, LATENT, LATENT).to(memory_format=torch.channels_last)
        embeds, step = torch.randn(2, THIN_UNET["encoder_hid_dim"]), torch.tensor(999)
        conditioning = model.prepare_conditioning({"image_embeds": embeds}, step.reshape(1)).at(0)
        compile_model(model, "unet", form == "regional", "inductor", {"conv_1x1_as_mm": True})

        def run(model=model, sample=sample, step=step, conditioning=conditioning) -> None:  # this form's, bound now
            with torch.no_grad():
                model(sample, step, None, conditioning=conditioning, return_dict=False)

        with fresh_cache(delete=False):  # cold: nothing compiled by an earlier run is reused
            start = time.perf_counter()
            run()
            seconds = time.perf_counter() - start
        times = []
        for _ in range(5):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        out[form] = {
            "compile_s": round(seconds, 1),
            "graphs": graphs_compiled(),
            "generated_kernels": metrics.generated_kernel_count,
            "compiled_ms": round(1000 * min(times), 2),
            "compiled_ms_all": [round(1000 * t, 2) for t in times],
        }
        print(f"thin UNet, Inductor (CPU), {form}: {out[form]}", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inductor", action="store_true", help="also compile the thin UNet with Inductor on the CPU")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "compile_regional_cpu.json"))
    args = parser.parse_args(argv)
    results: dict = {"tracing_meta_768": tracing()}
    if args.inductor:
        results["inductor_cpu_thin_unet"] = inductor_on_cpu()
    write_cpu_results(
        Path(args.out),
        "torch.compile of whole models against their repeated blocks compiled one by one (regional): tracing seconds "
        "and graphs, full size on the meta device; with --inductor, a cold Inductor compile of the thin UNet on the CPU",
        "compile_regional.py",
        argv,
        results,
        dtype="float16 (meta); float32 (Inductor, CPU)",
    )


if __name__ == "__main__":
    main()
