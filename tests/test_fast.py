"""The fast path (kandinsky22.fast): fused projections keep the checkpoint layout, the models compile whole after
fusing, the fast path's images equal the eager path's, and the denoising loops never read a device value on the host.

Compilation here uses torch.compile's "eager" / "aot_eager" backends: they trace like Inductor does (a graph break
fails ``fullgraph=True``) without generating kernels, which would take minutes on a small CPU.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

import kandinsky22
from kandinsky22 import tiny
from kandinsky22.models.layers import FusibleProjections

TOL = 1e-4  # fp32, max |fast - eager| on [0, 1] images and on model outputs


def _models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    prior = kandinsky22.PriorTransformer(**tiny.tiny_prior_config())
    with torch.no_grad():  # zeros at init would make every embedding clip_mean
        prior.clip_std.fill_(1.0)
        prior.positional_embedding.normal_(std=0.1)
    models = {
        "unet": kandinsky22.UNet2DConditionModel(**tiny.tiny_unet_config(4, "image")),
        "movq": kandinsky22.VQModel(**tiny.tiny_movq_config()),
        "prior": prior,
    }
    return {name: model.eval() for name, model in models.items()}


def _calls(models: dict[str, torch.nn.Module]) -> dict[str, tuple]:
    """(module to compile, its inputs) per model, shaped as the pipelines call them."""
    g = torch.Generator().manual_seed(1)
    width = tiny.TINY_EMBED_DIM
    unet_args = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor(981))
    unet_kwargs = {"added_cond_kwargs": {"image_embeds": torch.randn(2, width, generator=g)}, "return_dict": False}
    latents = torch.randn(1, 4, 8, 8, generator=g)
    prior_kwargs = {
        "proj_embedding": torch.randn(2, width, generator=g),
        "encoder_hidden_states": torch.randn(2, 77, width, generator=g),
        "attention_mask": torch.arange(77).expand(2, 77) < 9,
        "return_dict": False,
    }
    return {
        "unet": (models["unet"], unet_args, unet_kwargs),
        "movq": (models["movq"].decoder, (latents, latents), {}),
        "prior": (models["prior"], (torch.randn(2, width, generator=g), torch.tensor(500)), prior_kwargs),
    }


def _fuse(model: torch.nn.Module) -> int:
    layers = [m for m in model.modules() if isinstance(m, FusibleProjections)]
    for layer in layers:
        layer.fuse_projections()
    return len(layers)


@pytest.mark.parametrize("name", ["unet", "movq", "prior"])
def test_fused_models_compile_whole_and_match_eager(name: str) -> None:
    models = _models()
    module, args, kwargs = _calls(models)[name]
    with torch.no_grad():
        expected = module(*args, **kwargs)[0]
        assert _fuse(models[name]) > 0
        fused = module(*args, **kwargs)[0]
        compiled = torch.compile(module, fullgraph=True, backend="aot_eager")(*args, **kwargs)[0]
    assert (fused - expected).abs().max() < TOL
    assert (compiled - expected).abs().max() < TOL


@pytest.mark.parametrize("name", ["unet", "movq", "prior"])
def test_fused_model_saves_and_loads_the_official_keys(name: str, tmp_path: Path) -> None:
    models = _models()
    model = models[name]
    module, args, kwargs = _calls(models)[name]
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = module(*args, **kwargs)[0]
    _fuse(model)
    assert any(key.endswith("qkv_weight") for key, _ in model.named_parameters())

    state = model.state_dict()
    assert set(state) == set(original)
    assert all(torch.equal(state[key], original[key]) for key in original)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    assert set(saved) == set(original)
    assert all(torch.equal(saved[key], original[key]) for key in original)

    reloaded = type(model).from_pretrained(tmp_path)  # an unfused model from the fused model's files
    module_again = reloaded.decoder if name == "movq" else reloaded
    again = _fuse(type(model).from_pretrained(tmp_path))  # and a fused model reading unfused keys (strict)
    assert again > 0
    with torch.no_grad():
        assert torch.equal(module_again(*args, **kwargs)[0], expected)
    fresh = _models()[name]
    _fuse(fresh)
    fresh.load_state_dict(original, strict=True)
    fresh_module = fresh.decoder if name == "movq" else fresh
    with torch.no_grad():
        assert (fresh_module(*args, **kwargs)[0] - expected).abs().max() < TOL


# ----------------------------------------------------------------------------------------------------------------------
# Pipelines
# ----------------------------------------------------------------------------------------------------------------------


def _pipeline() -> kandinsky22.KandinskyV22CombinedPipeline:
    """A tiny text2img pipeline built in memory (our models, transformers CLIP towers, the tiny tokenizer)."""
    models = _models()
    tower = {"hidden_size": tiny.TINY_EMBED_DIM, "intermediate_size": 37, "num_hidden_layers": 1}
    tower.update(num_attention_heads=4, projection_dim=tiny.TINY_EMBED_DIM)
    vocab, _ = tiny.tiny_vocab()
    ids = {"bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"], "pad_token_id": 0}
    text = transformers.CLIPTextConfig(**tower, **ids, vocab_size=len(vocab))
    vision = transformers.CLIPVisionConfig(**tower, image_size=tiny.TINY_IMAGE_SIZE, patch_size=8)
    tokenizer_folder = tiny.write_tiny_tokenizer(Path(tempfile.mkdtemp()) / "tokenizer")
    processor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    pipe = kandinsky22.KandinskyV22CombinedPipeline(
        unet=models["unet"],
        scheduler=kandinsky22.DDPMScheduler(**_config(tiny.DECODER_SCHEDULER)),
        movq=models["movq"],
        prior_prior=models["prior"],
        prior_image_encoder=transformers.CLIPVisionModelWithProjection(vision).eval(),
        prior_text_encoder=transformers.CLIPTextModelWithProjection(text).eval(),
        prior_tokenizer=transformers.CLIPTokenizer.from_pretrained(tokenizer_folder),
        prior_scheduler=kandinsky22.UnCLIPScheduler(**_config(tiny.PRIOR_SCHEDULER)),
        prior_image_processor=processor(size=tiny.TINY_IMAGE_SIZE, crop_size=tiny.TINY_IMAGE_SIZE),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _config(values: dict) -> dict:
    return {k: v for k, v in values.items() if not k.startswith("_")}


CALL = {"num_inference_steps": 3, "prior_num_inference_steps": 3, "height": 64, "width": 64, "output_type": "pt"}


def test_fast_path_gives_the_eager_images() -> None:
    pipe = _pipeline()
    eager = pipe("red cat", generator=torch.Generator().manual_seed(0), **CALL).images
    warm_up = pipe.enable_fast_path(shapes=[(64, 64)], backend="eager")
    assert set(warm_up) == {"unet", "movq", "prior_prior"}
    for module in (pipe.unet, pipe.movq.decoder, pipe.prior_prior):
        assert module._compiled_call_impl is not None
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(m.fused_sizes for m in pipe.unet.modules() if isinstance(m, FusibleProjections))
    # The sub-pipelines share the modules, so they are on the fast path too; a second call changes nothing.
    assert pipe.decoder_pipe.unet is pipe.unet
    pipe.enable_fast_path(backend="eager")
    compiled = counters["stats"]["unique_graphs"]
    fast = pipe("red cat", generator=torch.Generator().manual_seed(0), **CALL).images
    # The warm-up's graphs serve the call (its 3 steps, not the warm-up's one, change no guarded stride or mode), and
    # a call with a negative prompt (the prior then runs both prompts in one batch) or another scheduler.
    pipe("red cat", negative_prompt="blurry", generator=torch.Generator().manual_seed(0), **CALL)
    pipe.decoder_pipe.scheduler = kandinsky22.EulerDiscreteScheduler(**_config(tiny.DECODER_SCHEDULER))
    pipe("red cat", generator=torch.Generator().manual_seed(0), **CALL)
    pipe.decoder_pipe.scheduler = kandinsky22.DDPMScheduler(**_config(tiny.DECODER_SCHEDULER))
    assert counters["stats"]["unique_graphs"] == compiled
    assert fast.shape == eager.shape == (1, 3, 64, 64)
    assert (fast - eager).abs().max() < TOL
    assert set(pipe.unet.state_dict()) == set(_models()["unet"].state_dict())


def test_fast_path_input_errors() -> None:
    pipe = _pipeline()
    with pytest.raises(ValueError, match="shapes"):
        pipe.enable_fast_path(shapes=[(64,)])
    with pytest.raises(ValueError, match="shapes"):
        pipe.enable_fast_path(shapes=[(64, 64.0)])
    pipe.enable_sequential_cpu_offload(device="cpu")
    with pytest.raises(ValueError, match="sequential"):
        pipe.enable_fast_path()


class _HostToDeviceCopies(TorchDispatchMode):
    """Records the shape of every copy from the CPU to another device."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            source = args[1] if func is torch.ops.aten.copy_.default else args[0]
            target = args[0] if func is torch.ops.aten.copy_.default else out
            if source.device.type == "cpu" and target.device.type != "cpu":
                self.shapes.append(tuple(source.shape))
        return out


