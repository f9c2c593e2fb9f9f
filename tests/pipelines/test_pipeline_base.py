"""The pipeline base: save/load both ways, hub downloads, components, devices and dtypes, offloading, outputs."""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kandinsky22 import (
    DDIMScheduler,
    KandinskyPriorPipelineOutput,
    KandinskyV22CombinedPipeline,
    KandinskyV22Img2ImgPipeline,
    KandinskyV22Pipeline,
    KandinskyV22PriorPipeline,
    loading,
)

TOL = 1e-4
DECODE = {"height": 64, "width": 64, "num_inference_steps": 2, "output_type": "np"}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def embeds() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(1, 32, generator=gen(10)), torch.randn(1, 32, generator=gen(11))


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_ours_saves_the_reference_loads(tmp_path, our_decoder, our_prior):
    import diffusers

    our_decoder.save_pretrained(tmp_path / "decoder")
    our_prior.save_pretrained(tmp_path / "prior")
    decoder = quiet(diffusers.KandinskyV22Pipeline.from_pretrained(tmp_path / "decoder"))
    prior = quiet(diffusers.KandinskyV22PriorPipeline.from_pretrained(tmp_path / "prior"))
    a = our_decoder(*embeds(), generator=gen(), **DECODE).images
    b = decoder(*embeds(), generator=gen(), **DECODE).images
    assert np.abs(a - b).max() < TOL
    a = our_prior("horse", num_inference_steps=2, generator=gen()).image_embeds
    b = prior("horse", num_inference_steps=2, generator=gen()).image_embeds
    assert (a - b).abs().max() < TOL
    index = json.loads((tmp_path / "prior" / "model_index.json").read_text())
    assert index["_class_name"] == "KandinskyV22PriorPipeline"
    assert index["image_processor"] == ["transformers", "CLIPImageProcessor"]
    assert index["prior"] == ["diffusers", "PriorTransformer"]


def test_combined_round_trips_both_ways(tmp_path, decoder_repo):
    import diffusers

    ours = quiet(KandinskyV22CombinedPipeline.from_pretrained(decoder_repo))
    ours.save_pretrained(tmp_path / "ours")
    ref = quiet(diffusers.KandinskyV22CombinedPipeline.from_pretrained(tmp_path / "ours"))
    ref.save_pretrained(tmp_path / "ref")
    back = quiet(KandinskyV22CombinedPipeline.from_pretrained(tmp_path / "ref"))
    kwargs = {"num_inference_steps": 2, "prior_num_inference_steps": 2, "height": 64, "width": 64, "output_type": "np"}
    a = ours("horse", generator=gen(), **kwargs).images
    b = ref("horse", generator=gen(), **kwargs).images
    c = back("horse", generator=gen(), **kwargs).images
    assert np.abs(a - b).max() < TOL and np.abs(a - c).max() < TOL


@pytest.mark.parametrize(
    "options",
    [
        {"variant": "fp16"},
        {"safe_serialization": False},
        {"variant": "fp16", "safe_serialization": False},
        {"variant": "fp16", "max_shard_size": 40_000},
        {"max_shard_size": "40KB"},
    ],
    ids=["variant", "bin", "variant-bin", "variant-shards", "shards-as-text"],
)
def test_save_options_write_the_reference_files_and_load_both_ways(tmp_path, decoder_repo, options):
    """``variant`` and ``safe_serialization`` name the same files as the reference's save (the CLIP encoders of
    transformers 5 write safetensors either way), and the folder loads in both libraries with that variant."""
    import diffusers

    ours = quiet(KandinskyV22CombinedPipeline.from_pretrained(decoder_repo))
    ref = quiet(diffusers.KandinskyV22CombinedPipeline.from_pretrained(decoder_repo))
    ours.save_pretrained(tmp_path / "ours", **options)
    ref.save_pretrained(tmp_path / "ref", **options)

    def files(root: Path) -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    if "max_shard_size" in options:  # the models cut their shards elsewhere than the reference's: both load them
        index = f"diffusion_pytorch_model.safetensors.index{'.fp16' if 'variant' in options else ''}.json"
        assert (tmp_path / "ours" / "unet" / index).exists()
    else:
        assert files(tmp_path / "ours") == files(tmp_path / "ref")
    variant = options.get("variant")
    kwargs = {"num_inference_steps": 2, "prior_num_inference_steps": 2, "height": 64, "width": 64, "output_type": "np"}
    expected = ours("horse", generator=gen(), **kwargs).images
    for cls in (KandinskyV22CombinedPipeline, diffusers.KandinskyV22CombinedPipeline):
        back = quiet(cls.from_pretrained(tmp_path / "ours", variant=variant))
        assert np.abs(back("horse", generator=gen(), **kwargs).images - expected).max() < TOL


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"safe_serialization": "yes"}, r"`safe_serialization` must be True or False, got 'yes'"),
        ({"variant": ""}, r"`variant` must be a name such as 'fp16' or None, got ''"),
        ({"max_shard_size": "5 apples"}, r"max_shard_size must be a positive number of bytes or a size such as '10GB'"),
        ({"max_shard_size": 0}, r"max_shard_size must be a positive number of bytes"),
    ],
)
def test_save_options_errors(tmp_path, our_decoder, options, match):
    with pytest.raises(ValueError, match=match):
        our_decoder.save_pretrained(tmp_path, **options)
    assert not any(tmp_path.iterdir())


