"""Bulk generation in one process (``kandinsky22.batch``): files, manifest, malformed lines, failures and resuming.

The runs are in-process on ``make_tiny_repos`` checkpoints; one test goes through the console script. Ray runs are in
``test_ray.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
from filelock import FileLock

import kandinsky22.jobs
from kandinsky22.batch import MANIFEST, PARTIAL_PREFIX, ImageResult, Summary, Unit, UnitRunner, read_jobs, run_batch
from kandinsky22.recipe import read_recipe, transcode

SCRIPT = shutil.which("kandinsky22")
COMMAND = [SCRIPT] if SCRIPT else [sys.executable, "-m", "kandinsky22.cli"]


def shared_tiny_repos(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> dict[str, Path]:
    """``make_tiny_repos`` output, built once per test session for all xdist workers (as tests/server/conftest.py)."""
    from kandinsky22.tiny import make_tiny_repos

    base = tmp_path_factory.getbasetemp()
    root = (base if worker_id == "master" else base.parent) / "server-tiny-repos"
    with FileLock(f"{root}.lock"):
        done = root / "done.json"
        if not done.exists():
            repos = make_tiny_repos(root)
            done.write_text(json.dumps({name: str(path) for name, path in repos.items()}))
    return {name: Path(path) for name, path in json.loads(done.read_text()).items()}


@pytest.fixture(scope="session")
def tiny_repos(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> dict[str, Path]:
    return shared_tiny_repos(tmp_path_factory, worker_id)


def job_line(i: int, **fields: Any) -> dict[str, Any]:
    """A fast text2img job: 64 px, two steps per stage, seed 1000 + i."""
    return {
        "prompt": f"a red cat {i}",
        "seed": 1000 + i,
        "steps": 2,
        "prior_steps": 2,
        "width": 64,
        "height": 64,
        **fields,
    }


def write_jobs(path: Path, lines: list[dict[str, Any] | str]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def engine() -> UnitRunner:
    """One Engine for the module's runs: each model loads once."""
    return UnitRunner(device="cpu")


def run(jobs: Path, out: Path, repos: dict[str, Path], engine: UnitRunner, **options: Any) -> Summary:
    def run_units(units: list[Unit]) -> Iterator[ImageResult]:
        for unit in units:
            yield from engine(unit.payload())

    decoders = {"text2img": str(repos["decoder"]), "inpaint": str(repos["decoder-inpaint"])}
    return run_batch(jobs, out, run_units, prior=str(repos["prior"]), decoders=decoders, **options)


def manifest(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]


def pngs(out: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out.glob("*.png"))}


