"""Bulk generation: ``kandinsky22 batch JOBS.jsonl --out DIR``, in one process or on a Ray cluster.

JOBS holds one job per line: a JSON object of :class:`~kandinsky22.jobs.Job` fields (dashes allowed, as in the CLI's
prompts files) and an optional ``id`` (default: the line number, ``000042``); blank lines and ``#`` comments are
skipped. Image ``k`` of a job goes to ``DIR/{id}-{k}.png`` (``.jpg`` or ``.webp`` with ``--format``), its recipe
inside (see :mod:`kandinsky22.recipe`). Once all its files are written, the job gets one line in
``DIR/manifest.jsonl``: id, line, files, quality, seed, timings, and the error if it failed. A line that is not a
valid job gets a manifest line with its line number and the error; the other jobs go on.

Resuming: a job is complete when its manifest line has no error, all its files exist and it was made from the same job
fields (``spec``, a fingerprint; with ``--lora``, of the LoRAs and their files too) at the same quality (a run in
another format names other files, so it redoes the jobs). A re-run skips complete jobs and redoes the others, failed
ones included. Files are written under a temporary name and renamed, and the manifest line comes after the files, so
an interrupted run leaves each job complete or to be redone, never a half-written image listed as done. A re-run first
rewrites the manifest with the complete lines only, so every job has at most one line; the line of a job made in
another format or at another quality comes back at the end of the run if the run did not redo that job (``--limit``,
an interruption).

Seeds: a job without a seed gets one drawn here, once, before any work is handed out, so a worker that crashes and is
retried remakes the same image. The manifest and each image's recipe record it.

The work is cut into units of one pipeline call each (:func:`~kandinsky22.jobs.group_jobs`, at most ``batch_size``
images). The same units run in this process or on a Ray actor pool (:mod:`kandinsky22.scale.ray_batch`), so the same
seeds give identical pixels either way. Workers return the encoded files; only this process writes to DIR, so DIR need
not be shared with the cluster (input images and model folders must be readable on every node, or be hub ids).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kandinsky22.jobs import (
    HUB_ID,
    MAX_IMAGES,
    IncompatibleJob,
    Job,
    check_decoder,
    check_decoder_option,
    group_jobs,
    image_size,
    mix_item_kind,
)
from kandinsky22.lora_specs import LoraError, LoraSpec, checked_sources, lora_argument
from kandinsky22.recipe import EXTENSIONS, check_job_fits, check_quality

MANIFEST = "manifest.jsonl"
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# Files being written are named so; a re-run deletes the ones an interrupted run left behind.
PARTIAL_PREFIX = ".partial-"


@dataclass
class BatchJob:
    """One line of the jobs file: the resolved job with its seed, or the error that makes the line unusable."""

    id: str
    line: int
    job: Job | None = None
    spec: str = ""
    error: str | None = None
    output_format: str = "png"

    @property
    def files(self) -> list[str]:
        suffix = EXTENSIONS[self.output_format]
        return [] if self.job is None else [f"{self.id}-{k}{suffix}" for k in range(self.job.num_images)]


@dataclass
class Unit:
    """One pipeline call: single-image jobs and, for each, its batch job's id and image index; the files' format."""

    index: int
    images: list[tuple[str, int, Job]]
    output_format: str = "png"
    quality: int | None = None

    def payload(self) -> str:
        """JSON text, what crosses to a worker (plain data, so any worker can rebuild the jobs)."""
        return json.dumps(
            {
                "unit": self.index,
                "images": [{"job": job_id, "index": k, "fields": job.to_dict()} for job_id, k, job in self.images],
                "format": self.output_format,
                "quality": self.quality,
            }
        )


@dataclass
class ImageResult:
    """What a worker sends back for one image: its file (or the error) and the timings of its pipeline call."""

    unit: int
    job: str
    index: int
    seed: int
    data: bytes | None = None
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    device: str = ""
    dtype: str = ""


@dataclass
class Summary:
    jobs: int
    skipped: int
    done: int
    failed: int
    images: int
    seconds: float
    manifest: str

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


# runner(units) -> the results of every image of every unit, in any order.
RunUnits = Callable[[list[Unit]], Iterable[ImageResult]]


# ----------------------------------------------------------------------------------------------------------------------
# The jobs file
# ----------------------------------------------------------------------------------------------------------------------


def read_jobs(
    path: str | os.PathLike,
    prior: str | None = None,
    decoders: dict[str, str] | None = None,
    output_format: str = "png",
    loras: Sequence[dict[str, Any]] = (),
) -> list[BatchJob]:
    """Every job line of ``path``, resolved, with its seed; ``prior`` and ``decoders`` (by task) fill missing models.
    ``output_format`` gives the suffix of the jobs' files; ``loras`` (as recipes record them) apply to every job, so
    they are part of each job's fingerprint.

    A line that is not a valid job comes back with ``error`` set (``line N: …``); a missing file raises.
    """
    entries: list[BatchJob] = []
    used: dict[str, int] = {}
    # utf-8-sig: a byte-order mark (Windows editors write one) would make the first line invalid JSON
    for number, text in enumerate(Path(path).expanduser().read_text(encoding="utf-8-sig").splitlines(), 1):
        text = text.strip()
        if not text or text.startswith("#"):
            continue
        entry = _read_line(text, number, prior, decoders or {}, output_format, loras)
        if entry.id in used:
            entry = BatchJob(
                entry.id, number, error=f"line {number}: id {entry.id!r} is already used by line {used[entry.id]}"
            )
        else:
            used[entry.id] = number
        entry.output_format = output_format
        entries.append(entry)
    return entries


def _read_line(
    text: str,
    number: int,
    prior: str | None,
    decoders: dict[str, str],
    output_format: str = "png",
    loras: Sequence[dict[str, Any]] = (),
) -> BatchJob:
    default_id = f"{number:06d}"
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as err:
        return BatchJob(default_id, number, error=f"line {number}: not valid JSON ({err.msg})")
    if not isinstance(fields, dict):
        return BatchJob(default_id, number, error=f"line {number}: a line must be a JSON object of job fields")
    fields = {key.replace("-", "_"): value for key, value in fields.items()}
    job_id = fields.pop("id", default_id)
    if not isinstance(job_id, str) or not ID_PATTERN.match(job_id):
        return BatchJob(
            default_id,
            number,
            error=f"line {number}: id must be 1 to 100 letters, digits, '.', '_' or '-' (not first), got {job_id!r}",
        )
    if prior is not None:
        fields.setdefault("prior", prior)
    task = fields.get("task", "text2img")
    if isinstance(task, str) and task in decoders:
        fields.setdefault("decoder", decoders[task])
    try:
        job = Job.from_dict(fields).validate()
        _absolute_paths(job)
        for name in ("prior", "decoder"):
            check_model(getattr(job, name), name)
        _check_inputs(job)
        job = job.resolved()
        check_decoder(job)  # its kind and its steps, from its config files (a folder, or a hub id in the cache)
        check_job_fits(job, output_format, loras)  # a JPEG's Exif holds 64 KiB of recipe
    except (TypeError, ValueError, FileNotFoundError) as err:
        return BatchJob(job_id, number, error=f"line {number}: {err}")
    # The fingerprint leaves out a seed drawn here, so that an unseeded job stays the same job across runs. LoRAs (and
    # their files' hashes) are in it only when there are some: the jobs of earlier runs without any keep theirs.
    fields = {**job.to_dict(), "loras": list(loras)} if loras else job.to_dict()
    spec = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return BatchJob(job_id, number, job.with_seed(), spec)


def _absolute_paths(job: Job) -> None:
    """Existing local paths made absolute: workers may run in another folder, or on another machine."""

    def absolute(value: Any) -> Any:
        if isinstance(value, str) and value and Path(value).expanduser().exists():
            return str(Path(value).expanduser().resolve())
        return value

    for name in ("image", "mask", "hint", "prior", "decoder"):
        setattr(job, name, absolute(getattr(job, name)))
    job.items = [absolute(item) for item in job.items]


def _check_inputs(job: Job) -> None:
    """Every input image exists and is an image (its header is read), so that a typo fails the line, not a worker."""
    sources = [(name, getattr(job, name)) for name in ("image", "mask", "hint")]
    sources += [(f"items[{i}]", item) for i, item in enumerate(job.items) if mix_item_kind(item) == "image"]
    for name, source in sources:
        if source is not None:
            try:
                image_size(source)
            except OSError as err:  # a missing file, or one PIL cannot read
                raise ValueError(f"{name}: {err}") from None


def check_model(value: str | None, what: str) -> None:
    """A model that is neither an existing folder nor a hub id (``owner/name``) raises ``FileNotFoundError``."""
    if value and not Path(value).expanduser().exists() and not HUB_ID.match(value):
        raise FileNotFoundError(f"no such model folder for {what}: '{value}'")


# ----------------------------------------------------------------------------------------------------------------------
# The manifest and the output folder
# ----------------------------------------------------------------------------------------------------------------------


def read_manifest(out_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The manifest's last line without an error, per job id; a line cut short by an interrupted run is skipped.

    Lines with an error are left out: a re-run retries those jobs whatever the manifest says.
    """
    path = Path(out_dir) / MANIFEST
    records: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return records
    for text in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("id"), str) and record.get("error") is None:
            records[record["id"]] = record
    return records


