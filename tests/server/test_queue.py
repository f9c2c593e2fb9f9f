"""The job queue and worker thread, with a stand-in runner whose steps the test releases (no model, no HTTP).

Every interleaving here is chosen by the test through events, so nothing depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import numpy as np
import PIL.Image
import pytest

from kandinsky22.jobs import Cancelled, Job
from kandinsky22.recipe import encode_image, make_recipe, read_recipe
from kandinsky22.server.schemas import Limits
from kandinsky22.server.worker import TERMINAL, JobFinished, JobOutput, JobQueue, QueueFull, Unavailable

TIMEOUT = 20.0


class _Gate:
    """What a test lets through: one turn per :meth:`step` call, or every turn after :meth:`release` (``free``: from
    the start). ``calls`` records what came."""

    def __init__(self, free: bool = False) -> None:
        self.calls: list = []
        self._cond = threading.Condition()
        self._tokens = 0
        self._free = free

    def step(self) -> None:
        with self._cond:
            self._tokens += 1
            self._cond.notify_all()

    def release(self) -> None:
        with self._cond:
            self._free = True
            self._cond.notify_all()

    def _wait_turn(self) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self._free or self._tokens > 0, TIMEOUT)
            if not self._free:
                self._tokens -= 1

    def _record(self, call) -> None:
        with self._cond:
            self.calls.append(call)
            self._cond.notify_all()

    def wait_calls(self, n: int) -> None:
        """Until ``n`` calls have started."""
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.calls) >= n, TIMEOUT)


class GatedRunner(_Gate):
    """Runs a batch in two 'steps'. A batch holding a job with prompt 'hold' takes each step only when the test
    allows it: one step per :meth:`step` call, or all of them after :meth:`release`. ``calls``: each batch's prompts."""

    def __init__(self) -> None:
        super().__init__()
        self.running = threading.Event()

    def wait_for(self, predicate) -> None:
        """Until ``predicate()`` holds, checked whenever a call starts or :meth:`notify` is called."""
        with self._cond:
            assert self._cond.wait_for(predicate, TIMEOUT)

    def notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def __call__(self, jobs, progress, should_cancel):
        prompts = [job.prompt for job in jobs]
        self._record(prompts)
        self.running.set()
        for step in (1, 2):
            if "hold" in prompts:
                self._wait_turn()
            if should_cancel():
                raise Cancelled
            progress("decoder", step, 2)
        if "boom" in prompts:
            raise RuntimeError("the model broke")
        return [
            JobOutput(
                images=[PIL.Image.new("RGB", (8, 8), (single.seed % 256, 0, 0)) for single in job.expand()],
                recipes=[make_recipe(single, "cpu", "fp32") for single in job.expand()],
                timings={"decoder": 0.0},
            )
            for job in jobs
        ]


def made(files: list[bytes]) -> list[str]:
    """``prompt:seed`` of each file, from its recipe."""
    return [f"{recipe['prompt']}:{recipe['seed']}" for recipe in map(read_recipe, files)]


def make_job(prompt: str, **fields) -> Job:
    fields = {"width": 64, "height": 64, "steps": 2, "prior_steps": 2, "seed": 7, **fields}
    return Job(prompt=prompt, **fields).validate()


def wait_status(queue: JobQueue, job_id: str, statuses: set[str]) -> dict:
    """Block until the job reaches one of ``statuses``, woken by the queue's own change notifications."""
    return wait_until(queue, job_id, lambda snapshot: snapshot["status"] in statuses)


def wait_until(queue: JobQueue, job_id: str, predicate) -> dict:
    """Block until the job's snapshot satisfies ``predicate``, woken by the queue's own change notifications."""

    async def main() -> dict:
        changed = asyncio.Event()
        assert queue.watch(job_id, asyncio.get_running_loop(), changed)
        try:
            while not predicate(snapshot := queue.get(job_id)):
                await asyncio.wait_for(changed.wait(), TIMEOUT)
                changed.clear()
            return snapshot
        finally:
            queue.unwatch(job_id, changed)

    return asyncio.run(main())


@pytest.fixture
def runner():
    runner = GatedRunner()
    yield runner
    runner.release()


def start(runner: GatedRunner, concurrency: int = 1, **limits) -> JobQueue:
    queue = JobQueue(lambda: runner, Limits(**limits), concurrency=concurrency)
    queue.start()
    return queue


