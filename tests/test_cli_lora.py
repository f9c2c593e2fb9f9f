"""``--lora SOURCE[:WEIGHT]`` of the image commands and of ``kandinsky22 batch``: parsing, the checks made before any
model loads, the adapters merged into the UNet and the prior, what recipes record and ``--from-png`` re-applies.

The LoRAs are tiny random state dicts written here in peft's layout (``<module>.lora_A.weight`` / ``lora_B``) for
modules of the ``make-tiny`` checkpoints; their up matrices are non-zero, so that they change the image.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_cli import FAST, ok, pixels, run, tiny  # noqa: F401 (tiny: the fixture)

from kandinsky22 import lora
from kandinsky22.batch import ImageResult, Unit, UnitRunner, run_batch
from kandinsky22.jobs import Engine, Job
from kandinsky22.lora_specs import LoraError, LoraSpec, changed_loras, checked_sources, lora_file, parse_lora
from kandinsky22.recipe import file_sha256, job_from_recipe, read_recipe

# Modules of the tiny UNet and prior (kandinsky22.tiny) and their weights' shapes (out, in).
UNET_MODULES = {
    "down_blocks.1.attentions.0.to_q": (64, 64),
    "mid_block.attentions.0.to_k": (64, 64),
    "up_blocks.0.attentions.0.add_k_proj": (64, 32),
}
PRIOR_MODULES = {"prior.transformer_blocks.0.attn1.to_q": (24, 24), "prior.transformer_blocks.0.ff.net.2": (24, 96)}
SIZE = ["--width", "64", "--height", "64", "--seed", "5"]


def write_lora(path: Path, modules: dict[str, tuple[int, int]] = UNET_MODULES, seed: int = 0, rank: int = 4) -> Path:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for module, (out_features, in_features) in modules.items():
        state[f"{module}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator)
        state[f"{module}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


def models(tiny: dict[str, str]) -> list[str]:  # noqa: F811 (the fixture's value)
    return ["--prior", tiny["prior"], "--decoder", tiny["decoder"]]


# ----------------------------------------------------------------------------------------------------------------------
# Parsing and checks (no models)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "source", "weight"),
    [
        ("style.safetensors", "style.safetensors", 1.0),
        ("style.safetensors:0.75", "style.safetensors", 0.75),
        ("owner/name:-0.5", "owner/name", -0.5),
        ("owner/name", "owner/name", 1.0),
        ("C:\\loras\\style.safetensors", "C:\\loras\\style.safetensors", 1.0),
        ("C:\\loras\\style.safetensors:2", "C:\\loras\\style.safetensors", 2.0),
        ("a:b.safetensors:0", "a:b.safetensors", 0.0),
        ("style.safetensors:abc", "style.safetensors:abc", 1.0),  # not a number: part of the source
    ],
)
def test_source_and_weight_split_at_the_last_colon_when_a_number_follows(text: str, source: str, weight: float) -> None:
    assert parse_lora(text) == LoraSpec(source, weight)


@pytest.mark.parametrize("text", ["style.safetensors:nan", "style.safetensors:inf", "x:-1e999", ":0.5", "  "])
def test_a_weight_that_is_not_finite_or_no_source_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="finite number|SOURCE"):
        parse_lora(text)


def test_local_sources_must_exist_and_are_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_lora(tmp_path / "style.safetensors")
    specs = checked_sources([LoraSpec("style.safetensors", 0.5), LoraSpec("owner/name")])
    assert specs == [LoraSpec(str(tmp_path / "style.safetensors"), 0.5), LoraSpec("owner/name")]
    with pytest.raises(LoraError, match=r"^--lora gone\.safetensors: no such file or folder"):
        checked_sources([LoraSpec("gone.safetensors")])
    with pytest.raises(LoraError, match="no such file or folder"):
        checked_sources([LoraSpec("./owner/name")])  # a path, not a hub id
    with pytest.raises(LoraError, match=r"^--lora style\.safetensors:abc: WEIGHT must be a number, got 'abc'"):
        checked_sources([LoraSpec("style.safetensors:abc")])  # parse_lora keeps a non-number in the source


def test_the_file_of_a_folder_is_the_one_kandinsky22_lora_reads(tmp_path: Path) -> None:
    folder = tmp_path / "trained"
    write_lora(folder / "pytorch_lora_weights.safetensors", seed=1)
    write_lora(folder / "checkpoint-100.safetensors", seed=2)
    assert lora_file(str(folder)) == folder / "pytorch_lora_weights.safetensors"
    single = tmp_path / "single"
    write_lora(single / "my_style.safetensors")
    assert lora_file(str(single)) == single / "my_style.safetensors"
    (folder / "pytorch_lora_weights.safetensors").unlink()
    write_lora(folder / "other.safetensors")
    with pytest.raises(FileNotFoundError, match=r"several other \.safetensors files \(checkpoint-100.safetensors, "):
        lora_file(str(folder))


@pytest.mark.parametrize("command", ["generate", "img2img", "inpaint", "depth", "mix"])
@pytest.mark.parametrize(
    ("lora_arg", "message"),
    [
        ("gone.safetensors:0.5", "error: --lora gone.safetensors: no such file or folder"),
        ("style.safetensors:nan", "error: argument --lora: WEIGHT must be a finite number, got 'nan'"),
        ("style.safetensors:-inf", "error: argument --lora: WEIGHT must be a finite number, got '-inf'"),
    ],
)
def test_lora_argument_errors_exit_2_before_any_model_loads(
    command: str, lora_arg: str, message: str, tmp_path: Path
) -> None:
    """The default models are hub ids that are not in the (empty) cache: an error found after loading would be the
    offline hub's, exit 1."""
    write_lora(tmp_path / "style.safetensors")
    inputs = {"generate": ["x"], "img2img": ["x", "--image", "a.png"], "inpaint": ["x", "--image", "a.png"]}
    inputs |= {"depth": ["x", "--hint", "a.png"], "mix": ["--item", "x"]}
    if command == "inpaint":
        inputs["inpaint"] += ["--mask", "a.png"]
    import PIL.Image

    PIL.Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    result = run(command, *inputs[command], "--lora", lora_arg, "-o", "out.png", cwd=tmp_path, env={"HF_HOME": "hf"})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kandinsky22 {command}: {message}"), result.stderr
    assert not (tmp_path / "hf").exists()


