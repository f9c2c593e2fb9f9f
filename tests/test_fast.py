"""The fast path (kandinsky22.fast): fused projections keep the checkpoint layout, the models compile whole after
fusing, the fast path's images equal the eager path's, and the denoising loops never read a device value on the host.

Compilation here uses torch.compile's "eager" / "aot_eager" backends: they trace like Inductor does (a graph break
fails ``fullgraph=True``) without generating kernels, which would take minutes on a small CPU.
"""

from __future__ import annotations

import dataclasses
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from graph_standin import fast_path_as_on_cuda, rerun_capture
from safetensors.torch import load_file
from torch import nn
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

import kandinsky22
from kandinsky22 import fast, tiny
from kandinsky22.models import layers, movq, norms, prior
from kandinsky22.models.layers import AddedKVAttention, FusibleProjections, ResnetBlock2D

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
def test_fused_models_compile_whole_and_match_eager(name: str, monkeypatch) -> None:
    # the UNet's fused attentions write their keys in place uncompiled (all sizes here), concatenate compiled
    monkeypatch.setattr("kandinsky22.models.layers._IN_PLACE_MIN_PIXELS", 0)
    models = _models()
    module, args, kwargs = _calls(models)[name]
    with torch.no_grad():
        expected = module(*args, **kwargs)[0]
        assert _fuse(models[name]) > 0
        fused = module(*args, **kwargs)[0]
        compiled = torch.compile(module, fullgraph=True, backend="aot_eager")(*args, **kwargs)[0]
    assert (fused - expected).abs().max() < TOL
    assert (compiled - expected).abs().max() < TOL


class _AtenOps(TorchDispatchMode):
    """The aten ops a call runs, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("batch", [1, 3])
def test_fused_attention_writes_keys_after_the_context_without_a_concatenation(batch: int, monkeypatch) -> None:
    """Fused and uncompiled, an added-KV attention's projection GEMMs write the pixels' keys and values after the
    context's in one buffer (a GEMM per sample): the same output as the unfused layer's, and no ``cat``."""
    monkeypatch.setattr("kandinsky22.models.layers._IN_PLACE_MIN_PIXELS", 30)
    torch.manual_seed(0)
    layer = AddedKVAttention(32, context_dim=24, head_dim=8, groups=8).eval()
    x, context = torch.randn(batch, 32, 5, 6), torch.randn(batch, 7, 24)
    with torch.no_grad():
        expected = layer(x, layer.context_kv(context))
        layer.fuse_projections()
        context_kv = layer.context_kv(context)
        with _AtenOps() as seen:
            fused = layer(x, context_kv)
    assert seen.ops.count("addmm") == batch + 1  # the projection per sample, the output projection
    assert "cat" not in seen.ops
    assert (fused - expected).abs().max() < TOL
    monkeypatch.setattr("kandinsky22.models.layers._IN_PLACE_MIN_PIXELS", 31)  # 5 x 6 pixels: below it, concatenated
    with torch.no_grad(), _AtenOps() as seen:
        assert (layer(x, context_kv) - fused).abs().max() < TOL
    assert seen.ops.count("cat") == 2 and seen.ops.count("addmm") == 2
    # recording gradients (of the input here): concatenated, since a GEMM into a given output records none
    monkeypatch.setattr("kandinsky22.models.layers._IN_PLACE_MIN_PIXELS", 0)
    x.requires_grad_(True)
    out = layer(x, context_kv)
    assert (out.detach() - fused).abs().max() < TOL
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


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


@pytest.mark.parametrize("scope", ["blocks", "model", "none"])
def test_fast_path_gives_the_eager_images(scope: str) -> None:
    torch._dynamo.reset()  # graphs compiled by other tests (same code, same shapes) would serve these calls
    pipe = _pipeline()
    eager = pipe("red cat", generator=torch.Generator().manual_seed(0), **CALL).images
    before = counters["stats"]["unique_graphs"]
    warm_up = pipe.enable_fast_path(shapes=[(64, 64)], backend="eager", compile_scope=scope)
    assert set(warm_up) == {"unet", "movq", "prior_prior"}
    blocks = {
        pipe.unet: (ResnetBlock2D, AddedKVAttention),
        pipe.movq.decoder: (movq.ResnetBlock, movq.SelfAttention),
        pipe.prior_prior: (prior.TransformerBlock,),
    }
    for module, kinds in blocks.items():
        inner = [m for m in module.modules() if isinstance(m, kinds)]
        assert inner
        if scope == "model":  # the model is one graph (no CUDA graph on the CPU)
            assert module._compiled_call_impl is not None
            assert all(m._compiled_call_impl is None for m in inner)
        elif scope == "blocks":  # each block is compiled, the model runs them from eager code
            assert module._compiled_call_impl is None
            assert all(m._compiled_call_impl is not None for m in inner)
        else:  # nothing is compiled
            assert module._compiled_call_impl is None
            assert all(m._compiled_call_impl is None for m in inner)
    assert (counters["stats"]["unique_graphs"] == before) == (scope == "none")
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(m.fused_sizes for m in pipe.unet.modules() if isinstance(m, FusibleProjections))
    # The sub-pipelines share the modules, so they are on the fast path too; a second call changes nothing.
    assert pipe.decoder_pipe.unet is pipe.unet
    pipe.enable_fast_path(backend="eager", compile_scope=scope)
    with pytest.raises(ValueError, match="compile_scope"):
        pipe.enable_fast_path(backend="eager", compile_scope="model" if scope != "model" else "blocks")
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


def test_blocks_of_one_structure_share_one_graph() -> None:
    """With compile_scope="blocks", the prior's identical transformer blocks compile once, not once each."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = kandinsky22.PriorTransformer(**{**tiny.tiny_prior_config(), "num_layers": 3}).eval()
    _, args, kwargs = _calls(_models())["prior"]
    with torch.no_grad():
        expected = model(*args, **kwargs)[0]
    fast._prepare(model, "eager", offloaded=False, scope="blocks")
    before = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        out = model(*args, **kwargs)[0]
    assert counters["stats"]["unique_graphs"] - before == 1
    assert (out - expected).abs().max() < TOL


