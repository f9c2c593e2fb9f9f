"""tiny.py: the make-tiny repositories have the official layout, are deterministic, and load in the reference library
too — where the reference's combined pipeline draws the same image as our engine for the same seed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kandinsky22.tiny import REPO_NAMES, make_tiny_repos


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_tiny_repos(tmp_path_factory.mktemp("k22tiny"))


def test_official_layout(tiny: dict[str, Path]) -> None:
    assert list(tiny) == list(REPO_NAMES)
    prior = tiny["prior"]
    index = json.loads((prior / "model_index.json").read_text())
    assert index["_class_name"] == "KandinskyV22PriorPipeline"
    assert index["image_processor"] == ["transformers", "CLIPImageProcessor"]
    for component in ("prior", "text_encoder", "image_encoder", "tokenizer", "scheduler", "image_processor"):
        assert (prior / component).is_dir(), component
    assert (prior / "prior" / "diffusion_pytorch_model.safetensors").is_file()
    assert (prior / "text_encoder" / "model.safetensors").is_file()
    expected = {
        "decoder": ("KandinskyV22Pipeline", 4, True),
        "decoder-inpaint": ("KandinskyV22InpaintPipeline", 9, False),
        "controlnet-depth": ("KandinskyV22ControlnetPipeline", 8, True),
    }
    for name, (class_name, in_channels, clip_sample) in expected.items():
        folder = tiny[name]
        assert json.loads((folder / "model_index.json").read_text())["_class_name"] == class_name
        assert json.loads((folder / "unet" / "config.json").read_text())["in_channels"] == in_channels
        scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        assert (scheduler["_class_name"], scheduler["clip_sample"]) == ("DDPMScheduler", clip_sample)
        assert f"- {prior}" in (folder / "README.md").read_text()  # the connected-pipe link to the prior


def test_deterministic_and_global_rng_untouched(tiny: dict[str, Path], tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    again = make_tiny_repos(tmp_path)
    assert torch.equal(torch.rand(1), expected_next)
    for name in ("prior/prior", "decoder/unet", "controlnet-depth/movq"):
        file = "diffusion_pytorch_model.safetensors"
        assert (tmp_path / name / file).read_bytes() == (tiny[name.split("/")[0]].parent / name / file).read_bytes()
    assert again["decoder"] == tmp_path.resolve() / "decoder"


def test_reference_library_loads_every_repo_strictly(tiny: dict[str, Path]) -> None:
    import diffusers

    for name, class_name in [
        ("prior", "KandinskyV22PriorPipeline"),
        ("decoder", "KandinskyV22Pipeline"),
        ("decoder-inpaint", "KandinskyV22InpaintPipeline"),
        ("controlnet-depth", "KandinskyV22ControlnetPipeline"),
    ]:
        pipe = getattr(diffusers, class_name).from_pretrained(tiny[name])
        model_name = "prior" if name == "prior" else "unet"
        subfolder = tiny[name] / model_name
        model_class = type(getattr(pipe, model_name))
        _, info = model_class.from_pretrained(subfolder, output_loading_info=True)
        assert not any(info.values()), (name, info)  # no missing, unexpected or mismatched keys


@pytest.mark.parametrize("negative", ["", "blurry"])
def test_reference_combined_pipeline_draws_the_engine_image(tiny: dict[str, Path], negative: str) -> None:
    """Same repo, same seed: the reference's combined pipeline and our engine (the CLI's path) give the same image,
    with and without a negative prompt (zero-image negative / one prior run for both embeddings)."""
    import diffusers

    from kandinsky22.jobs import Engine, Job

    models = {"prior": str(tiny["prior"]), "decoder": str(tiny["decoder"])}
    job = Job(prompt="a red cat", negative=negative, seed=42, steps=3, prior_steps=3, width=128, height=128, **models)
    ours = np.asarray(Engine(device="cpu").run([job])[0].image, dtype=np.int16)
    reference = diffusers.KandinskyV22CombinedPipeline.from_pretrained(tiny["decoder"])
    reference.set_progress_bar_config(disable=True)
    theirs = reference(
        "a red cat",
        negative_prompt=negative or None,
        num_inference_steps=3,
        prior_num_inference_steps=3,
        height=128,
        width=128,
        generator=torch.Generator().manual_seed(42),
    ).images[0]
    theirs = np.asarray(theirs, dtype=np.int16)
    assert ours.shape == theirs.shape == (128, 128, 3)
    # Independent fp32 implementations: a rounding level on a few pixels at most (measured: 1 level, < 0.1 %).
    assert np.abs(ours - theirs).max() <= 1 and (ours != theirs).mean() < 0.01