def test_queue_full_answers_with_retry_after_and_admits_again_after(runner):
    queue = start(runner, max_queue=2)
    try:
        running = queue.submit(make_job("hold"))
        assert runner.running.wait(TIMEOUT)
        queued = [queue.submit(make_job("hold", steps=3)) for _ in range(2)]
        assert [s["queue_position"] for s in queued] == [0, 1]
        with pytest.raises(QueueFull) as full:
            queue.submit(make_job("one too many"))
        assert full.value.retry_after >= 1
        runner.release()
        for snapshot in [running, *queued]:
            assert wait_status(queue, snapshot["id"], TERMINAL)["status"] == "succeeded"
        assert wait_status(queue, queue.submit(make_job("after"))["id"], TERMINAL)["status"] == "succeeded"
    finally:
        queue.stop(TIMEOUT)


def test_compatible_text2img_jobs_share_a_call_up_to_max_batch_images(runner):
    queue = start(runner, max_batch=4)
    try:
        blocker = queue.submit(make_job("hold", width=128))
        assert runner.running.wait(TIMEOUT)
        a = queue.submit(make_job("a"))
        b = queue.submit(make_job("b", num_images=2))
        other_size = queue.submit(make_job("c", height=128))
        d = queue.submit(make_job("d", seed=99))
        too_many = queue.submit(make_job("e", num_images=2))  # 1 + 2 + 1 images taken: 2 more exceed max_batch 4
        runner.release()
        finals = {s["id"]: wait_status(queue, s["id"], TERMINAL) for s in (blocker, a, b, other_size, d, too_many)}
        assert runner.calls == [["hold"], ["a", "b", "d"], ["c"], ["e"]]
        assert [finals[s["id"]]["batch_size"] for s in (a, b, d, other_size, too_many)] == [4, 4, 4, 1, 2]
        # Each job gets its own outputs back, with its own seeds.
        assert made(queue.files(b["id"])) == ["b:7", "b:8"]
        assert finals[d["id"]]["seeds"] == [99]
    finally:
        queue.stop(TIMEOUT)


def test_a_failing_job_fails_alone_and_the_worker_goes_on(runner):
    queue = start(runner, max_batch=4)
    try:
        blocker = queue.submit(make_job("hold", width=128))
        assert runner.running.wait(TIMEOUT)
        good = queue.submit(make_job("good"))
        bad = queue.submit(make_job("boom"))
        runner.release()
        assert wait_status(queue, bad["id"], TERMINAL)["error"] == "RuntimeError: the model broke"
        assert wait_status(queue, good["id"], TERMINAL)["status"] == "succeeded"
        # The batch failed, then each job ran alone.
        assert runner.calls[1:] == [["good", "boom"], ["good"], ["boom"]]
        after = queue.submit(make_job("after"))
        assert wait_status(queue, after["id"], TERMINAL)["status"] == "succeeded"
        assert wait_status(queue, blocker["id"], TERMINAL)["status"] == "succeeded"
    finally:
        queue.stop(TIMEOUT)


def test_cancel_queued_and_running_jobs(runner):
    queue = start(runner)
    try:
        running = queue.submit(make_job("hold"))
        assert runner.running.wait(TIMEOUT)
        queued = queue.submit(make_job("hold", width=128))
        behind = queue.submit(make_job("hold", width=192))
        assert queue.get(behind["id"])["queue_position"] == 1
        assert queue.cancel(queued["id"])["status"] == "cancelled"
        assert queue.get(behind["id"])["queue_position"] == 0
        snapshot = queue.cancel(running["id"])
        assert snapshot["status"] == "running" and snapshot["cancel_requested"]
        runner.release()
        assert wait_status(queue, running["id"], TERMINAL)["status"] == "cancelled"
        assert wait_status(queue, behind["id"], TERMINAL)["status"] == "succeeded"
        with pytest.raises(JobFinished):
            queue.cancel(behind["id"])
        assert queue.cancel("no-such-job") is None
        assert queue.files(running["id"]) is None
    finally:
        queue.stop(TIMEOUT)