def test_fast_path_rejects_an_unknown_scope() -> None:
    with pytest.raises(ValueError, match="compile_scope.*'layers'"):
        _pipeline().enable_fast_path(backend="eager", compile_scope="layers")


def test_fast_path_input_errors() -> None:
    pipe = _pipeline()
    with pytest.raises(ValueError, match="shapes"):
        pipe.enable_fast_path(shapes=[(64,)])
    with pytest.raises(ValueError, match="shapes"):
        pipe.enable_fast_path(shapes=[(64, 64.0)])
    # One shape without its list, or as text: a ValueError naming the value, not a TypeError from inside
    with pytest.raises(ValueError, match=r"shapes.*\(64, 64\)"):
        pipe.enable_fast_path(shapes=(64, 64))
    with pytest.raises(ValueError, match="shapes.*'64x64'"):
        pipe.enable_fast_path(shapes="64x64")
    with pytest.raises(ValueError, match="shapes.*'64x64'"):
        pipe.enable_fast_path(shapes=["64x64"])
    with pytest.raises(ValueError, match="shapes=64"):
        pipe.enable_fast_path(shapes=64)
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


@pytest.mark.parametrize("scope", ["blocks", "model"])
def test_warm_up_without_negative_prompts_leaves_the_doubled_prior_batch(scope: str) -> None:
    torch._dynamo.reset()  # graphs compiled by other tests (same code, same shapes) would serve these calls
    pipe = _pipeline()
    pipe.enable_fast_path(shapes=[(64, 64)], backend="eager", negative_prompts=False, compile_scope=scope)
    compiled = counters["stats"]["unique_graphs"]
    pipe("red cat", generator=torch.Generator().manual_seed(0), **CALL)
    assert counters["stats"]["unique_graphs"] == compiled
    pipe("red cat", negative_prompt="blurry", generator=torch.Generator().manual_seed(0), **CALL)
    # the prior at twice the batch, compiled on first use: the model, or its block for the prompt's tokens (once per
    # run, in prepare_context) and for a step's
    assert counters["stats"]["unique_graphs"] == compiled + (1 if scope == "model" else 2)


