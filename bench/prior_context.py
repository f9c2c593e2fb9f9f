"""The full-size prior's denoising loop on the CPU: the prompt's context in its two forms, against the reference.

``PriorContext`` (``kandinsky22.models.prior``) holds what the prior derives from the prompt, once per run. In the
"kv" form a step runs only its three tokens (time, x_t, prd) through the 20 layers, reading the 78 prompt tokens'
keys and values computed once per run; in the "tokens" form it runs all 81, as the reference does (the form for
eager runs on a GPU, which are bound by kernel launches). On the CPU the arithmetic is the cost, so this measures
the loop as the prior pipeline runs it (classifier-free guidance: a batch of 2; context prepared once; then the
steps), with the official config's sizes and random weights, in fp32, and the reference's model on the same
weights and inputs, alternating the three in rounds.

    python bench/prior_context.py               # 25 steps, 2 rounds; writes bench/results/prior_context_cpu.json
    python bench/prior_context.py --steps 5     # quicker

Needs ~9 GB of memory (two copies of the 1.03 B-parameter prior in fp32) and diffusers (the reference).
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
from bench_pipeline import PRIOR, write_cpu_results  # noqa: E402

from kandinsky22.models.prior import PriorTransformer  # noqa: E402


def loops(steps: int) -> dict[str, Callable[[], torch.Tensor]]:
    """The three loops (ours kv, ours tokens, the reference), each returning its last step's output."""
    import diffusers

    torch.manual_seed(0)
    ours = PriorTransformer(**PRIOR).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():  # the embeddings start at zero: make every weight count
            p.uniform_(0.9, 1.1) if "norm" in name and name.endswith("weight") else p.normal_(std=0.02)
    ref = diffusers.PriorTransformer.from_config(PRIOR).eval()
    ref.load_state_dict(ours.state_dict())
    width, batch = PRIOR["embedding_dim"], 2
    g = torch.Generator().manual_seed(1)
    pooled = torch.randn(batch, width, generator=g)
    hidden = torch.randn(batch, PRIOR["num_embeddings"], width, generator=g)
    mask = torch.ones(batch, PRIOR["num_embeddings"], dtype=torch.bool)
    mask[:, 9:] = False  # a 9-token prompt: the rest is padding, as CLIP's tokenizer pads to 77
    x = torch.randn(batch, width, generator=g)
    timesteps = torch.linspace(999, 0, steps).round().long()

    def ours_loop(cache: bool) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            context = ours.prepare_context(pooled, hidden, mask, timesteps=timesteps, cache_prompt=cache)
            for i, t in enumerate(timesteps):
                (out,) = ours(x, t, context=context.at(i), return_dict=False)
            return out

        return run

    def ref_loop() -> torch.Tensor:
        for t in timesteps:
            out = ref(x, t, proj_embedding=pooled, encoder_hidden_states=hidden, attention_mask=mask)
        return out.predicted_image_embedding

    return {"ours_kv": ours_loop(True), "ours_tokens": ours_loop(False), "reference": ref_loop}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=25, help="denoising steps per loop (default 25, the official)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds in which the loops take turns (default 2)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "prior_context_cpu.json")
    args = parser.parse_args(argv)

    runs = loops(args.steps)
    results: dict[str, Any] = {name: {"seconds": []} for name in runs}
    outputs = {}
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, run in runs.items():
                start = time.perf_counter()
                outputs[name] = run()
                results[name]["seconds"].append(round(time.perf_counter() - start, 3))
                print(f"{name:12s} {results[name]['seconds'][-1]:8.2f} s", flush=True)
    for name in runs:
        results[name]["best_s"] = min(results[name]["seconds"])
        if name != "reference":
            results[name]["max_abs_diff_vs_reference"] = float((outputs[name] - outputs["reference"]).abs().max())
    results["ratio_kv_over_reference"] = round(results["ours_kv"]["best_s"] / results["reference"]["best_s"], 3)
    results["ratio_tokens_over_reference"] = round(results["ours_tokens"]["best_s"] / results["reference"]["best_s"], 3)
    print({k: v for k, v in results.items() if k.startswith("ratio")})
    write_cpu_results(
        args.out,
        "seconds of the full-size prior's denoising loop (model calls, CFG batch of 2, fp32) on the CPU",
        "prior_context.py",
        argv,
        results,
        threads=torch.get_num_threads(),
        steps=args.steps,
        rounds=args.rounds,
    )


if __name__ == "__main__":
    main()