def test_cancelling_one_job_of_a_batch_keeps_the_others(runner):
    queue = start(runner)
    try:
        blocker = queue.submit(make_job("hold", width=128))
        assert runner.running.wait(TIMEOUT)
        a = queue.submit(make_job("hold"))
        b = queue.submit(make_job("b"))
        queue.cancel(blocker["id"])
        runner.step()  # the blocker's call sees the cancellation before its first step
        assert wait_status(queue, blocker["id"], TERMINAL)["status"] == "cancelled"
        assert wait_status(queue, a["id"], {"running"})["batch_size"] == 2
        assert queue.cancel(a["id"])["status"] == "cancelled"
        runner.release()
        assert wait_status(queue, b["id"], TERMINAL)["status"] == "succeeded"
        assert queue.get(a["id"])["images"] == 0
    finally:
        queue.stop(TIMEOUT)


def test_progress_reaches_watchers_with_the_step_of_each_stage(runner):
    queue = start(runner)
    try:
        job = queue.submit(make_job("a"))
        final = wait_status(queue, job["id"], TERMINAL)
        assert final["stages"]["decoder"] == {"step": 2, "steps": 2}
        assert final["stages"]["prior"] == {"step": 0, "steps": 2}  # this runner reports no prior steps
        assert final["stages"]["decode"] == {"step": 0, "steps": 1}
        assert final["stages"]["encode"] == {"step": 1, "steps": 1} and final["stage"] == "encode"
        assert set(final["timings"]) == {"decoder", "encode"} and final["timings"]["decoder"] == 0.0
        assert final["started_at"] >= final["created_at"]
    finally:
        queue.stop(TIMEOUT)


def test_results_expire_after_their_ttl_and_beyond_the_cap():
    now = [1000.0]
    queue = JobQueue(lambda: GatedRunner(), Limits(result_ttl_s=60, max_results=2), clock=lambda: now[0])
    queue.start()
    try:
        ids = []
        for prompt in ("a", "b", "c"):
            ids.append(queue.submit(make_job(prompt))["id"])
            wait_status(queue, ids[-1], TERMINAL)
        # Three finished, cap two: the oldest went.
        assert queue.get(ids[0]) is None
        assert made(queue.files(ids[1])) == ["b:7"]
        now[0] += 61
        assert queue.get(ids[1]) is None and queue.get(ids[2]) is None
    finally:
        queue.stop(TIMEOUT)


def test_with_concurrency_two_batches_run_at_once(runner):
    queue = start(runner, concurrency=2)
    try:
        first = queue.submit(make_job("hold", width=128))
        second = queue.submit(make_job("hold", width=192))
        runner.wait_calls(2)  # both calls started while neither could finish: they run side by side
        assert queue.stats()["queue"]["running"] == 2
        third = queue.submit(make_job("a"))
        assert queue.get(third["id"])["queue_position"] == 0
        runner.release()
        for job in (first, second, third):
            assert wait_status(queue, job["id"], TERMINAL)["status"] == "succeeded"
    finally:
        queue.stop(TIMEOUT)


def test_a_model_load_failure_fails_queued_jobs_and_is_reported():
    release = threading.Event()

    def load():
        assert release.wait(TIMEOUT)
        raise OSError("no such model folder")

    queue = JobQueue(load, Limits())
    queue.start()
    try:
        assert queue.state == "loading"
        job = queue.submit(make_job("a"))
        release.set()
        final = wait_status(queue, job["id"], TERMINAL)
        assert final["status"] == "failed" and "no such model folder" in final["error"]
        assert queue.state == "error" and queue.load_error == "OSError: no such model folder"
        with pytest.raises(Unavailable, match="no such model folder"):
            queue.submit(make_job("b"))
    finally:
        queue.stop(TIMEOUT)


# -- encoding: the encoder threads write each image once, in its job's format, off the worker's path --------------


class GatedEncoder(_Gate):
    """Stands in for the queue's ``encode_image``: records each call (the image object, prompt, format, quality) and
    encodes with the real one, but only when the test lets it: one call per :meth:`step`, or all after
    :meth:`release` (``free``: from the start)."""

    def __call__(self, image, recipe, output_format="png", quality=None):
        self._record((image, recipe["prompt"], output_format, quality))
        self._wait_turn()
        return encode_image(image, recipe, output_format, quality)