def is_complete(record: dict[str, Any], out_dir: Path) -> bool:
    files = record.get("files")
    return (
        record.get("error") is None
        and isinstance(files, list)
        and bool(files)
        and all(isinstance(name, str) and (out_dir / name).is_file() for name in files)
    )


def plan(
    entries: list[BatchJob], out_dir: Path, quality: int | None = None
) -> tuple[list[dict[str, Any]], list[BatchJob], dict[str, dict[str, Any]]]:
    """The manifest lines to keep (complete jobs), the jobs to run, in file order, and the complete lines of jobs to
    run that were made in another format or at another quality (by job id).

    A complete line of a job whose fields, files (their format) or ``quality`` changed since (or whose line is no
    longer valid) is dropped and the job is redone; complete lines of ids that are no longer in the jobs file are kept
    (their files are still there). A line of the same job fields in another format or at another quality still
    describes files on disk: the run puts it back when it ends without having redone that job (``--limit``, an
    interruption), so that going back to that format skips the job.
    """
    current = {entry.id: entry for entry in reversed(entries)}  # a repeated id: the first line is the job
    keep: dict[str, dict[str, Any]] = {}
    other_format: dict[str, dict[str, Any]] = {}
    for job_id, record in read_manifest(out_dir).items():
        if not is_complete(record, out_dir):
            continue
        if job_id not in current:
            keep[job_id] = record
        elif record.get("spec") == current[job_id].spec:
            if (
                record["files"] == current[job_id].files
                and record.get("quality") == quality  # absent from PNG lines of earlier versions: None
            ):
                keep[job_id] = record
            else:
                other_format[job_id] = record
    todo = [entry for entry in entries if entry.job is not None and entry.id not in keep]
    return list(keep.values()), todo, other_format


