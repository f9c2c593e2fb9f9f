"""Host-side cost of one eager call of each model, ours against the reference: the official structure, thin.

On a GPU, eager diffusion inference at these sizes is bound by the host: Python and the dispatcher queue ~1,000
kernels per UNet step, and the GPU waits for them (the reference's eager UNet CFG step takes 29.8 ms on an H200 where
the same work, compiled into a CUDA graph, takes 14.8). This measures that share on the CPU: each model has the
official config's structure (levels, layers per level, where the attention layers are, the prior's 20 layers) with
every width divided so that the arithmetic is negligible, and is called on small inputs. What is left is Python, the
dispatcher and tiny CPU kernels — per operator, about what queuing a kernel costs on a GPU. The dispatched operator
counts are printed too (each is a kernel launch on a GPU, views aside).

The models are called as the pipelines call them: the UNet with a classifier-free-guidance batch of 2 — ours with its
conditioning prepared once per run, as our loop does —, the prior with a batch of 2, the MoVQ decoder on one latent.

    python bench/host_overhead.py                 # prints a table, writes bench/results/host_overhead_cpu.json
    python bench/host_overhead.py --repeats 50    # more calls per measurement

Runs on the CPU in about a minute; needs diffusers (the reference) installed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import MOVQ, PRIOR, UNET, write_cpu_results  # noqa: E402

from kandinsky22.models.movq import VQModel  # noqa: E402
from kandinsky22.models.prior import PriorTransformer  # noqa: E402
from kandinsky22.models.unet import UNet2DConditionModel  # noqa: E402

# The official configs with thin widths (32 groups still divide them; one 32-wide head per attention layer).
THIN_UNET = {
    **UNET,
    "block_out_channels": [32, 64, 96, 128],
    "attention_head_dim": 32,
    "encoder_hid_dim": 64,
    "cross_attention_dim": 32,
}
THIN_MOVQ = {**MOVQ, "block_out_channels": [32, 64, 64, 128]}
THIN_PRIOR = {**PRIOR, "num_attention_heads": 2, "attention_head_dim": 16, "embedding_dim": 32}
LATENT = 8  # UNet latents 8×8 (1×1 at the lowest level), MoVQ decode of an 8×8 latent (a 64×64 image)


class OpCounter(TorchDispatchMode):
    """Counts the operators that reach the dispatcher, and those of them that are not views (kernels on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.ops += 1
        returns = func._schema.returns
        self.kernels += not (returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns))
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], Any]) -> dict[str, int]:
    with OpCounter() as counter:
        fn()
    return {"ops": counter.ops, "kernels": counter.kernels}


def time_ms(fn: Callable[[], Any], repeats: int) -> dict[str, float]:
    """Median and best wall ms per call over ``repeats`` calls (after two warm-up calls)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return {"median_ms": round(statistics.median(times), 3), "best_ms": round(min(times), 3)}


def calls(dtype: torch.dtype) -> dict[str, dict[str, Callable[[], Any]]]:
    import diffusers

    torch.manual_seed(0)
    ours_unet = UNet2DConditionModel(**THIN_UNET).to(dtype).eval()
    ref_unet = diffusers.UNet2DConditionModel.from_config(THIN_UNET).to(dtype).eval()
    ours_movq = VQModel(**THIN_MOVQ).to(dtype).eval()
    ref_movq = diffusers.VQModel.from_config(THIN_MOVQ).to(dtype).eval()
    ours_prior = PriorTransformer(**THIN_PRIOR).to(dtype).eval()
    ref_prior = diffusers.PriorTransformer.from_config(THIN_PRIOR).to(dtype).eval()

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=dtype)

    sample, embeds = t(2, 4, LATENT, LATENT), t(2, THIN_UNET["encoder_hid_dim"])
    timestep = torch.tensor(999)
    # As our loop calls it: prepared once per run with the run's timesteps, one step's row per call.
    conditioning = ours_unet.prepare_conditioning({"image_embeds": embeds}, timestep.reshape(1)).at(0)
    latents = t(1, 4, LATENT, LATENT)
    width = THIN_PRIOR["embedding_dim"]
    x, proj, hidden = t(2, width), t(2, width), t(2, THIN_PRIOR["num_embeddings"], width)
    mask = torch.ones(2, THIN_PRIOR["num_embeddings"], dtype=torch.bool)
    prior_kwargs = {"proj_embedding": proj, "encoder_hidden_states": hidden, "attention_mask": mask}
    # As our loop calls it in an eager run on a GPU: the prompt's tokens and the mask prepared once per run, all 81
    # tokens through the layers (the "tokens" form; the "kv" form, used on the CPU and compiled, launches more).
    prior_context = ours_prior.prepare_context(proj, hidden, mask, timesteps=timestep.reshape(1), cache_prompt=False)
    prior_context = prior_context.at(0)
    return {
        "unet_cfg_step": {
            "ours": lambda: ours_unet(sample, timestep, None, conditioning=conditioning, return_dict=False),
            "reference": lambda: ref_unet(
                sample, timestep, None, added_cond_kwargs={"image_embeds": embeds}, return_dict=False
            ),
        },
        "prior_cfg_step": {
            "ours": lambda: ours_prior(x, timestep, context=prior_context, return_dict=False),
            "reference": lambda: ref_prior(x, timestep, return_dict=False, **prior_kwargs),
        },
        "movq_decode": {
            "ours": lambda: ours_movq.decode(latents, force_not_quantize=True),
            "reference": lambda: ref_movq.decode(latents, force_not_quantize=True),
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per model and library (default 20)")
    parser.add_argument("--dtype", choices=("fp16", "fp32"), default="fp32")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "host_overhead_cpu.json")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    results: dict[str, Any] = {}
    with torch.no_grad():
        for name, pair in calls(dtype).items():
            # Alternate the libraries round by round so that a load change on a shared machine hits both alike.
            entry: dict[str, Any] = {lib: count_ops(fn) for lib, fn in pair.items()}
            rounds: dict[str, list[dict[str, float]]] = {lib: [] for lib in pair}
            for _ in range(3):
                for lib, fn in pair.items():
                    rounds[lib].append(time_ms(fn, args.repeats))
            for lib in pair:
                entry[lib]["median_ms"] = min(r["median_ms"] for r in rounds[lib])
                entry[lib]["best_ms"] = min(r["best_ms"] for r in rounds[lib])
            entry["ratio_median"] = round(entry["ours"]["median_ms"] / entry["reference"]["median_ms"], 3)
            results[name] = entry
            ours, ref = entry["ours"], entry["reference"]
            print(
                f"{name:15s} ours {ours['median_ms']:7.2f} ms {ours['ops']:5d} ops {ours['kernels']:4d} kernels   "
                f"reference {ref['median_ms']:7.2f} ms {ref['ops']:5d} ops {ref['kernels']:4d} kernels   "
                f"time ratio {entry['ratio_median']:.3f}",
                flush=True,
            )
    write_cpu_results(
        args.out,
        "ms per eager call on the CPU of thin models with the official structure (host overhead)",
        "host_overhead.py",
        argv,
        results,
        threads=torch.get_num_threads(),
        dtype=args.dtype,
        repeats=args.repeats,
    )


if __name__ == "__main__":
    main()
