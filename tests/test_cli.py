"""The ``kandinsky22`` console script, run in subprocesses on checkpoints written by ``kandinsky22 make-tiny``.

Model runs are grouped per subprocess (each pays torch's start-up); argument errors need no models and return fast.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from kandinsky22.jobs import Job
from kandinsky22.recipe import encode_image, job_from_recipe, read_recipe, save_image

SCRIPT = shutil.which("kandinsky22")
COMMAND = [SCRIPT] if SCRIPT else [sys.executable, "-m", "kandinsky22.cli"]
FAST = ["--steps", "3", "--prior-steps", "3", "--quiet"]
RECIPE_KEYS = set(Job().to_dict()) | {"tool", "version", "device", "dtype", "inputs_sha256"}


def run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # No network in tests; one thread per process, as the suite's workers (the models are tiny: threads only thrash).
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [*COMMAND, *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=600, check=False
    )


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr
    return result


def pixels(path: Path) -> np.ndarray:
    with PIL.Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        return np.asarray(image)


def write_image(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    PIL.Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path, format="PNG")
    return path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """``kandinsky22 make-tiny`` run once per test session, shared by the xdist workers through a file lock."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # xdist: the session's folder
    listing = shared / "k22tiny-cli.json"
    with FileLock(str(shared / "k22tiny-cli.lock")):
        if not listing.is_file():
            root = shared / "k22tiny-cli"
            result = ok(run("make-tiny", str(root), "--json", cwd=shared))
            listing.write_text(result.stdout)
    repos = json.loads(listing.read_text())
    assert set(repos) == {"prior", "decoder", "decoder-inpaint", "controlnet-depth"}
    return repos


def models(tiny: dict[str, str], decoder: str = "decoder") -> list[str]:
    return ["--prior", tiny["prior"], "--decoder", tiny[decoder]]


# ----------------------------------------------------------------------------------------------------------------------
# Runs on tiny checkpoints
# ----------------------------------------------------------------------------------------------------------------------


def test_generate_exact_size_recipe_json_then_rerun_from_png_and_prompts_file(
    tiny: dict[str, str], tmp_path: Path
) -> None:
    size = ["--width", "80", "--height", "72"]
    result = ok(
        run(
            "generate",
            "a red cat",
            "--seed",
            "7",
            "--num-images",
            "2",
            *size,
            *FAST,
            "--json",
            "-o",
            "out/{n}-{seed}.png",
            *models(tiny),
            cwd=tmp_path,
        )
    )
    summary = json.loads(result.stdout)
    assert [(i["path"], i["seed"], i["width"], i["height"]) for i in summary["images"]] == [
        ("out/1-7.png", 7, 80, 72),
        ("out/2-8.png", 8, 80, 72),
    ]
    assert {"load", "prior", "decoder", "decode", "total"} <= set(summary["timings"])
    assert set(summary["images"][0]["timings"]) >= {"prior", "decoder", "decode"}
    assert (summary["device"], summary["dtype"]) == ("cpu", "fp32")
    first, second = tmp_path / "out/1-7.png", tmp_path / "out/2-8.png"
    assert pixels(first).shape == (72, 80, 3)
    recipe = read_recipe(second)
    assert set(recipe) == RECIPE_KEYS
    expected = {"task": "text2img", "prompt": "a red cat", "seed": 8, "num_images": 1, "steps": 3, "prior_steps": 3}
    expected |= {"width": 80, "height": 72, "scheduler": "ddpm", "guidance": 4.0, "prior": tiny["prior"]}
    assert {k: recipe[k] for k in expected} == expected
    assert not np.array_equal(pixels(first), pixels(second))

    # --from-png re-runs the recorded job: pixel for pixel.
    rerun = ok(run("generate", "--from-png", str(second), "--quiet", "-o", "again.png", cwd=tmp_path))
    assert "seed 8" in rerun.stdout
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(second))

    # A prompts file: one job per line (JSON lines override the command line); the same seed gives the same pixels
    # as in the first run, in another process.
    (tmp_path / "prompts.txt").write_text('# jobs\n{"prompt": "a red cat", "seed": 7}\n\na blue dog\n')
    batch = ok(
        run(
            "generate",
            "--prompts-file",
            "prompts.txt",
            "--seed",
            "100",
            *size,
            *FAST,
            "-o",
            "batch/{n}.png",
            *models(tiny),
            cwd=tmp_path,
        )
    )
    assert len(batch.stdout.splitlines()) == 2
    assert np.array_equal(pixels(tmp_path / "batch/1.png"), pixels(first))
    dog = read_recipe(tmp_path / "batch/2.png")
    assert (dog["prompt"], dog["seed"], dog["width"]) == ("a blue dog", 100, 80)


def test_sigmas_respace_the_sampler_and_the_recipe_remakes_the_image(tiny: dict[str, str], tmp_path: Path) -> None:
    """--sigmas beta changes the image, is recorded (only when given), and --from-png remakes it; --sigmas default over
    that recipe gives the sampler's own spacing back."""
    common = ["x", "--seed", "3", "--scheduler", "euler", "--width", "64", "--height", "64", *FAST, *models(tiny)]
    ok(run("generate", *common, "-o", "own.png", cwd=tmp_path))
    ok(run("generate", *common, "--sigmas", "beta", "-o", "beta.png", cwd=tmp_path))
    assert "sigmas" not in read_recipe(tmp_path / "own.png")
    assert read_recipe(tmp_path / "beta.png")["sigmas"] == "beta"
    assert not np.array_equal(pixels(tmp_path / "own.png"), pixels(tmp_path / "beta.png"))
    ok(run("generate", "--from-png", "beta.png", "--quiet", "-o", "again.png", cwd=tmp_path))
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "beta.png"))
    ok(run("generate", "--from-png", "beta.png", "--sigmas", "default", "--quiet", "-o", "back.png", cwd=tmp_path))
    assert np.array_equal(pixels(tmp_path / "back.png"), pixels(tmp_path / "own.png"))
    assert "sigmas" not in read_recipe(tmp_path / "back.png")