def write_image(path: Path, mode: str, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    shape = (64, 64, 3) if mode == "RGB" else (64, 64)
    PIL.Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


def test_files_manifest_recipes_malformed_lines_and_failures(
    tiny_repos: dict[str, Path], engine: UnitRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image, mask = write_image(tmp_path / "in.png", "RGB", 1), write_image(tmp_path / "mask.png", "L", 2)
    lines: list[dict[str, Any] | str] = [
        job_line(1),
        "# a comment, then a blank line",
        "",
        job_line(2, num_images=2, id="hero"),
        '{"prompt": "cut short", ',
        job_line(3, colour="red"),
        job_line(4, steps=0),
        job_line(5, id="hero"),
        job_line(6, id="../up"),
        job_line(7, task="img2img", image=str(tmp_path / "missing.png"), steps=10),
        ["not", "an", "object"],
        # Valid, but the text2img decoder cannot inpaint, which its config tells only once it loads here (as for a hub
        # repository not downloaded yet): fails when it runs, alone.
        job_line(8, task="inpaint", image=str(image), mask=str(mask), decoder=str(tiny_repos["decoder"])),
        {key: value for key, value in job_line(9).items() if key != "seed"},
    ]
    jobs = write_jobs(tmp_path / "jobs.jsonl", lines)
    out = tmp_path / "out"
    monkeypatch.setattr(kandinsky22.jobs, "decoder_config", lambda decoder, filename: None, raising=False)
    summary = run(jobs, out, tiny_repos, engine)

    assert (summary.jobs, summary.done, summary.failed, summary.skipped, summary.images) == (11, 3, 8, 0, 4)
    records = {record["line"]: record for record in manifest(out)}
    assert sorted(records) == [1, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    errors = {line: record["error"] for line, record in records.items() if record["error"] is not None}
    assert errors[5].startswith("line 5: not valid JSON")
    assert errors[6].startswith("line 6: unknown job field(s) colour")
    assert errors[7] == "line 7: steps must be from 1 to 1000, got 0"
    assert errors[8] == "line 8: id 'hero' is already used by line 4"
    assert errors[9].startswith("line 9: id must be")
    assert "missing.png" in errors[10] and errors[10].startswith("line 10: ")
    assert errors[11] == "line 11: a line must be a JSON object of job fields"
    assert errors[12].startswith("IncompatibleJob: decoder") and records[12]["seed"] == 1008
    assert "is a text-to-image decoder (UNet in_channels 4" in errors[12]
    assert all(records[line]["files"] == [] for line in errors)

    assert records[1]["id"] == "000001" and records[1]["files"] == ["000001-0.png"]
    assert records[4]["id"] == "hero" and records[4]["files"] == ["hero-0.png", "hero-1.png"]
    drawn = records[13]["seed"]
    assert isinstance(drawn, int)
    assert set(pngs(out)) == {"000001-0.png", "hero-0.png", "hero-1.png", "000013-0.png"}
    for name, seed in (("000001-0.png", 1001), ("hero-0.png", 1002), ("hero-1.png", 1003), ("000013-0.png", drawn)):
        recipe = read_recipe(out / name)
        assert (recipe["seed"], recipe["num_images"], recipe["width"], recipe["height"]) == (seed, 1, 64, 64)
    assert set(records[1]["timings"]) >= {"prior", "decoder", "decode"}

    # Again: complete jobs are skipped, failed ones retried (and fail again), each line still reported once.
    before = pngs(out)
    again = run(jobs, out, tiny_repos, engine)
    assert (again.done, again.skipped, again.failed) == (0, 3, 8)
    assert sorted(record["line"] for record in manifest(out)) == sorted(records)
    assert pngs(out) == before


def test_a_line_its_decoder_cannot_run_is_reported_before_any_model_loads(
    tiny_repos: dict[str, Path], tmp_path: Path
) -> None:
    """A decoder of another kind, or a step count its sampler cannot take, fails the line when the file is read (from
    the decoder's config files), as an invalid line does; they failed only once a worker had loaded the models."""
    image, mask = write_image(tmp_path / "in.png", "RGB", 1), write_image(tmp_path / "mask.png", "L", 2)
    decoder = str(tiny_repos["decoder"])
    lines = [
        job_line(1, steps=1000, decoder=decoder),
        job_line(2, task="inpaint", image=str(image), mask=str(mask), decoder=decoder),
        job_line(3, task="img2img", image=str(image), steps=1000, strength=0.5, decoder=decoder),  # runs 500 steps
        job_line(4, steps=999, decoder=decoder),
    ]
    entries = read_jobs(write_jobs(tmp_path / "jobs.jsonl", lines))
    assert [entry.error for entry in entries[2:]] == [None, None]
    assert entries[0].error == (
        f"line 1: steps 1000 is more than the ddpm sampler of decoder '{decoder}' can take: its schedule would start "
        "at timestep 1000, past the 1000 timesteps the model was trained on (timestep_spacing 'leading', steps_offset "
        "1); use at most 999 steps"
    )
    assert entries[1].error == (
        f"line 2: decoder '{decoder}' is a text-to-image decoder (UNet in_channels 4, addition_embed_type 'image'), "
        "but inpaint needs an inpainting decoder (UNet in_channels 9, addition_embed_type 'image'), such as "
        "kandinsky-community/kandinsky-2-2-decoder-inpaint"
    )


def test_resume_after_an_interruption_redoes_exactly_the_unfinished_jobs(
    tiny_repos: dict[str, Path], engine: UnitRunner, tmp_path: Path
) -> None:
    lines = [job_line(i, num_images=2 if i == 4 else 1) for i in range(1, 7)]
    jobs = write_jobs(tmp_path / "jobs.jsonl", lines)
    reference = tmp_path / "reference"
    run(jobs, reference, tiny_repos, engine)

    out = tmp_path / "out"
    first = run(jobs, out, tiny_repos, engine, limit=3)
    assert (first.done, first.images) == (3, 3)
    # What a run killed mid-way leaves: a job with some files but no manifest line (written in place, garbage), a
    # partial file, a manifest line cut short, and a complete job whose file was deleted since.
    (out / "000005-0.png").write_bytes(b"not a finished image")
    (out / f"{PARTIAL_PREFIX}000006-0.png").write_bytes(b"half")
    with open(out / MANIFEST, "a") as file:
        file.write('{"id": "000006", "files": ["0000')
    (out / "000002-0.png").unlink()

    resumed = run(jobs, out, tiny_repos, engine)
    assert (resumed.done, resumed.skipped, resumed.failed) == (4, 2, 0)
    records = manifest(out)
    assert sorted(record["id"] for record in records) == [f"{i:06d}" for i in range(1, 7)]
    assert all(record["error"] is None for record in records)
    assert not list(out.glob(PARTIAL_PREFIX + "*"))
    assert pngs(out) == pngs(reference)

    # A changed line is a new job: only it is redone.
    lines[5]["prompt"] = "a blue horse"
    write_jobs(jobs, lines)
    changed = run(jobs, out, tiny_repos, engine)
    assert (changed.done, changed.skipped) == (1, 5)
    records = manifest(out)
    assert sorted(record["id"] for record in records) == [f"{i:06d}" for i in range(1, 7)]
    assert read_recipe(out / "000006-0.png")["prompt"] == "a blue horse"


def test_jpeg_and_webp_files_and_a_change_of_format_or_quality_redoes_the_jobs(
    tiny_repos: dict[str, Path], engine: UnitRunner, tmp_path: Path
) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job_line(1, prompt="рыжий кот 🐱"), job_line(2, num_images=2)])
    png_out, out = tmp_path / "png", tmp_path / "out"
    run(jobs, png_out, tiny_repos, engine)
    names = ["000001-0", "000002-0", "000002-1"]
    assert sorted(pngs(png_out)) == [f"{name}.png" for name in names]

    def check(suffix: str, output_format: str, quality: int) -> None:
        assert sorted(p.name for p in out.glob(f"*{suffix}")) == [name + suffix for name in names]
        assert {record["quality"] for record in manifest(out)} == {quality}
        assert sorted(name for record in manifest(out) for name in record["files"]) == [n + suffix for n in names]
        for name in names:
            png = (png_out / f"{name}.png").read_bytes()
            # The same image and recipe as the PNG run's: its PNG, re-encoded, gives the file byte for byte.
            assert (out / (name + suffix)).read_bytes() == transcode(png, output_format, quality)
            assert read_recipe(out / (name + suffix)) == read_recipe(png)
        assert read_recipe(out / f"000001-0{suffix}")["prompt"] == "рыжий кот 🐱"

    summary = run(jobs, out, tiny_repos, engine, output_format="webp")
    assert (summary.done, summary.images) == (2, 3)
    check(".webp", "webp", 90)
    # Another format names other files, another quality makes other bytes: either way the jobs are redone.
    summary = run(jobs, out, tiny_repos, engine, output_format="jpeg", quality=70)
    assert (summary.done, summary.skipped) == (2, 0)
    check(".jpg", "jpeg", 70)
    assert run(jobs, out, tiny_repos, engine, output_format="jpeg", quality=70).skipped == 2
    assert run(jobs, out, tiny_repos, engine, output_format="jpeg", quality=40).done == 2
    check(".jpg", "jpeg", 40)
    # A manifest of an earlier version has no "quality": its PNG jobs are complete.
    lines = [json.loads(line) for line in (png_out / MANIFEST).read_text().splitlines()]
    (png_out / MANIFEST).write_text(
        "".join(json.dumps({k: v for k, v in r.items() if k != "quality"}) + "\n" for r in lines)
    )
    assert run(jobs, png_out, tiny_repos, engine).skipped == 2
    with pytest.raises(ValueError, match="quality applies to jpeg and webp only"):
        run(jobs, png_out, tiny_repos, engine, quality=80)


def test_a_run_in_another_format_keeps_the_lines_of_the_jobs_it_did_not_redo(
    tiny_repos: dict[str, Path], engine: UnitRunner, tmp_path: Path
) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job_line(1), job_line(2)])
    out = tmp_path / "out"
    assert run(jobs, out, tiny_repos, engine).done == 2
    # A JPEG run cut short by --limit redoes job 1 only: job 2's PNG line still describes its file.
    summary = run(jobs, out, tiny_repos, engine, output_format="jpeg", limit=1)
    assert (summary.done, summary.skipped) == (1, 0)
    assert sorted((record["id"], record["files"][0]) for record in manifest(out)) == [
        ("000001", "000001-0.jpg"),
        ("000002", "000002-0.png"),
    ]
    # Back to PNG: only job 1 (now listed as JPEG) is redone.
    summary = run(jobs, out, tiny_repos, engine)
    assert (summary.done, summary.skipped) == (1, 1)
    assert sorted(record["files"][0] for record in manifest(out)) == ["000001-0.png", "000002-0.png"]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*COMMAND, "batch", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
    )


