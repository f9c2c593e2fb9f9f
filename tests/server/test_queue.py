"""The job queue and worker thread, with a stand-in runner whose steps the test releases (no model, no HTTP).

Every interleaving here is chosen by the test through events, so nothing depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from kandinsky22.jobs import Cancelled, Job
from kandinsky22.server.schemas import Limits
from kandinsky22.server.worker import TERMINAL, JobFinished, JobOutput, JobQueue, QueueFull, Unavailable

TIMEOUT = 20.0


class GatedRunner:
    """Runs a batch in two 'steps'. A batch holding a job with prompt 'hold' takes each step only when the test
    allows it: one step per :meth:`step` call, or all of them after :meth:`release`."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.running = threading.Event()
        self._cond = threading.Condition()
        self._tokens = 0
        self._free = False

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

    def wait_calls(self, n: int) -> None:
        """Until ``n`` calls have started."""
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.calls) >= n, TIMEOUT)

    def __call__(self, jobs, progress, should_cancel):
        prompts = [job.prompt for job in jobs]
        with self._cond:
            self.calls.append(prompts)
            self._cond.notify_all()
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
                files=[f"{job.prompt}:{job.seed + i}".encode() for i in range(job.num_images)],
                seeds=[job.seed + i for i in range(job.num_images)],
                timings={"decoder": 0.0},
            )
            for job in jobs
        ]


def make_job(prompt: str, **fields) -> Job:
    fields = {"width": 64, "height": 64, "steps": 2, "prior_steps": 2, "seed": 7, **fields}
    return Job(prompt=prompt, **fields).validate()


def wait_status(queue: JobQueue, job_id: str, statuses: set[str]) -> dict:
    """Block until the job reaches one of ``statuses``, woken by the queue's own change notifications."""

    async def main() -> dict:
        changed = asyncio.Event()
        assert queue.watch(job_id, asyncio.get_running_loop(), changed)
        try:
            while (snapshot := queue.get(job_id))["status"] not in statuses:
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
        assert queue.files(b["id"]) == [b"b:7", b"b:8"]
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
        assert final["timings"] == {"decoder": 0.0}
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
        assert queue.files(ids[1]) == [b"b:7"]
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


def test_each_job_gets_its_files_in_its_own_format_and_one_that_cannot_be_encoded_fails_alone():
    """The runner makes PNGs (recipe included); each job's are re-encoded in its output format once it succeeds. A
    recipe too long for a JPEG's Exif fails that job only."""
    import PIL.Image

    from kandinsky22.recipe import encode_image, make_recipe

    image = PIL.Image.new("RGB", (64, 64), (200, 30, 30))

    def run_batch(jobs, progress, should_cancel):
        recipes = [make_recipe(job, "cpu", "fp32") for job in jobs]
        return [JobOutput(files=[encode_image(image, r)], seeds=[r["seed"]], timings={}) for r in recipes]

    queue = JobQueue(lambda: run_batch, Limits())
    queue.start()
    try:
        requests = [("a", "png", None), ("b", "jpeg", 50), ("c", "webp", 90), ("x" * 40_000, "jpeg", 90)]
        ids = [queue.submit(make_job(prompt), fmt, quality)["id"] for prompt, fmt, quality in requests]
        finals = [wait_status(queue, job_id, TERMINAL) for job_id in ids]
        assert [final["output_format"] for final in finals] == ["png", "jpeg", "webp", "jpeg"]
        assert [final["status"] for final in finals] == ["succeeded"] * 3 + ["failed"]
        for job_id, (prompt, fmt, quality) in zip(ids[:3], requests):
            recipe = make_recipe(make_job(prompt), "cpu", "fp32")
            assert queue.files(job_id) == [encode_image(image, recipe, fmt, quality)]
        assert "more than a JPEG holds" in finals[3]["error"] and queue.files(ids[3]) is None
    finally:
        queue.stop(TIMEOUT)
