"""The HTTP API (FastAPI) and the web page, in front of one :class:`~kandinsky22.server.worker.JobQueue`.

Routes: ``POST /v1/images/generations`` (OpenAI-compatible, waits for the images), the job API (``POST /v1/jobs``,
``GET``/``DELETE /v1/jobs/{id}``, ``/events`` as server-sent events, ``/images/{k}.png``, ``.jpg`` or ``.webp`` as
the job's ``output_format``), ``GET /v1/health``, ``GET /v1/models``, FastAPI's ``/openapi.json`` and ``/docs``, and
the page at ``/``.

Errors are OpenAI-shaped: ``{"error": {"message", "type", "param", "code"}}``. With an API key every route but
``/v1/health`` needs it, as ``Authorization: Bearer KEY``, ``X-API-Key: KEY`` or HTTP Basic with KEY as the password
(the last lets a browser open the page: it asks once and sends it with every request of the page).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import hmac
import html
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kandinsky22 import __version__
from kandinsky22.jobs import (
    DEFAULT_SIZE,
    DEFAULT_STRENGTH,
    MAX_MASK_BLUR,
    PRIOR_REPO,
    SCHEDULER_CONFIG,
    SCHEDULERS,
    SIGMA_SPACINGS,
    SPACED_SAMPLERS,
    IncompatibleJob,
    Job,
    ProgressFn,
    check_steps,
    decoder_config,
)
from kandinsky22.lora_specs import LoraSpec
from kandinsky22.recipe import EXTENSIONS, FORMAT_NAMES, MEDIA_TYPES, SUFFIX_FORMATS
from kandinsky22.server.schemas import (
    LORAS_USAGE,
    ImageGenerationRequest,
    JobRequest,
    Limits,
    RequestError,
    generation_to_job,
    job_request_to_job,
    output_encoding,
    parse_job_request,
    served_loras,
)
from kandinsky22.server.worker import TERMINAL, JobFinished, JobOutput, JobQueue, QueueFull, RunBatch, Unavailable

log = logging.getLogger("kandinsky22.server")

HEALTH_PATH = "/v1/health"
# Server-sent event streams send a comment this often, so proxies and clients do not drop an idle connection.
KEEPALIVE_S = 15.0
# How often a waiting /v1/images/generations call checks that its client is still there (it cancels the job if not).
DISCONNECT_POLL_S = 1.0
# Multipart fields that may be uploaded files.
IMAGE_FIELDS = ("image", "mask_image", "hint_image")
# Where the page's LoRA weight inputs go (static/index.html)
LORA_INPUTS = "<!-- lora weights -->"


@dataclass
class ServerConfig:
    """Models, device and limits of one server; ``decoders`` maps each served task to its decoder id or folder."""

    prior: str = PRIOR_REPO
    decoders: dict[str, str] = field(default_factory=dict)
    # merged into the UNets and the prior as they load (kandinsky22.lora_specs), at these weights unless a request
    # chooses others among them (its "loras")
    loras: list[LoraSpec] = field(default_factory=list)
    device: str = "auto"
    dtype: str = "auto"
    # None: the pipelines' fast path (enable_fast_path) where the device is CUDA, the device it is made for.
    fast: bool | None = None
    # (width, height) compiled at start-up on the fast path, each for 1 and max_batch images per call (max_batch only
    # when batch_invariant). Other sizes and batch sizes run eagerly rather than stall the queue while compiling.
    warm_up: list[tuple[int, int]] = field(default_factory=lambda: [(512, 512)])
    compile_backend: str = "inductor"  # torch.compile's backend for the fast path ("eager"/"aot_eager": trace only)
    # what the fast path compiles: "auto" ("none" where the Triton norms run on CUDA, else "blocks"), "blocks",
    # "model" or "none" (CUDA graphs and Triton norms only)
    compile_scope: str = "auto"
    # torch.compile's cache folder in the process that loads the models (this one, or each Ray Serve replica); None:
    # torch's default. See kandinsky22.fast.use_compile_cache.
    compile_cache: str | None = None
    api_key: str | None = None
    # Pad every pipeline call to max_batch images, so an image is bit-identical whatever it was batched with.
    batch_invariant: bool = False
    limits: Limits = field(default_factory=Limits)

    @property
    def tasks(self) -> list[str]:
        return list(self.decoders)


# ----------------------------------------------------------------------------------------------------------------------
# Running jobs with the Engine
# ----------------------------------------------------------------------------------------------------------------------


def engine_loader(config: ServerConfig, info: dict[str, Any]) -> Callable[[], RunBatch]:
    """A ``load()`` for the :class:`JobQueue`: builds the Engine, loads every served model, returns the runner.

    ``info`` receives the device, dtype, whether the fast path is on and the LoRAs applied (as recipes record them:
    source, weight, SHA-256 of the file read), for ``/v1/models``.
    """

    def load() -> RunBatch:
        from kandinsky22.jobs import Engine, resolve_device
        from kandinsky22.recipe import make_recipe

        started = time.perf_counter()
        fast = resolve_device(config.device).type == "cuda" if config.fast is None else config.fast
        if fast and config.compile_cache is not None:
            from kandinsky22.fast import use_compile_cache

            use_compile_cache(config.compile_cache)
        max_batch = config.limits.max_batch
        batches = [max_batch] if config.batch_invariant else sorted({1, max_batch})
        engine = Engine(
            device=config.device,
            dtype=config.dtype,
            fast=fast,
            max_decoders=len(set(config.decoders.values())),
            warm_up=[(height, width, n) for width, height in config.warm_up for n in batches],
            compile_new_shapes=False,
            compile_backend=config.compile_backend,
            compile_scope=config.compile_scope,
            on_load=lambda role, model: log.info("loading the %s %s", role, model),
            loras=config.loras,
        )
        for lora in engine.load_loras():
            log.info("LoRA %s, weight %g (file SHA-256 %s)", lora["source"], lora["weight"], lora["sha256"])
        # Load every repository now: the first request of a task must not stall everyone queued behind it for a load.
        # (Other tasks of a loaded repository only wrap its modules in another pipeline class, which is cheap.)
        engine.prior_pipeline(config.prior)
        first_task = {decoder: task for task, decoder in reversed(config.decoders.items())}
        for decoder, task in first_task.items():
            engine.decoder_pipeline(Job(task=task, decoder=decoder))
        warmed = [f"{width}x{height}" for width, height in config.warm_up] if engine.fast_applied else []
        info.update(device=engine.device_name, dtype=engine.dtype_name, fast=engine.fast_applied, warm_up=warmed)
        info.update(loras=[{**lora.record(), "adapts": sorted(lora.lora.parts)} for lora in engine.loras.load()])
        if engine.fast_applied:
            log.info(
                "fast path: %s compiled for %s images per call in %.1f s (compile cache: %s); other sizes run eagerly",
                ", ".join(warmed) or "no size",
                " and ".join(map(str, batches)),
                engine.warm_up_seconds,
                os.environ.get("TORCHINDUCTOR_CACHE_DIR", "torch's default"),
            )
        log.info(
            "models loaded in %.1f s on %s (%s); ready", time.perf_counter() - started, info["device"], info["dtype"]
        )

        def run_batch(jobs: Sequence[Job], progress: ProgressFn, should_cancel: Callable[[], bool]) -> list[JobOutput]:
            singles = [single for job in jobs for single in job.expand()]
            results = []
            call_of = []  # index of the pipeline call that made each image
            call_timings = []
            # A job asking for more images than max_batch runs in several calls: max_batch bounds a call's memory.
            for start in range(0, len(singles), max_batch):
                chunk = singles[start : start + max_batch]
                # Batch-invariant mode: every call has max_batch images (copies of the first, thrown away), because
                # matmul kernels choose their summation order by batch size: the last bits would follow the batch.
                padding = [chunk[0]] * (max_batch - len(chunk)) if config.batch_invariant else []
                made = engine.run(chunk + padding, progress=progress, cancel=should_cancel)[: len(chunk)]
                results += made
                call_of += [len(call_timings)] * len(made)
                call_timings.append(made[0].timings)
            outputs = []
            for job in jobs:
                mine, calls = results[: job.num_images], sorted(set(call_of[: job.num_images]))
                results, call_of = results[job.num_images :], call_of[job.num_images :]
                timings: dict[str, float] = {}
                for call in calls:
                    for stage, seconds in call_timings[call].items():
                        timings[stage] = timings.get(stage, 0.0) + seconds
                # the LoRAs each image was made with: the job's choice, not the server's defaults
                recipes = [make_recipe(r.job, engine.device_name, engine.dtype_name, r.loras) for r in mine]
                # Images, not files: the queue's encoder threads write them in the job's format, off this thread.
                outputs.append(JobOutput(images=[r.image for r in mine], recipes=recipes, timings=timings))
            return outputs

        return run_batch

    return load


# ----------------------------------------------------------------------------------------------------------------------
# Errors, authentication, body size
# ----------------------------------------------------------------------------------------------------------------------


def error_response(
    status: int, message: str, error_type: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": error_type, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


class ApiKeyMiddleware:
    """Every route but health needs the key; checked before the body is read, in constant time."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode()

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        given = headers.get(b"x-api-key")
        auth = headers.get(b"authorization", b"")
        scheme, _, value = auth.partition(b" ")
        if scheme.lower() == b"bearer":
            given = value.strip()
        elif scheme.lower() == b"basic":
            try:
                given = base64.b64decode(value.strip(), validate=True).partition(b":")[2]
            except (binascii.Error, ValueError):
                return False
        return given is not None and hmac.compare_digest(given, self.key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == HEALTH_PATH or self._authorized(dict(scope["headers"])):
            await self.app(scope, receive, send)
            return
        response = error_response(
            401,
            "a valid API key is required: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
            "authentication_error",
            # Lets a browser that opens the page ask for the key (as the password) and then send it by itself.
            headers={"WWW-Authenticate": 'Basic realm="kandinsky22", charset="UTF-8"'},
        )
        await response(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """413 for a body over ``limit`` bytes: at once from Content-Length, else while a chunked body streams in."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    def _too_large(self) -> JSONResponse:
        return error_response(413, f"the request body is larger than {self.limit} bytes", "invalid_request_error")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._too_large()(scope, receive, send)
            return
        received = 0
        more_body = True
        started = False

        async def counted_receive() -> Message:
            nonlocal received, more_body
            message = await receive()
            received += len(message.get("body", b""))
            more_body = message.get("more_body", False)
            if received > self.limit:
                raise _BodyTooLarge
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _BodyTooLarge:
            if started:
                raise
            # Read (and drop) what the client is still sending, up to another `limit`: closing a connection with
            # unread data resets it, and the client would lose this answer. A client sending more is cut off.
            drained = 0
            while more_body and drained <= self.limit:
                message = await receive()
                drained += len(message.get("body", b""))
                more_body = message.get("more_body", False)
            await self._too_large()(scope, receive, send)


# ----------------------------------------------------------------------------------------------------------------------
# JSON views of jobs
# ----------------------------------------------------------------------------------------------------------------------


def image_url(base_url: str, job_id: str, index: int, output_format: str) -> str:
    return f"{base_url}/v1/jobs/{job_id}/images/{index}{EXTENSIONS[output_format]}"


def job_view(snapshot: dict[str, Any], base_url: str) -> dict[str, Any]:
    job: Job = snapshot["job"]
    url = f"{base_url}/v1/jobs/{snapshot['id']}"
    output_format = snapshot["output_format"]
    seeds = snapshot["seeds"]
    timings = {f"{stage}_s": round(seconds, 4) for stage, seconds in snapshot["timings"].items()}
    if snapshot["started_at"] is not None:
        timings["queue_s"] = round(snapshot["started_at"] - snapshot["created_at"], 4)
    if snapshot["finished_at"] is not None:
        timings["total_s"] = round(snapshot["finished_at"] - snapshot["created_at"], 4)
    return {
        "id": snapshot["id"],
        "object": "job",
        "status": snapshot["status"],
        "task": job.task,
        "prompt": job.prompt,
        "negative_prompt": job.negative,
        "n": job.num_images,
        "width": job.width,
        "height": job.height,
        "steps": job.steps,
        "prior_steps": job.prior_steps,
        "guidance_scale": job.guidance,
        "prior_guidance_scale": job.prior_guidance,
        "scheduler": job.scheduler,
        "sigmas": job.sigmas,
        "strength": job.strength,
        "keep_unmasked": job.keep_unmasked,
        "mask_blur": job.mask_blur,
        "loras": None if job.loras is None else [{"source": s.source, "weight": s.weight} for s in job.loras],
        "output_format": output_format,
        "seeds": seeds,
        "queue_position": snapshot["queue_position"],
        "progress": {"stage": snapshot["stage"], "stages": snapshot["stages"]},
        "batch_size": snapshot["batch_size"],
        "created_at": snapshot["created_at"],
        "started_at": snapshot["started_at"],
        "finished_at": snapshot["finished_at"],
        "timings": timings,
        "cancel_requested": snapshot["cancel_requested"],
        "images": [
            {"index": k, "seed": seeds[k], "url": image_url(base_url, snapshot["id"], k, output_format)}
            for k in range(snapshot["images"])
        ],
        "events_url": f"{url}/events",
        "error": None if snapshot["error"] is None else {"message": snapshot["error"], "type": "server_error"},
    }


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


# ----------------------------------------------------------------------------------------------------------------------
# The application
# ----------------------------------------------------------------------------------------------------------------------


def _job_request_schema() -> dict[str, Any]:
    """OpenAPI for ``POST /v1/jobs``, whose body is read by hand to take JSON or multipart."""
    schema = {"$ref": "#/components/schemas/JobRequest"}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": schema},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "description": "The JobRequest fields; image, mask_image, hint_image and items may be files.",
                    }
                },
            },
        }
    }


def create_app(
    config: ServerConfig,
    *,
    loader: Callable[[ServerConfig, dict[str, Any]], Callable[[], RunBatch]] = engine_loader,
    concurrency: int = 1,
) -> FastAPI:
    """The application; its worker thread starts (and loads the models) when the server starts.

    ``loader`` and ``concurrency`` let Ray Serve (:mod:`kandinsky22.scale.serve_app`) run the pipeline calls on model
    replicas, several at once, behind these same routes.
    """
    limits = config.limits
    info: dict[str, Any] = {
        "device": None,
        "dtype": None,
        "fast": None,
        "warm_up": None,
        "batch_invariant": config.batch_invariant,
        # source and weight until the models have loaded; then also the SHA-256 of each file read and the models it
        # adapts ("unet", "prior")
        "loras": [{"source": lora.source, "weight": lora.weight, "sha256": None} for lora in config.loras],
    }
    queue = JobQueue(loader(config, info), limits, concurrency=concurrency)
    started_at = time.time()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        queue.start()
        yield
        queue.stop(timeout=30)

    app = FastAPI(
        title="kandinsky22",
        version=__version__,
        summary="Kandinsky 2.2 image generation: an OpenAI-compatible endpoint, a job API and a web page.",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimitMiddleware, limit=limits.max_body_bytes)
    if config.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=config.api_key)
    app.mount("/static", StaticFiles(packages=[("kandinsky22.server", "static")]), name="static")
    _register_errors(app)
    _add_job_request_schema(app)
    page_html = _page_html(config.loras)

    def configured(job: Job) -> Job:
        decoder = config.decoders.get(job.task)
        if decoder is None:
            raise RequestError(
                f"task {job.task!r} is not served here; this server runs {', '.join(config.tasks)}", param="task"
            )
        loras = served_loras(job.loras, config.loras)
        job = dataclasses.replace(job, prior=config.prior, decoder=decoder, loras=loras).resolved(
            max_side=limits.max_side
        )
        # A step count the decoder's sampler cannot take, from its scheduler config (a folder, or a hub repository in
        # the cache, where the loaded models are): refused here, not as a failed job. (Without the config, the run
        # refuses it before the prior runs.)
        scheduler_config = decoder_config(decoder, SCHEDULER_CONFIG)
        if scheduler_config is not None:
            try:
                check_steps(job, scheduler_config)
            except IncompatibleJob as err:
                raise RequestError(str(err), param="steps") from None
        # A side not given comes from the other and the input image's aspect: it must respect --max-side as a given
        # one does (with neither given, resolved() keeps the default size within it).
        for name in ("width", "height"):
            if getattr(job, name) > limits.max_side:
                raise RequestError(
                    f"{name} would be {getattr(job, name)} (from the input image or the default); this server makes "
                    f"at most {limits.max_side} pixels a side: give width and height",
                    param=name,
                )
        return job

    async def changes(job_id: str, idle_s: float) -> AsyncIterator[dict[str, Any] | None]:
        """The job's snapshot now, after every change and every ``idle_s`` without one, until it finishes.

        Ends after a finished snapshot, or with ``None`` when the job is unknown or its results expired.
        """
        changed = asyncio.Event()
        if not queue.watch(job_id, asyncio.get_running_loop(), changed):
            yield None
            return
        try:
            while True:
                snapshot = queue.get(job_id)
                yield snapshot
                if snapshot is None or snapshot["status"] in TERMINAL:
                    return
                # A change between get() and here has set the event, so this returns at once; none is missed.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(changed.wait(), idle_s)
                changed.clear()
        finally:
            queue.unwatch(job_id, changed)

    # -- page and service ------------------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(page_html)

    @app.get(HEALTH_PATH, summary="Liveness and readiness (no API key needed)")
    def health() -> JSONResponse:
        body = {
            "status": {"ready": "ok"}.get(queue.state, queue.state),
            "error": queue.load_error,
            "version": __version__,
            "uptime_s": round(time.time() - started_at, 1),
            **queue.stats(),
        }
        return JSONResponse(body, status_code=200 if queue.state == "ready" else 503)

    @app.get("/v1/models", summary="Loaded models, tasks, schedulers, defaults and limits")
    def models() -> dict[str, Any]:
        data = [{"id": config.prior, "object": "model", "owned_by": "kandinsky22", "role": "prior"}]
        by_decoder: dict[str, list[str]] = {}
        for task, decoder in config.decoders.items():
            by_decoder.setdefault(decoder, []).append(task)
        for decoder, tasks in by_decoder.items():
            data.append(
                {"id": decoder, "object": "model", "owned_by": "kandinsky22", "role": "decoder", "tasks": tasks}
            )
        defaults = Job()
        return {
            "object": "list",
            "data": data,
            "state": queue.state,
            "tasks": config.tasks,
            "schedulers": list(SCHEDULERS),
            "sigmas": {"spacings": list(SIGMA_SPACINGS), "samplers": list(SPACED_SAMPLERS)},
            "defaults": {
                "width": min(DEFAULT_SIZE, limits.max_side),
                "height": min(DEFAULT_SIZE, limits.max_side),
                "steps": defaults.steps,
                "prior_steps": defaults.prior_steps,
                "guidance_scale": defaults.guidance,
                "prior_guidance_scale": defaults.prior_guidance,
                "scheduler": defaults.scheduler,
                # by task: img2img's, and depth's with an image
                "strength": dict(DEFAULT_STRENGTH),
            },
            "limits": {**limits.as_dict(), "size_multiple": 1, "max_mask_blur": MAX_MASK_BLUR},
            **info,
            **({"loras_per_request": LORAS_USAGE} if config.loras else {}),
        }

    # -- OpenAI-compatible -----------------------------------------------------------------------------------------

    @app.post("/v1/images/generations", summary="OpenAI-compatible text to image (waits for the images)")
    async def generations(body: ImageGenerationRequest, request: Request) -> JSONResponse:
        output_format, quality = output_encoding(body)
        job_id = queue.submit(configured(generation_to_job(body, limits)), output_format, quality)["id"]
        final = None
        async with contextlib.aclosing(changes(job_id, DISCONNECT_POLL_S)) as updates:
            async for final in updates:
                if final is not None and final["status"] not in TERMINAL and await request.is_disconnected():
                    # Nobody will read the images: give the worker to the next request.
                    with contextlib.suppress(JobFinished):
                        queue.cancel(job_id)
                    return error_response(499, "the client went away", "cancelled")
        headers = {"X-Job-Id": job_id}
        files = queue.files(job_id)  # now: results are dropped after their TTL or beyond --max-results
        if final is None or (final["status"] == "succeeded" and files is None):
            message = "the results were dropped before they could be sent (raise --max-results)"
            return error_response(500, message, "server_error", headers=headers)
        if final["status"] == "cancelled":
            return error_response(503, "the job was cancelled", "cancelled", headers=headers)
        if final["status"] == "failed":
            return error_response(500, final["error"], "server_error", headers=headers)
        data = []
        base = _base_url(request)
        for k, seed in enumerate(final["seeds"]):
            item: dict[str, Any] = {"revised_prompt": None, "seed": seed}
            if body.response_format == "url":
                item["url"] = image_url(base, job_id, k, output_format)
            else:
                item["b64_json"] = base64.b64encode(files[k]).decode()
            data.append(item)
        return JSONResponse({"created": int(final["created_at"]), "data": data}, headers=headers)

    # -- job API ---------------------------------------------------------------------------------------------------

    @app.post(
        "/v1/jobs",
        status_code=202,
        summary="Queue a job (text2img, img2img, inpaint, mix, depth); JSON or multipart",
        openapi_extra=_job_request_schema(),
    )
    async def create_job(request: Request) -> JSONResponse:
        content_type = request.headers.get("content-type", "")
        files: dict[str, Any] = {}
        if content_type.startswith("multipart/form-data"):
            fields, files = await _read_form(request)
        else:
            try:
                fields = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise RequestError(f"the body is not valid JSON ({err})") from err
            if not isinstance(fields, dict):
                raise RequestError("the body must be a JSON object")
        job_request = parse_job_request(fields)
        output_format, quality = output_encoding(job_request)
        job = configured(job_request_to_job(job_request, limits, files))
        snapshot = queue.submit(job, output_format, quality)
        view = job_view(snapshot, _base_url(request))
        return JSONResponse(view, status_code=202, headers={"Location": f"/v1/jobs/{view['id']}"})

    def _found(job_id: str, snapshot: dict[str, Any] | None) -> dict[str, Any]:
        if snapshot is None:
            raise RequestError(
                f"no job {job_id!r} (unknown, or its results expired)", status=404, error_type="not_found"
            )
        return snapshot

    @app.get("/v1/jobs/{job_id}", summary="A job's status, progress, timings and result URLs")
    def get_job(job_id: str, request: Request) -> dict[str, Any]:
        return job_view(_found(job_id, queue.get(job_id)), _base_url(request))

    @app.delete("/v1/jobs/{job_id}", status_code=202, summary="Cancel a job (a running one stops at its next step)")
    def cancel_job(job_id: str, request: Request) -> JSONResponse:
        try:
            snapshot = _found(job_id, queue.cancel(job_id))
        except JobFinished as err:
            raise RequestError(str(err), status=409, error_type="conflict") from err
        return JSONResponse(job_view(snapshot, _base_url(request)), status_code=202)

    @app.get("/v1/jobs/{job_id}/events", summary="Server-sent events: the job's status on every change")
    async def job_events(job_id: str, request: Request) -> StreamingResponse:
        _found(job_id, queue.get(job_id))
        base = _base_url(request)

        async def stream() -> AsyncIterator[str]:
            last = None
            async with contextlib.aclosing(changes(job_id, KEEPALIVE_S)) as updates:
                async for snapshot in updates:
                    if snapshot is None:
                        return
                    if snapshot["version"] == last:
                        yield ": keep-alive\n\n"
                        continue
                    last = snapshot["version"]
                    yield f"id: {last}\ndata: {json.dumps(job_view(snapshot, base))}\n\n"

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    @app.get(
        "/v1/jobs/{job_id}/images/{index}.{extension}",
        summary="One result image in the job's output_format (png, jpg or webp), carrying its recipe (PNG: a "
        "'kandinsky22' text chunk; JPEG and WebP: the Exif UserComment)",
        response_class=Response,
        responses={200: {"content": {media_type: {} for media_type in MEDIA_TYPES.values()}}},
    )
    def job_image(job_id: str, index: int, extension: str) -> Response:
        snapshot = _found(job_id, queue.get(job_id))
        files = queue.files(job_id) or []
        if not 0 <= index < len(files):
            raise RequestError(
                f"job {job_id} has no image {index} (status {snapshot['status']}, {snapshot['images']} image(s))",
                status=404,
                error_type="not_found",
            )
        # The extension must name the stored format (.jpeg too for a JPEG): a .png URL that served JPEG bytes would
        # mislead whatever saves it by its name.
        output_format = snapshot["output_format"]
        if SUFFIX_FORMATS.get(f".{extension.lower()}") != output_format:
            url = image_url("", job_id, index, output_format)
            raise RequestError(
                f"job {job_id}'s images are {FORMAT_NAMES[output_format]}: its image {index} is at {url}",
                status=404,
                error_type="not_found",
            )
        return Response(
            files[index], media_type=MEDIA_TYPES[output_format], headers={"Cache-Control": "private, max-age=3600"}
        )

    return app


def _page_html(loras: Sequence[LoraSpec]) -> str:
    """The page, with a weight input for each of the server's LoRAs (prefilled with its own weight; the page sends
    them as the request's ``loras``), none without any."""
    page = resources.files("kandinsky22.server").joinpath("static/index.html").read_text()
    if not loras:
        return page.replace(LORA_INPUTS, "")
    inputs = []
    for k, lora in enumerate(loras):
        source = html.escape(lora.source, quote=True)
        name = html.escape(lora.source.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or lora.source)
        inputs.append(
            # any step, and no bounds: a start-up weight of any precision (or past a request's range, which the
            # server's answer then explains) is sent as it is
            f'<div><label for="lora-{k}" title="{source}">{name}</label><input id="lora-{k}" class="lora" '
            f'type="number" step="any" value="{float(lora.weight)!r}" data-source="{source}" required></div>'
        )
    fieldset = f'<fieldset id="loras"><legend>LoRA weights</legend><div class="row">{"".join(inputs)}</div></fieldset>'
    return page.replace(LORA_INPUTS, fieldset)


async def _read_form(request: Request) -> tuple[dict[str, Any], dict[str, Any]]:
    """Multipart fields → (JobRequest fields, uploaded files by name); list fields may repeat."""
    try:
        form = await request.form()
    except StarletteHTTPException as err:
        raise RequestError(f"the multipart body could not be read ({err.detail})") from err
    fields: dict[str, Any] = {}
    files: dict[str, Any] = {}
    for name in form:
        values = form.getlist(name)
        if name == "items":
            files["items"] = [await v.read() if isinstance(v, UploadFile) else v for v in values]
        elif name == "weights":
            fields["weights"] = values
        elif name == "loras" and not isinstance(values[-1], UploadFile):  # JSON text: [{"source": …, "weight": …}]
            try:
                fields["loras"] = json.loads(values[-1])
            except json.JSONDecodeError as err:
                raise RequestError(f"loras is not valid JSON ({err})", "loras") from err
        elif isinstance(values[-1], UploadFile):
            if name not in IMAGE_FIELDS:
                raise RequestError(f"{name} cannot be a file; files are accepted for {', '.join(IMAGE_FIELDS)}", name)
            files[name] = await values[-1].read()
        else:
            fields[name] = values[-1]
    return fields, files


def _add_job_request_schema(app: FastAPI) -> None:
    """Put JobRequest (and what it refers to) into the OpenAPI components that ``POST /v1/jobs`` points at."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        schema = generate()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        if "JobRequest" not in components:
            job_schema = JobRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(job_schema.pop("$defs", {}))
            components["JobRequest"] = job_schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _register_errors(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError) -> JSONResponse:
        return error_response(err.status, str(err), err.error_type, err.param)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, err: QueueFull) -> JSONResponse:
        return error_response(429, str(err), "rate_limit_error", headers={"Retry-After": str(err.retry_after)})

    @app.exception_handler(Unavailable)
    async def unavailable(request: Request, err: Unavailable) -> JSONResponse:
        return error_response(503, f"the server takes no jobs now: {err}", "server_error")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        if first.get("type") == "json_invalid":  # its loc is a character offset, not a field
            message = f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'invalid JSON')})"
            return error_response(400, message, "invalid_request_error")
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = loc[0] if loc else None
        where = ".".join(loc) if loc else "body"
        return error_response(400, f"{where}: {first.get('msg', 'invalid value')}", "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        error_type = {404: "not_found", 405: "invalid_request_error"}.get(err.status_code, "invalid_request_error")
        return error_response(err.status_code, str(err.detail), error_type, headers=err.headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, f"internal error: {type(err).__name__}", "server_error")