def test_console_script(tiny_repos: dict[str, Path], tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job_line(1), "{oops", job_line(3)])
    models = ["--prior", str(tiny_repos["prior"]), "--decoder", str(tiny_repos["decoder"])]
    result = cli(str(jobs), "--out", "out", *models, "--json", "--quiet", cwd=tmp_path)
    assert result.returncode == 1, result.stderr  # a job failed: the manifest says which
    summary = json.loads(result.stdout)
    assert (summary["jobs"], summary["done"], summary["failed"], summary["images"]) == (3, 2, 1, 2)
    assert "1 job(s) failed" in result.stderr
    assert sorted(pngs(tmp_path / "out")) == ["000001-0.png", "000003-0.png"]

    write_jobs(jobs, [job_line(1), "# fixed later", job_line(3)])  # ids are line numbers: keep them
    result = cli(str(jobs), "--out", "out", *models, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "2 jobs: 0 done, 2 already complete, 0 failed" in result.stdout

    for args, code, message in (
        (["missing.jsonl", "--out", "x"], 1, "no such jobs file"),
        ([str(jobs), "--out", "x", "--workers", "2"], 2, "error: --workers needs --ray"),
        # --cpus-per-worker was ignored without --ray (the jobs ran in this process)
        ([str(jobs), "--out", "x", "--cpus-per-worker", "2"], 2, "error: --cpus-per-worker needs --ray"),
        (
            [str(jobs), "--out", "x", "--workers", "2", "--gpus-per-worker", "1", "--cpus-per-worker", "2"],
            2,
            "error: --workers, --gpus-per-worker and --cpus-per-worker need --ray (without it, the jobs run in this",
        ),
        ([str(jobs), "--out", "x", "--prior", "no/such/folder/here"], 1, "no such model folder for --prior"),
        (
            [str(jobs), "--out", "x", "--depth-decoder", str(tiny_repos["decoder"])],
            2,
            f"error: --depth-decoder '{tiny_repos['decoder']}' is a text-to-image decoder (UNet in_channels 4",
        ),
        ([str(jobs), "--out", "x", "--batch-size", "0"], 2, "--batch-size: must be a positive integer"),
        ([str(jobs), "--out", "x", "--compile-cache", "c"], 2, "--compile-cache needs --fast"),
        ([str(jobs), "--out", "x", "--fast", "--compile-cache", str(jobs)], 2, "compile cache folder"),
    ):
        result = cli(*args, cwd=tmp_path)
        assert result.returncode == code and message in result.stderr, (args, result.stderr)


def test_errors_under_python_dash_m(tmp_path: Path) -> None:
    """`python -m kandinsky22.cli batch`: the command's own exit codes and hints (its errors were not recognised as
    kandinsky22.cli's there: exit 1 and "run again with --debug" for all), and an --out that is a file."""
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job_line(1)])
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "café"}\n'.encode("latin-1"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for args, code, message in (
        (["missing.jsonl", "--out", "x"], 1, "hint: check the JOBS path"),
        ([str(jobs), "--out", "x", "--workers", "2"], 2, "error: --workers needs --ray"),
        ([str(jobs), "--out", "file.txt"], 2, "error: --out 'file.txt' is a file; give a folder"),
        (["latin1.jsonl", "--out", "x"], 2, "error: JOBS 'latin1.jsonl' is not UTF-8 text"),
        ([str(jobs), "--out", "x", "--quality", "80"], 2, "error: --quality 80 applies to --format jpeg and webp"),
        ([str(jobs), "--out", "x", "--format", "gif"], 2, "argument --format: must be png, jpeg (or jpg) or webp"),
        ([str(jobs), "--out", "x", "--format", "jpeg", "--quality", "0"], 2, "--quality: must be an integer from 1"),
    ):
        command = [sys.executable, "-m", "kandinsky22.cli", "batch", *args]
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
        assert result.returncode == code and message in result.stderr, (args, result.stderr)
        assert "RuntimeFailure" not in result.stderr and "UsageError" not in result.stderr