def test_denoising_loops_never_read_device_values_on_the_host() -> None:
    """The whole text2img call with the models on the ``meta`` device: a meta tensor has no values, so anything that
    would wait for a GPU (``.item()``, ``bool()``, ``.tolist()``, ``.cpu()``, printing) raises. Only the schedulers'
    host tables, the tokenizer's ids and the CPU generator's noise are real; the timestep tables go to the device
    once per loop, not a timestep per step (a blocking copy on CUDA)."""
    pipe = _pipeline().to("meta")
    with _HostToDeviceCopies() as copies:
        call = {**CALL, "output_type": "latent"}
        latents = pipe("red cat", generator=torch.Generator().manual_seed(0), **call).images
    assert latents.device.type == "meta" and latents.shape == (1, 4, 8, 8)
    assert copies.shapes.count((3,)) == 2  # the prior's and the decoder's timestep tables
    assert not [shape for shape in copies.shapes if len(shape) == 0]  # no per-step scalar copies
    with pytest.raises(RuntimeError):
        latents.sum().item()  # the premise: reading a meta value fails


@pytest.mark.parametrize("scheduler", ["DDPMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_inpaint_loop_copies_only_noise_per_step(scheduler: str) -> None:
    """Inpainting re-noises the kept image at every step (``add_noise``). On the ``meta`` device, a run of 6 steps
    makes no more copies from the host than a run of 3 but for the CPU generator's noise of each extra step (DDPM
    draws noise at every step; Euler and DPM-Solver++ do not): the scheduler's tables and the timesteps reach the
    device once per run, where a copy per step would block the host on a GPU."""
    torch.manual_seed(0)
    unet = kandinsky22.UNet2DConditionModel(**tiny.tiny_unet_config(9, "image"))
    movq = kandinsky22.VQModel(**tiny.tiny_movq_config())
    sampler = getattr(kandinsky22, scheduler)(**_config(tiny.DECODER_SCHEDULER))
    pipe = kandinsky22.KandinskyV22InpaintPipeline(unet=unet.eval(), scheduler=sampler, movq=movq.eval()).to("meta")
    pipe.set_progress_bar_config(disable=True)
    embeds = torch.empty(1, tiny.TINY_EMBED_DIM, device="meta")
    mask = torch.zeros(64, 64)
    mask[:32] = 1

    def copies(steps: int) -> list[tuple[int, ...]]:
        with _HostToDeviceCopies() as recorded:
            pipe(
                image_embeds=embeds,
                negative_image_embeds=embeds,
                image=torch.rand(1, 3, 64, 64),
                mask_image=mask,
                height=64,
                width=64,
                num_inference_steps=steps,
                generator=torch.Generator().manual_seed(0),
                output_type="latent",
            )
        return recorded.shapes

    short, long = copies(3), copies(6)
    extra = list(long)
    for shape in short:
        extra.remove(shape) if shape in extra else None
    noise_draws = 3 if scheduler == "DDPMScheduler" else 0
    assert extra.count((1, 4, 8, 8)) == noise_draws, extra
    # and the longer run's own tables, once: timesteps (6,) instead of (3,); σ (7,) instead of (4,)
    tables = [(6,), (7,)] if scheduler != "DDPMScheduler" else [(6,)]
    assert sorted(shape for shape in extra if shape != (1, 4, 8, 8)) == tables, extra


def test_warm_up_without_negative_prompts_leaves_the_doubled_prior_batch() -> None:
    torch._dynamo.reset()  # graphs compiled by other tests (same code, same shapes) would serve these calls
    pipe = _pipeline()
    pipe.enable_fast_path(shapes=[(64, 64)], backend="eager", negative_prompts=False)
    compiled = counters["stats"]["unique_graphs"]
    pipe("red cat", generator=torch.Generator().manual_seed(0), **CALL)
    assert counters["stats"]["unique_graphs"] == compiled
    pipe("red cat", negative_prompt="blurry", generator=torch.Generator().manual_seed(0), **CALL)
    assert counters["stats"]["unique_graphs"] == compiled + 1  # the prior at twice the batch, compiled on first use