def make_units(
    todo: list[BatchJob], batch_size: int, output_format: str = "png", quality: int | None = None
) -> list[Unit]:
    """The pipeline calls of ``todo``: images of jobs that can share a call, at most ``batch_size`` per call, each
    to be encoded in ``output_format`` at ``quality``."""
    singles: list[Job] = []
    owner: dict[int, tuple[str, int]] = {}
    for entry in todo:
        for k, single in enumerate(entry.job.expand()):
            owner[id(single)] = (entry.id, k)
            singles.append(single)
    groups = group_jobs(singles, batch_size)
    return [
        Unit(i, [(*owner[id(job)], job) for job in group], output_format, quality) for i, group in enumerate(groups)
    ]


def write_atomically(path: Path, data: bytes) -> None:
    """Write under a temporary name, then rename: ``path`` is either absent or complete, whenever the run stops."""
    partial = path.with_name(PARTIAL_PREFIX + path.name)
    with open(partial, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)


class _Manifest:
    """The manifest file: rewritten with the kept lines at the start of a run, then appended to, one line per job."""

    def __init__(self, out_dir: Path, keep: list[dict[str, Any]]) -> None:
        self.path = out_dir / MANIFEST
        write_atomically(self.path, "".join(json.dumps(record) + "\n" for record in keep).encode())
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def append(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def _record(
    entry: BatchJob,
    files: list[str],
    error: str | None,
    timings: dict[str, float],
    device: str = "",
    dtype: str = "",
    quality: int | None = None,
) -> dict[str, Any]:
    return {
        "id": entry.id,
        "line": entry.line,
        "files": files,
        "quality": quality,
        "seed": None if entry.job is None else entry.job.seed,
        "timings": {stage: round(seconds, 4) for stage, seconds in timings.items()},
        "error": error,
        "spec": entry.spec,
        "device": device,
        "dtype": dtype,
        "finished_at": round(time.time(), 3),
    }


class _Collector:
    """Gathers each job's images as results arrive (in any order, duplicates ignored) and records finished jobs."""

    def __init__(self, todo: list[BatchJob], out_dir: Path, manifest: _Manifest, quality: int | None) -> None:
        self.entries = {entry.id: entry for entry in todo}
        self.quality = quality
        self.results: dict[str, dict[int, ImageResult]] = {entry.id: {} for entry in todo}
        self.out_dir = out_dir
        self.manifest = manifest
        self.done = 0
        self.failed = 0
        self.images = 0

    def add(self, result: ImageResult) -> bool:
        """Take one image's result; true when it was new."""
        received = self.results.get(result.job)
        if received is None or result.index in received:
            return False
        received[result.index] = result
        entry = self.entries[result.job]
        if len(received) == entry.job.num_images:
            self._finish(entry, [received[k] for k in range(entry.job.num_images)])
            del self.results[result.job]
        return True

    def _finish(self, entry: BatchJob, results: list[ImageResult]) -> None:
        timings: dict[str, float] = {}
        for unit_timings in {r.unit: r.timings for r in results}.values():
            for stage, seconds in unit_timings.items():
                timings[stage] = timings.get(stage, 0.0) + seconds
        errors = sorted({r.error for r in results if r.error is not None})
        first = results[0]
        if errors:
            self.manifest.append(_record(entry, [], "; ".join(errors), timings, first.device, first.dtype))
            self.failed += 1
            return
        for name, result in zip(entry.files, results):
            write_atomically(self.out_dir / name, result.data)
        self.manifest.append(_record(entry, entry.files, None, timings, first.device, first.dtype, self.quality))
        self.done += 1
        self.images += len(results)


def run_batch(
    jobs_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    run_units: RunUnits | None = None,
    *,
    prior: str | None = None,
    decoders: dict[str, str] | None = None,
    batch_size: int = 1,
    limit: int | None = None,
    on_image: Callable[[int, int], None] | None = None,
    output_format: str = "png",
    quality: int | None = None,
    loras: Sequence[dict[str, Any]] = (),
) -> Summary:
    """Run the jobs of ``jobs_path`` that are not complete in ``out_dir`` (at most ``limit`` of them).

    ``run_units`` runs the pipeline calls (default: :func:`run_local`, in this process); ``on_image(done, total)`` is
    called after each image arrives. The files are ``output_format`` (png, jpeg or webp) at ``quality`` (JPEG and
    WebP only: 1..100, default 90; see :func:`kandinsky22.recipe.encode_image`). ``loras``: the LoRAs the runner
    applies (:meth:`~kandinsky22.lora_specs.LoadedLora.record`), for the jobs' fingerprints.
    """
    started = time.perf_counter()
    quality = check_quality(output_format, quality)
    entries = read_jobs(jobs_path, prior, decoders, output_format, loras)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    for leftover in out.glob(PARTIAL_PREFIX + "*"):
        leftover.unlink()
    keep, todo, other_format = plan(entries, out, quality)
    skipped = sum(1 for entry in entries if entry.job is not None) - len(todo)
    todo = todo[:limit] if limit is not None else todo
    invalid = [entry for entry in entries if entry.job is None]
    units = make_units(todo, batch_size, output_format, quality)
    total = sum(len(unit.images) for unit in units)
    arrived = 0
    manifest = _Manifest(out, keep)
    collector = _Collector(todo, out, manifest, quality)
    try:
        for entry in invalid:
            manifest.append(_record(entry, [], entry.error, {}))
        if units:
            for result in (run_units or run_local)(units):
                if collector.add(result):
                    arrived += 1
                    if on_image is not None:
                        on_image(arrived, total)
    finally:
        finished = collector.entries.keys() - collector.results.keys()
        for job_id, record in other_format.items():
            if job_id not in finished:  # not redone in this run (--limit, an interruption): its files stay listed
                manifest.append(record)
        manifest.close()
    missing = [entry.id for entry in todo if entry.id in collector.results]
    if missing:
        raise RuntimeError(f"the workers returned no result for job(s) {', '.join(missing[:5])}")
    return Summary(
        jobs=len(entries),
        skipped=skipped,
        done=collector.done,
        failed=collector.failed + len(invalid),
        images=collector.images,
        seconds=time.perf_counter() - started,
        manifest=str(manifest.path),
    )


# ----------------------------------------------------------------------------------------------------------------------
# Running units: one Engine per process (the single-process runner, and the body of each Ray actor)
# ----------------------------------------------------------------------------------------------------------------------


class UnitRunner:
    """Runs units with one :class:`~kandinsky22.jobs.Engine`, which loads each model once, on first use."""

    def __init__(
        self,
        device: str = "auto",
        dtype: str = "auto",
        fast: bool = False,
        compile_cache: str | None = None,
        loras: Sequence[LoraSpec] = (),
    ) -> None:
        from kandinsky22.jobs import Engine

        if compile_cache is not None:  # in this process: each Ray actor is one
            from kandinsky22.fast import use_compile_cache

            use_compile_cache(compile_cache)
        self.engine = Engine(device=device, dtype=dtype, fast=fast, loras=loras)

    def __call__(self, payload: str) -> list[ImageResult]:
        data = json.loads(payload)
        images = [(image["job"], image["index"], Job.from_dict(image["fields"])) for image in data["images"]]
        return self._run(data["unit"], images, data.get("format", "png"), data.get("quality"))

    def _run(
        self, unit: int, images: list[tuple[str, int, Job]], output_format: str, quality: int | None
    ) -> list[ImageResult]:
        from kandinsky22.recipe import encode_image, make_recipe

        engine = self.engine
        try:
            results = engine.run([job for _, _, job in images])
        except LoraError:  # a LoRA that does not fit the models fails every job: the run stops
            raise
        except Exception as err:  # one job's failure is recorded in the manifest; the others go on
            owners = list(dict.fromkeys(job_id for job_id, _, _ in images))
            if len(owners) > 1:
                # Several jobs shared the call: run each alone, so only the one that breaks fails.
                return [
                    result
                    for owner in owners
                    for result in self._run(unit, [i for i in images if i[0] == owner], output_format, quality)
                ]
            message = f"{type(err).__name__}: {err}"
            return [ImageResult(unit, job_id, k, job.seed, error=message) for job_id, k, job in images]
        device, dtype = engine.device_name, engine.dtype_name
        return [
            ImageResult(
                unit,
                job_id,
                k,
                result.job.seed,
                # The one writer of recipe files (the CLI's and the server's too): the same job gives the same bytes.
                data=encode_image(
                    result.image, make_recipe(result.job, device, dtype, engine.lora_records), output_format, quality
                ),
                timings=result.timings,
                device=device,
                dtype=dtype,
            )
            for (job_id, k, _), result in zip(images, results)
        ]


def run_local(units: list[Unit], **engine: Any) -> Iterator[ImageResult]:
    """The units one after the other in this process; ``engine``: :class:`UnitRunner`'s arguments."""
    runner = UnitRunner(**engine)
    for unit in units:
        yield from runner(unit.payload())


# ----------------------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------------------


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def _batch_size(text: str) -> int:
    value = _positive(text)
    if value > MAX_IMAGES:
        raise argparse.ArgumentTypeError(f"must be from 1 to {MAX_IMAGES}, got {value}")
    return value


def _quality(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 100:
        raise argparse.ArgumentTypeError(f"must be an integer from 1 to 100, got {text!r}")
    return int(text)


def resource_amount(text: str) -> float:
    """argparse type: a finite number of at least 0 (a resource amount may be a fraction: 0.5 GPU shares one)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of at least 0, got {text!r}")
    return value


def add_ray_address_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """``--ray [ADDRESS]``, shared by ``batch`` and ``serve``: ``None`` when absent, ``""`` when given bare."""
    parser.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help=f"{what} on a Ray cluster: auto (the cluster this machine belongs to), ray://HEAD:10001 (Ray Client), "
        "HEAD:6379, or local (start one here); bare: $RAY_ADDRESS, else a running local cluster, else a new one",
    )


def needs_ray(options: list[str]) -> str:
    """``--a needs --ray``, ``--a and --b need --ray``, ``--a, --b and --c need --ray``."""
    named = options[0] if len(options) == 1 else f"{', '.join(options[:-1])} and {options[-1]}"
    return f"{named} {'needs' if len(options) == 1 else 'need'} --ray"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``batch`` options, on ``parser`` (argparse only: importing this module is cheap)."""
    from kandinsky22.cli import DTYPES, output_format_type

    parser.add_argument("jobs", metavar="JOBS", help="JSON lines file: one job per line (Job fields, optional id)")
    parser.add_argument(
        "-o", "--out", required=True, metavar="DIR", help="output folder: the images and manifest.jsonl"
    )
    models = parser.add_argument_group("models (for lines that name none)")
    models.add_argument("--prior", help="prior hub id or folder (default: the official prior)")
    models.add_argument("--decoder", help="decoder for text2img, img2img and mix (default: the official one)")
    models.add_argument("--inpaint-decoder", help="decoder for inpaint (default: the official inpainting decoder)")
    models.add_argument("--depth-decoder", help="decoder for depth (default: the official controlnet-depth one)")
    models.add_argument(
        "--lora",
        action="append",
        type=lora_argument,
        metavar="SOURCE[:WEIGHT]",
        help="apply a LoRA to every job (repeat for several): a .safetensors/.bin file, a folder holding one, or a hub "
        "id; WEIGHT (default 1) after the last ':'. Recorded in each image's recipe",
    )
    run = parser.add_argument_group("running")
    run.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda[:N] or mps (each worker)")
    run.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: fp16 on GPUs, fp32 on CPU")
    run.add_argument("--fast", action="store_true", help="use the pipelines' fast path where they have one")
    run.add_argument(
        "--compile-cache",
        metavar="DIR",
        help="with --fast: keep torch.compile's caches in DIR (each worker; with --ray a path valid on every node, "
        "e.g. a shared file system): workers and later runs read what one compiled instead of compiling again",
    )
    run.add_argument(
        "--batch-size",
        type=_batch_size,
        default=1,
        help="images per pipeline call (default 1: each image bit-identical to its --from-png re-run)",
    )
    run.add_argument("--limit", type=_positive, help="run at most this many of the jobs still to do, then stop")
    ray = parser.add_argument_group("Ray (bulk generation on Ray Data: one pipeline per actor)")
    add_ray_address_argument(ray, "run")
    ray.add_argument("--workers", type=_positive, help="actors (default: one per GPU of the cluster, or 1)")
    ray.add_argument(
        "--gpus-per-worker", type=resource_amount, help="GPUs per actor (default: 1 if the cluster has GPUs)"
    )
    ray.add_argument("--cpus-per-worker", type=resource_amount, help="CPUs per actor (default 1)")
    out = parser.add_argument_group("output")
    out.add_argument(
        "--format",
        type=output_format_type,
        default="png",
        metavar="{png,jpeg,webp}",
        help="the images' format: png (the default), jpeg or webp; each file carries its recipe",
    )
    out.add_argument("--quality", type=_quality, metavar="N", help="jpeg and webp quality, 1-100 (default 90)")
    out.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    out.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    out.add_argument("--debug", action="store_true", help="show tracebacks")


def run_command(args: argparse.Namespace) -> int:
    """``kandinsky22 batch``: 0 when every job is complete, 1 when some failed (see the manifest)."""
    from kandinsky22.cli import DEVICE_PATTERN, RuntimeFailure, UsageError, apply_compile_cache

    if not DEVICE_PATTERN.match(args.device):
        raise UsageError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {args.device!r}")
    ray_only = {"--workers": args.workers, "--gpus-per-worker": args.gpus_per_worker}
    ray_only["--cpus-per-worker"] = args.cpus_per_worker
    given = [option for option, value in ray_only.items() if value is not None]
    if args.ray is None and given:
        raise UsageError(f"{needs_ray(given)} (without it, the jobs run in this process)")
    if args.cpus_per_worker is None:
        args.cpus_per_worker = 1.0
    if args.quality is not None and args.format == "png":
        raise UsageError(f"--quality {args.quality} applies to --format jpeg and webp (PNG is lossless)")
    jobs = Path(args.jobs).expanduser()
    if not jobs.is_file():
        raise RuntimeFailure(f"no such jobs file: '{jobs}'", "check the JOBS path")
    try:
        jobs.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise UsageError(f"JOBS '{jobs}' is not UTF-8 text ({err.reason} at byte {err.start})") from None
    if Path(args.out).expanduser().exists() and not Path(args.out).expanduser().is_dir():
        raise UsageError(f"--out '{args.out}' is a file; give a folder (it is created if missing)")
    decoders = {
        task: value
        for tasks, value in (
            (("text2img", "img2img", "mix"), args.decoder),
            (("inpaint",), args.inpaint_decoder),
            (("depth",), args.depth_decoder),
        )
        if value is not None
        for task in tasks
    }
    for what, value in (("--prior", args.prior), *(("--decoder", v) for v in set(decoders.values()))):
        try:
            check_model(value, what)
        except FileNotFoundError as err:
            raise RuntimeFailure(
                str(err), "pass an existing folder or a hub id (`kandinsky22 make-tiny DIR`)"
            ) from None
    for option, task in (("--decoder", "text2img"), ("--inpaint-decoder", "inpaint"), ("--depth-decoder", "depth")):
        if task in decoders:
            try:
                check_decoder_option(task, decoders[task], option)
            except IncompatibleJob as err:
                raise UsageError(str(err)) from None
    apply_compile_cache(args)  # here too: a folder that cannot be one fails now, not in every worker
    loras = _loras(args.lora or [])
    engine = {"device": args.device, "dtype": args.dtype, "fast": args.fast, "compile_cache": args.compile_cache}
    engine["loras"] = [LoraSpec(record["source"], record["weight"]) for record in loras]
    if args.ray is None:

        def runner(units: list[Unit]) -> Iterator[ImageResult]:
            _quiet_loading(args.quiet)
            return run_local(units, **engine)

    else:
        from kandinsky22.scale.ray_batch import RayOptions, run_units

        options = RayOptions(
            address=args.ray or None,
            workers=args.workers,
            gpus_per_worker=args.gpus_per_worker,
            cpus_per_worker=args.cpus_per_worker,
            progress_bars=not args.quiet,
        )

        def runner(units: list[Unit]) -> Iterator[ImageResult]:
            return run_units(units, options, engine)

    bar = _ImageBar(enabled=not args.quiet)
    # With --json, stdout carries the summary only: whatever else is printed meanwhile goes to stderr (Ray prints its
    # workers' and raylets' messages on the driver's stdout).
    stdout = sys.stdout
    if args.json:
        sys.stdout = sys.stderr
    try:
        summary = run_batch(
            jobs,
            args.out,
            runner,
            prior=None if args.prior is None else str(args.prior),
            decoders=decoders,
            batch_size=args.batch_size,
            limit=args.limit,
            on_image=bar,
            output_format=args.format,
            quality=args.quality,
            loras=loras,
        )
    except LoraError as err:  # a LoRA whose modules are not in the models, or do not fit them
        raise UsageError(str(err)) from None
    finally:
        sys.stdout = stdout
        bar.close()
    if args.json:
        print(json.dumps({**dataclasses.asdict(summary), "images_per_s": round(summary.images_per_s, 4)}))
    else:
        print(
            f"{summary.jobs} jobs: {summary.done} done, {summary.skipped} already complete, {summary.failed} failed; "
            f"{summary.images} images in {summary.seconds:.1f} s ({summary.images_per_s:.2f} images/s); "
            f"manifest: {summary.manifest}"
        )
    if summary.failed:
        print(
            f"kandinsky22 batch: {summary.failed} job(s) failed: their errors are in {summary.manifest}; "
            "a re-run retries them",
            file=sys.stderr,
        )
    return 1 if summary.failed else 0


def _loras(specs: list[LoraSpec]) -> list[dict[str, Any]]:
    """``--lora``: local paths checked, each file found, read and hashed here, before any job runs (so that a LoRA
    that cannot be used stops the run now, and its hash is part of the jobs' fingerprints); as recipes record them.
    The workers find and read them again, where they run."""
    from kandinsky22.cli import RuntimeFailure, UsageError
    from kandinsky22.lora_specs import EngineLoras

    try:
        loras = EngineLoras(checked_sources(specs))
        loras.load()
    except LoraError as err:
        raise UsageError(str(err)) from None
    except OSError as err:  # a hub failure
        raise RuntimeFailure(
            " ".join(str(err).split()), "check the network and the --lora hub id, or pass a local LoRA file or folder"
        ) from err
    return loras.records()


def _quiet_loading(quiet: bool) -> None:
    """No per-file "Loading weights" bars from transformers (and none from the hub with ``--quiet``)."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    if quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


class _ImageBar:
    """A tqdm bar of images on stderr, created when the first image arrives (the total is known then)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="images", unit="img", file=sys.stderr, dynamic_ncols=True)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
