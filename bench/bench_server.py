"""Burst benchmark of ``kandinsky22 serve``: N concurrent text2img requests, throughput and latency per --max-batch.

For each ``--max-batch`` value, starts a server on tiny random checkpoints (``make_tiny_repos``; they draw noise, so
this measures the serving path and batching, not the real model), sends one warm-up request, then a burst of
``--requests`` concurrent ``POST /v1/images/generations`` (all compatible: same size, steps, scheduler, guidance;
distinct prompts and seeds), and reports images/s over the burst, p50/p95 request latency and the batch sizes the
worker ran. Loopback only. Not part of the test suite.

    python bench/bench_server.py --requests 30 --batches 1 4 --rounds 2
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def start(args: list[str], threads: int) -> tuple[subprocess.Popen, str]:
    exe = shutil.which("kandinsky22")
    command = [exe] if exe else [sys.executable, "-m", "kandinsky22.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(
        [*command, "serve", "--port", "0", "--log-level", "warning", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    url = ""
    for line in proc.stdout:
        if "listening on http://" in line:
            url = line.split("listening on ", 1)[1].split("/ ", 1)[0]
            break
    if not url:
        raise RuntimeError("the server did not start")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # health answers 503 while the models load
        try:
            with urllib.request.urlopen(url + "/v1/health", timeout=5) as response:
                if json.load(response)["status"] == "ok":
                    return proc, url
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not get ready")


def post(url: str, body: dict) -> float:
    started = time.perf_counter()
    request = urllib.request.Request(
        url + "/v1/images/generations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        data = json.load(response)["data"]
    assert len(data) == 1 and data[0]["b64_json"]
    return time.perf_counter() - started


def burst(url: str, n: int, common: dict) -> dict:
    with urllib.request.urlopen(url + "/v1/health") as response:
        before = json.load(response)["batch_sizes"]
    bodies = [{"prompt": f"request {i}", "seed": i, **common} for i in range(n)]
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
        latencies = sorted(pool.map(lambda body: post(url, body), bodies))
    wall = time.perf_counter() - started
    with urllib.request.urlopen(url + "/v1/health") as response:
        after = json.load(response)["batch_sizes"]
    batches = {size: count - before.get(size, 0) for size, count in after.items() if count - before.get(size, 0)}
    return {
        "images_per_s": n / wall,
        "wall_s": wall,
        "p50_s": statistics.median(latencies),
        "p95_s": latencies[max(0, round(0.95 * n) - 1)],
        "batch_sizes": batches,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rounds", type=int, default=2, help="bursts per --max-batch value (servers alternate)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prior-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="OMP_NUM_THREADS of the server")
    parser.add_argument("--repos", help="folder of make_tiny_repos output (default: a fresh temporary one)")
    args = parser.parse_args()

    import torch

    from kandinsky22 import __version__
    from kandinsky22.tiny import make_tiny_repos

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.repos or tmp)
        if not (root / "decoder").exists():
            make_tiny_repos(root)
        common = {"size": f"{args.size}x{args.size}", "steps": args.steps, "prior_steps": args.prior_steps}
        print(
            f"kandinsky22 {__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs, server OMP_NUM_THREADS={args.threads}; tiny checkpoints; burst of "
            f"{args.requests} concurrent requests, {json.dumps(common)}"
        )
        servers = {}
        try:
            for max_batch in args.batches:
                model_args = ["--prior", str(root / "prior"), "--decoder", str(root / "decoder")]
                servers[max_batch] = start(
                    [*model_args, "--max-batch", str(max_batch), "--max-queue", str(args.requests)], args.threads
                )
                post(servers[max_batch][1], {"prompt": "warm-up", **common})
            results: dict[int, list[dict]] = {b: [] for b in args.batches}
            for _ in range(args.rounds):
                for max_batch in args.batches:
                    results[max_batch].append(burst(servers[max_batch][1], args.requests, common))
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait()
        print(f"{'max-batch':>9} {'round':>5} {'images/s':>9} {'wall s':>7} {'p50 s':>7} {'p95 s':>7}  batch sizes run")
        for max_batch, rounds in results.items():
            for i, r in enumerate(rounds, 1):
                print(
                    f"{max_batch:>9} {i:>5} {r['images_per_s']:>9.2f} {r['wall_s']:>7.2f} {r['p50_s']:>7.2f} "
                    f"{r['p95_s']:>7.2f}  {r['batch_sizes']}"
                )


if __name__ == "__main__":
    main()
