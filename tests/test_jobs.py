"""jobs.py: validation, defaults, seeds and grouping, exact-size helpers, and the Engine on tiny checkpoints."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from tiny_repos import DECODER_SCHEDULER_CONFIG

from kandinsky22.jobs import (
    DECODER_REPO,
    INPAINT_REPO,
    PRIOR_REPO,
    SCHEDULER_CLASSES,
    SCHEDULERS,
    SIGMA_SPACINGS,
    SPACED_SAMPLERS,
    Cancelled,
    Engine,
    IncompatibleJob,
    Job,
    crop_to_size,
    fit_to_grid,
    group_jobs,
    make_scheduler,
    mix_item_kind,
)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from kandinsky22.tiny import make_tiny_repos

    return make_tiny_repos(tmp_path_factory.mktemp("k22tiny"))


@pytest.fixture(scope="session")
def engine() -> Engine:
    return Engine(device="cpu")


def _write_image(path: Path, size: tuple[int, int], seed: int = 0, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    channels = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    PIL.Image.fromarray(rng.integers(0, 256, channels, dtype=np.uint8)).save(path, format="PNG")
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"task": "paint"}, "task must be one of text2img, img2img, inpaint, mix, depth; got 'paint'"),
        ({"prompt": "  "}, "prompt must be a non-empty text for text2img"),
        ({"steps": 0}, "steps must be from 1 to 1000, got 0"),
        ({"steps": True}, "steps must be an integer from 1 to 1000, got True"),
        ({"prior_steps": 2.5}, "prior_steps must be an integer"),
        ({"prior_steps": 1}, "prior_steps must be from 2 to 1000, got 1"),  # the prior's scheduler needs 2
        ({"guidance": 0.5}, "guidance must be from 1 to 100, got 0.5"),
        ({"prior_guidance": math.nan}, "prior_guidance must be a number"),
        ({"scheduler": "plms"}, "scheduler must be one of ddpm, ddim, dpm++, dpm++-karras, euler, euler-a, unipc"),
        ({"sigmas": "cosine"}, "sigmas must be one of karras, exponential, beta; got 'cosine'"),
        ({"sigmas": "beta"}, "sigmas 'beta' does not apply to the ddpm sampler; the samplers that take it: dpm++,"),
        ({"scheduler": "dpm++-karras", "sigmas": "exponential"}, "does not apply to the dpm++-karras sampler"),
        ({"keep_unmasked": True}, "keep_unmasked is only used by inpaint, not by text2img"),
        ({"mask_blur": 2}, "mask_blur is only used by inpaint, not by text2img"),
        ({"task": "inpaint", "image": "a.png", "mask": "m.png", "mask_blur": 65}, "mask_blur must be from 0 to 64"),
        ({"task": "inpaint", "image": "a.png", "mask": "m.png", "mask_blur": "2"}, "mask_blur must be a number"),
        ({"task": "inpaint", "image": "a.png", "mask": "m.png", "keep_unmasked": 1}, "keep_unmasked must be true or"),
        ({"width": 63}, "width must be from 64 to 2048, got 63"),
        ({"height": 4096}, "height must be from 64 to 2048, got 4096"),
        ({"num_images": 0}, "num_images must be from 1 to 16, got 0"),
        ({"seed": -1}, "seed must be from 0 to"),
        ({"seed": 2**63 - 1, "num_images": 2}, "runs past the largest seed"),
        ({"task": "img2img"}, "img2img needs image"),
        ({"task": "inpaint", "image": "a.png"}, "inpaint needs mask"),
        ({"mask": "m.png"}, "mask is only used by inpaint, not by text2img"),
        ({"task": "depth", "image": "a.png"}, "depth needs hint"),
        ({"hint": "h.png"}, "hint is only used by depth"),
        ({"strength": 0.5}, "strength is only used by img2img and by depth with an image"),
        ({"task": "img2img", "image": "a.png", "strength": 1.5}, "strength must be from 0 to 1, got 1.5"),
        ({"task": "img2img", "image": "a.png", "strength": 0}, "strength must be above 0"),
        ({"task": "img2img", "image": "a.png", "strength": 0.1, "steps": 5}, "leaves no denoising step"),
        ({"task": "depth", "hint": "h.png", "strength": 0.5}, "strength is only used by img2img and by depth with"),
        ({"task": "mix", "prompt": ""}, "mix needs at least one item"),
        ({"task": "mix", "prompt": "", "items": ["a", "b"], "weights": [1]}, "one weight per item: got 2 items"),
        ({"task": "mix", "prompt": "", "items": ["a"], "weights": [0]}, "at least one mix weight must be non-zero"),
        ({"task": "mix", "prompt": "", "items": [" "], "weights": [1]}, "items[0] is empty"),
        ({"task": "mix", "prompt": "", "items": [3], "weights": [1]}, "items[0] must be a text, an image file or"),
        ({"task": "mix", "prompt": "", "items": "ab", "weights": [1, 1]}, "items must be a list, got 'ab'"),
        ({"weights": None}, "weights must be a list, got None"),
        ({"task": "img2img", "image": 5}, "image must be an image file path or an image, got 5"),
        ({"task": "mix", "items": ["a"], "weights": [1]}, "prompt is not used by mix"),
        ({"items": ["a"], "weights": [1]}, "items and weights are only used by mix"),
        ({"prior": ""}, "prior must be a hub id or a folder path"),
        ({"negative": None}, "negative must be a string"),
    ],
)
def test_validation_names_field_and_value(fields: dict, message: str) -> None:
    job = Job(**{"prompt": "a red cat", **fields})
    with pytest.raises(ValueError) as err:
        job.validate()
    assert message in str(err.value)


def test_from_dict_rejects_unknown_fields_listing_allowed() -> None:
    with pytest.raises(ValueError, match=r"unknown job field\(s\) colour; allowed: task, prompt, negative"):
        Job.from_dict({"prompt": "x", "colour": "red"})
    assert Job.from_dict(Job(prompt="x", seed=3).to_dict()) == Job(prompt="x", seed=3)


def test_resolved_fills_task_defaults(tmp_path: Path) -> None:
    job = Job(prompt="a red cat").resolved()
    assert (job.width, job.height, job.strength, job.prior, job.decoder) == (512, 512, None, PRIOR_REPO, DECODER_REPO)
    photo = _write_image(tmp_path / "photo.png", (300, 200))
    img2img = Job(task="img2img", prompt="x", image=str(photo)).resolved()
    assert (img2img.width, img2img.height, img2img.strength) == (300, 200, 0.3)
    assert Job(task="img2img", prompt="x", image=str(photo), width=150).resolved().height == 100
    assert Job(task="img2img", prompt="x", image=str(photo), height=100).resolved().width == 150
    big = _write_image(tmp_path / "big.png", (3000, 1500))
    inpaint = Job(task="inpaint", prompt="x", image=str(big), mask=str(big)).resolved()
    assert (inpaint.width, inpaint.height, inpaint.decoder) == (1024, 512, INPAINT_REPO)
    depth = Job(task="depth", prompt="x", hint=str(photo), image=str(photo)).resolved()
    assert (depth.width, depth.strength) == (300, 0.5)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        Job(task="img2img", prompt="x", image=str(tmp_path / "missing.png")).resolved()
    # A small input is scaled up to MIN_SIDE keeping its aspect (each side was clamped apart: 60x50 gave 64x64).
    small = _write_image(tmp_path / "small.png", (60, 50))
    assert _size(Job(task="img2img", prompt="x", image=str(small)).resolved()) == (77, 64)


def _size(job: Job) -> tuple[int | None, int | None]:
    return job.width, job.height


def test_resolved_keeps_a_size_not_given_within_max_side(tmp_path: Path) -> None:
    photo = _write_image(tmp_path / "photo.png", (300, 200))
    assert _size(Job(prompt="x").resolved(max_side=256)) == (256, 256)
    assert _size(Job(task="img2img", prompt="x", image=str(photo)).resolved(max_side=256)) == (256, 171)
    # A side given is kept: only the other follows the aspect (a server refuses it past its limit).
    assert Job(task="img2img", prompt="x", image=str(photo), width=300).resolved(max_side=256).width == 300


def test_expand_gives_consecutive_seeds_and_single_image_jobs() -> None:
    jobs = Job(prompt="x", seed=10, num_images=3).expand()
    assert [(j.seed, j.num_images) for j in jobs] == [(10, 1), (11, 1), (12, 1)]
    drawn = Job(prompt="x", num_images=2).expand()
    assert drawn[0].seed is not None and drawn[1].seed == drawn[0].seed + 1


def test_group_jobs_batches_only_compatible_jobs() -> None:
    cat, dog = Job(prompt="cat", seed=1), Job(prompt="dog", seed=2)
    other_steps = Job(prompt="cow", seed=3, steps=10)
    a, b = (
        Job(task="img2img", prompt="a", image="x.png", seed=1),
        Job(task="img2img", prompt="b", image="x.png", seed=1),
    )
    groups = group_jobs([cat, other_steps, dog, a, b], max_batch=8)
    assert groups == [[cat, dog], [other_steps], [a], [b]]  # text2img batches across prompts; img2img does not
    assert group_jobs([cat, dog, cat], max_batch=2) == [[cat, dog], [cat]]


def test_sigmas_are_recorded_only_when_set_and_part_of_the_batch_key() -> None:
    plain = Job(prompt="cat", scheduler="euler", seed=1)
    beta = dataclasses.replace(plain, sigmas="beta")
    assert "sigmas" not in plain.to_dict()  # recipes and batch fingerprints of earlier versions stay as they were
    assert beta.to_dict()["sigmas"] == "beta" and Job.from_dict(beta.to_dict()) == beta
    assert Job.from_dict({**beta.to_dict(), "sigmas": None}) == plain
    assert group_jobs([plain, beta], max_batch=8) == [[plain], [beta]]
    # The JSON fields of every version before sigmas and keep_unmasked: a job that does not set them keeps its recipe
    # and its batch fingerprint (a re-run of an earlier batch skips its complete jobs)
    earlier = "task prompt negative negative_prior seed steps prior_steps guidance prior_guidance scheduler width"
    earlier += " height num_images strength image mask hint items weights prior decoder"
    assert list(Job().to_dict()) == earlier.split()
    inpaint = Job(task="inpaint", prompt="hat", image="a.png", mask="m.png")
    assert "keep_unmasked" not in inpaint.to_dict()
    assert dataclasses.replace(inpaint, keep_unmasked=True).to_dict()["keep_unmasked"] is True


def test_samplers_that_take_sigmas_are_those_whose_class_has_the_switches() -> None:
    import kandinsky22

    for name in SCHEDULERS:
        class_name, _ = SCHEDULER_CLASSES[name]
        has_switches = "use_beta_sigmas" in getattr(kandinsky22, class_name).config_defaults
        assert (name in SPACED_SAMPLERS) == (has_switches and name != "dpm++-karras"), name


@pytest.mark.parametrize("sigmas", SIGMA_SPACINGS)
@pytest.mark.parametrize("name", SPACED_SAMPLERS)
def test_make_scheduler_turns_on_one_spacing(name: str, sigmas: str) -> None:
    config = {**DECODER_SCHEDULER_CONFIG, "use_karras_sigmas": True}  # a config's own spacing gives way
    scheduler = make_scheduler(name, config, sigmas)
    assert scheduler._sigma_spacing == sigmas
    assert make_scheduler(name, DECODER_SCHEDULER_CONFIG)._sigma_spacing is None


def test_mix_items_are_images_by_suffix_or_existing_file(tmp_path: Path) -> None:
    photo = _write_image(tmp_path / "photo", (64, 64))  # no suffix, but a file
    assert [mix_item_kind(i) for i in ["a red cat", "missing.jpg", str(photo)]] == ["text", "image", "image"]


def test_a_16_bit_depth_map_keeps_its_levels(tmp_path: Path) -> None:
    """A 16-bit greyscale PNG (how depth estimators save depth maps) is read as its 8-bit levels; PIL's conversion
    clipped it at 255, so the hint the decoder saw was nearly all white."""
    from kandinsky22.jobs import load_image

    levels = np.tile(np.arange(256, dtype=np.uint16), (4, 1))  # 256 x 4, every 8-bit level
    PIL.Image.fromarray(levels * 257).save(tmp_path / "depth16.png")  # 257 * k: level k of 16 bits
    with PIL.Image.open(tmp_path / "depth16.png") as opened:
        assert opened.mode.startswith("I")  # PIL's 16-bit mode, the case at hand
    hint = fit_to_grid(load_image(tmp_path / "depth16.png", "hint"), (256, 4), (256, 64), "RGB")
    assert np.array_equal(np.asarray(hint)[30:34, :, 0], levels.astype(np.uint8))


def _sideways_photo(path: Path) -> PIL.Image.Image:
    """A 400 x 200 image saved with EXIF orientation 6 ("turn 90 degrees clockwise to show"), as phones store photos."""
    stored = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 400, 3), dtype=np.uint8))
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    stored.save(path, exif=exif)
    return stored


def test_a_photo_is_read_as_shown_by_its_exif_orientation(tmp_path: Path) -> None:
    """The input is the photo as viewers show it (as the reference's load_image reads it): it was used sideways,
    and the default output size was the stored one, 400 x 200 instead of 200 x 400."""
    from kandinsky22.jobs import image_size, load_image

    stored = _sideways_photo(tmp_path / "photo.png")
    assert image_size(tmp_path / "photo.png") == (200, 400)
    shown = stored.transpose(PIL.Image.Transpose.ROTATE_270)  # 90 degrees clockwise
    assert np.array_equal(np.asarray(load_image(tmp_path / "photo.png")), np.asarray(shown))
    job = Job(task="img2img", prompt="x", image=str(tmp_path / "photo.png")).resolved()
    assert (job.width, job.height) == (200, 400)


def test_fit_to_grid_pads_and_crop_returns_the_resized_input() -> None:
    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray(rng.integers(0, 256, (50, 90, 3), dtype=np.uint8))
    padded = fit_to_grid(image, (80, 72), (128, 128), "RGB")
    assert padded.size == (128, 128)
    expected = np.asarray(image.resize((80, 72), PIL.Image.BICUBIC))
    assert np.array_equal(np.asarray(crop_to_size(padded, (80, 72))), expected)
    array = np.asarray(padded)
    assert np.array_equal(array[:, 0], array[:, 23])  # edge replicated to the left of the 24 px offset
    mask = fit_to_grid(PIL.Image.new("L", (10, 10), 255), (80, 72), (128, 128), "L", fill=0)
    assert np.asarray(mask)[0, 0] == 0 and np.asarray(mask)[64, 64] == 255


# ----------------------------------------------------------------------------------------------------------------------
# The engine on tiny checkpoints
# ----------------------------------------------------------------------------------------------------------------------


def _text2img(tiny: dict[str, Path], **fields) -> Job:
    base = {"prompt": "a red cat", "prior": str(tiny["prior"]), "decoder": str(tiny["decoder"])}
    return Job(**{**base, "steps": 3, "prior_steps": 3, "width": 80, "height": 72, **fields})


def test_image_depends_only_on_its_own_seed(tiny: dict[str, Path], engine: Engine) -> None:
    """Alone or second in a batch, an image comes from its own generator: equal up to float summation order."""
    job = _text2img(tiny, seed=5, negative="blurry")
    alone = np.asarray(engine.run([job])[0].image, dtype=np.int16)
    batch = engine.run([_text2img(tiny, prompt="a horse", seed=9, negative="blurry"), job])
    batched = np.asarray(batch[1].image, dtype=np.int16)
    assert batch[1].job.seed == 5 and batch[1].image.size == (80, 72)
    # Batched kernels sum in another order; fp32 differences of ~1e-5 flip a rounding level on a few pixels at most.
    assert np.abs(alone - batched).max() <= 1
    assert (alone != batched).mean() < 0.01
    # Control: a shared generator or a different seed changes essentially every pixel.
    other = np.asarray(engine.run([dataclasses.replace(job, seed=6)])[0].image, dtype=np.int16)
    assert (alone != other).mean() > 0.5
    assert np.array_equal(alone, np.asarray(engine.run([job])[0].image, dtype=np.int16))  # deterministic


def test_progress_stages_timings_and_cancel(tiny: dict[str, Path], engine: Engine) -> None:
    events: list[tuple[str, int, int]] = []
    result = engine.run([_text2img(tiny, seed=1, steps=4, prior_steps=2)], progress=lambda *e: events.append(e))[0]
    assert events == [("prior", 1, 2), ("prior", 2, 2)] + [("decoder", k, 4) for k in range(1, 5)] + [("decode", 1, 1)]
    assert {"prior", "decoder", "decode"} <= set(result.timings) and all(v >= 0 for v in result.timings.values())

    seen: list[tuple[str, int, int]] = []
    with pytest.raises(Cancelled, match="decoder step 3 of 4"):
        engine.run(
            [_text2img(tiny, seed=1, steps=4, prior_steps=2)],
            progress=lambda *e: seen.append(e),
            cancel=lambda: len(seen) >= 4,  # 2 prior steps + 2 decoder steps done
        )
    assert seen[-1] == ("decoder", 2, 4)
    assert len(engine.run([_text2img(tiny, seed=1, steps=2, prior_steps=2)])) == 1  # usable after a cancel


def test_wrong_decoder_for_task_names_the_right_kind(tiny: dict[str, Path], engine: Engine, tmp_path: Path) -> None:
    photo = _write_image(tmp_path / "photo.png", (64, 64))
    job = Job(task="inpaint", prompt="x", image=str(photo), mask=str(photo), prior=str(tiny["prior"]))
    message = (
        f"decoder '{tiny['decoder']}' is a text-to-image decoder (UNet in_channels 4, addition_embed_type 'image'), "
        "but inpaint needs an inpainting decoder (UNet in_channels 9, addition_embed_type 'image'), such as "
        f"{INPAINT_REPO}"
    )
    with pytest.raises(IncompatibleJob) as raised:
        engine.run([dataclasses.replace(job, decoder=str(tiny["decoder"]), seed=0)])
    assert str(raised.value) == message


def test_fast_flag_enables_the_fast_path_where_a_pipeline_has_one(
    tiny: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from kandinsky22.pipelines.decoder import KandinskyV22Pipeline

    enabled = []
    calls = []

    def enable(pipe, **kwargs):
        enabled.append(pipe)
        calls.append(kwargs)

    monkeypatch.setattr(KandinskyV22Pipeline, "enable_fast_path", enable, raising=False)
    fast = Engine(device="cpu", fast=True, warm_up=[(64, 80, 2)], compile_backend="aot_eager")
    pipe = fast.decoder_pipeline(_text2img(tiny))
    assert enabled == [pipe] and fast.fast_applied
    assert calls == [
        {"shapes": [(64, 80, 2)], "backend": "aot_eager", "negative_prompts": True, "compile_scope": "auto"}
    ]
    with pytest.raises(ValueError, match="compile_scope must be one of auto, blocks, model, none; got 'layers'"):
        Engine(device="cpu", fast=True, compile_scope="layers")
    slow = Engine(device="cpu")
    slow.decoder_pipeline(_text2img(tiny))
    assert enabled == [pipe] and not slow.fast_applied


def test_fast_engine_reuses_its_warm_up_and_runs_other_shapes_eagerly(
    tiny: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's engine: the graphs compiled at load for the warm-up shapes serve the jobs of that shape (a run in
    another grad mode than the warm-up's would fail their guards and compile again, at the first request), and a
    size not warmed up runs eagerly instead of compiling while requests wait, without capturing a CUDA graph (here
    the CPU stand-in of one). The images are the eager engine's."""
    from graph_standin import fast_path_as_on_cuda
    from torch._dynamo.utils import counters

    fast_path_as_on_cuda(monkeypatch)
    fast = Engine(device="cpu", fast=True, warm_up=[(64, 64, 1)], compile_backend="eager")
    job = _text2img(tiny, seed=3, width=64, height=64)
    fast.prior_pipeline(job.prior)
    fast.decoder_pipeline(job)  # loading warms up
    compiled = counters["stats"]["unique_graphs"]
    assert compiled > 0 and fast.warm_up_seconds > 0
    # Still free to compile here: a job that does not match the warm-up's graphs would compile (and count).
    warmed = np.asarray(fast.run([job])[0].image, dtype=np.int16)
    assert counters["stats"]["unique_graphs"] == compiled, "the warmed-up shape was compiled again"
    unet = fast.decoder_pipeline(job).unet._compiled_call_impl
    assert unet.captures == 1
    fast.compile_new_shapes = False  # as the server runs it
    bigger = dataclasses.replace(job, width=128, height=96)
    other = np.asarray(fast.run([bigger])[0].image, dtype=np.int16)
    assert counters["stats"]["unique_graphs"] == compiled, "a size not warmed up was compiled"
    assert unet.captures == 1, "a size not warmed up was captured"

    eager = Engine(device="cpu")
    for got, expected in ((warmed, job), (other, bigger)):
        reference = np.asarray(eager.run([expected])[0].image, dtype=np.int16)
        assert got.shape == reference.shape and np.abs(got - reference).max() <= 1  # fused GEMMs: last-bit changes


def test_run_rejects_incompatible_jobs(tiny: dict[str, Path], engine: Engine) -> None:
    with pytest.raises(ValueError, match="use group_jobs"):
        engine.run([_text2img(tiny, seed=1), _text2img(tiny, seed=2, steps=5)])
    with pytest.raises(ValueError, match="single-image jobs"):
        engine.run([_text2img(tiny, num_images=2)])