def test_img2img_writes_exact_size_and_overwrites_only_when_asked(tiny: dict[str, str], tmp_path: Path) -> None:
    photo = write_image(tmp_path / "photo.png", (100, 60), seed=1)
    (tmp_path / "result.png").write_bytes(b"old")
    args = ["img2img", "a red cat", "--image", "photo.png", "--strength", "0.5", "--width", "80", "--height", "72"]
    refused = run(*args, *FAST, "-o", "result.png", *models(tiny), cwd=tmp_path)
    assert refused.returncode == 1 and "exists" in refused.stderr and "--overwrite" in refused.stderr
    assert (tmp_path / "result.png").read_bytes() == b"old"
    ok(run(*args, *FAST, "--seed", "3", "-o", "result.png", "--overwrite", *models(tiny), cwd=tmp_path))
    assert pixels(tmp_path / "result.png").shape == (72, 80, 3)
    recipe = read_recipe(tmp_path / "result.png")
    assert (recipe["task"], recipe["strength"], recipe["image"]) == ("img2img", 0.5, str(photo.resolve()))
    assert recipe["inputs_sha256"]["image"] == hashlib.sha256(photo.read_bytes()).hexdigest()

    # The recipe names the input: --from-png re-makes it without repeating --image (argparse required it).
    ok(run("img2img", "--from-png", "result.png", "--quiet", "-o", "again.png", cwd=tmp_path))
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "result.png"))


def test_inpaint_defaults_to_the_input_size(tiny: dict[str, str], tmp_path: Path) -> None:
    write_image(tmp_path / "photo.png", (100, 70), seed=1)
    mask = np.zeros((70, 100), dtype=np.uint8)
    mask[10:40, 20:70] = 255
    PIL.Image.fromarray(mask).save(tmp_path / "mask.png")
    args = ["inpaint", "a hat", "--image", "photo.png", "--mask", "mask.png", "--seed", "1", "-o", "hat.png"]
    ok(run(*args, *FAST, *models(tiny, "decoder-inpaint"), cwd=tmp_path))
    assert pixels(tmp_path / "hat.png").shape == (70, 100, 3)
    recipe = read_recipe(tmp_path / "hat.png")
    assert (recipe["task"], recipe["width"], recipe["height"]) == ("inpaint", 100, 70)
    assert set(recipe["inputs_sha256"]) == {"image", "mask"}
    ok(run("inpaint", "--from-png", "hat.png", "--quiet", "-o", "again.png", cwd=tmp_path))  # no --image, --mask
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "hat.png"))
    assert "keep_unmasked" not in recipe

    # --keep-unmasked: the photo's own pixels where the mask is black (at its exact size, past the grid's padding),
    # the same repainted pixels; recorded, remade by --from-png, and undone by --no-keep-unmasked.
    ok(run(*args[:-1], "kept.png", "--keep-unmasked", *FAST, *models(tiny, "decoder-inpaint"), cwd=tmp_path))
    kept, plain, photo = pixels(tmp_path / "kept.png"), pixels(tmp_path / "hat.png"), pixels(tmp_path / "photo.png")
    assert np.array_equal(kept[mask == 0], photo[mask == 0]) and not np.array_equal(plain[mask == 0], photo[mask == 0])
    assert np.array_equal(kept[mask == 255], plain[mask == 255])
    assert read_recipe(tmp_path / "kept.png")["keep_unmasked"] is True
    ok(run("inpaint", "--from-png", "kept.png", "--quiet", "-o", "kept-again.png", cwd=tmp_path))
    assert np.array_equal(pixels(tmp_path / "kept-again.png"), kept)
    ok(run("inpaint", "--from-png", "kept.png", "--no-keep-unmasked", "--quiet", "-o", "back.png", cwd=tmp_path))
    assert np.array_equal(pixels(tmp_path / "back.png"), plain)
    # --mask-blur 4 (σ in pixels) softens the edge: beyond 4σ of the mask the photo is untouched, at its edge a mix
    ok(run("inpaint", "--from-png", "kept.png", "--mask-blur", "4", "--quiet", "-o", "soft.png", cwd=tmp_path))
    soft = pixels(tmp_path / "soft.png")
    assert read_recipe(tmp_path / "soft.png")["mask_blur"] == 4 and "mask_blur" not in read_recipe(
        tmp_path / "kept.png"
    )
    assert np.array_equal(soft[56:], photo[56:]) and not np.array_equal(soft[40], photo[40])


def test_mix_of_a_text_and_an_image(tiny: dict[str, str], tmp_path: Path) -> None:
    write_image(tmp_path / "style.png", (64, 64), seed=2)
    args = ["mix", "--item", "a red cat", "--weight", "0.7", "--item", "style.png", "--weight", "0.3"]
    ok(
        run(
            *args, "--width", "96", "--height", "64", "--seed", "5", *FAST, "-o", "mix.png", *models(tiny), cwd=tmp_path
        )
    )
    assert pixels(tmp_path / "mix.png").shape == (64, 96, 3)
    recipe = read_recipe(tmp_path / "mix.png")
    assert recipe["items"] == ["a red cat", str((tmp_path / "style.png").resolve())]
    assert recipe["weights"] == [0.7, 0.3] and recipe["inputs_sha256"]["items"][0] is None


def test_depth_with_and_without_a_start_image(tiny: dict[str, str], tmp_path: Path) -> None:
    write_image(tmp_path / "depth.png", (70, 90), seed=3, mode="L")
    write_image(tmp_path / "photo.png", (70, 90), seed=4)
    (tmp_path / "jobs.jsonl").write_text('{"prompt": "a robot"}\n{"prompt": "a robot", "image": "photo.png"}\n')
    args = ["depth", "--hint", "depth.png", "--prompts-file", "jobs.jsonl", "--seed", "9", "-o", "robot-{n}.png"]
    ok(run(*args, *FAST, *models(tiny, "controlnet-depth"), cwd=tmp_path))
    for n in (1, 2):
        assert pixels(tmp_path / f"robot-{n}.png").shape == (90, 70, 3)
    plain, started = read_recipe(tmp_path / "robot-1.png"), read_recipe(tmp_path / "robot-2.png")
    assert (plain["task"], plain["image"], plain["strength"]) == ("depth", None, None)
    assert (started["image"], started["strength"]) == (str((tmp_path / "photo.png").resolve()), 0.5)