def test_image_processor_saved_under_its_pil_name_loads(tmp_path, prior_repo):
    shutil.copytree(prior_repo, tmp_path / "prior")
    index_path = tmp_path / "prior" / "model_index.json"
    index = json.loads(index_path.read_text())
    index["image_processor"] = ["transformers", "CLIPImageProcessorPil"]
    index_path.write_text(json.dumps(index))
    pipe = KandinskyV22PriorPipeline.from_pretrained(tmp_path / "prior")
    assert type(pipe.image_processor).__name__.startswith("CLIPImageProcessor")
    assert pipe.image_processor.crop_size["height"] == 32


def test_hub_id_downloads_only_the_needed_files(tmp_path, monkeypatch, decoder_repo):
    hub = tmp_path / "hub"
    shutil.copytree(decoder_repo, hub)
    for sub in ("unet", "movq"):  # the official repos also hold .bin copies of every weight file
        (hub / sub / "diffusion_pytorch_model.bin").write_bytes(b"not needed")
    fetched: list[str] = []

    def fake_download(repo_id: str, allow_patterns: list[str], revision=None, **kwargs) -> Path:
        assert repo_id == "kandinsky-community/kandinsky-2-2-decoder"
        local = tmp_path / "snapshot"
        for file in hub.rglob("*"):
            name = file.relative_to(hub).as_posix()
            if file.is_file() and any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                (local / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(file, local / name)
                fetched.append(name)
        return local

    monkeypatch.setattr(loading, "download_from_hub", fake_download)
    pipe = KandinskyV22Pipeline.from_pretrained("kandinsky-community/kandinsky-2-2-decoder")
    assert isinstance(pipe, KandinskyV22Pipeline)
    assert not [name for name in fetched if name.endswith(".bin")]
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"} <= set(
        fetched
    )


def test_hub_options_reach_every_download(tmp_path, monkeypatch, decoder_repo, prior_repo):
    # revision, cache_dir, token, local_files_only, ... were refused as "unknown components".
    repos = {
        "kandinsky-community/kandinsky-2-2-decoder": decoder_repo,
        "kandinsky-community/kandinsky-2-2-prior": prior_repo,
    }
    calls: list[tuple[str, dict]] = []

    def fake_download(repo_id: str, allow_patterns: list[str], **kwargs) -> Path:
        calls.append((repo_id, {k: v for k, v in kwargs.items() if v is not None}))
        return repos[repo_id]

    monkeypatch.setattr(loading, "download_from_hub", fake_download)
    options = {"cache_dir": str(tmp_path / "cache"), "local_files_only": True, "token": "t"}
    pipe = KandinskyV22CombinedPipeline.from_pretrained(
        "kandinsky-community/kandinsky-2-2-decoder",
        prior_path="kandinsky-community/kandinsky-2-2-prior",
        revision="abc123",
        use_safetensors=True,
        **options,
    )
    assert isinstance(pipe, KandinskyV22CombinedPipeline)
    assert {repo for repo, _ in calls} == set(repos)
    for repo, kwargs in calls:
        # A revision names a version of the repository given, not of the prior it names.
        revision = {"revision": "abc123"} if repo.endswith("decoder") else {}
        assert kwargs == {**options, **revision}, repo
    calls.clear()
    auto = __import__("kandinsky22").AutoPipelineForText2Image.from_pretrained(
        "kandinsky-community/kandinsky-2-2-decoder", prior_path="kandinsky-community/kandinsky-2-2-prior", **options
    )
    assert isinstance(auto, KandinskyV22CombinedPipeline) and calls and all(kw == options for _, kw in calls)


def test_a_variant_that_is_missing_is_a_warning(decoder_repo, caplog):
    # A component without the variant's files loads its default weights: said at warning level (it was info, silent).
    with caplog.at_level("WARNING", logger="kandinsky22"):
        KandinskyV22Pipeline.from_pretrained(decoder_repo, variant="fp16")
    folders = sorted(Path(r.args[1]).name for r in caplog.records if "No 'fp16' weights" in r.getMessage())
    assert folders == ["movq", "unet"]


