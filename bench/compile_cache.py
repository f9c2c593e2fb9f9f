"""The fast path's warm-up from empty compile caches, then again in a new process reading the caches the first wrote.

What ``--compile-cache DIR`` (``kandinsky22.fast.use_compile_cache``) buys a server restart: torch.compile keeps the
compiled graphs and kernels on disk (by default under the temporary folder), and a process that compiles the same
models for the same shapes reads them back. Each run is a fresh interpreter that loads the tiny checkpoints
(``kandinsky22.tiny``), enables the fast path with Inductor for one size, and reports the warm-up seconds per model.

    python bench/compile_cache.py            # tiny models, 64x64, CPU; writes bench/results/compile_cache_cpu.json

About two minutes on the CPU (the cold Inductor compile is most of it); needs a C++ compiler (Inductor's CPU code).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import write_cpu_results  # noqa: E402

CHILD = """
import json, sys, time
import torch
from kandinsky22 import KandinskyV22Pipeline, KandinskyV22PriorPipeline
from kandinsky22.fast import use_compile_cache
use_compile_cache(sys.argv[2])
torch.set_num_threads(1)
start = time.perf_counter()
prior = KandinskyV22PriorPipeline.from_pretrained(sys.argv[1] + "/prior")
decoder = KandinskyV22Pipeline.from_pretrained(sys.argv[1] + "/decoder")
loaded = time.perf_counter()
seconds = {**prior.enable_fast_path(shapes=[(64, 64, 1)]), **decoder.enable_fast_path(shapes=[(64, 64, 1)])}
print(json.dumps({"load_s": loaded - start, "warm_up_s": time.perf_counter() - loaded, "per_model_s": seconds}))
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "compile_cache_cpu.json")
    args = parser.parse_args(argv)

    from kandinsky22.tiny import make_tiny_repos

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        make_tiny_repos(Path(tmp) / "repos")
        cache = Path(tmp) / "cache"  # empty: the first run compiles everything
        for run in ("cold", "from_cache"):
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(Path(tmp) / "repos"), str(cache)],
                capture_output=True,
                text=True,
                env=env,
                check=True,
            ).stdout
            results[run] = {k: round(v, 2) if isinstance(v, float) else v for k, v in json.loads(out).items()}
            results[run]["per_model_s"] = {k: round(v, 2) for k, v in results[run]["per_model_s"].items()}
            print(run, results[run], flush=True)
    results["ratio_from_cache_over_cold"] = round(results["from_cache"]["warm_up_s"] / results["cold"]["warm_up_s"], 3)
    write_cpu_results(
        args.out,
        "fast-path warm-up seconds (Inductor, tiny models, 64x64, CPU): empty caches, then a new process reading them",
        "compile_cache.py",
        argv,
        results,
        threads=1,
    )


if __name__ == "__main__":
    main()