def test_from_png_runs_in_the_recorded_dtype(tiny: dict[str, str], tmp_path: Path) -> None:
    """A PNG made in bf16 re-made with --from-png alone: the same pixels (it ran in the default dtype, fp32 here)."""
    args = ["generate", "a red cat", "--dtype", "bf16", "--seed", "4", "--width", "64", "--height", "64"]
    ok(run(*args, *FAST, "-o", "bf16.png", *models(tiny), cwd=tmp_path))
    assert read_recipe(tmp_path / "bf16.png")["dtype"] == "bf16"
    ok(run("generate", "--from-png", "bf16.png", "--quiet", "-o", "again.png", cwd=tmp_path))
    assert read_recipe(tmp_path / "again.png")["dtype"] == "bf16"
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "bf16.png"))
    # --dtype given overrides the recorded one, as every option does.
    ok(run("generate", "--from-png", "bf16.png", "--dtype", "fp32", "--quiet", "-o", "fp32.png", cwd=tmp_path))
    assert read_recipe(tmp_path / "fp32.png")["dtype"] == "fp32"


def test_a_recipe_too_long_for_a_jpeg_is_refused_before_the_models_load(tiny: dict[str, str], tmp_path: Path) -> None:
    """A JPEG's Exif holds 64 KiB: a 40,000-character prompt (80 kB in UTF-16) was refused only when the image was
    written, after the whole run. WebP takes it."""
    prompt = "a red cat " * 4000
    refused = run("generate", prompt, *FAST, "-o", "long.jpg", *models(tiny), cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr
    assert "--out (JPEG): the recipe takes" in refused.stderr and "more than a JPEG holds" in refused.stderr
    assert "loading" not in refused.stderr and not (tmp_path / "long.jpg").exists()
    ok(
        run(
            "generate", prompt, *FAST, "--width", "64", "--height", "64", "-o", "long.webp", *models(tiny), cwd=tmp_path
        )
    )
    assert read_recipe(tmp_path / "long.webp")["prompt"] == prompt


def test_jpeg_and_webp_outputs_carry_the_recipe_that_remakes_them(tiny: dict[str, str], tmp_path: Path) -> None:
    """-o cat.JPG writes a JPEG holding the recipe; --from-png on it re-makes the job into a folder as WebP, and
    --from-image on that WebP re-makes it as PNG. JPEG and WebP are lossy, so the recipes and jobs are compared; the
    PNG's pixels, encoded as the JPEG was, give the JPEG's bytes: the same image was made each time."""
    prompt = "рыжий кот в шляпе 🐱🎩"
    size = ["--width", "64", "--height", "64"]
    first = ok(
        run(
            "generate",
            prompt,
            "--seed",
            "5",
            *size,
            *FAST,
            "--quality",
            "80",
            "-o",
            "cat.JPG",
            *models(tiny),
            cwd=tmp_path,
        )
    )
    assert first.stdout.startswith("cat.JPG  seed 5  64x64")
    jpeg = tmp_path / "cat.JPG"
    assert jpeg.read_bytes()[:3] == b"\xff\xd8\xff"
    recipe = read_recipe(jpeg)
    assert set(recipe) == RECIPE_KEYS
    assert (recipe["prompt"], recipe["seed"], recipe["steps"], recipe["prior"]) == (prompt, 5, 3, tiny["prior"])

    ok(run("generate", "--from-png", "cat.JPG", "--format", "webp", "--quiet", "-o", "again/", cwd=tmp_path))
    webp = tmp_path / "again" / "kandinsky22-5.webp"
    assert webp.read_bytes()[8:12] == b"WEBP"
    ok(run("generate", "--from-image", str(webp), "--quiet", "-o", "third.png", cwd=tmp_path))
    png = tmp_path / "third.png"

    assert read_recipe(webp) == recipe and read_recipe(png) == recipe  # nothing format-specific in a recipe
    assert job_from_recipe(read_recipe(webp)) == job_from_recipe(read_recipe(png)) == job_from_recipe(recipe)
    with PIL.Image.open(png) as image:
        assert encode_image(image, recipe, "jpeg", 80) == jpeg.read_bytes()


# ----------------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "choose a command: generate, img2img, inpaint, mix, depth, make-tiny"),
        (["generate"], "generate needs a PROMPT (or --prompts-file, or --from-png)"),
        (["generate", "x", "--steps", "0"], "argument --steps: must be from 1 to 1000, got 0"),
        (["generate", "x", "--steps", "many"], "argument --steps: must be an integer from 1 to 1000, got 'many'"),
        (["generate", "x", "--prior-steps", "1"], "argument --prior-steps: must be from 2 to 1000, got 1"),
        (["generate", "x", "--scheduler", "plms"], "argument --scheduler: invalid choice: 'plms' (choose from"),
        (["generate", "x", "--sigmas", "cosine"], "argument --sigmas: invalid choice: 'cosine' (choose from"),
        (
            ["generate", "x", "--scheduler", "ddim", "--sigmas", "karras"],
            "sigmas 'karras' does not apply to the ddim sampler; the samplers that take it: dpm++, euler,",
        ),
        (["generate", "x", "--sigmas", "beta"], "sigmas 'beta' does not apply to the ddpm sampler"),
        (["generate", "x", "--keep-unmasked"], "unrecognized arguments: --keep-unmasked"),
        (["generate", "x", "--width", "63"], "argument --width: must be from 64 to 2048, got 63"),
        (["generate", "x", "--guidance", "0.5"], "argument --guidance: must be a number from 1 to 100, got '0.5'"),
        (["generate", "x", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8' (choose from"),
        (["generate", "x", "--device", "tpu"], "argument --device: must be auto, cpu, cuda, cuda:N or mps"),
        (["generate", "x", "-o", "cat.gif"], "--out must name a .png, .jpg, .jpeg or .webp file (the recipe is"),
        (
            ["generate", "x", "-o", "cat.jpg", "--format", "png"],
            "--out 'cat.jpg' names a JPEG file but --format is png",
        ),
        (["generate", "x", "-o", "out/{n}.webp", "--format", "jpg"], "names a WebP file but --format is jpeg"),
        (["generate", "x", "-o", "cat.PNG", "--quality", "80"], "--quality applies to jpeg and webp files; 'cat.PNG'"),
        (["generate", "x", "--quality", "80"], "--quality applies to jpeg and webp files; 'kandinsky22-{seed}.png'"),
        (["generate", "x", "--format", "jpeg", "--quality", "0"], "argument --quality: must be from 1 to 100, got 0"),
        (["generate", "x", "--format", "gif"], "argument --format: must be png, jpeg (or jpg) or webp, got 'gif'"),
        (["generate", "--from-image", "plain.jpg"], "--from-image: 'plain.jpg' holds no kandinsky22 recipe"),
        (["generate", "--from-png", "plain.webp"], "--from-png: 'plain.webp' holds no kandinsky22 recipe"),
        (["generate", "x", "-o", "{name}.png"], "--out pattern '{name}.png' may only use {n} and {seed}"),
        (["make-tiny", "plain.png"], "DIR 'plain.png' is a file; give a folder"),
        (["generate", "x", "-o", "plain.png/x.png"], "--out needs 'plain.png' to be a folder, but 'plain.png' is a"),
        (["generate", "--prompts-file", "bad.jsonl"], "bad.jsonl line 2: not valid JSON"),
        (["generate", "--prompts-file", "latin1.txt"], "--prompts-file 'latin1.txt' is not UTF-8 text"),
        # A byte-order mark before a JSON line: the line was taken as a prompt, "{...}" drawn as text.
        (["generate", "--prompts-file", "bom.jsonl"], "bom.jsonl line 1: unknown job field(s) colour"),
        (["mix", "--prompts-file", "letters.jsonl"], "letters.jsonl line 1: items must be a list, got 'ab'"),
        (["generate", "--prompts-file", "null.jsonl"], "null.jsonl line 1: items must be a list, got None"),
        (
            ["generate", "--prompts-file", "unknown.jsonl"],
            "unknown.jsonl line 1: unknown job field(s) colour; allowed:",
        ),
        (["generate", "--from-png", "plain.png"], "--from-png: 'plain.png' holds no kandinsky22 recipe"),
        (
            ["img2img", "--from-png", "uploaded.png"],
            "--from-png: 'uploaded.png' records no file for --image (it was uploaded); give --image",
        ),
        (
            ["generate", "--from-png", "plain.png", "--prompts-file", "p.txt"],
            "--from-png and --prompts-file cannot be combined",
        ),
        (["img2img", "x"], "img2img needs --image (or --prompts-file, or --from-png)"),
        (["inpaint", "x", "--image", "plain.png"], "inpaint needs --mask (or --prompts-file, or --from-png)"),
        (["depth", "x"], "depth needs --hint (or --prompts-file, or --from-png)"),
        (["img2img", "x", "--image", "plain.png", "--strength", "0.1", "--steps", "5"], "leaves no denoising step"),
        (["img2img", "x", "--image", "plain.png", "--strength", "0"], "argument --strength: must be a number above 0"),
        (["mix", "--item", "a", "--weight", "1", "--weight", "2"], "mix needs one weight per item: got 1 items and 2"),
        (["mix"], "mix needs at least one --item TEXT_OR_IMAGE"),
        (["generate", "x", "--prompts-file", "p.txt"], "give either PROMPT or --prompts-file, not both"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("a\n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    (tmp_path / "unknown.jsonl").write_text('{"prompt": "a", "colour": "red"}\n')
    (tmp_path / "letters.jsonl").write_text('{"items": "ab", "weights": [1, 1]}\n')
    (tmp_path / "latin1.txt").write_bytes("a café\n".encode("latin-1"))
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "a", "colour": "red"}\n')
    (tmp_path / "null.jsonl").write_text('{"prompt": "a", "items": null}\n')
    write_image(tmp_path / "plain.png", (64, 64), seed=0)
    for name in ("plain.jpg", "plain.webp"):
        PIL.Image.open(tmp_path / "plain.png").save(tmp_path / name)
    # What the server writes for an img2img upload: the recipe has no file for the image.
    uploaded = {**Job(task="img2img", prompt="x", seed=1).to_dict(), "tool": "kandinsky22", "version": "0"}
    save_image(PIL.Image.new("RGB", (64, 64)), tmp_path / "uploaded.png", uploaded)
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "error: " in lines[0] and message in lines[0], result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["inpaint", "x", "--image", "plain.png", "--mask", "gone.png"], 1, "no such file for --mask: 'gone.png'"),
        (["depth", "x", "--hint", "plain.png", "--image", "gone.png"], 1, "no such file for --image: 'gone.png'"),
        (["mix", "--item", "a", "--item", "gone.png"], 1, "no such file for --item: 'gone.png'"),
        (["img2img", "x", "--image", "cut.png"], 2, "--image '{tmp}/cut.png' is not an image file PIL can read"),
        (["inpaint", "x", "--image", "plain.png", "--mask", "cut.png"], 2, "--mask '{tmp}/cut.png' is not an image"),
        (["img2img", "x", "--image", "text.png"], 2, "--image '{tmp}/text.png' is not an image file PIL can read"),
        (["generate", "--from-png", "cut.png"], 2, "--from-png: 'cut.png' is not a readable PNG file"),
    ],
)
def test_input_images_are_checked_before_the_models_load(
    args: list[str], status: int, message: str, tmp_path: Path
) -> None:
    """A missing or damaged input fails at once, naming its option (the default models are not even looked up);
    it was found after the models loaded, or reported with a hint about the network."""
    plain = write_image(tmp_path / "plain.png", (64, 64), seed=0)
    (tmp_path / "cut.png").write_bytes(plain.read_bytes()[:200])  # a PNG cut short: its header reads, its pixels not
    (tmp_path / "text.png").write_text("not an image")
    result = run(*args, "-o", "out.png", cwd=tmp_path, env={"HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == status, result.stderr
    error = result.stderr.splitlines()[0]
    assert message.format(tmp=tmp_path.resolve()) in error and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == (2 if status == 1 else 1)  # exit 1: the error and a hint


def test_repeated_output_name_is_an_argument_error(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text('{"prompt": "a", "seed": 1}\n{"prompt": "b", "seed": 1}\n')
    result = run("generate", "--prompts-file", "p.txt", "-o", "{seed}.png", cwd=tmp_path)
    assert result.returncode == 2 and "gives '1.png' to images 1 and 2; add {n} to the pattern" in result.stderr


def test_missing_model_folder_exits_1_naming_it(tmp_path: Path) -> None:
    result = run("generate", "a red cat", "--decoder", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert result.returncode == 1
    error, hint = result.stderr.splitlines()
    assert f"no such model folder for --decoder: '{tmp_path / 'nowhere'}'" in error and "make-tiny" in hint
    assert "Traceback" not in result.stderr
    debug = run("generate", "a red cat", "--decoder", str(tmp_path / "nowhere"), "--debug", cwd=tmp_path)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_offline_hub_exits_1_naming_the_repository(tmp_path: Path) -> None:
    result = run("generate", "a red cat", "--quiet", "-o", "x.png", cwd=tmp_path, env={"HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    error, hint = result.stderr.splitlines()
    assert "Could not get 'kandinsky-community/kandinsky-2-2-prior'" in error and "local folder" in hint


def test_unreachable_hub_is_the_whole_message_on_one_line(tmp_path: Path) -> None:
    # A refused connection (a local port: no network needed) gives huggingface_hub's message over several lines; the
    # error line was its first line, cut inside a parenthesis, without the "download it elsewhere" advice.
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    result = run("generate", "a red cat", "--quiet", "-o", "x.png", cwd=tmp_path, env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    error, hint = result.stderr.splitlines()
    assert "Could not get 'kandinsky-community/kandinsky-2-2-prior'" in error and "Connection refused" in error
    assert error.count("(") == error.count(")") and "huggingface-cli download" in error
    assert "local folder" in hint


def test_an_unavailable_device_exits_1_with_a_hint_about_device(tmp_path: Path, tiny: dict[str, str]) -> None:
    # The hint was "run again with --debug for the traceback", which says nothing about what to do.
    models = ["--prior", tiny["prior"], "--decoder", tiny["decoder"]]
    result = run("generate", "x", *models, *FAST, "--device", "cuda:99", "-o", "x.png", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    error, hint = result.stderr.splitlines()
    assert "device 'cuda:99' is not available" in error
    assert "--device auto" in hint and "--device cpu" in hint


def test_argument_errors_come_back_without_importing_torch(tmp_path: Path) -> None:
    code = (
        "import sys; import kandinsky22.cli as cli; "
        "rc = (cli.main(['img2img', 'x', '--image', 'a.png', '--strength', '0.1', '--steps', '5']), "
        "cli.main(['generate', 'x', '--prior', '/nonexistent/prior']), "
        "cli.main(['generate', 'x', '--lora', 'gone.safetensors'])); "
        "print(rc, sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "(2, 1, 2) []"


def test_out_of_memory_is_one_line_and_a_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import torch

    from kandinsky22 import cli, jobs

    def run_out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore details")

    monkeypatch.setattr(jobs.Engine, "run", run_out_of_memory)
    monkeypatch.setattr(jobs.Engine, "missing_models", lambda self, job: [])
    args = [
        "generate",
        "x",
        "--prior",
        str(tmp_path),
        "--decoder",
        str(tmp_path),
        "--quiet",
        "-o",
        str(tmp_path / "x.png"),
    ]
    assert cli.main(args) == 1
    error, hint = capsys.readouterr().err.splitlines()
    assert error == "kandinsky22 generate: error: out of memory: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert hint.startswith("kandinsky22 generate: hint: try --dtype fp16, a smaller --width/--height")
    assert not (tmp_path / "x.png").exists()


def test_an_output_that_cannot_be_written_is_one_line_and_a_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A full disk when saving: the error names the file, the hint the output (it was a hint about the network)."""
    import PIL.Image

    from kandinsky22 import jobs, recipe

    def run_one(self, group, **kwargs):
        return [jobs.Result(PIL.Image.new("RGB", (64, 64)), job.resolved(), {}) for job in group]

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(jobs.Engine, "run", run_one)
    monkeypatch.setattr(jobs.Engine, "missing_models", lambda self, job: [])
    monkeypatch.setattr(recipe, "save_image", disk_full)
    from kandinsky22 import cli

    out = tmp_path / "x.png"
    args = ["generate", "x", "--prior", str(tmp_path), "--decoder", str(tmp_path), "--quiet", "-o", str(out)]
    assert cli.main(args) == 1
    error, hint = capsys.readouterr().err.splitlines()
    assert error == f"kandinsky22 generate: error: cannot write '{out}': No space left on device"
    assert hint == "kandinsky22 generate: hint: check the --out folder and the free space"


def test_serve_warm_up_sizes_parse_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from kandinsky22.server.command import add_arguments

    parser = argparse.ArgumentParser(prog="kandinsky22 serve")
    add_arguments(parser)
    assert parser.parse_args([]).warm_up is None  # serve() then takes 512x512 if --max-side allows it
    assert parser.parse_args(["--warm-up", "768x512, 1024X1024"]).warm_up == [(768, 512), (1024, 1024)]
    assert parser.parse_args(["--warm-up", "none"]).warm_up == []
    assert parser.parse_args([]).compile_scope == "auto"
    assert parser.parse_args(["--compile-scope", "none"]).compile_scope == "none"
    for bad in ("512", "0x512", "512x", "99999x512", "512x512;768x768"):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(["--warm-up", bad])
        assert exit_info.value.code == 2
        assert "--warm-up: must be WIDTHxHEIGHT sizes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["--fast", "--no-fast"])
    assert "not allowed with argument" in capsys.readouterr().err
    # A device torch does not know was accepted: the server started, then answered 503 with the load error.
    assert parser.parse_args(["--device", "cuda:1"]).device == "cuda:1"
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--device", "tpu"])
    assert exit_info.value.code == 2
    assert "argument --device: must be auto, cpu, cuda, cuda:N or mps, got 'tpu'" in capsys.readouterr().err

    from kandinsky22 import cli

    # --max-n above what a job may hold was advertised in /v1/models while requests were capped at 16.
    assert cli.main(["serve", "--max-n", "17"]) == 2
    assert "--max-n at most 16; got 1024, 150 and 17" in capsys.readouterr().err
    assert cli.main(["serve", "--warm-up", "512x512,1024x768", "--max-side", "768"]) == 2
    assert capsys.readouterr().err.strip() == (
        "kandinsky22 serve: error: --warm-up 1024x768 is larger than --max-side 768: no request could use it"
    )


@pytest.mark.parametrize("negative", [[], ["--negative", "blurry"]], ids=["plain", "negative"])
@pytest.mark.parametrize("scope", [None, "blocks", "model", "none"])
def test_fast_compiles_the_runs_shapes_when_the_models_load(
    negative: list[str],
    scope: str | None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """--fast hands the engine the run's (height, width, images per call) to warm up, and the prior's doubled batch
    only when a job has a negative prompt, in --compile-scope (default auto); a note says it compiles, or, with
    --compile-scope none, that it does not, or with auto where it would."""
    import PIL.Image

    from kandinsky22 import cli, jobs

    seen = []

    def fake_run(self, group, progress=None, cancel=None):
        seen.append((self.fast, self.warm_up, self.negative_prompts, self.compile_scope))
        return [jobs.Result(PIL.Image.new("RGB", (job.width, job.height)), job, {}) for job in group]

    monkeypatch.setattr(jobs.Engine, "run", fake_run)
    monkeypatch.setattr(jobs.Engine, "missing_models", lambda self, job: [])
    args = ["generate", "x", "--prior", str(tmp_path), "--decoder", str(tmp_path), "--fast"]
    args += [] if scope is None else ["--compile-scope", scope]
    sizes = ["--width", "96", "--height", "64", "--num-images", "3", "--batch-size", "2", *negative]
    assert cli.main([*args, *sizes, "-o", str(tmp_path / "x.png")]) == 0
    assert seen[0] == (True, [(64, 96, 1), (64, 96, 2)], bool(negative), scope or "auto")
    what = "compiling for" if scope in ("blocks", "model") else "preparing"
    assert f"fast path: {what} 96x64 (1 per call), 96x64 (2 per call)" in capsys.readouterr().err


def test_compile_scope_needs_fast_and_a_known_scope(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from kandinsky22 import cli, fast, jobs

    assert jobs.COMPILE_SCOPES == fast.COMPILE_SCOPES  # the CLI's copy, kept without importing torch
    args = ["generate", "x", "--prior", str(tmp_path), "--decoder", str(tmp_path), "-o", str(tmp_path / "x.png")]
    assert cli.main([*args, "--compile-scope", "none"]) == 2
    assert "error: --compile-scope none needs --fast" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*args, "--fast", "--compile-scope", "layers"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'layers'" in capsys.readouterr().err


def test_compile_cache_sets_the_inductor_cache_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """--compile-cache DIR: torch.compile's caches go to DIR (created), for generate with --fast and for serve; a
    folder that cannot be one, or the option without the fast path, is an argument error naming it."""
    import PIL.Image

    from kandinsky22 import cli, jobs

    # set here so that monkeypatch restores the variable (or its absence) after the test
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "before"))
    seen = []
    monkeypatch.setattr(
        jobs.Engine,
        "run",
        lambda self, group, progress=None, cancel=None: (
            seen.append(os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
            or [jobs.Result(PIL.Image.new("RGB", (job.width, job.height)), job, {}) for job in group]
        ),
    )
    monkeypatch.setattr(jobs.Engine, "missing_models", lambda self, job: [])
    args = ["generate", "x", "--prior", str(tmp_path), "--decoder", str(tmp_path), "-o", str(tmp_path / "x.png")]
    cache = tmp_path / "cache" / "inner"
    assert cli.main([*args, "--fast", "--compile-cache", str(cache)]) == 0
    assert seen == [str(cache)] and cache.is_dir()

    assert cli.main([*args, "--overwrite", "--compile-cache", str(cache)]) == 2
    assert "error: --compile-cache needs --fast" in capsys.readouterr().err
    a_file = tmp_path / "x.png"  # written above
    assert cli.main([*args, "--overwrite", "--fast", "--compile-cache", str(a_file)]) == 2
    assert f"error: --compile-cache: compile cache folder '{a_file}' cannot be created" in capsys.readouterr().err
    assert cli.main(["serve", "--no-fast", "--compile-cache", str(cache)]) == 2
    assert "error: --compile-cache has no use with --no-fast" in capsys.readouterr().err
    assert cli.main(["serve", "--compile-cache", str(a_file)]) == 2
    assert f"kandinsky22 serve: error: --compile-cache: compile cache folder '{a_file}'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------------
# What a decoder's config files say: checked before the models load where they can be read, else as they load
# ----------------------------------------------------------------------------------------------------------------------

DECODER_OF = {"generate": "decoder", "img2img": "decoder", "mix": "decoder", "inpaint": "decoder-inpaint"}
DECODER_OF["depth"] = "controlnet-depth"
STEPS_1000 = (
    "--steps 1000 is more than the {sampler} sampler of decoder '{decoder}' can take: its schedule would start at "
    "timestep 1000, past the 1000 timesteps the model was trained on (timestep_spacing 'leading', steps_offset 1); "
    "use at most 999 steps"
)
KINDS = {
    "decoder": "a text-to-image decoder (UNet in_channels 4, addition_embed_type 'image')",
    "decoder-inpaint": "an inpainting decoder (UNet in_channels 9, addition_embed_type 'image')",
    "controlnet-depth": "a controlnet-depth decoder (UNet in_channels 8, addition_embed_type 'image_hint')",
}


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model that starts loading fails the command (exit 1, "AssertionError: a model loaded")."""
    from kandinsky22 import jobs

    def load(self, *args, **kwargs):
        raise AssertionError("a model loaded")

    monkeypatch.setattr(jobs.Engine, "prior_pipeline", load)
    monkeypatch.setattr(jobs.Engine, "decoder_pipeline", load)


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "x", "--steps", "1000"],
        ["generate", "x", "--steps", "1000", "--scheduler", "euler"],
        ["generate", "--prompts-file", "p.jsonl"],
        ["img2img", "x", "--image", "plain.png", "--strength", "1", "--steps", "1000"],
        ["inpaint", "x", "--image", "plain.png", "--mask", "plain.png", "--steps", "1000"],
        ["depth", "x", "--hint", "plain.png", "--steps", "1000"],
        ["mix", "--item", "a", "--item", "plain.png", "--steps", "1000", "--scheduler", "ddim"],
    ],
    ids=["generate", "euler", "prompts-file", "img2img", "inpaint", "depth", "mix"],
)
def test_a_step_count_the_sampler_cannot_take_fails_before_the_models_load(
    args: list[str], tiny: dict[str, str], tmp_path: Path, monkeypatch, capsys, no_loading
) -> None:
    """--steps 1000 with the decoders' DDPM config (and DDIM's and Euler's on it) reaches the untrained timestep 1000:
    the pipelines refused it only after the models had loaded and the prior had run (exit 1, "ValueError: ...", the
    --debug hint). Now a usage error from the decoder folder's scheduler config, before anything loads."""
    from kandinsky22 import cli

    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / "plain.png", (64, 64), seed=0)
    (tmp_path / "p.jsonl").write_text('{"prompt": "a", "steps": 999}\n{"prompt": "b", "steps": 1000}\n')
    command = args[0]
    decoder = tiny[DECODER_OF[command]]
    assert cli.main([*args, "--prior", tiny["prior"], "--decoder", decoder, "-o", "out.png"]) == 2
    sampler = args[args.index("--scheduler") + 1] if "--scheduler" in args else "ddpm"
    where = "p.jsonl line 2: " if "--prompts-file" in args else ""
    assert capsys.readouterr().err == (
        f"kandinsky22 {command}: error: {where}{STEPS_1000.format(sampler=sampler, decoder=decoder)}\n"
    )


def test_a_step_count_the_sampler_can_take_is_not_refused(
    tiny: dict[str, str], tmp_path: Path, monkeypatch, capsys, no_loading
) -> None:
    """1000 steps of which the strength keeps the trained ones, 999 steps, and samplers whose schedule stays within
    the trained timesteps at 1000 steps: on to the models."""
    from kandinsky22 import cli

    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / "plain.png", (64, 64), seed=0)
    models = ["--prior", tiny["prior"], "--decoder", tiny["decoder"], "-o", "out.png"]
    for args in (
        ["img2img", "x", "--image", "plain.png", "--strength", "0.5", "--steps", "1000"],
        ["generate", "x", "--steps", "999"],
        ["generate", "x", "--steps", "1000", "--scheduler", "dpm++"],
        ["generate", "x", "--steps", "1000", "--scheduler", "unipc"],
    ):
        assert cli.main([*args, *models, "--quiet"]) == 1, args
        assert "AssertionError: a model loaded" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "given"),
    [
        ("generate", "decoder-inpaint"),
        ("generate", "controlnet-depth"),
        ("img2img", "decoder-inpaint"),
        ("inpaint", "decoder"),
        ("depth", "decoder"),
        ("depth", "decoder-inpaint"),
    ],
)
def test_a_decoder_of_another_kind_is_named_before_the_models_load(
    command: str, given: str, tiny: dict[str, str], tmp_path: Path, monkeypatch, capsys, no_loading
) -> None:
    """The kind a decoder folder holds is in its UNet config: it failed once the models had loaded, as a generic
    "ValueError: ..." with the --debug hint (exit 1)."""
    from kandinsky22 import cli
    from kandinsky22.jobs import DEFAULT_DECODERS

    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / "plain.png", (64, 64), seed=0)
    inputs = {"img2img": ["--image", "plain.png"], "inpaint": ["--image", "plain.png", "--mask", "plain.png"]}
    inputs["depth"] = ["--hint", "plain.png"]
    args = [command, "x", *inputs.get(command, []), "--prior", tiny["prior"], "--decoder", tiny[given]]
    assert cli.main([*args, "-o", "out.png"]) == 2
    task = cli.COMMAND_TASKS[command]
    assert capsys.readouterr().err == (
        f"kandinsky22 {command}: error: --decoder '{tiny[given]}' is {KINDS[given]}, but {task} needs "
        f"{KINDS[DECODER_OF[command]]}, such as {DEFAULT_DECODERS[task]}\n"
    )


def _hub_cache(root: Path, repo: str, folder: str) -> Path:
    """A local hub cache holding ``repo``'s UNet and scheduler configs, copied from ``folder``, as a download leaves
    them (what ``huggingface_hub.try_to_load_from_cache`` reads)."""
    cache = root / "hub"
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / "0123abcd"
    for name in ("unet/config.json", "scheduler/scheduler_config.json"):
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(folder) / name, snapshot / name)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0123abcd")
    return cache


def test_a_hub_decoder_in_the_local_cache_is_checked_before_it_loads(
    tiny: dict[str, str], tmp_path: Path, monkeypatch, capsys, no_loading
) -> None:
    """For a hub id, the configs of a repository downloaded before are in the local hub cache: read there (no
    network); a repository not in the cache is checked once it loads (see the next test)."""
    import huggingface_hub

    from kandinsky22 import cli
    from kandinsky22.jobs import DECODER_REPO

    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / "plain.png", (64, 64), seed=0)
    cache = _hub_cache(tmp_path / "hf", DECODER_REPO, tiny["decoder"])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert cli.main(["generate", "x", "--steps", "1000", "-o", "out.png"]) == 2
    assert capsys.readouterr().err == (
        f"kandinsky22 generate: error: {STEPS_1000.format(sampler='ddpm', decoder=DECODER_REPO)}\n"
    )
    inpaint = ["inpaint", "x", "--image", "plain.png", "--mask", "plain.png", "--decoder", DECODER_REPO]
    assert cli.main([*inpaint, "-o", "out.png"]) == 2
    assert f"error: --decoder '{DECODER_REPO}' is {KINDS['decoder']}, but inpaint needs" in capsys.readouterr().err
    # Not in the cache: nothing to read before loading.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    assert cli.main(["generate", "x", "--steps", "1000", "-o", "out.png", "--quiet"]) == 1
    assert "AssertionError: a model loaded" in capsys.readouterr().err


