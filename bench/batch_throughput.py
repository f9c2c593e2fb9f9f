"""Bulk generation throughput: ``kandinsky22 batch`` in one process, and on Ray Data with 1 and 2 workers.

Writes ``--jobs`` text2img jobs (distinct prompts and seeds, ``--size`` px, ``--steps`` steps per stage) for tiny
random checkpoints (``make_tiny_repos``: they draw noise, so this measures the bulk path and how it scales, not the real
model), then runs them into a fresh folder per configuration, all in one local Ray instance of ``--cpus`` CPUs (one
CPU and one torch thread per worker). For each configuration it reports:

* ``total``: images / wall time of the whole run (planning, actor start-up and model loading included);
* ``steady``: images / time between the first and the last image written (start-up excluded), from the manifest;

and checks that every run wrote the same bytes as the single-process one. Not part of the test suite.

    python bench/batch_throughput.py --jobs 60 --workers 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=60)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    args = parser.parse_args()

    # One torch thread everywhere: the workers get one CPU each, and so does the single-process run.
    os.environ.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    import ray
    import torch

    from kandinsky22.batch import MANIFEST, run_batch, run_local
    from kandinsky22.scale.ray_batch import RayOptions, run_units
    from kandinsky22.tiny import make_tiny_repos

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="k22-batch-bench-"))
    repos = make_tiny_repos(root / "tiny")
    jobs = root / "jobs.jsonl"
    fields = {"steps": args.steps, "prior_steps": args.steps, "width": args.size, "height": args.size}
    jobs.write_text(
        "".join(json.dumps({"prompt": f"a red cat {i}", "seed": i, **fields}) + "\n" for i in range(args.jobs))
    )
    models = {"prior": str(repos["prior"]), "decoders": {"text2img": str(repos["decoder"])}}
    ray.init(num_cpus=args.cpus, include_dashboard=False)
    engine = {"device": "cpu"}

    runs = [("1 process", lambda units: run_local(units, **engine))]
    for workers in args.workers:
        options = RayOptions(workers=workers, gpus_per_worker=0, progress_bars=False)
        runs.append((f"ray, {workers} worker(s)", lambda units, o=options: run_units(units, o, engine)))
    print(
        f"{args.jobs} jobs of {args.size}x{args.size} px, {args.steps} prior + {args.steps} decoder steps; tiny "
        f"models on {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"ray {ray.__version__}"
    )
    print(f"{'run':<22} {'total s':>8} {'img/s total':>12} {'img/s steady':>13}  same bytes")
    reference: dict[str, bytes] | None = None
    for name, runner in runs:
        out = root / name.replace(" ", "").replace(",", "-").replace("(s)", "")
        started = time.perf_counter()
        summary = run_batch(jobs, out, runner, **models)
        seconds = time.perf_counter() - started
        finished = sorted(json.loads(line)["finished_at"] for line in (out / MANIFEST).read_text().splitlines())
        steady = (len(finished) - 1) / (finished[-1] - finished[0])
        files = {path.name: path.read_bytes() for path in out.glob("*.png")}
        reference = reference or files
        print(f"{name:<22} {seconds:>8.1f} {summary.images / seconds:>12.2f} {steady:>13.2f}  {files == reference}")
    ray.shutdown()


if __name__ == "__main__":
    main()