@pytest.fixture
def encoder(monkeypatch):
    encoder = GatedEncoder()
    monkeypatch.setattr("kandinsky22.server.worker.encode_image", encoder)
    yield encoder
    encoder.release()


def test_the_worker_runs_the_next_batch_while_the_last_ones_images_are_encoded(runner, encoder):
    """The worker thread hands a call's images to the encoders and takes the next batch at once; a job stays running
    at stage "encode" until its files exist, and only then counts as generated."""
    queue = start(runner, max_batch=1)
    try:
        a = queue.submit(make_job("a"))
        b = queue.submit(make_job("b", num_images=2))
        runner.wait_calls(2)  # b's call started while a's image waits in the (held) encoder
        encoder.wait_calls(1)
        assert encoder.calls[0][1] == "a"
        busy = wait_until(queue, b["id"], lambda s: s["stage"] == "encode")
        for snapshot in (queue.get(a["id"]), busy):
            assert snapshot["status"] == "running" and snapshot["stage"] == "encode" and snapshot["images"] == 0
            assert snapshot["stages"]["encode"]["step"] == 0 and snapshot["stages"]["decoder"]["step"] == 2
        assert busy["stages"]["encode"]["steps"] == 2 and busy["seeds"] == [7, 8]
        assert queue.files(a["id"]) is None
        stats = queue.stats()
        assert stats["images_generated"] == 0 and stats["batch_sizes"] == {1: 1, 2: 1}
        assert stats["queue"]["running"] == 2 and stats["queue"]["encoding"] == 2
        encoder.release()
        finals = [wait_status(queue, job["id"], TERMINAL) for job in (a, b)]
        assert [final["status"] for final in finals] == ["succeeded", "succeeded"]
        assert finals[1]["stages"]["encode"] == {"step": 2, "steps": 2}
        assert made(queue.files(b["id"])) == ["b:7", "b:8"]
        stats = queue.stats()
        assert stats["images_generated"] == 3 and stats["queue"]["running"] == stats["queue"]["encoding"] == 0
    finally:
        queue.stop(TIMEOUT)


def test_each_job_is_encoded_once_in_its_own_format_from_the_runners_image(monkeypatch):
    """No PNG in between: the encoder gets the runner's own image object, once, in the job's format and quality, and
    the file is what encode_image makes of that image and its recipe."""
    encoder = GatedEncoder(free=True)
    monkeypatch.setattr("kandinsky22.server.worker.encode_image", encoder)
    rng = np.random.default_rng(0)
    made_by_runner = {}

    def run_batch(jobs, progress, should_cancel):
        outputs = []
        for job in jobs:
            image = PIL.Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8))
            recipe = make_recipe(job, "cpu", "fp32")
            made_by_runner[job.prompt] = image, recipe
            outputs.append(JobOutput(images=[image], recipes=[recipe], timings={}))
        return outputs

    queue = JobQueue(lambda: run_batch, Limits())
    queue.start()
    try:
        requests = [("a", "png", None), ("b", "jpeg", 50), ("c", "webp", 90)]
        ids = [queue.submit(make_job(prompt), fmt, quality)["id"] for prompt, fmt, quality in requests]
        finals = [wait_status(queue, job_id, TERMINAL) for job_id in ids]
        assert [final["status"] for final in finals] == ["succeeded"] * 3
        assert sorted(call[1:] for call in encoder.calls) == [(p, f, q) for p, f, q in requests]
        for job_id, (prompt, fmt, quality) in zip(ids, requests):
            image, recipe = made_by_runner[prompt]
            assert [call[0] for call in encoder.calls if call[1] == prompt] == [image]
            (file,) = queue.files(job_id)
            assert file == encode_image(image, recipe, fmt, quality)
            assert read_recipe(file) == recipe
    finally:
        queue.stop(TIMEOUT)