def test_unit_runner_keeps_compile_caches_where_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each worker process (a Ray actor, or this one) points torch.compile's caches at the folder of --compile-cache.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "before"))  # restored after the test
    UnitRunner(device="cpu", fast=True, compile_cache=str(tmp_path / "cache"))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache") and (tmp_path / "cache").is_dir()


def test_a_byte_order_mark_is_not_part_of_the_first_line(tmp_path: Path) -> None:
    """A jobs file saved by a Windows editor starts with a UTF-8 byte-order mark: its first job was 'not valid JSON'."""
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_bytes(b"\xef\xbb\xbf" + (json.dumps(job_line(1)) + "\n").encode())
    (entry,) = read_jobs(jobs)
    assert entry.error is None and entry.job.prompt == "a red cat 1"


def test_a_recipe_too_long_for_a_jpeg_fails_its_line_when_the_file_is_read(tmp_path: Path) -> None:
    """A JPEG's Exif holds 64 KiB of recipe: the line failed only once its image had been made. WebP takes it."""
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{**job_line(1), "prompt": "a red cat " * 4000}, job_line(2)])
    long, short = read_jobs(jobs, output_format="jpeg")
    assert long.error.startswith("line 1: the recipe takes") and "more than a JPEG holds" in long.error
    assert short.error is None
    assert [entry.error for entry in read_jobs(jobs, output_format="webp")] == [None, None]