# ----------------------------------------------------------------------------------------------------------------------
# CUDA graphs (CudaGraphCall), with a CPU stand-in for the capture
# ----------------------------------------------------------------------------------------------------------------------


def _graph(model: torch.nn.Module) -> fast.CudaGraphCall:
    model._compiled_call_impl = fast.CudaGraphCall(model, model._call_impl, rerun_capture, "cpu")
    return model._compiled_call_impl


def test_graphed_unet_and_prior_give_the_eager_images() -> None:
    """The pipelines' real calls through CudaGraphCall: the UNet's and the prior's arguments (their per-run
    conditioning dataclasses among them) are keyed and copied in, one capture serves every step of every call."""
    pipe = _pipeline()
    eager = pipe("red cat", generator=torch.Generator().manual_seed(0), **CALL).images
    eager_negative = pipe("red cat", negative_prompt="blurry", generator=torch.Generator().manual_seed(0), **CALL)
    unet, prior_calls = _graph(pipe.unet), _graph(pipe.prior_prior)
    with torch.no_grad():
        graphed = pipe("red cat", generator=torch.Generator().manual_seed(0), **CALL).images
        again = pipe("red cat", generator=torch.Generator().manual_seed(0), **CALL).images
        negative = pipe("red cat", negative_prompt="blurry", generator=torch.Generator().manual_seed(0), **CALL)
    assert (graphed - eager).abs().max() < TOL
    assert torch.equal(graphed, again)
    assert (negative.images - eager_negative.images).abs().max() < TOL
    assert unet.captures == 1  # 3 steps × 3 calls, one shape
    assert prior_calls.captures == 2  # one prompt, then prompt and negative prompt in one batch


def test_cuda_graph_call_keys_copies_and_clones() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)

    @dataclasses.dataclass
    class Extra:
        shift: torch.Tensor
        negate: bool

    def forward(x: torch.Tensor, extra: Extra, *ignored: object) -> torch.Tensor:
        return model(x) * (-1 if extra.negate else 1) + extra.shift

    def direct(x: torch.Tensor, extra: Extra) -> torch.Tensor:
        with torch.no_grad():
            return forward(x, extra)

    call = fast.CudaGraphCall(model, forward, rerun_capture, "cpu")
    shift = torch.zeros(3)
    x1, x2 = torch.randn(2, 4), torch.randn(2, 4)
    with torch.no_grad():
        first = call(x1, Extra(shift, False))
        second = call(x2, Extra(shift, False))  # same signature: replayed, shift not copied again
        assert call.captures == 1
        assert torch.equal(first, direct(x1, Extra(shift, False)))  # a clone: the replay did not overwrite it
        assert torch.equal(second, direct(x2, Extra(shift, False)))
        shift.add_(1.0)  # the same tensor object, changed in place: copied in again
        assert torch.equal(call(x2, Extra(shift, False)), direct(x2, Extra(shift, False)))
        assert torch.equal(call(x2, Extra(torch.ones(3), False)), direct(x2, Extra(torch.ones(3), False)))
        assert call.captures == 1
        # another non-tensor value, shape or layout is another graph
        assert torch.equal(call(x2, Extra(shift, True)), direct(x2, Extra(shift, True)))
        x3 = torch.randn(5, 4)
        assert torch.equal(call(x3, Extra(shift, False)), direct(x3, Extra(shift, False)))
        assert torch.equal(call(x3.t().contiguous().t(), Extra(shift, False)), direct(x3, Extra(shift, False)))
        assert call.captures == 4
        # weights at a new address (a model moved or cast): captured afresh, with the new values
        model.weight.data = model.weight.data * 2
        assert torch.equal(call(x2, Extra(shift, False)), direct(x2, Extra(shift, False)))
        assert call.captures == 5
        assert len(call.replays) <= fast._GRAPHS_PER_MODEL
    # autograd on, a Python number (a timestep as an int would be a graph per step) or an argument it does not key:
    # a direct call, no graph
    assert call(x2, Extra(shift, False)).requires_grad
    with torch.no_grad():
        for extra_argument in (object(), 981, 0.5):
            assert torch.equal(call(x2, Extra(shift, False), extra_argument), direct(x2, Extra(shift, False)))
        # keyword order is not part of the key
        assert torch.equal(call(extra=Extra(shift, False), x=x2), call(x=x2, extra=Extra(shift, False)))
    assert call.captures == 6