def test_what_the_configs_tell_only_once_loaded_is_a_usage_error_before_the_prior_runs(
    tiny: dict[str, str], tmp_path: Path, monkeypatch, capsys
) -> None:
    """A decoder whose configs cannot be read before it loads (a hub repository not downloaded yet): the same errors
    once it has loaded, before the prior runs, as a usage error; they were "ValueError: ..." with the --debug hint,
    the step count only after the prior had run."""
    from kandinsky22 import cli, jobs

    def prior_ran(*args, **kwargs):
        raise AssertionError("the prior ran")

    monkeypatch.setattr(jobs, "decoder_config", lambda decoder, filename: None, raising=False)
    monkeypatch.setattr(jobs.Engine, "_embeddings", prior_ran)
    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / "plain.png", (64, 64), seed=0)
    models = ["--prior", tiny["prior"], "--decoder", tiny["decoder"], "--quiet", "-o", "out.png"]
    assert cli.main(["generate", "x", "--steps", "1000", *models]) == 2
    message = STEPS_1000.format(sampler="ddpm", decoder=tiny["decoder"]).removeprefix("--")
    assert capsys.readouterr().err == f"kandinsky22 generate: error: {message}\n"
    assert cli.main(["inpaint", "x", "--image", "plain.png", "--mask", "plain.png", *models]) == 2
    assert capsys.readouterr().err == (
        f"kandinsky22 inpaint: error: decoder '{tiny['decoder']}' is {KINDS['decoder']}, but inpaint needs "
        f"{KINDS['decoder-inpaint']}, such as kandinsky-community/kandinsky-2-2-decoder-inpaint\n"
    )


