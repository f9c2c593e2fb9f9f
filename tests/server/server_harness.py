"""Helpers of the server tests: a ``kandinsky22 serve`` subprocess with a small loopback HTTP client, and images.

(A module of its own, not conftest.py, so that test files import it by a name no other test folder uses.)

A server binds port 0 (any free port) and prints its address; :class:`Server` reads it and waits for the ``ready``
log line (models loaded), so no port is guessed and nothing waits on a clock.

Tests that need jobs to queue first start a "blocker" (:func:`start_blocker`): a long job of another size, which keeps
the one worker busy until the test cancels it (it stops at its next step). What queues behind it is then known
exactly, whatever the machine's speed: the blocker's 2 x MAX_STEPS - 1 steps take far longer than any test needs to
queue its jobs.
"""

from __future__ import annotations

import base64
import email.message
import http.client
import io
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

START_TIMEOUT = 180.0  # seconds for a server to import torch and load the tiny models on a busy CI machine
REQUEST_TIMEOUT = 120.0


class Response:
    def __init__(self, status: int, headers: email.message.Message, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    def error(self) -> dict[str, Any]:
        return self.json()["error"]


class Server:
    """A ``kandinsky22 serve`` subprocess and a small HTTP client for it (loopback only)."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, headers: dict[str, str] | None = None):
        self.headers = headers or {}  # sent with every request unless a request gives its own
        exe = shutil.which("kandinsky22")
        command = [exe] if exe else [sys.executable, "-m", "kandinsky22.cli"]
        # One torch thread: the suite runs two xdist workers (each with servers) on two cores.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        self.proc = subprocess.Popen(
            [*command, "serve", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.output: list[str] = []
        lines: queue.Queue[str | None] = queue.Queue()

        def read() -> None:
            for line in self.proc.stdout:
                self.output.append(line)
                lines.put(line)
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        self.url = ""
        while True:
            try:
                line = lines.get(timeout=START_TIMEOUT)
            except queue.Empty:
                self.stop()
                raise RuntimeError("the server did not start in time:\n" + "".join(self.output)) from None
            if line is None:
                raise RuntimeError("the server exited:\n" + "".join(self.output))
            if "listening on http://" in line:
                self.url = line.split("listening on ", 1)[1].split("/ ", 1)[0]
            if "; ready" in line:
                break
        self.host, self.port = self.url.removeprefix("http://").rsplit(":", 1)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
        timeout: float = REQUEST_TIMEOUT,
    ) -> Response:
        headers = dict(self.headers if headers is None else headers)
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return Response(response.status, response.headers, response.read())
        except urllib.error.HTTPError as err:
            return Response(err.code, err.headers, err.read())

    def events(self, job_id: str, headers: dict[str, str] | None = None, timeout: float = REQUEST_TIMEOUT):
        """Yield the job snapshots of ``/v1/jobs/{id}/events`` as they arrive, until the stream ends."""
        conn = http.client.HTTPConnection(self.host, int(self.port), timeout=timeout)
        try:
            conn.request("GET", f"/v1/jobs/{job_id}/events", headers=self.headers if headers is None else headers)
            response = conn.getresponse()
            assert response.status == 200, response.read()
            assert response.getheader("Content-Type").startswith("text/event-stream")
            for line in response:
                if line.startswith(b"data: "):
                    yield json.loads(line[len(b"data: ") :])
        finally:
            conn.close()

    def wait(self, job_id: str, statuses: set[str]) -> dict[str, Any]:
        """The first snapshot of the job with a status in ``statuses`` (followed through its event stream)."""
        for snapshot in self.events(job_id):
            if snapshot["status"] in statuses:
                return snapshot
        raise AssertionError(f"job {job_id} ended without reaching {statuses}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def png_image(data: bytes):
    import PIL.Image

    image = PIL.Image.open(io.BytesIO(data))
    image.load()
    return image


def b64_png(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def model_args(repos: dict[str, Path]) -> list[str]:
    return [
        "--prior",
        str(repos["prior"]),
        "--decoder",
        str(repos["decoder"]),
        "--inpaint-decoder",
        str(repos["decoder-inpaint"]),
        "--depth-decoder",
        str(repos["controlnet-depth"]),
    ]


# Limits of the main test server: a queue of 8, batches of 4, long jobs possible (a "blocker" that keeps the worker
# busy until the test cancels it), and a 1 MiB body limit.
MAX_QUEUE = 8
MAX_BATCH = 4
MAX_STEPS = 1000
MAX_BODY_MB = 1


FAST = {"steps": 2, "prior_steps": 2}
TERMINAL = {"succeeded", "failed", "cancelled"}


def limit_args() -> list[str]:
    return [
        *("--max-queue", str(MAX_QUEUE), "--max-batch", str(MAX_BATCH), "--max-steps", str(MAX_STEPS)),
        *("--max-body-mb", str(MAX_BODY_MB), "--max-side", "256"),
    ]


API_KEY = "test-key-0123456789"


def start_blocker(server: Server) -> str:
    """Start a long job of a size no test uses otherwise; return its id once it runs."""
    # MAX_STEPS - 1 decoder steps: the decoder's DDPM config cannot take MAX_STEPS (it would start at timestep 1000)
    body = {"prompt": "blocker", "width": 64, "height": 128, "steps": MAX_STEPS - 1, "prior_steps": MAX_STEPS}
    response = server.request("POST", "/v1/jobs", body)
    assert response.status == 202, response.body
    job_id = response.json()["id"]
    server.wait(job_id, {"running"})
    return job_id


def cancel(server: Server, job_id: str) -> None:
    assert server.request("DELETE", f"/v1/jobs/{job_id}").status == 202
    assert server.wait(job_id, TERMINAL)["status"] == "cancelled"


def pixels(png: bytes):
    import numpy as np

    return np.asarray(png_image(png).convert("RGB"))


def recipe(png: bytes) -> dict:
    from kandinsky22.recipe import RECIPE_KEY

    return json.loads(png_image(png).text[RECIPE_KEY])
