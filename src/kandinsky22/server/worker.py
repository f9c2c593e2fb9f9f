"""The bounded job queue, the worker thread that owns the models, and the encoder threads that write the files.

The HTTP layer (asyncio) only submits, reads, cancels and watches jobs; all model work happens in a single thread,
so the GPU runs one pipeline call at a time and no model is shared between threads. The worker takes the oldest
queued job and, for text2img, the queued jobs that can share its pipeline call (:meth:`Job.batch_key`: same size,
steps, scheduler, guidance, LoRA choice), up to ``max_batch`` images. Each image has its own generator (see
:mod:`kandinsky22.jobs`), so batching never changes an image. A failed batch is retried job by job, so a request that
breaks the model fails alone; the worker goes on either way.

The runner hands back images and their recipes, not files. A small pool of encoder threads writes each image once, in
its job's output format and quality (:func:`kandinsky22.recipe.encode_image`, recipe included), while the worker
already runs the next batch: a 768² PNG takes about 0.2 s of CPU, a quarter of a fast pipeline call, and Pillow
encodes without holding the GIL. Meanwhile the job stays ``running``, at progress stage ``encode`` (its ``stages``
count the images written); it succeeds once all its files exist. An image that cannot be encoded (a recipe too long
for a JPEG's Exif) fails its job alone. Should the encoders fall behind, the worker waits for them before it takes
another batch, so unencoded images never pile up in memory. Finished jobs keep their files in memory until
``result_ttl_s`` after they finish, and at most ``max_results`` finished jobs are kept (the oldest go first).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kandinsky22.jobs import Cancelled, Job, ProgressFn
from kandinsky22.recipe import encode_image
from kandinsky22.server.schemas import Limits

if TYPE_CHECKING:
    import PIL.Image

log = logging.getLogger("kandinsky22.server")

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


@dataclass
class JobOutput:
    """What running one job produced: its images, the recipe of each (:func:`kandinsky22.recipe.make_recipe`, its
    seed included), and the seconds of each stage of the pipeline call(s). The queue encodes the files."""

    images: list[PIL.Image.Image]
    recipes: list[dict[str, Any]]
    timings: dict[str, float]


# run_batch(jobs, progress, should_cancel) -> one JobOutput per job; raises Cancelled when should_cancel() said so.
RunBatch = Callable[[Sequence[Job], ProgressFn, Callable[[], bool]], list[JobOutput]]


class QueueFull(Exception):
    def __init__(self, queued: int, retry_after: int):
        super().__init__(f"the queue is full ({queued} jobs waiting); retry in {retry_after} s")
        self.retry_after = retry_after


class Unavailable(Exception):
    """The server is shutting down, or could not load its models: it takes no more jobs."""


class JobFinished(Exception):
    """Cancelling a job that has already finished."""


@dataclass(eq=False)
class JobRecord:
    id: str
    job: Job
    created_at: float
    # How the result files are encoded (kandinsky22.recipe.encode_image): png, or jpeg/webp at a quality.
    output_format: str = "png"
    quality: int | None = None
    status: str = "queued"
    started_at: float | None = None
    finished_at: float | None = None
    # stage -> [step, total]; filled with the expected totals, corrected by the runner's progress reports.
    stages: dict[str, list[int]] = field(default_factory=dict)
    stage: str | None = None
    batch_size: int | None = None  # images in the pipeline call that ran this job
    # From the end of its pipeline call: its seeds, and seconds per stage ("encode": its images' encoding, summed).
    seeds: list[int] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    # While its images are encoded: each one's file, once made.
    encoded: list[bytes | None] = field(default_factory=list)
    files: list[bytes] | None = None  # once succeeded: its images in output_format
    error: str | None = None
    cancel_requested: bool = False
    version: int = 0
    watchers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = field(default_factory=list)

    @property
    def images(self) -> int:
        return self.job.num_images

    def snapshot(self, queue_position: int | None) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "job": self.job,
            "output_format": self.output_format,
            "queue_position": queue_position,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "stage": self.stage,
            "stages": {name: {"step": s[0], "steps": s[1]} for name, s in self.stages.items()},
            "batch_size": self.batch_size,
            "seeds": self.seeds if self.seeds is not None else [self.job.seed + i for i in range(self.images)],
            "images": len(self.files) if self.files is not None else 0,
            "timings": dict(self.timings),
            "error": self.error,
            "cancel_requested": self.cancel_requested,
            "version": self.version,
        }


class JobQueue:
    """Jobs by id, the FIFO of queued ones, and the worker thread that runs them with ``load()``'s runner.

    ``load`` runs in the worker thread (loading weights can take minutes; the server answers health checks
    meanwhile) and returns the :data:`RunBatch` used for every job. ``concurrency`` worker threads take batches once
    it is loaded: 1 where this process owns the one model; one per model replica under Ray Serve. ``encoders``
    threads encode the images (default: one per worker thread, at least 2, at most one per CPU core).
    """

    def __init__(
        self,
        load: Callable[[], RunBatch],
        limits: Limits,
        clock: Callable[[], float] = time.time,
        concurrency: int = 1,
        encoders: int | None = None,
    ):
        self.limits = limits
        self.state = "loading"
        self.load_error: str | None = None
        self._load = load
        self._clock = clock
        self._cond = threading.Condition()
        self._jobs: OrderedDict[str, JobRecord] = OrderedDict()
        self._queue: list[JobRecord] = []
        self._running: list[list[JobRecord]] = []  # the batches being run, one per busy worker thread
        self._stopping = False
        self.concurrency = concurrency
        self.encoders = encoders or min(max(2, concurrency), os.cpu_count() or 1)
        self._threads: list[threading.Thread] = []
        # The images waiting for an encoder thread (job, index, image, recipe), oldest first, and the running jobs
        # whose images are being encoded.
        self._encodes: deque[tuple[JobRecord, int, PIL.Image.Image, dict[str, Any]]] = deque()
        self._encoding: set[JobRecord] = set()
        # The worker takes no batch while this many images wait for their files (two batches per worker thread):
        # enough that encoding overlaps the next calls, bounded so that slow encoders cannot fill the memory.
        self._max_unencoded = 2 * limits.max_batch * concurrency
        # Seconds per pipeline call (moving average), for Retry-After; and how full the batches were.
        self._batch_seconds = 1.0
        self.batch_sizes: Counter[int] = Counter()
        self.images_done = 0

    # -- lifecycle ---------------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._start_thread(self._work, "kandinsky22-worker")

    def _start_thread(self, target: Callable[..., None], name: str, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Cancel everything, let the running call stop at its next step, drop the images waiting for an encoder, and
        join the threads (an image being encoded takes its fraction of a second)."""
        with self._cond:
            self._stopping = True
            for record in self._queue:
                self._finish(record, "cancelled")
            self._queue.clear()
            for batch in self._running:
                for record in batch:
                    record.cancel_requested = True
            for record in list(self._encoding):
                record.cancel_requested = True
                self._finish(record, "cancelled")
            self._cond.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in list(self._threads):
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    # -- the HTTP side -----------------------------------------------------------------------------------------------

    def submit(self, job: Job, output_format: str = "png", quality: int | None = None) -> dict[str, Any]:
        """Queue a validated job (its seed drawn now, so status shows it), its images to be served in
        ``output_format`` at ``quality`` (as :func:`kandinsky22.recipe.check_quality` returns it); raises
        :class:`QueueFull`."""
        job = job.with_seed()
        with self._cond:
            if self._stopping:
                raise Unavailable(self.load_error or "the server is shutting down")
            if len(self._queue) >= self.limits.max_queue:
                raise QueueFull(len(self._queue), self._retry_after())
            record = JobRecord(
                id=uuid.uuid4().hex,
                job=job,
                created_at=self._clock(),
                output_format=output_format,
                quality=quality,
            )
            record.stages = {
                "prior": [0, job.prior_steps],
                "decoder": [0, job.steps],
                "decode": [0, 1],
                "encode": [0, job.num_images],
            }
            self._jobs[record.id] = record
            self._queue.append(record)
            self._evict()
            self._cond.notify_all()
            return record.snapshot(len(self._queue) - 1)

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self._cond:
            self._evict()
            record = self._jobs.get(job_id)
            return None if record is None else record.snapshot(self._position(record))

    def files(self, job_id: str) -> list[bytes] | None:
        """The job's image files, in its output format; ``None`` before it succeeded or once its results were
        dropped."""
        with self._cond:
            record = self._jobs.get(job_id)
            return None if record is None or record.files is None else list(record.files)

    def cancel(self, job_id: str) -> dict[str, Any] | None:
        """Cancel a queued job now, or a running one at its next step; ``None`` for an unknown id."""
        with self._cond:
            record = self._jobs.get(job_id)
            if record is None:
                return None
            if record.status in TERMINAL:
                raise JobFinished(f"job {job_id} has already {record.status}")
            record.cancel_requested = True
            if record.status == "queued":
                self._queue.remove(record)
                self._finish(record, "cancelled")
                self._queue_changed()
            elif record in self._encoding or any(
                not r.cancel_requested for batch in self._running if record in batch for r in batch
            ):
                # Its images are made and being encoded, or the rest of its batch goes on: its images are dropped.
                self._finish(record, "cancelled")
            else:
                # The pipeline call stops at its next step (should_cancel) and the runner reports it.
                self._touch(record)
            return record.snapshot(self._position(record))

    def watch(self, job_id: str, loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> bool:
        """Set ``event`` (in ``loop``) whenever the job changes; false for an unknown id."""
        with self._cond:
            record = self._jobs.get(job_id)
            if record is None:
                return False
            record.watchers.append((loop, event))
            return True

    def unwatch(self, job_id: str, event: asyncio.Event) -> None:
        with self._cond:
            record = self._jobs.get(job_id)
            if record is not None:
                record.watchers = [w for w in record.watchers if w[1] is not event]

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {
                "queue": {
                    "queued": len(self._queue),
                    # running jobs: in a pipeline call, or (also counted as "encoding") their images being encoded
                    "running": sum(len(batch) for batch in self._running) + len(self._encoding),
                    "encoding": len(self._encoding),
                    "kept": len(self._jobs),
                    "max_queue": self.limits.max_queue,
                },
                "images_generated": self.images_done,
                # images per pipeline call -> how many calls: how well batching works under the current load
                "batch_sizes": dict(sorted(self.batch_sizes.items())),
            }

    # -- bookkeeping (callers hold the lock) -------------------------------------------------------------------------

    def _position(self, record: JobRecord) -> int | None:
        return self._queue.index(record) if record.status == "queued" else None

    def _touch(self, record: JobRecord) -> None:
        record.version += 1
        for loop, event in record.watchers:
            # The watcher's loop may have closed while its stream was ending; nothing is listening then.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(event.set)

    def _queue_changed(self) -> None:
        for record in self._queue:
            self._touch(record)

    def _finish(self, record: JobRecord, status: str, error: str | None = None) -> None:
        record.status = status
        record.error = error
        record.finished_at = self._clock()
        if record in self._encoding:
            # Its images still waiting for an encoder are dropped; one being encoded is thrown away when done.
            self._encoding.discard(record)
            self._encodes = deque(task for task in self._encodes if task[0] is not record)
            record.encoded = []
            self._cond.notify_all()  # a worker may be waiting for fewer unencoded images
        self._touch(record)

    def _unencoded(self) -> int:
        return sum(file is None for record in self._encoding for file in record.encoded)

    def _retry_after(self) -> int:
        running = sum(len(batch) for batch in self._running)
        batches_ahead = len(self._queue) / self.limits.max_batch + running + 1
        return max(1, min(300, math.ceil(batches_ahead * self._batch_seconds / self.concurrency)))

    def _evict(self) -> None:
        now = self._clock()
        finished = [r for r in self._jobs.values() if r.status in TERMINAL]
        expired = [r for r in finished if now - r.finished_at > self.limits.result_ttl_s]
        # _jobs is in submission order, so the oldest finished jobs go first when over the cap.
        over = finished[: max(0, len(finished) - self.limits.max_results)]
        for record in set(expired) | set(over):
            del self._jobs[record.id]

    # -- the worker thread -------------------------------------------------------------------------------------------

    def _work(self) -> None:
        try:
            run_batch = self._load()
        except Exception as err:  # the server keeps answering, reporting why it cannot generate
            log.exception("loading the models failed")
            with self._cond:
                self.state = "error"
                self.load_error = f"{type(err).__name__}: {err}"
                self._stopping = True
                for record in self._queue:
                    self._finish(record, "failed", f"the server could not load its models: {self.load_error}")
                self._queue.clear()
            return
        with self._cond:
            self.state = "ready"
            if self._stopping:  # stopped while loading: stop() joins the threads it saw
                return
            for _ in range(self.concurrency - 1):
                self._start_thread(self._serve, "kandinsky22-worker", run_batch)
            for _ in range(self.encoders):
                self._start_thread(self._encode_images, "kandinsky22-encode")
        self._serve(run_batch)

    def _serve(self, run_batch: RunBatch) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(run_batch, batch)

    def _next_batch(self) -> list[JobRecord] | None:
        with self._cond:
            held = False
            while not self._stopping and (not self._queue or self._unencoded() >= self._max_unencoded):
                if self._queue and not held:
                    held = True
                    log.info(
                        "%d images wait for the encoders; the next pipeline call waits for them", self._unencoded()
                    )
                self._cond.wait()
            if self._stopping:
                return None
            head = self._queue[0]
            batch = [head]
            if head.job.task == "text2img":
                key, images = head.job.batch_key(), head.images
                for record in self._queue[1:]:
                    if images + record.images > self.limits.max_batch:
                        continue
                    if record.job.task == "text2img" and record.job.batch_key() == key:
                        batch.append(record)
                        images += record.images
            now = self._clock()
            images = sum(record.images for record in batch)
            for record in batch:
                self._queue.remove(record)
                record.status = "running"
                record.started_at = now
                record.batch_size = images
                self._touch(record)
            self._running.append(batch)
            self._queue_changed()
            return batch

    def _run(self, run_batch: RunBatch, batch: list[JobRecord]) -> None:
        def progress(stage: str, step: int, total: int) -> None:
            with self._cond:
                for record in batch:
                    if record.status in TERMINAL:
                        continue
                    record.stage = stage
                    record.stages[stage] = [step, total]
                    self._touch(record)

        def should_cancel() -> bool:
            with self._cond:
                return all(record.cancel_requested for record in batch)

        started = time.perf_counter()
        try:
            outputs = run_batch([record.job for record in batch], progress, should_cancel)
        except Cancelled:
            with self._cond:
                for record in batch:
                    if record.status not in TERMINAL:
                        self._finish(record, "cancelled")
                self._running.remove(batch)
            return
        except Exception as err:
            if len(batch) > 1:
                log.warning("a batch of %d jobs failed (%s); running them one by one", len(batch), err)
                with self._cond:
                    self._running.remove(batch)
                for record in batch:
                    with self._cond:
                        if record.status in TERMINAL:
                            continue
                        record.batch_size = record.images
                        self._running.append([record])
                    self._run(run_batch, [record])
                return
            log.exception("job %s failed", batch[0].id)
            with self._cond:
                self._finish(batch[0], "failed", f"{type(err).__name__}: {err}")
                self._running.remove(batch)
            return
        seconds = time.perf_counter() - started
        with self._cond:
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
            self.batch_sizes[sum(record.images for record in batch)] += 1
            self._running.remove(batch)
            for record, output in zip(batch, outputs):
                if record.status in TERMINAL:
                    continue
                if record.cancel_requested:
                    self._finish(record, "cancelled")
                    continue
                # The encoder threads write its files; this thread goes on to the next batch.
                record.seeds = [recipe["seed"] for recipe in output.recipes]
                record.timings = dict(output.timings)
                record.encoded = [None] * len(output.images)
                record.stage = "encode"
                record.stages["encode"] = [0, len(output.images)]
                self._encoding.add(record)
                self._encodes.extend((record, i, *made) for i, made in enumerate(zip(output.images, output.recipes)))
                self._touch(record)
            self._cond.notify_all()
            self._evict()

    # -- the encoder threads -----------------------------------------------------------------------------------------

    def _encode_images(self) -> None:
        """Encode the images the workers hand over, oldest first, each in its job's format, until the queue stops."""
        while True:
            with self._cond:
                while not self._encodes and not self._stopping:
                    self._cond.wait()
                if not self._encodes:
                    return
                record, index, image, recipe = self._encodes.popleft()
            started = time.perf_counter()
            try:
                file, error = encode_image(image, recipe, record.output_format, record.quality), None
            except Exception as err:  # fails this job; raised, it would end this thread and strand the others' images
                log.warning("job %s: its images could not be encoded as %s: %s", record.id, record.output_format, err)
                file, error = None, f"{type(err).__name__}: {err}"
            seconds = time.perf_counter() - started
            with self._cond:
                self._encoded(record, index, file, error, seconds)
            del record, image, recipe, file  # an idle encoder thread keeps no image alive

    def _encoded(self, record: JobRecord, index: int, file: bytes | None, error: str | None, seconds: float) -> None:
        if record.status in TERMINAL:  # cancelled, or failed by another of its images, meanwhile: the file is dropped
            return
        if file is None:
            self._finish(record, "failed", error)
            self._evict()
            return
        record.encoded[index] = file
        record.timings["encode"] = record.timings.get("encode", 0.0) + seconds
        done = sum(f is not None for f in record.encoded)
        record.stages["encode"] = [done, len(record.encoded)]
        if done < len(record.encoded):
            self._touch(record)
            self._cond.notify_all()  # a worker may be waiting for fewer unencoded images
            return
        record.files = list(record.encoded)
        self.images_done += len(record.files)
        self._finish(record, "succeeded")
        self._evict()