def test_use_safetensors_chooses_the_weight_format(tmp_path, decoder_repo):
    repo = tmp_path / "decoder"
    shutil.copytree(decoder_repo, repo)
    safetensors = KandinskyV22Pipeline.from_pretrained(repo, use_safetensors=True)
    with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model\.bin \(or a sharded index\)"):
        KandinskyV22Pipeline.from_pretrained(repo, use_safetensors=False)
    # The weights saved as pickled .bin files only: found by default and with False, refused with True.
    for name in ("unet", "movq"):
        torch.save(getattr(safetensors, name).state_dict(), repo / name / "diffusion_pytorch_model.bin")
        (repo / name / "diffusion_pytorch_model.safetensors").unlink()
    for choice in (None, False):
        loaded = KandinskyV22Pipeline.from_pretrained(repo, use_safetensors=choice)
        assert all(
            torch.equal(a, b) for a, b in zip(loaded.unet.state_dict().values(), safetensors.unet.state_dict().values())
        )
    with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model\.safetensors \(or a sharded index\)"):
        KandinskyV22Pipeline.from_pretrained(repo, use_safetensors=True)
    with pytest.raises(ValueError, match="`use_safetensors` must be True, False or None, got 'yes'"):
        KandinskyV22Pipeline.from_pretrained(repo, use_safetensors="yes")
    with pytest.raises(ValueError, match=r"unknown components or options \['low_cpu_mem_usage'\].*revision, cache_dir"):
        KandinskyV22CombinedPipeline.from_pretrained(repo, low_cpu_mem_usage=False)


def test_components_share_modules_and_are_checked(our_decoder):
    img2img = KandinskyV22Img2ImgPipeline(**our_decoder.components)
    assert img2img.unet is our_decoder.unet and img2img.movq is our_decoder.movq
    with pytest.raises(TypeError, match="missing"):
        KandinskyV22Pipeline(unet=our_decoder.unet, scheduler=our_decoder.scheduler)
    with pytest.raises(ValueError, match="vae"):
        KandinskyV22Pipeline.from_pretrained("unused", vae=None)


def test_to_dtype_and_device_and_loading_dtype(decoder_repo, prior_repo):
    # DDIM and given start latents: no noise is drawn (draws in float64 and float32 differ for the same seed).
    ddim = DDIMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1)
    pipe = quiet(KandinskyV22Pipeline.from_pretrained(decoder_repo, torch_dtype=torch.float64, scheduler=ddim))
    assert pipe.dtype == torch.float64 and pipe.movq.dtype == torch.float64 and pipe.device == torch.device("cpu")
    latents = torch.randn(1, 4, 32, 32, generator=gen(3))
    a = pipe(*embeds(), latents=latents, **DECODE).images
    pipe.to("cpu", torch.float32)
    assert pipe.unet.dtype == torch.float32 and pipe.dtype == torch.float32
    b = pipe(*embeds(), latents=latents, **DECODE).images
    assert np.abs(a - b).max() < 1e-3  # float64 vs float32 rounding, amplified by the random tiny MoVQ
    prior = KandinskyV22PriorPipeline.from_pretrained(prior_repo, torch_dtype=torch.float64)
    assert prior.text_encoder.dtype == prior.image_encoder.dtype == prior.prior.dtype == torch.float64


@pytest.mark.parametrize("pipeline", [KandinskyV22Pipeline, KandinskyV22CombinedPipeline])
@pytest.mark.parametrize("torch_dtype", ["float16", "auto", 16])
def test_a_torch_dtype_that_is_not_a_dtype_is_refused_naming_it(decoder_repo, pipeline, torch_dtype):
    """A string was taken by ``Module.to`` as a device name ("Invalid device string: 'float16'")."""
    with pytest.raises(ValueError, match=rf"`torch_dtype` must be a torch.dtype .*got {torch_dtype!r}"):
        pipeline.from_pretrained(decoder_repo, torch_dtype=torch_dtype)


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_cpu_offload_gives_the_same_images(decoder_repo, mode):
    """On a CPU-only machine the offload target is the CPU: this checks the mechanics, not the memory saving."""
    combined = quiet(KandinskyV22CombinedPipeline.from_pretrained(decoder_repo))
    kwargs = {"num_inference_steps": 2, "prior_num_inference_steps": 2, "height": 64, "width": 64, "output_type": "np"}
    expected = combined("horse", generator=gen(), **kwargs).images
    getattr(combined, f"enable_{mode}_cpu_offload")(device="cpu")
    assert combined.decoder_pipe._execution_device == torch.device("cpu")
    images = combined("horse", generator=gen(), **kwargs).images
    assert np.abs(images - expected).max() < TOL
    if mode == "model":
        assert combined.prior_pipe._offload is combined.decoder_pipe._offload
        assert combined.decoder_pipe._offload.active is None  # the last model went back after the call


