"""Bulk generation on Ray Data: the units of :mod:`kandinsky22.batch` mapped over an actor pool.

Each actor holds one :class:`~kandinsky22.batch.UnitRunner` (one Engine: the models load once per actor) on
``gpus_per_worker`` GPUs and runs one unit (one pipeline call) per call. Results stream back to the driver as they are
made, which writes the files and the manifest; the driver decides every seed before handing out work.

Fault tolerance is Ray Data's: an actor that dies (a lost node, an out-of-memory kill) is restarted and its unfinished
call retried. The driver ignores an image it already has, so a retried call never duplicates one.

Test hook: with ``KANDINSKY22_KILL_WORKER=MARKER:N`` in the driver's environment, the first actor to reach its N-th
call while ``MARKER`` does not exist creates it and kills its own process (as the kernel's OOM killer would), once
per run; the recovery tests use it.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kandinsky22.batch import ImageResult, Unit
from kandinsky22.lora_specs import LoraError
from kandinsky22.scale import connected, default_gpus

KILL_WORKER_ENV = "KANDINSKY22_KILL_WORKER"
_COLUMNS = ("unit", "job", "index", "seed", "data", "error", "timings", "device", "dtype")


@dataclass
class RayOptions:
    """Where and how wide to run: ``address`` for ``ray.init`` (``None``: Ray's default lookup), the actor count
    (``None``: one per GPU of the cluster, or 1 without GPUs) and each actor's resources."""

    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float | None = None
    cpus_per_worker: float = 1.0
    progress_bars: bool = True


class _Worker:
    """The Ray Data callable class: one per actor."""

    def __init__(self, engine: dict[str, Any], kill_after: str | None) -> None:
        from transformers.utils import logging as transformers_logging

        from kandinsky22.batch import UnitRunner

        transformers_logging.disable_progress_bar()  # per-file loading bars from every actor would flood the driver
        self.runner = UnitRunner(**engine)
        self.kill_after = kill_after
        self.calls = 0

    def __call__(self, batch: Any) -> Any:
        import json

        import pyarrow as pa

        self.calls += 1
        if self.kill_after is not None:
            self._kill_once()
        rows = []
        for payload in batch.column("payload").to_pylist():
            try:
                results = self.runner(payload)
            except LoraError as err:
                # A LoRA that does not fit the models fails every job: the driver stops the run with it (as a row:
                # raised here, it would reach the driver as Ray's wrapped traceback, the error itself lost).
                fatal = json.dumps([err.source, err.reason])
                rows.append({**dict.fromkeys(_COLUMNS), "unit": json.loads(payload)["unit"], "fatal": fatal})
                continue
            for result in results:
                row = {name: getattr(result, name) for name in _COLUMNS}
                row["timings"] = json.dumps(result.timings)
                rows.append(row)
        return pa.Table.from_pylist(rows, schema=_schema())

    def _kill_once(self) -> None:
        marker, _, nth = self.kill_after.rpartition(":")
        if self.calls != int(nth):
            return
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os.kill(os.getpid(), signal.SIGKILL)


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("unit", pa.int64()),
            ("job", pa.string()),
            ("index", pa.int64()),
            ("seed", pa.int64()),
            ("data", pa.binary()),
            ("error", pa.string()),
            ("timings", pa.string()),
            ("device", pa.string()),
            ("dtype", pa.string()),
            ("fatal", pa.string()),  # a LoRA error: [source, reason]
        ]
    )


def run_units(units: list[Unit], options: RayOptions, engine: dict[str, Any]) -> Iterator[ImageResult]:
    """Run ``units`` on an actor pool of the cluster; yields each image's result as it arrives.

    ``engine`` holds each actor's Engine arguments (device, dtype, fast).
    """
    import json

    with connected(options.address) as ray:
        from ray.data import ActorPoolStrategy, DataContext

        DataContext.get_current().enable_progress_bars = options.progress_bars
        gpus = default_gpus(ray, options.gpus_per_worker)
        workers = options.workers
        if workers is None:
            workers = max(1, int(ray.cluster_resources().get("GPU", 0) // gpus)) if gpus else 1
        # One unit per block, so the pool balances call by call and a result reaches the driver as soon as it is made.
        rows = [{"unit": unit.index, "payload": unit.payload()} for unit in units]
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            _Worker,
            fn_constructor_kwargs={"engine": engine, "kill_after": os.environ.get(KILL_WORKER_ENV)},
            batch_size=1,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=workers),
            num_gpus=gpus,
            num_cpus=options.cpus_per_worker,
        )
        for row in dataset.iter_rows():
            if row["fatal"] is not None:  # raised as without Ray: the command reports it in one line
                raise LoraError(*json.loads(row["fatal"]))
            values = {name: row[name] for name in _COLUMNS}
            values["timings"] = json.loads(values["timings"])
            yield ImageResult(**values)
