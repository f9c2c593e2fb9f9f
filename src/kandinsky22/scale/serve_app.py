"""The Ray Serve application of ``kandinsky22 serve --ray``: an ingress deployment and autoscaled model replicas.

* :class:`Ingress` (one replica, no GPU) serves the plain server's FastAPI app
  (:func:`kandinsky22.server.app.create_app`): the same routes, limits, queue, batching, job API, progress events and
  cancellation. Its :class:`~kandinsky22.server.worker.JobQueue` runs up to ``max_replicas`` pipeline calls at once,
  each on a model replica, instead of on a local Engine. Jobs and their results live in its memory, which is why it
  has one replica: a job id is answered by the replica that made it.
* :class:`Model` (``gpus_per_replica`` GPUs each, between ``min_replicas`` and ``max_replicas``) runs the plain
  server's batch runner (:func:`kandinsky22.server.app.engine_loader`) on its own Engine. A call streams one event per
  denoising step back to the ingress, then the images and their recipes; cancelling the call stops the run at its
  next step. The images cross as PIL images (they pickle as their raw pixels, 1.7 MB at 768²): the ingress's queue
  encodes each once, in its job's format, in its encoder threads, as on the plain server, so a replica takes its next
  call as soon as the pipeline returns, and the format and quality, which belong to the job record, stay with it.

This module imports ray; only ``--ray`` imports it (see :mod:`kandinsky22.scale.ray_serve`).
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle

from kandinsky22.jobs import Cancelled, Job, ProgressFn
from kandinsky22.server.app import ServerConfig, create_app, engine_loader
from kandinsky22.server.worker import JobOutput, RunBatch

APP_NAME = "kandinsky22"
# HTTP requests the ingress takes at once. Waiting generation calls and event streams hold theirs for the length of a
# job, so Ray Serve's default (5) would stall even health checks behind five waiting clients; the server's own
# --max-queue is what limits the work.
INGRESS_MAX_ONGOING_REQUESTS = 1000
# While the ingress waits for a first model replica, it checks this often whether Ray Serve gave up starting one.
REPLICA_POLL_S = 2.0


@dataclass
class ReplicaOptions:
    """The model replicas: resources, and Ray Serve's autoscaling between ``min_replicas`` and ``max_replicas``."""

    min_replicas: int = 1
    max_replicas: int = 1
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    # Calls in flight per replica that the autoscaler aims at (each replica runs one call at a time; more wait in line).
    target_ongoing_requests: float = 1.0
    downscale_delay_s: float = 600.0


@serve.deployment(max_ongoing_requests=1)
class Model:
    """One Engine with every served model loaded; one pipeline call at a time."""

    def __init__(self, config: ServerConfig) -> None:
        self.info: dict[str, Any] = {}
        self.run_batch = engine_loader(config, self.info)()

    def describe(self) -> dict[str, Any]:
        """Device, dtype and fast path, for ``/v1/models``."""
        return dict(self.info)

    async def run(self, jobs: list[Job]) -> AsyncIterator[tuple[Any, ...]]:
        """``("progress", stage, step, total)`` after each step, then ``("done", outputs)``."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        stop = threading.Event()

        def send(*event: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        def work() -> None:
            try:
                send("done", self.run_batch(jobs, lambda *step: send("progress", *step), stop.is_set))
            except BaseException as err:  # handed to the caller's iteration, which raises it
                send("error", err)

        # A thread, not the event loop: the replica keeps answering (health checks, cancellation) while it computes.
        threading.Thread(target=work, name="kandinsky22-model", daemon=True).start()
        try:
            while True:
                event = await events.get()
                if event[0] == "error":
                    raise event[1]
                yield event
                if event[0] == "done":
                    return
        finally:
            # The caller cancelled (or the call ended): a run still going stops at its next step.
            stop.set()


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS)
@serve.ingress()
class Ingress:
    """The HTTP API of the plain server, with model replicas in place of the local Engine."""

    def __init__(self, config: ServerConfig, model: DeploymentHandle, concurrency: int) -> None:
        self.config = config
        self.model = model
        self.concurrency = concurrency

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self.config, loader=self._loader, concurrency=self.concurrency)

    def _loader(self, config: ServerConfig, info: dict[str, Any]) -> Callable[[], RunBatch]:
        def load() -> RunBatch:
            # Waits for a replica to be up (with --min-replicas 0, this starts one): /v1/health says ready after it.
            # A replica that cannot load the models leaves the call waiting for ever; Ray Serve marks the deployment
            # unhealthy then, which fails the load as on the plain server (/v1/health says why, jobs fail).
            response = self.model.describe.remote()
            while True:
                try:
                    info.update(response.result(timeout_s=REPLICA_POLL_S))
                    return self._run_batch
                except TimeoutError:
                    if _model_status() in ("UNHEALTHY", "DEPLOY_FAILED"):
                        response.cancel()
                        raise RuntimeError(
                            f"the model replicas could not start: {replica_error() or 'see the Ray Serve logs'}"
                        ) from None

        return load

    def _run_batch(
        self, jobs: Sequence[Job], progress: ProgressFn, should_cancel: Callable[[], bool]
    ) -> list[JobOutput]:
        """One pipeline call on a replica (this runs in a JobQueue worker thread, so it may block)."""
        stream = self.model.options(stream=True).run.remote(list(jobs))
        try:
            for event in stream:
                if event[0] == "done":
                    return event[1]
                progress(*event[1:])
                if should_cancel():
                    stream.cancel()
                    raise Cancelled(f"cancelled after {event[1]} step {event[2]} of {event[3]}")
        except RayTaskError as err:
            # The replica's own exception, so a failed job reads as on the plain server ("ValueError: …").
            raise err.cause from None
        raise RuntimeError("the model replica ended the call without a result")


def _model_deployment() -> Any:
    return serve.status().applications[APP_NAME].deployments["Model"]


def _model_status() -> str | None:
    try:
        status = _model_deployment().status
        return str(getattr(status, "value", status))
    except Exception:  # no status (yet): keep waiting
        return None


def replica_error() -> str | None:
    """The last line of the exception a model replica raised while starting (Ray Serve keeps its traceback)."""
    try:
        message = _model_deployment().message or ""
    except Exception:  # the status is a courtesy: without it the error reads as Ray's
        return None
    lines = [line.strip() for line in message.splitlines()]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b[^:]*: ", line)]
    return errors[-1] if errors else None


def build_app(config: ServerConfig, replicas: ReplicaOptions) -> Any:
    """The application: the ingress bound to the model deployment."""
    model = Model.options(
        ray_actor_options={"num_gpus": replicas.gpus_per_replica, "num_cpus": replicas.cpus_per_replica},
        autoscaling_config={
            "min_replicas": replicas.min_replicas,
            "max_replicas": replicas.max_replicas,
            "target_ongoing_requests": replicas.target_ongoing_requests,
            "downscale_delay_s": replicas.downscale_delay_s,
        },
    ).bind(config)
    return Ingress.bind(config, model, replicas.max_replicas)