def test_prior_output_access(our_prior):
    out = our_prior("horse", num_inference_steps=2, generator=gen())
    assert isinstance(out, KandinskyPriorPipelineOutput)
    image_embeds, negative = out.to_tuple()
    assert out[0] is image_embeds is out["image_embeds"] and out[1] is negative is out.negative_image_embeds
    a, b = out
    assert a is image_embeds and b is negative and len(out) == 2


def test_conv_models_are_laid_out_channels_last_where_the_device_prefers_it(decoder_repo, monkeypatch):
    """On CUDA the pipelines keep the UNet and MoVQ channels_last (forced here for the CPU): at construction, after
    ``to()`` and when offloading is enabled. The images stay those of the NCHW models."""
    from kandinsky22.pipelines import base

    def layout(pipe):
        return {
            name: next(p for p in getattr(pipe, name).parameters() if p.dim() == 4).is_contiguous(
                memory_format=torch.channels_last
            )
            for name in ("unet", "movq")
        }

    kwargs = {"prompt": "horse", **DECODE, "prior_num_inference_steps": 2}
    expected = quiet(KandinskyV22CombinedPipeline.from_pretrained(decoder_repo))(generator=gen(), **kwargs).images
    monkeypatch.setattr(base, "CHANNELS_LAST_DEVICES", {"cpu"})
    pipe = quiet(KandinskyV22CombinedPipeline.from_pretrained(decoder_repo))
    assert layout(pipe) == {"unet": True, "movq": True}
    images = pipe(generator=gen(), **kwargs).images
    assert np.abs(images - expected).max() < 1e-5
    for model in (pipe.unet, pipe.movq):
        model.to(memory_format=torch.contiguous_format)
    pipe.to("cpu")
    assert layout(pipe) == {"unet": True, "movq": True}
    monkeypatch.setattr(base, "CHANNELS_LAST_DEVICES", set())
    pipe.unet.to(memory_format=torch.contiguous_format)
    pipe.to("cpu")
    assert layout(pipe) == {"unet": False, "movq": True}  # elsewhere the layout is left as it is
    monkeypatch.setattr(base, "CHANNELS_LAST_DEVICES", {"cpu"})
    pipe.enable_model_cpu_offload(device="cpu")
    assert layout(pipe) == {"unet": True, "movq": True}
    assert np.abs(pipe(generator=gen(), **kwargs).images - expected).max() < 1e-5


@pytest.mark.parametrize(
    ("pipeline", "repo", "match"),
    [
        ("KandinskyV22Pipeline", "inpaint_repo", "KandinskyV22Pipeline needs a UNet with 4 input channels, .* has 9"),
        ("KandinskyV22Img2ImgPipeline", "controlnet_repo", "needs a UNet with 4 input channels, .* has 8 and a depth"),
        (
            "KandinskyV22InpaintPipeline",
            "decoder_repo",
            "KandinskyV22InpaintPipeline needs a UNet with 9 input channels",
        ),
        (
            "KandinskyV22ControlnetPipeline",
            "decoder_repo",
            "needs a UNet with 8 input channels and a depth-hint encoder",
        ),
        (
            "KandinskyV22ControlnetImg2ImgPipeline",
            "inpaint_repo",
            "needs a UNet with 8 input channels and a depth-hint",
        ),
    ],
)
def test_a_unet_of_another_kind_is_refused_naming_the_repository_to_load(request, pipeline, repo, match):
    """A decoder folder of the wrong kind (e.g. the text2img decoder for inpainting) failed deep inside the first UNet
    call (a channel mismatch), or, for controlnet on a plain decoder, silently ignored the hint."""
    import kandinsky22

    pipe = quiet(getattr(kandinsky22, pipeline).from_pretrained(request.getfixturevalue(repo)))
    image = torch.zeros(1, 3, 64, 64)
    inputs = {
        "KandinskyV22Img2ImgPipeline": {"image": image, "strength": 1.0},
        "KandinskyV22InpaintPipeline": {"image": image, "mask_image": torch.zeros(64, 64)},
        "KandinskyV22ControlnetPipeline": {"hint": image},
        "KandinskyV22ControlnetImg2ImgPipeline": {"image": image, "hint": image, "strength": 1.0},
    }.get(pipeline, {})
    positive, negative = embeds()
    with pytest.raises(ValueError, match=match):
        pipe(image_embeds=positive, negative_image_embeds=negative, **inputs, **DECODE)
