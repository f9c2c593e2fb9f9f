"""Scaling out on a local Ray cluster: ``kandinsky22 batch --ray`` and ``kandinsky22 serve --ray``.

One Ray instance for the module (Ray takes seconds to start); the commands run as subprocesses that join it by its
address, as they would join a real cluster. Ray Data's actors and Ray Serve's replicas are separate processes, so the
module needs 2 CPUs of Ray resources, one per actor or replica.
"""

from __future__ import annotations

import base64
import io
import json
import os
import queue
import re
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
from test_batch import COMMAND, MANIFEST, job_line, pngs, shared_tiny_repos, write_jobs
from test_batch import run as run_in_process

from kandinsky22.batch import UnitRunner
from kandinsky22.jobs import Job
from kandinsky22.lora_specs import LoraSpec
from kandinsky22.recipe import file_sha256, job_from_recipe, make_recipe
from kandinsky22.scale.ray_batch import KILL_WORKER_ENV

ray = pytest.importorskip("ray")
# Ray Serve's own configuration classes use a pydantic form that pydantic deprecates; nothing of ours.
pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`:DeprecationWarning")

START_TIMEOUT = 300.0  # seconds for a command to join the cluster, start its actors and load the tiny models
ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="session")
def tiny_repos(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> dict[str, Path]:
    return shared_tiny_repos(tmp_path_factory, worker_id)


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A local Ray instance; the environment (no hub, one thread) is set first, so its workers inherit it."""
    saved = {name: os.environ.get(name) for name in ENV}
    os.environ.update(ENV)
    # Ray gives its raylet a fixed 30 s to register; on a 2-core machine busy with the other xdist worker that can
    # run out, so start-up gets three tries before the tests fail.
    for attempt in range(3):
        try:
            ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")  # loopback only
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def one_thread_run(jobs: list[Job], loras: list[LoraSpec] | None = None) -> list[np.ndarray]:
    """``Engine.run`` in this process with one torch thread, as in each actor or replica (one CPU each)."""
    import torch

    from kandinsky22.jobs import Engine

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [np.asarray(result.image) for result in Engine(device="cpu", loras=loras or []).run(jobs)]
    finally:
        torch.set_num_threads(threads)


def models(repos: dict[str, Path]) -> list[str]:
    return ["--prior", str(repos["prior"]), "--decoder", str(repos["decoder"])]


def _interrupt(proc: subprocess.Popen) -> None:
    """Ctrl-C, as a user stops the command; killed if it has not ended within two minutes."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_batch_on_ray_resumes_survives_a_killed_worker_and_matches_one_process(
    ray_address: str, tiny_repos: dict[str, Path], tmp_path: Path
) -> None:
    lines: list[dict[str, Any] | str] = [job_line(i) for i in range(1, 21)]
    lines.insert(6, '{"prompt": "unfinished')  # line 7: reported, the 20 jobs go on
    jobs = write_jobs(tmp_path / "jobs.jsonl", lines)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each actor (one CPU): the same kernels, so the same bits
    try:
        engine = UnitRunner(device="cpu")
        reference = tmp_path / "reference"
        run_in_process(jobs, reference, tiny_repos, engine)
        # The first run stops after 4 jobs (as if interrupted); the Ray run must do the other 16 exactly once.
        out = tmp_path / "out"
        run_in_process(jobs, out, tiny_repos, engine, limit=4)
    finally:
        torch.set_num_threads(threads)
    assert len(pngs(out)) == 4

    marker = tmp_path / "killed"
    result = subprocess.run(
        [*COMMAND, "batch", str(jobs), "--out", str(out), *models(tiny_repos), "--device", "cpu"]
        + ["--ray", ray_address, "--workers", "2", "--json", "--quiet"],
        env={**os.environ, **ENV, KILL_WORKER_ENV: f"{marker}:2"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 1, result.stderr  # line 7 failed
    summary = json.loads(result.stdout)  # nothing else on stdout, even with Ray's messages
    assert (summary["jobs"], summary["skipped"], summary["done"], summary["failed"]) == (21, 4, 16, 1)
    assert marker.exists()  # a worker was killed on its 2nd call, and its work redone

    records = [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]
    ids = [record["id"] for record in records]
    assert sorted(ids) == sorted(set(ids)) == [f"{i:06d}" for i in range(1, 22)]
    (failed,) = [record for record in records if record["error"] is not None]
    assert failed["line"] == 7 and failed["error"].startswith("line 7: not valid JSON")
    assert all(record["device"] == "cpu" for record in records if record["error"] is None)
    assert len(pngs(reference)) == 20
    assert pngs(out) == pngs(reference)  # same seeds, same bytes, each image once


def read_listening(proc: subprocess.Popen, lines: queue.Queue[str | None]) -> str:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        match = re.search(r"listening on (http://\S+?)/? ", line)
        if match:
            return match.group(1)
    proc.kill()
    raise AssertionError(f"serve --ray did not start within {START_TIMEOUT:.0f} s (exit {proc.poll()})")


def request(url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_serve_on_ray_answers_health_and_generation_like_the_plain_server(
    ray_address: str, tiny_repos: dict[str, Path], tmp_path: Path
) -> None:
    # A LoRA of weight 0 (the images of a server without it) that a request turns on: the ingress checks the choice,
    # the replica's Engine applies it.
    from test_cli_lora import write_lora

    lora = write_lora(tmp_path / "style.safetensors")
    proc = subprocess.Popen(
        [*COMMAND, "serve", "--port", "0", *models(tiny_repos), "--device", "cpu", "--ray", ray_address]
        + ["--max-replicas", "1", "--cpus-per-replica", "1", "--lora", f"{lora}:0"],
        env={**os.environ, **ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    output: list[str] = []

    def pump() -> None:
        for line in proc.stdout:
            output.append(line)
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    try:
        base = read_listening(proc, lines)
        status, health = 0, {}
        for _ in range(60):  # the ingress is up once serve.run returned; it says ready once a replica answered
            status, health = request(f"{base}/v1/health")
            if status == 200:
                break
            time.sleep(1)
        assert status == 200 and health["status"] == "ok", health

        status, body = request(
            f"{base}/v1/images/generations",
            {"prompt": "a red cat", "size": "64x64", "n": 2, "seed": 77, "steps": 2, "prior_steps": 2},
        )
        assert status == 200, body
        assert [item["seed"] for item in body["data"]] == [77, 78]
        served = []
        for item in body["data"]:
            with PIL.Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))) as image:
                served.append((np.asarray(image.convert("RGB")), json.loads(image.text["kandinsky22"])))
        assert [recipe["seed"] for _, recipe in served] == [77, 78]
        assert all(pixels.shape == (64, 64, 3) for pixels, _ in served)
        # The replica ran the plain server's batch code: the same two-image call here gives the same pixels.
        expected = one_thread_run([job_from_recipe(recipe) for _, recipe in served])
        assert all(np.array_equal(pixels, want) for (pixels, _), want in zip(served, expected))

        status, body = request(f"{base}/v1/images/generations", {"prompt": "a red cat", "size": "64x64", "steps": 0})
        assert status == 400 and body["error"]["param"] == "steps"  # validated by the same routes

        chosen = {"prompt": "a red cat", "size": "64x64", "seed": 77, "steps": 2, "prior_steps": 2}
        status, body = request(
            f"{base}/v1/images/generations", {**chosen, "loras": [{"source": str(lora), "weight": 0.9}]}
        )
        assert status == 200, body
        with PIL.Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"]))) as image:
            pixels, recipe = np.asarray(image.convert("RGB")), json.loads(image.text["kandinsky22"])
        assert recipe["loras"] == [{"source": str(lora), "weight": 0.9, "sha256": file_sha256(lora)}]
        (want,) = one_thread_run([job_from_recipe(recipe)], [LoraSpec(str(lora), 0.9)])
        assert np.array_equal(pixels, want) and not np.array_equal(pixels, expected[0])
        status, body = request(f"{base}/v1/images/generations", {**chosen, "loras": [{"source": "x", "weight": 1}]})
        assert status == 400 and body["error"]["param"] == "loras"
        status, models_body = request(f"{base}/v1/models")
        assert (
            status == 200 and models_body["device"] == "cpu" and models_body["tasks"] == ["text2img", "img2img", "mix"]
        )
    finally:
        _interrupt(proc)
    assert proc.returncode == 0, "".join(output[-30:])
    from ray import serve

    from kandinsky22.scale.serve_app import APP_NAME

    assert APP_NAME not in serve.status().applications  # deleted when the command stopped


def test_the_ingress_queue_runs_one_call_per_model_replica_at_once() -> None:
    """``serve --ray`` gives the server's queue one worker thread per replica (``concurrency``): calls overlap."""
    from kandinsky22.server.schemas import Limits
    from kandinsky22.server.worker import JobOutput, JobQueue

    both_running = threading.Barrier(2, timeout=60)

    def run_batch(jobs: list[Job], progress: Any, should_cancel: Any) -> list[JobOutput]:
        both_running.wait()  # a queue running one call at a time breaks the barrier: the jobs fail
        image, recipes = PIL.Image.new("RGB", (8, 8)), [make_recipe(job, "cpu", "fp32") for job in jobs]
        return [JobOutput(images=[image], recipes=[recipe], timings={}) for recipe in recipes]

    queue = JobQueue(lambda: run_batch, Limits(), concurrency=2)
    queue.start()
    try:
        # Two sizes: two pipeline calls, not one batch.
        ids = [queue.submit(Job(prompt="a cat", width=width, height=64, seed=1))["id"] for width in (64, 128)]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and any(queue.get(i)["status"] not in ("succeeded", "failed") for i in ids):
            time.sleep(0.05)
        assert [queue.get(i)["status"] for i in ids] == ["succeeded", "succeeded"]
        assert queue.stats()["batch_sizes"] == {1: 2}
    finally:
        queue.stop(timeout=10)


def test_a_ray_address_that_is_malformed_or_where_nothing_listens_is_an_error_naming_it(
    tiny_repos: dict[str, Path], tmp_path: Path
) -> None:
    """``ray.init`` at an address where nothing listens retried for ever, deaf to Ctrl-C and SIGTERM; a malformed one
    ended as a bare ``ValueError`` with the --debug hint."""
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job_line(1)])
    base = [*COMMAND, "batch", str(jobs), "--out", str(tmp_path / "out"), *models(tiny_repos), "--quiet"]
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    for command in (base, [*COMMAND, "serve", *models(tiny_repos)]):
        unreachable = subprocess.run(
            [*command, "--ray", f"127.0.0.1:{port}"], env={**env, **ENV}, capture_output=True, text=True, timeout=120
        )
        assert unreachable.returncode == 1, unreachable.stderr
        assert f"cannot join the Ray cluster at 127.0.0.1:{port}: nothing answers at" in unreachable.stderr
    malformed = subprocess.run(
        [*base, "--ray", "nonsense"], env={**env, **ENV}, capture_output=True, text=True, timeout=120
    )
    assert malformed.returncode == 2, malformed.stderr
    assert "error: --ray 'nonsense' is not a Ray address: Invalid address format: nonsense" in malformed.stderr


def test_serve_on_ray_says_why_when_the_model_replicas_cannot_load_the_models(
    ray_address: str, tiny_repos: dict[str, Path], tmp_path: Path
) -> None:
    """A decoder folder without a model: with --min-replicas 1 the command failed with Ray's "Deploying application
    kandinsky22 failed" and not the cause; with --min-replicas 0 the server said "loading" for ever and its jobs waited
    for ever. Now as on the plain server: the replica's error, and /v1/health says "error" with it."""
    broken = ["--prior", str(tiny_repos["prior"]), "--decoder", str(tmp_path), "--device", "cpu"]
    command = [*COMMAND, "serve", "--port", "0", *broken, "--ray", ray_address, "--cpus-per-replica", "1"]
    cause = f"the model replicas could not start: FileNotFoundError: No 'model_index.json' in '{tmp_path}'"
    failed = subprocess.run(command, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=600)
    assert failed.returncode == 1 and f"kandinsky22 serve: error: {cause}" in failed.stderr, failed.stderr[-3000:]

    proc = subprocess.Popen(
        [*command, "--min-replicas", "0"],
        env={**os.environ, **ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    try:
        base = read_listening(proc, lines)
        health: dict[str, Any] = {}
        for _ in range(180):  # the replica is started by the first call: loading, then the load's outcome
            _, health = request(f"{base}/v1/health")
            if health["status"] != "loading":
                break
            time.sleep(1)
        assert health["status"] == "error" and health["error"] == f"RuntimeError: {cause}", health
        status, body = request(f"{base}/v1/images/generations", {"prompt": "a red cat", "size": "64x64"})
        assert status == 503 and cause in body["error"]["message"], body
    finally:
        _interrupt(proc)
    assert proc.returncode == 0


def test_a_second_serve_on_one_cluster_is_refused_naming_the_first() -> None:
    """Ray Serve has one HTTP address per cluster: a second ``serve --ray`` deployed the application again under its
    name, which replaced the first server (its models, queue and jobs) and was deleted by either command's exit."""
    from types import SimpleNamespace

    from kandinsky22.cli import RuntimeFailure
    from kandinsky22.scale.ray_serve import _refuse_a_second_server
    from kandinsky22.scale.serve_app import APP_NAME

    _refuse_a_second_server({}, "127.0.0.1", 8000)
    _refuse_a_second_server({"someone-else": SimpleNamespace(status="RUNNING")}, "127.0.0.1", 8000)
    with pytest.raises(RuntimeFailure) as refused:
        _refuse_a_second_server({APP_NAME: SimpleNamespace(status="RUNNING")}, "::1", 8000)
    assert str(refused.value) == (
        "a kandinsky22 server already runs on this Ray cluster (Ray Serve application 'kandinsky22', running, at "
        "http://[::1]:8000/); a cluster serves one, and a second would replace it"
    )
    assert "Ctrl-C its `kandinsky22 serve --ray` command" in refused.value.hint
    assert "`serve delete kandinsky22`" in refused.value.hint


def test_serve_on_a_cluster_that_serves_kandinsky22_already_exits_1_and_leaves_it(
    ray_address: str, tiny_repos: dict[str, Path]
) -> None:
    """The whole command against a running application of that name (a stand-in, so that no model loads): refused
    before it deploys anything, and the running one still answers."""
    from ray import serve

    from kandinsky22.scale.ray_serve import _free_port
    from kandinsky22.scale.serve_app import APP_NAME

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class First:
        def __call__(self, request: Any) -> str:
            return "the first server"

    serve.start(http_options={"host": "127.0.0.1", "port": _free_port("127.0.0.1")})
    from ray.serve.context import _get_global_client

    http = _get_global_client().http_config  # Serve keeps the address it started with when a test before started it
    serve.run(First.bind(), name=APP_NAME, route_prefix="/")
    try:
        second = subprocess.run(
            [*COMMAND, "serve", "--port", "0", *models(tiny_repos), "--device", "cpu", "--ray", ray_address],
            env={**os.environ, **ENV},
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
        )
        assert second.returncode == 1, second.stderr[-3000:]
        assert "kandinsky22 serve: error: a kandinsky22 server already runs on this Ray cluster" in second.stderr
        with urllib.request.urlopen(f"http://{http.host}:{http.port}/", timeout=60) as response:
            assert response.read() == b"the first server"
    finally:
        serve.delete(APP_NAME)


def test_batch_on_ray_a_lora_that_does_not_fit_is_one_line_naming_it(
    ray_address: str, tiny_repos: dict[str, Path], tmp_path: Path
) -> None:
    """The driver reads and hashes the LoRA; a worker finds, as it loads the models, that its modules are not theirs:
    the command says so in one line naming the option, as without Ray, not in Ray's wrapped traceback."""
    from test_cli_lora import write_lora

    lora = write_lora(tmp_path / "other.safetensors", {"down_blocks.7.attentions.0.to_q": (64, 64)})
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job_line(1)])
    result = subprocess.run(
        [*COMMAND, "batch", str(jobs), "--out", str(tmp_path / "out"), *models(tiny_repos), "--device", "cpu"]
        + ["--ray", ray_address, "--workers", "1", "--quiet", "--lora", str(lora)],
        env={**os.environ, **ENV},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("kandinsky22 batch: error")]
    assert result.returncode == 2, result.stderr
    assert errors == [
        f"kandinsky22 batch: error: --lora {lora}: 1 module(s) are not in the Kandinsky 2.2 unet, e.g. "
        "['down_blocks.7.attentions.0.to_q'] (is this a LoRA for another model?)"
    ], result.stderr