def test_a_recipe_too_long_for_a_jpeg_fails_its_job_alone_and_the_rest_of_its_batch_succeeds(runner):
    queue = start(runner, max_batch=4)
    try:
        blocker = queue.submit(make_job("hold", width=128))
        assert runner.running.wait(TIMEOUT)
        requests = [("a", "jpeg", 90), ("x" * 40_000, "jpeg", 90), ("c", "png", None)]
        ids = [queue.submit(make_job(prompt), fmt, quality)["id"] for prompt, fmt, quality in requests]
        runner.release()
        finals = [wait_status(queue, job_id, TERMINAL) for job_id in ids]
        assert runner.calls[1] == [prompt for prompt, _, _ in requests]  # one call made the three
        assert [final["status"] for final in finals] == ["succeeded", "failed", "succeeded"]
        assert (
            finals[1]["error"].startswith("ValueError: the recipe takes")
            and "more than a JPEG holds" in (finals[1]["error"])
        )
        assert queue.files(ids[1]) is None and made(queue.files(ids[0]) + queue.files(ids[2])) == ["a:7", "c:7"]
        # The encoders and the worker go on.
        after = queue.submit(make_job("after"), "jpeg", 80)
        assert wait_status(queue, after["id"], TERMINAL)["status"] == "succeeded"
        assert wait_status(queue, blocker["id"], TERMINAL)["status"] == "succeeded"
    finally:
        queue.stop(TIMEOUT)


def test_a_job_cancelled_while_its_images_are_encoded_ends_cancelled_at_once(runner, encoder):
    queue = start(runner)
    try:
        job = queue.submit(make_job("a", num_images=3))
        wait_until(queue, job["id"], lambda s: s["stage"] == "encode")
        encoder.step()  # one image written, the others still waiting
        wait_until(queue, job["id"], lambda s: s["stages"]["encode"]["step"] == 1)
        snapshot = queue.cancel(job["id"])
        assert snapshot["status"] == "cancelled" and snapshot["images"] == 0
        assert queue.stats()["queue"]["encoding"] == 0
        encoder.release()
        other = queue.submit(make_job("b"))
        assert wait_status(queue, other["id"], TERMINAL)["status"] == "succeeded"
        assert queue.get(job["id"])["status"] == "cancelled" and queue.files(job["id"]) is None
        assert queue.stats()["images_generated"] == 1
    finally:
        queue.stop(TIMEOUT)


def test_the_worker_waits_for_the_encoders_when_they_fall_behind(runner, encoder, caplog):
    """At most two batches' images per worker wait for their files: the third call waits until one is written."""
    held = []

    class Held(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "wait for the encoders" in record.getMessage():
                held.append(record.getMessage())
                runner.notify()

    caplog.set_level(logging.INFO, logger="kandinsky22.server")
    handler = Held()
    logging.getLogger("kandinsky22.server").addHandler(handler)
    queue = start(runner, max_batch=1)
    try:
        ids = [queue.submit(make_job(prompt))["id"] for prompt in ("a", "b", "c")]
        runner.wait_for(lambda: held or len(runner.calls) >= 3)
        assert held == ["2 images wait for the encoders; the next pipeline call waits for them"]
        assert runner.calls == [["a"], ["b"]] and queue.get(ids[2])["status"] == "queued"
        encoder.release()
        assert [wait_status(queue, job_id, TERMINAL)["status"] for job_id in ids] == ["succeeded"] * 3
        assert runner.calls == [["a"], ["b"], ["c"]]
    finally:
        queue.stop(TIMEOUT)
        logging.getLogger("kandinsky22.server").removeHandler(handler)


def test_stop_drops_the_images_waiting_for_an_encoder_and_joins_every_thread(runner, encoder):
    before = set(threading.enumerate())
    queue = JobQueue(lambda: runner, Limits(max_batch=1), encoders=1)
    queue.start()
    stopper = threading.Thread(target=queue.stop, args=(TIMEOUT,))
    try:
        ids = [queue.submit(make_job(prompt))["id"] for prompt in ("a", "b")]
        wait_until(queue, ids[1], lambda s: s["stage"] == "encode")
        encoder.wait_calls(1)  # a's image is being encoded (held), b's waits for the one encoder
        stopper.start()
        assert [wait_status(queue, job_id, TERMINAL)["status"] for job_id in ids] == ["cancelled"] * 2
        encoder.release()
        stopper.join(TIMEOUT)
        assert not stopper.is_alive()
        assert [call[1] for call in encoder.calls] == ["a"]  # b's image was dropped, not encoded
        assert queue.files(ids[0]) is None and queue.stats()["images_generated"] == 0
        assert [t.name for t in set(threading.enumerate()) - before if t.name.startswith("kandinsky22-")] == []
    finally:
        encoder.release()
        queue.stop(TIMEOUT)