# ----------------------------------------------------------------------------------------------------------------------
# Runs on tiny checkpoints
# ----------------------------------------------------------------------------------------------------------------------


def test_a_lora_changes_the_image_weight_0_does_not_and_from_png_re_applies_it(
    tiny: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    style = write_lora(tmp_path / "loras/style.safetensors")
    plain = ["generate", "a red cat", *SIZE, *FAST, *models(tiny)]
    ok(run(*plain, "-o", "plain.png", cwd=tmp_path))
    result = ok(run(*plain, "--lora", "loras/style.safetensors:0.7", "--json", "-o", "lora.png", cwd=tmp_path))
    recorded = [{"source": str(style), "weight": 0.7, "sha256": file_sha256(style)}]
    assert json.loads(result.stdout)["loras"] == recorded
    assert not np.array_equal(pixels(tmp_path / "lora.png"), pixels(tmp_path / "plain.png"))
    recipe = read_recipe(tmp_path / "lora.png")
    assert recipe["loras"] == recorded
    assert job_from_recipe(recipe).prompt == "a red cat"  # the job fields are the recipe's others
    assert "loras" not in read_recipe(tmp_path / "plain.png")  # a run without LoRAs records none, as before

    ok(run(*plain, "--lora", "loras/style.safetensors:0", "-o", "zero.png", cwd=tmp_path))
    assert np.array_equal(pixels(tmp_path / "zero.png"), pixels(tmp_path / "plain.png"))

    # --from-png re-applies the recorded LoRA, from another folder: pixel for pixel, no warning.
    (tmp_path / "elsewhere").mkdir()
    again = ok(run("generate", "--from-png", "../lora.png", "--quiet", "-o", "again.png", cwd=tmp_path / "elsewhere"))
    assert "warning" not in again.stderr
    assert np.array_equal(pixels(tmp_path / "elsewhere/again.png"), pixels(tmp_path / "lora.png"))
    assert read_recipe(tmp_path / "elsewhere/again.png")["loras"] == recorded

    # --lora given with --from-png replaces the recorded ones.
    ok(run("generate", "--from-png", "lora.png", "--lora", f"{style}:0", "--quiet", "-o", "off.png", cwd=tmp_path))
    assert np.array_equal(pixels(tmp_path / "off.png"), pixels(tmp_path / "plain.png"))

    # The file changed since: a warning, and the run goes on (with the file as it is now).
    write_lora(style, seed=1)
    changed = ok(run("generate", "--from-png", "lora.png", "--quiet", "-o", "changed.png", cwd=tmp_path))
    warning = f"warning: --lora {style}: the file is not the one 'lora.png' was made with"
    assert warning in changed.stderr
    assert not np.array_equal(pixels(tmp_path / "changed.png"), pixels(tmp_path / "lora.png"))
    assert read_recipe(tmp_path / "changed.png")["loras"][0]["sha256"] == file_sha256(style)

    # A recorded LoRA that is gone: a usage error naming the image, before the models load.
    style.unlink()
    gone = run("generate", "--from-png", "lora.png", "-o", "gone.png", cwd=tmp_path)
    assert gone.returncode == 2
    assert gone.stderr.splitlines() == [
        f"kandinsky22 generate: error: --lora {style}: no such file or folder (give a .safetensors or .bin file, a "
        "folder holding one, or a hub id) (recorded in 'lora.png')"
    ]


def _bad_loras(folder: Path) -> dict[str, Path]:
    unknown = write_lora(folder / "unknown.safetensors", {"down_blocks.7.attentions.0.to_q": (64, 64)})
    shape = write_lora(folder / "shape.safetensors", {"mid_block.attentions.0.to_q": (64, 48)})
    text = folder / "text.safetensors"
    save_file(
        {
            "text_encoder.layer.q.lora_A.weight": torch.ones(2, 4),
            "text_encoder.layer.q.lora_B.weight": torch.ones(4, 2),
        },
        str(text),
    )
    return {"unknown": unknown, "shape": shape, "text": text}


def test_a_peft_folders_config_is_recorded_and_a_changed_one_warns(
    tiny: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    """peft's adapter_config.json sets the scale (lora_alpha / r): its SHA-256 is recorded beside the weights' file's,
    and --from-png warns when it changed (the weights' file unchanged), as it does for the file."""
    folder = tmp_path / "peft"
    write_lora(folder / "adapter_model.safetensors")
    config = folder / "adapter_config.json"
    config.write_text(json.dumps({"r": 4, "lora_alpha": 2}))
    plain = ["generate", "a red cat", *SIZE, *FAST, *models(tiny)]
    ok(run(*plain, "--lora", str(folder), "-o", "lora.png", cwd=tmp_path))
    recorded = read_recipe(tmp_path / "lora.png")["loras"]
    assert recorded[0]["config_sha256"] == file_sha256(config)
    assert recorded[0]["sha256"] == file_sha256(folder / "adapter_model.safetensors")
    same = ok(run("generate", "--from-png", "lora.png", "--quiet", "-o", "same.png", cwd=tmp_path))
    assert "warning" not in same.stderr
    config.write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    changed = ok(run("generate", "--from-png", "lora.png", "--quiet", "-o", "changed.png", cwd=tmp_path))
    assert f"warning: --lora {folder}: the file is not the one 'lora.png' was made with" in changed.stderr
    assert not np.array_equal(pixels(tmp_path / "changed.png"), pixels(tmp_path / "lora.png"))


def test_a_recipe_from_before_the_config_was_recorded_says_nothing_of_it() -> None:
    now = [{"source": "s", "weight": 1.0, "sha256": "a", "config_sha256": "c"}]
    assert changed_loras({"loras": [{"source": "s", "weight": 1.0, "sha256": "a"}]}, now) == []
    assert changed_loras({"loras": [{"source": "s", "sha256": "a", "config_sha256": "b"}]}, now) == ["s"]
    assert changed_loras({"loras": [{"source": "s", "sha256": "a", "config_sha256": "c"}]}, now) == []
    # recorded with a config that is gone now
    assert changed_loras(
        {"loras": [{"source": "s", "sha256": "a", "config_sha256": "c"}]}, [now[0] | {"config_sha256": None}]
    ) == ["s"]


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("unknown", "1 module(s) are not in the Kandinsky 2.2 unet, e.g. ['down_blocks.7.attentions.0.to_q']"),
        ("shape", "the unet's mid_block.attentions.0.to_q weight is (64, 64); its LoRA's down (4, 48)"),
        ("text", "adapts a text encoder ('text_encoder.layer.q.lora_A.weight')"),
    ],
)
def test_a_lora_that_does_not_fit_the_models_is_one_line_naming_the_option(
    kind: str,
    message: str,
    tiny: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    path = _bad_loras(tmp_path)[kind]
    result = run("generate", "x", *SIZE, *FAST, *models(tiny), "--lora", f"{kind}.safetensors:0.5", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"kandinsky22 generate: error: --lora {path}: {message}"), result.stderr
    assert not list(tmp_path.glob("*.png"))


@pytest.fixture(scope="module")
def plain_engine(tiny: dict[str, str]) -> Engine:  # noqa: F811
    return Engine(device="cpu")


def _image(engine: Engine, tiny: dict[str, str], task: str = "text2img") -> np.ndarray:  # noqa: F811
    job = Job(task=task, prompt="a cat", seed=3, steps=2, prior_steps=2, width=64, height=64)
    job.prior, job.decoder = tiny["prior"], tiny["decoder"]
    return np.asarray(engine.run([job])[0].image)


def test_a_lora_of_both_models_is_split_between_the_prior_and_the_decoder(
    plain_engine: Engine,
    tiny: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    """The Engine loads the prior and the decoder as separate pipelines: a LoRA with ``prior.`` and ``unet.`` keys
    (pipeline-level load_lora_weights refuses it on either) goes to both; a prior-only one changes the image too."""
    both = write_lora(
        tmp_path / "both.safetensors", {**PRIOR_MODULES, **{f"unet.{m}": s for m, s in UNET_MODULES.items()}}
    )
    prior_only = write_lora(tmp_path / "prior.safetensors", PRIOR_MODULES)
    plain = _image(plain_engine, tiny)
    engine = Engine(device="cpu", loras=[LoraSpec(str(both), 0.5), LoraSpec(str(prior_only))])
    assert not np.array_equal(_image(engine, tiny), plain)
    prior = engine.prior_pipeline(tiny["prior"]).prior
    unet = engine.decoder_pipeline(Job(decoder=tiny["decoder"])).unet
    assert lora.state_of(prior).active == {"lora1": 0.5, "lora2": 1.0}
    assert lora.state_of(unet).active == {"lora1": 0.5}
    assert [r["sha256"] for r in engine.lora_records] == [file_sha256(both), file_sha256(prior_only)]

    prior_engine = Engine(device="cpu", loras=[LoraSpec(str(prior_only))])
    assert not np.array_equal(_image(prior_engine, tiny), plain)
    assert lora.state_of(prior_engine.decoder_pipeline(Job(decoder=tiny["decoder"])).unet).adapters == {}


def _run(engine: Engine, tiny: dict[str, str], task: str = "text2img", loras: list | None = None):  # noqa: F811
    import PIL.Image

    job = Job(task=task, prompt="a cat", seed=3, steps=2, prior_steps=2, width=64, height=64, loras=loras)
    if task == "inpaint":
        job.image = PIL.Image.new("RGB", (64, 64), (200, 40, 40))
        job.mask = PIL.Image.new("L", (64, 64), 255)
    job.prior, job.decoder = tiny["prior"], tiny["decoder-inpaint" if task == "inpaint" else "decoder"]
    result = engine.run([job])[0]
    return np.asarray(result.image), result.loras


def test_a_jobs_lora_choice_equals_an_engine_started_with_those_weights(
    plain_engine: Engine,
    tiny: dict[str, str],  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Job.loras chooses among the Engine's LoRAs: exactly those, at those weights, the others off; re-merged only
    when the choice changes, also into a decoder loaded after the choice was made (it loads at the Engine's weights)."""
    style = write_lora(tmp_path / "style.safetensors")
    prior_only = write_lora(tmp_path / "prior.safetensors", PRIOR_MODULES, seed=1)
    engine = Engine(device="cpu", loras=[LoraSpec(str(style), 0.3), LoraSpec(str(prior_only), 0.5)])
    alone = Engine(device="cpu", loras=[LoraSpec(str(style), 0.8)])
    style_at_08 = {"source": str(style), "weight": 0.8, "sha256": file_sha256(style)}

    defaults, applied = _run(engine, tiny)
    assert [(r["source"], r["weight"]) for r in applied] == [(str(style), 0.3), (str(prior_only), 0.5)]
    chosen, applied = _run(engine, tiny, loras=[LoraSpec(str(style), 0.8)])
    assert np.array_equal(chosen, _run(alone, tiny)[0]) and applied == [style_at_08]
    assert not np.array_equal(chosen, defaults)
    none, applied = _run(engine, tiny, loras=[])
    assert np.array_equal(none, _run(plain_engine, tiny)[0]) and applied == []
    assert np.array_equal(_run(engine, tiny)[0], defaults)  # no choice: the Engine's weights again

    # The inpaint decoder loads now, at the Engine's weights, after a call with the same choice: the choice is merged
    # into it too before it runs.
    assert np.array_equal(_run(engine, tiny, loras=[LoraSpec(str(style), 0.8)])[0], chosen)
    inpainted, applied = _run(engine, tiny, "inpaint", loras=[LoraSpec(str(style), 0.8)])
    assert np.array_equal(inpainted, _run(alone, tiny, "inpaint")[0]) and applied == [style_at_08]

    # The same choice again merges nothing.
    merges = []
    monkeypatch.setattr(lora, "apply", lambda model: merges.append(model))
    _run(engine, tiny, "inpaint", loras=[LoraSpec(str(style), 0.8), LoraSpec(str(prior_only), 0)])
    assert merges == []

    with pytest.raises(ValueError, match=r"loras\[0\]\.source 'gone' is not one of the Engine's LoRAs \('/"):
        _run(engine, tiny, loras=[LoraSpec("gone", 1.0)])
    with pytest.raises(ValueError, match=r"loras\[1\]\.source '.*style.safetensors' is listed twice"):
        _run(engine, tiny, loras=[LoraSpec(str(style), 1.0), LoraSpec(str(style), 0.5)])
    with pytest.raises(ValueError, match=r"loras\[0\]\.weight must be from -8 to 8, got 9"):
        _run(engine, tiny, loras=[LoraSpec(str(style), 9.0)])


def test_jobs_of_different_lora_choices_do_not_share_a_call() -> None:
    """The choice is in the batch key, whatever order it lists the LoRAs in and with the ones it turns off or not."""
    a, b = LoraSpec("a", 0.5), LoraSpec("b", 1.0)
    key = Job(prompt="x", loras=[a, b]).batch_key()
    assert Job(prompt="y", loras=[b, a, LoraSpec("c", 0)]).batch_key() == key
    assert Job(prompt="x", loras=[a]).batch_key() != key
    assert Job(prompt="x", loras=[a, LoraSpec("b", 0.9)]).batch_key() != key
    assert Job(prompt="x").batch_key() != key != Job(prompt="x", loras=[]).batch_key()
    assert "loras" not in Job(prompt="x", loras=[a]).to_dict()


# ----------------------------------------------------------------------------------------------------------------------
# kandinsky22 batch
# ----------------------------------------------------------------------------------------------------------------------


def _batch(tmp_path: Path, out: str, tiny: dict[str, str], runner: UnitRunner, loras: list) -> dict[str, bytes]:  # noqa: F811
    jobs = tmp_path / "jobs.jsonl"
    line = {"prompt": "a red cat", "seed": 9, "steps": 2, "prior_steps": 2, "width": 64, "height": 64}
    jobs.write_text(json.dumps(line) + "\n")

    def run_units(units: list[Unit]) -> Iterator[ImageResult]:
        for unit in units:
            yield from runner(unit.payload())

    run_batch(jobs, tmp_path / out, run_units, prior=tiny["prior"], decoders={"text2img": tiny["decoder"]}, loras=loras)
    return {path.name: path.read_bytes() for path in sorted((tmp_path / out).glob("*.png"))}


def test_batch_applies_the_loras_to_every_job_records_them_and_redoes_jobs_when_they_change(
    tiny: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    style = write_lora(tmp_path / "style.safetensors")
    spec = LoraSpec(str(style), 0.7)
    record = {"source": str(style), "weight": 0.7, "sha256": file_sha256(style)}
    with_lora = _batch(tmp_path, "out", tiny, UnitRunner(device="cpu", loras=[spec]), [record])
    without = _batch(tmp_path, "plain", tiny, UnitRunner(device="cpu"), [])
    assert list(with_lora) == list(without) == ["000001-0.png"]
    assert read_recipe(with_lora["000001-0.png"])["loras"] == [record]
    assert "loras" not in read_recipe(without["000001-0.png"])
    assert with_lora != without

    # The CLI re-makes the batch's image from its recipe (with this process's thread count: the CPU kernels' rounding
    # can follow it).
    (tmp_path / "made.png").write_bytes(with_lora["000001-0.png"])
    threads = {"OMP_NUM_THREADS": str(torch.get_num_threads())}
    ok(run("generate", "--from-png", "made.png", "--quiet", "-o", "again.png", cwd=tmp_path, env=threads))
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "made.png"))

    # Resuming: the same LoRAs skip the job; another weight (or file) is another job.
    manifest = (tmp_path / "out/manifest.jsonl").read_text()
    _batch(tmp_path, "out", tiny, UnitRunner(device="cpu", loras=[spec]), [record])
    assert (tmp_path / "out/manifest.jsonl").read_text() == manifest
    _batch(tmp_path, "out", tiny, UnitRunner(device="cpu"), [])
    assert (tmp_path / "out/000001-0.png").read_bytes() == without["000001-0.png"]


def test_batch_lora_errors_exit_2_before_or_instead_of_the_jobs(
    tiny: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        json.dumps({"prompt": "a", "seed": 1, "steps": 2, "prior_steps": 2, "width": 64, "height": 64}) + "\n"
    )
    _bad_loras(tmp_path)
    write_lora(tmp_path / "style.safetensors")
    for lora_arg, message in (
        ("gone.safetensors", "kandinsky22 batch: error: --lora gone.safetensors: no such file or folder"),
        ("style.safetensors:nan", "kandinsky22 batch: error: argument --lora: WEIGHT must be a finite number"),
        ("text.safetensors", f"kandinsky22 batch: error: --lora {tmp_path / 'text.safetensors'}: adapts a text"),
        ("unknown.safetensors", f"kandinsky22 batch: error: --lora {tmp_path / 'unknown.safetensors'}: 1 module(s)"),
    ):
        result = run("batch", "jobs.jsonl", "--out", "out", *models(tiny), "--lora", lora_arg, "--quiet", cwd=tmp_path)
        assert result.returncode == 2 and result.stderr.startswith(message), (lora_arg, result.stderr)
        assert len(result.stderr.splitlines()) == 1 and not list(tmp_path.glob("out/*.png"))


def test_a_named_file_of_a_hub_repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``owner/name/FILE`` downloads that file of the repository (the hub stood in for by a folder: no network)."""
    from kandinsky22 import loading

    repo = tmp_path / "snapshot"
    write_lora(repo / "my_style.safetensors")
    asked = []

    def download(repo_id: str, allow_patterns: list[str], revision: str | None = None, **kwargs: object) -> Path:
        asked.append((repo_id, allow_patterns))
        return repo

    monkeypatch.setattr(loading, "download_from_hub", download)
    spec = parse_lora("owner/name/my_style.safetensors:0.5")
    assert spec == LoraSpec("owner/name/my_style.safetensors", 0.5)
    assert checked_sources([spec]) == [spec]
    assert lora_file(spec.source) == repo / "my_style.safetensors"
    assert asked[-1] == ("owner/name", ["my_style.safetensors", "adapter_config.json"])
    with pytest.raises(FileNotFoundError, match="no file 'gone.safetensors' in the hub repository 'owner/name'"):
        lora_file("owner/name/gone.safetensors")
    # the repository alone reads the standard names only, and says how to name another
    with pytest.raises(FileNotFoundError, match=r"hub repository 'owner/name'.*give it as 'owner/name/FILE'"):
        lora_file("owner/name")


def test_a_lora_error_pickles_as_itself() -> None:
    """Workers (Ray, processes) send errors back pickled: the source and the reason survive."""
    import pickle

    err = pickle.loads(pickle.dumps(LoraError("style.safetensors", "it does not fit")))
    assert isinstance(err, LoraError) and (err.source, err.reason) == ("style.safetensors", "it does not fit")
    assert str(err) == "--lora style.safetensors: it does not fit"
