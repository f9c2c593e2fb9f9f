"""The server's job queue with a stand-in GPU: what encoding the result files costs the worker thread.

A :class:`~kandinsky22.server.worker.JobQueue` runs one-image 768² text2img jobs (half PNG, half JPEG q90) with a
runner that sleeps ``--call-s`` per image (0.72 s: about one 768² image on the fast path on an H200, 0.711 s in
``bench/results/bench_pipeline_uncompiled_h200_run11.json``) and hands back real 768² images (smooth random pixels,
made before the clock starts) with their recipes. It reports the wall time from the first submission to the last
file, images/s, the share of that time the stand-in GPU was busy, and each format's mean job latency.

The queue's API tells which code runs: where ``JobOutput`` has ``files`` (main before the encoder threads), the
runner encodes each image as a PNG with its recipe in the worker thread, as ``engine_loader`` did, and the queue
re-encodes the JPEG jobs' (``recipe.transcode``) in the worker thread too; where it has ``images``, the runner hands
back the images and the queue's encoder threads write each file once, in its job's format. ``--compare SRC`` runs
the code under SRC and this checkout's in turn, ``--rounds`` each, in fresh processes. For a fixed commit of main:
``git archive COMMIT src | tar -x -C /tmp/main-COMMIT``, then ``--compare /tmp/main-COMMIT/src``.

First, the premise of encoder threads: Pillow releases the GIL while it encodes (see :func:`gil_check`).

    PYTHONPATH=src python3 bench/server_encode.py --compare /tmp/main-4df7d56/src --rounds 3 \\
        --json bench/results/server_encode_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

import numpy as np
import PIL
import PIL.Image

SIDE = 768


def smooth_image(seed: int) -> PIL.Image.Image:
    """A 768² RGB image of smooth random colours (24² noise, bicubic upsampled): compresses like a generated one,
    unlike white noise."""
    noise = np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    return PIL.Image.fromarray(noise).resize((SIDE, SIDE), PIL.Image.BICUBIC)


def gil_check(images: int) -> dict:
    """Does Pillow hold the GIL while it encodes? Two measures, per format (PIL's own save, as encode_image calls it):

    * ``ticker_max_gap_ms``: a Python thread that wakes every millisecond records the longest gap between its
      wake-ups while the main thread encodes ``images`` distinct 768² images. An encoder holding the GIL stalls it for
      a whole image; one that releases it, for a few ms at most. ``sorted()`` of a long list (C code that keeps the
      GIL) is the control. Other processes on the CPUs do not hide a stall, where they do hide a speed-up.
    * ``speedup``: the images encoded one after another, then split between two threads (2 on an idle 2-core
      machine where the GIL is released).
    """
    pictures = [smooth_image(1000 + i) for i in range(images)]
    long_list = list(np.random.default_rng(0).permutation(3_000_000).tolist())
    jobs = {
        "png": lambda part: [p.save(io.BytesIO(), format="PNG") for p in part],
        "jpeg": lambda part: [p.save(io.BytesIO(), format="JPEG", quality=90) for p in part],
        "webp": lambda part: [p.save(io.BytesIO(), format="WEBP", quality=90) for p in part],
        "control: sorted() of 3M ints": lambda part: [sorted(long_list) for _ in part],
    }
    results = {}
    for name, encode in jobs.items():
        encode(pictures[:1])  # first use: the encoder's set-up
        ticks: list[float] = []
        stop = threading.Event()

        def tick(ticks: list[float] = ticks, stop: threading.Event = stop) -> None:
            while not stop.is_set():
                ticks.append(time.perf_counter())
                time.sleep(0.001)

        ticker = threading.Thread(target=tick)
        ticker.start()
        time.sleep(0.05)
        started = time.perf_counter()
        encode(pictures)
        serial = time.perf_counter() - started
        stop.set()
        ticker.join()
        during = [started, *(t for t in ticks if t >= started), started + serial]
        gap = max(b - a for a, b in zip(during, during[1:]))
        threads = [threading.Thread(target=encode, args=(pictures[k::2],)) for k in range(2)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        parallel = time.perf_counter() - started
        results[name] = {
            "images": images,
            "ms_per_image_serial": round(1000 * serial / images, 2),
            "ticker_max_gap_ms": round(1000 * gap, 1),
            "serial_s": round(serial, 4),
            "two_threads_s": round(parallel, 4),
            "speedup": round(serial / parallel, 2),
        }
    return results


def run_queue(jobs_per_format: int, call_s: float, max_batch: int) -> dict:
    """One run of the queue of this process's kandinsky22 (see the module docstring)."""
    from kandinsky22.jobs import Job
    from kandinsky22.recipe import encode_image, make_recipe, read_recipe
    from kandinsky22.server.schemas import Limits
    from kandinsky22.server.worker import JobOutput, JobQueue

    old_api = "files" in {f.name for f in dataclasses.fields(JobOutput)}
    requests = [("png", None), ("jpeg", 90)] * jobs_per_format
    pictures = {f"job {k}": smooth_image(k) for k in range(len(requests))}
    busy = [0.0]

    def run_batch(jobs, progress, should_cancel):
        singles = [single for job in jobs for single in job.expand()]
        time.sleep(call_s * len(singles))  # the GPU; the worker thread waits for it without the GIL
        busy[0] += call_s * len(singles)
        outputs = []
        for job, single in zip(jobs, singles):  # one-image jobs
            recipe = make_recipe(single, "cuda:0", "fp16")
            image = pictures[job.prompt]
            if old_api:  # main's engine_loader: a PNG with its recipe, in the worker thread
                outputs.append(JobOutput(files=[encode_image(image, recipe, "png")], seeds=[single.seed], timings={}))
            else:
                outputs.append(JobOutput(images=[image], recipes=[recipe], timings={}))
        return outputs

    queue = JobQueue(lambda: run_batch, Limits(max_batch=max_batch, max_queue=len(requests)))
    queue.start()
    try:
        while queue.state == "loading":
            time.sleep(0.001)
        started = time.time()
        ids = []
        for k, (output_format, quality) in enumerate(requests):
            job = Job(prompt=f"job {k}", width=SIDE, height=SIDE, seed=k).validate()
            ids.append(queue.submit(job, output_format, quality)["id"])
        snapshots = {}
        while len(snapshots) < len(ids):  # polling every 2 ms: the clock's error is far below the figures
            for job_id in ids:
                if job_id not in snapshots and (snapshot := queue.get(job_id))["status"] in ("succeeded", "failed"):
                    snapshots[job_id] = snapshot
            time.sleep(0.002)
        wall = max(s["finished_at"] for s in snapshots.values()) - started
        statuses = {s["status"] for s in snapshots.values()}
        assert statuses == {"succeeded"}, statuses
        for job_id, (output_format, _) in zip(ids, requests):  # the right files, recipe included
            (file,) = queue.files(job_id)
            assert file.startswith(b"\x89PNG" if output_format == "png" else b"\xff\xd8\xff")
            assert read_recipe(file)["seed"] == snapshots[job_id]["seeds"][0]
        latency = {
            output_format: round(
                statistics.mean(
                    snapshots[i]["finished_at"] - snapshots[i]["created_at"]
                    for i, (f, _) in zip(ids, requests)
                    if f == output_format
                ),
                3,
            )
            for output_format in ("png", "jpeg")
        }
        return {
            "code": "main: PNG in the runner, transcode in the worker" if old_api else "encoder threads",
            "images": len(ids),
            "wall_s": round(wall, 3),
            "images_per_s": round(len(ids) / wall, 3),
            "gpu_busy_share": round(busy[0] / wall, 3),
            "mean_latency_s": latency,
            "batch_sizes": queue.stats()["batch_sizes"],
            "load_average_1m_after": round(os.getloadavg()[0], 2),
        }
    finally:
        queue.stop(30)


def versions() -> dict:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout
         .splitlines() if line.startswith("Model name")),
        platform.processor(),
    )  # fmt: skip
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "pillow": PIL.__version__,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def git_commit(source: str) -> str:
    """The commit a source folder is checked out at, ``+dirty`` where its tracked files changed since."""
    git = ["git", "-C", source]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no", "."], capture_output=True, text=True)
    if not commit:
        return "not a git checkout (e.g. git archive COMMIT src | tar -x -C DIR)"
    return commit + ("+dirty" if dirty.stdout.strip() else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=12, help="jobs per format (PNG, JPEG q90)")
    parser.add_argument("--call-s", type=float, default=0.72, help="stand-in GPU seconds per image")
    parser.add_argument("--max-batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--compare", metavar="SRC", help="also run the kandinsky22 under SRC, in turn with this one")
    parser.add_argument("--gil-images", type=int, default=8, help="images per format for the GIL check (0: skip)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--one-run", action="store_true", help=argparse.SUPPRESS)  # a child of --compare
    args = parser.parse_args()
    settings = {"jobs_per_format": args.jobs, "call_s": args.call_s, "max_batch": args.max_batch}
    if args.one_run:
        print(json.dumps(run_queue(args.jobs, args.call_s, args.max_batch)))
        return
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    sources = {"new": os.environ.get("PYTHONPATH") or here}
    if args.compare:
        sources = {"old": args.compare, **sources}
    commits = {label: git_commit(source) for label, source in sources.items()}
    result = {"bench": "server_encode", **versions(), "settings": settings, "sources": sources, "commits": commits}
    if args.gil_images:
        result["gil_check"] = gil_check(args.gil_images)
        for name, figures in result["gil_check"].items():
            print(f"GIL check {name}: {figures}", flush=True)
    runs: dict[str, list] = {label: [] for label in sources}
    for round_ in range(args.rounds):
        for label, source in sources.items():
            command = [sys.executable, os.path.abspath(__file__), "--one-run", "--jobs", str(args.jobs)]
            command += ["--call-s", str(args.call_s), "--max-batch", str(args.max_batch)]
            env = {**os.environ, "PYTHONPATH": source}
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
            run = json.loads(out.strip().splitlines()[-1])
            runs[label].append(run)
            print(f"round {round_ + 1} {label} ({source}): {run}", flush=True)
    result["runs"] = runs
    result["best_images_per_s"] = {label: max(r["images_per_s"] for r in rs) for label, rs in runs.items()}
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=2)
            file.write("\n")


if __name__ == "__main__":
    main()