def test_loading_lines_come_as_each_model_starts_loading(
    tiny: dict[str, str], tmp_path: Path, monkeypatch, capsys
) -> None:
    """ "loading PRIOR" and "loading DECODER" were both printed before the prior started loading."""
    from kandinsky22 import cli
    from kandinsky22.pipelines.decoder import KandinskyV22Pipeline
    from kandinsky22.pipelines.prior import KandinskyV22PriorPipeline

    printed_before = {}
    for cls in (KandinskyV22PriorPipeline, KandinskyV22Pipeline):

        def load(*args, cls=cls, original=cls.from_pretrained, **kwargs):
            printed_before[cls.__name__] = capsys.readouterr().err
            return original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", load)
    out = tmp_path / "out.png"
    args = ["generate", "x", "--prior", tiny["prior"], "--decoder", tiny["decoder"], *FAST[:4], "-o", str(out)]
    assert cli.main([*args, "--width", "64", "--height", "64"]) == 0
    before_prior, before_decoder = printed_before["KandinskyV22PriorPipeline"], printed_before["KandinskyV22Pipeline"]
    assert before_prior.endswith(f"loading prior {tiny['prior']}\n") and tiny["decoder"] not in before_prior
    assert f"loading decoder {tiny['decoder']}\n" in before_decoder and "loading prior" not in before_decoder
    assert "loading" not in capsys.readouterr().err  # none after the loads