def test_cuda_graph_call_keeps_the_most_recent_graphs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fast, "_GRAPHS_PER_MODEL", 2)
    model = torch.nn.Linear(4, 3)
    call = fast.CudaGraphCall(model, model, rerun_capture, "cpu")
    with torch.no_grad():
        for batch in (1, 2, 1, 3, 1):
            assert torch.equal(call(torch.ones(batch, 4)), model(torch.ones(batch, 4)))
    assert call.captures == 3  # batch 1 stayed (used last), batch 2 was dropped for 3
    assert [key[0][1][0][1][0][1] for key in call.replays] == [(3, 4), (1, 4)]


@pytest.mark.parametrize("scope", ["blocks", "model", "none"])
def test_warm_up_captures_the_graphs_the_pipeline_replays(scope: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path as on CUDA (CUDA graphs for the UNet and the prior), with the CPU stand-in for the capture: the
    warm-up calls the models as the pipeline's loops do, so a call at a warmed-up shape captures nothing more."""
    original = fast_path_as_on_cuda(monkeypatch)
    pipe = _pipeline()
    eager = pipe("red cat", generator=torch.Generator().manual_seed(0), **CALL).images
    pipe.enable_fast_path(shapes=[(64, 64)], backend="eager", compile_scope=scope)
    graphs = {name: getattr(pipe, name)._compiled_call_impl for name in ("unet", "prior_prior")}
    assert all(isinstance(g, original) for g in graphs.values())
    assert pipe.movq._compiled_call_impl is None  # MoVQ runs once per call: no graph holds its activations
    assert {name: g.captures for name, g in graphs.items()} == {"unet": 1, "prior_prior": 2}  # prior: 1 and 2 prompts
    with torch.no_grad():
        fast_images = pipe("red cat", generator=torch.Generator().manual_seed(0), **CALL).images
        pipe("red cat", negative_prompt="blurry", generator=torch.Generator().manual_seed(0), **CALL)
    assert {name: g.captures for name, g in graphs.items()} == {"unet": 1, "prior_prior": 2}
    assert (fast_images - eager).abs().max() < TOL


@pytest.mark.parametrize("scope", ["blocks", "model", "none"])
@pytest.mark.parametrize(("triton", "capability"), [(True, (9, 0)), (False, (9, 0)), (True, (6, 1))])
def test_triton_norms_where_the_fast_path_leaves_a_model_uncompiled(scope, triton, capability, monkeypatch) -> None:
    """On CUDA, where Triton generates code for the GPU (compute capability 7.0 and up): compile_scope="none" switches
    the UNet's GroupNorms to the Triton kernels (the compiled scopes keep Inductor's; the prior has none), and in
    every scope MoVQ stays uncompiled with the Triton kernels. Without Triton, or on an older GPU, everything is as
    the scope says."""
    fast_path_as_on_cuda(monkeypatch)
    monkeypatch.setattr(norms, "triton_available", lambda: triton)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    pipe = _pipeline()
    pipe.enable_fast_path(shapes=[(64, 64)], backend="eager", compile_scope=scope)
    runs = triton and capability >= (7, 0)
    for name, expected in (("unet", runs and scope == "none"), ("movq", runs)):
        flags = [getattr(m, "triton_norm", False) for m in getattr(pipe, name).modules() if isinstance(m, nn.GroupNorm)]
        assert flags and all(flag == expected for flag in flags)
    decoder = pipe.movq.decoder
    compiled = decoder._compiled_call_impl is not None or any(m._compiled_call_impl for m in decoder.modules())
    assert compiled == (scope != "none" and not runs)


@pytest.mark.parametrize("scope", ["blocks", "none"])
def test_graphs_read_phase_kernels_that_follow_the_weights(scope: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Uncompiled, the UNet's graphs read its upsampling convolutions' phase kernels from their buffers, refreshed
    once per run: a weight changed in place after the capture (as a LoRA merges) reaches the replayed graph, which
    is not captured again. Compiled, the graph derives them and nothing is kept."""
    torch._dynamo.reset()
    fast_path_as_on_cuda(monkeypatch)
    monkeypatch.setattr(layers, "_PHASES_MIN_PIXELS", 1)  # the phase form at the tiny sizes
    pipe = _pipeline()
    pipe.enable_fast_path(shapes=[(64, 64)], backend="eager", compile_scope=scope)
    convs = pipe.unet._upsampling_convs
    assert convs and all((conv.phase_kernel is not None) == (scope == "none") for conv in convs)
    graphs = pipe.unet._compiled_call_impl
    with torch.no_grad():
        for conv in convs:
            conv.weight.data.mul_(1.5)
        fast_images = pipe("red cat", generator=torch.Generator().manual_seed(0), **CALL).images
    assert graphs.captures == 1
    fast.drop_cuda_graphs(pipe.unet)
    eager = pipe("red cat", generator=torch.Generator().manual_seed(0), **CALL).images
    assert (fast_images - eager).abs().max() < TOL


@pytest.mark.parametrize(
    ("cuda", "triton", "capability", "offload", "expected"),
    [
        (True, True, (9, 0), False, "none"),  # the Triton norms run inside the CUDA graphs
        (True, False, (9, 0), False, "blocks"),
        (True, True, (6, 1), False, "blocks"),  # Triton generates no code for a Pascal GPU
        (True, True, (9, 0), True, "blocks"),  # offloaded: no CUDA graphs
        (False, True, (9, 0), False, "blocks"),
    ],
)
def test_auto_scope_is_none_where_the_triton_norms_run(cuda, triton, capability, offload, expected, monkeypatch):
    fast_path_as_on_cuda(monkeypatch)
    monkeypatch.setattr(fast, "_on_cuda", lambda model: cuda)
    monkeypatch.setattr(norms, "triton_available", lambda: triton)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    pipe = _pipeline()
    if offload:
        pipe.enable_model_cpu_offload(device="cpu")
    pipe.enable_fast_path(backend="eager")
    assert {m._fast_path_scope for m in (pipe.unet, pipe.movq, pipe.prior_prior)} == {expected}
    pipe.enable_fast_path(backend="eager")  # again: the scope it is on, whatever "auto" would pick now
    with pytest.raises(ValueError, match="compile_scope"):
        pipe.enable_fast_path(backend="eager", compile_scope="model")


def test_auto_scope_keeps_the_scope_a_pipeline_is_on(monkeypatch: pytest.MonkeyPatch) -> None:
    fast_path_as_on_cuda(monkeypatch)
    pipe = _pipeline()
    pipe.enable_fast_path(backend="eager", compile_scope="model")
    pipe.enable_fast_path(backend="eager")
    assert {m._fast_path_scope for m in (pipe.unet, pipe.movq, pipe.prior_prior)} == {"model"}


@pytest.mark.parametrize(
    ("ran_untimed", "autotuning", "warns"), [(True, False, True), (False, False, False), (True, True, False)]
)
def test_fast_path_warns_when_the_unet_already_ran_without_cudnn_autotuning(
    ran_untimed: bool, autotuning: bool, warns: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PyTorch keeps the cuDNN plan chosen at a convolution shape's first use: a UNet that already ran on CUDA with
    autotuning off (the flag its prepare_conditioning sets there; tests/pipelines/test_fast_cuda.py sets it for
    real) cannot get timed plans from the fast path, which says so and how to avoid it."""
    fast_path_as_on_cuda(monkeypatch)
    torch.backends.cudnn.benchmark = autotuning  # restored by the monkeypatch of fast_path_as_on_cuda
    pipe = _pipeline()
    if ran_untimed:
        pipe.unet._ran_untimed_convolutions = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.enable_fast_path(backend="eager", compile_scope="none")
    ours = [w for w in caught if "cuDNN autotuning" in str(w.message)]
    assert len(ours) == warns
    if warns:
        assert "the unet already ran on CUDA" in str(ours[0].message)
        assert "before the first image" in str(ours[0].message)
        assert ours[0].filename == __file__  # points at the caller's line


def test_only_warmed_up_graphs_captures_nothing_new() -> None:
    model = torch.nn.Linear(4, 3)
    call = fast.CudaGraphCall(model, model, rerun_capture, "cpu")
    with torch.no_grad():
        call(torch.ones(1, 4))
        with fast.only_warmed_up_graphs():
            assert torch.equal(call(torch.ones(2, 4)), model(torch.ones(2, 4)))  # runs directly
            assert torch.equal(call(torch.full((1, 4), 2.0)), model(torch.full((1, 4), 2.0)))  # replays
        assert call.captures == 1
        call(torch.ones(2, 4))
    assert call.captures == 2


def test_warm_up_compiles_and_captures_where_the_caller_asked_for_neither(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pipeline loaded while the server runs a request (the "eager_on_recompile" stance, only_warmed_up_graphs()):
    its warm-up still compiles and captures its shapes, and the stance holds again afterwards."""
    torch._dynamo.reset()
    fast_path_as_on_cuda(monkeypatch)
    pipe = _pipeline()
    before = counters["stats"]["unique_graphs"]
    with torch.compiler.set_stance("eager_on_recompile"), fast.only_warmed_up_graphs():
        pipe.enable_fast_path(shapes=[(64, 64)], backend="eager", negative_prompts=False, compile_scope="blocks")
        compiled = counters["stats"]["unique_graphs"]
        assert compiled > before
        assert pipe.unet._compiled_call_impl.captures == 1
        pipe("red cat", generator=torch.Generator().manual_seed(0), **{**CALL, "height": 128})  # not warmed up
        assert counters["stats"]["unique_graphs"] == compiled
        assert pipe.unet._compiled_call_impl.captures == 1


@pytest.mark.parametrize("scope", ["blocks", "model", "none"])
@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_offloading_after_the_fast_path_drops_the_graphs(scope: str, offload: str, monkeypatch) -> None:
    torch._dynamo.reset()
    fast_path_as_on_cuda(monkeypatch)
    pipe = _pipeline()
    eager = pipe("red cat", generator=torch.Generator().manual_seed(0), **CALL).images
    pipe.enable_fast_path(shapes=[(64, 64)], backend="eager", compile_scope=scope)
    compiled = pipe.unet._compiled_call_impl.fn
    getattr(pipe, f"enable_{offload}_cpu_offload")(device="cpu")
    for model in (pipe.unet, pipe.prior_prior):
        assert not isinstance(model._compiled_call_impl, fast.CudaGraphCall)
    assert all(conv.phase_kernel is None for conv in pipe.unet._upsampling_convs)  # kept for the graphs only
    # the compiled model stays compiled ("model" scope), the blocks stay compiled ("blocks")
    assert pipe.unet._compiled_call_impl is (compiled if scope == "model" else None)
    images = pipe("red cat", generator=torch.Generator().manual_seed(0), **CALL).images
    assert (images - eager).abs().max() < TOL