def _taken_port() -> socket.socket:
    """A listening socket: a server that would start on its port fails at once (exit 1), instead of serving."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    return taken


def test_serve_refuses_a_decoder_of_another_kind_before_it_starts(
    tiny: dict[str, str], capsys: pytest.CaptureFixture
) -> None:
    """A decoder of another kind for its option failed only once the server had loaded the models (health "error")."""
    from kandinsky22 import cli

    with _taken_port() as taken:
        serve = ["serve", "--port", str(taken.getsockname()[1]), "--prior", tiny["prior"], "--decoder", tiny["decoder"]]
        assert cli.main([*serve, "--depth-decoder", tiny["decoder-inpaint"]]) == 2
    assert capsys.readouterr().err == (
        f"kandinsky22 serve: error: --depth-decoder '{tiny['decoder-inpaint']}' is {KINDS['decoder-inpaint']}, "
        f"but depth needs {KINDS['controlnet-depth']}, such as kandinsky-community/kandinsky-2-2-controlnet-depth\n"
    )


def test_serve_refuses_ray_options_without_ray(tiny: dict[str, str], capsys: pytest.CaptureFixture) -> None:
    """--min-replicas & co. without --ray were ignored: the server ran here, alone, as if they had not been given."""
    from kandinsky22 import cli

    with _taken_port() as taken:
        serve = ["serve", "--port", str(taken.getsockname()[1]), "--prior", tiny["prior"], "--decoder", tiny["decoder"]]
        assert cli.main([*serve, "--min-replicas", "2", "--downscale-delay", "5"]) == 2
        assert capsys.readouterr().err == (
            "kandinsky22 serve: error: --min-replicas and --downscale-delay need --ray (Ray Serve's model replicas; "
            "without it, this process serves alone)\n"
        )
        for option, value in (("--max-replicas", "1"), ("--gpus-per-replica", "0"), ("--cpus-per-replica", "1")):
            assert cli.main([*serve, option, value]) == 2
            assert f"error: {option} needs --ray" in capsys.readouterr().err
        assert cli.main([*serve, "--target-ongoing-requests", "2"]) == 2
        assert "error: --target-ongoing-requests needs --ray" in capsys.readouterr().err
