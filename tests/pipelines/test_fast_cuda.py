"""On a CUDA device (skipped elsewhere): the fast path's CUDA graphs give the eager images, captured once per shape.

The CPU suite checks CudaGraphCall's keying and copying with a stand-in for the capture (tests/test_fast.py); this
captures real graphs, with torch.compile's "eager" backend (tracing only) and with Inductor (its Triton kernels
replayed inside our graph).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from kandinsky22 import KandinskyV22CombinedPipeline, KandinskyV22InpaintCombinedPipeline, fast

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def true_fp32():
    """fp32 convolutions and matmuls in fp32, not TF32 (see test_offload_cuda.py), and cuDNN's autotuning (which the
    fast path turns on) set back afterwards."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark = flags


KWARGS = {"num_inference_steps": 3, "prior_num_inference_steps": 3, "height": 64, "width": 64, "output_type": "np"}


def _run(pipe, **kwargs):
    return pipe("horse", generator=torch.Generator().manual_seed(0), **KWARGS, **kwargs).images


@pytest.mark.parametrize(
    ("scope", "backend"),
    [("blocks", "eager"), ("model", "eager"), ("blocks", "inductor"), ("none", "eager"), ("none", "triton_norms")],
)
def test_cuda_graphs_give_the_eager_images(decoder_repo, scope, backend):
    """``backend="triton_norms"``: no compilation, the Triton GroupNorms inside the graphs."""
    torch._dynamo.reset()
    pipe = KandinskyV22CombinedPipeline.from_pretrained(decoder_repo)
    pipe.set_progress_bar_config(disable=True)
    pipe.to("cuda")
    expected, expected_negative = _run(pipe), _run(pipe, negative_prompt="blurry")
    if backend == "triton_norms":
        assert fast.use_triton_norms(pipe) > 0
        backend = "eager"
    pipe.enable_fast_path(shapes=[(64, 64)], backend=backend, compile_scope=scope)
    graphs = {name: getattr(pipe, name)._compiled_call_impl for name in ("unet", "prior_prior")}
    assert all(isinstance(g, fast.CudaGraphCall) for g in graphs.values())
    images, again, negative = _run(pipe), _run(pipe), _run(pipe, negative_prompt="blurry")
    # warm-up captured the UNet once, the prior for one and two prompts; the calls replay them
    assert {name: g.captures for name, g in graphs.items()} == {"unet": 1, "prior_prior": 2}
    # the Triton norms: the UNet's under compile_scope="none", MoVQ's in every scope
    triton = any(getattr(m, "triton_norm", False) for m in (*pipe.unet.modules(), *pipe.movq.modules()))
    tol = 1e-4 if backend == "eager" and not triton else 1e-3  # Inductor and Triton reorder fp32 reductions
    assert np.abs(images - expected).max() < tol
    assert np.abs(negative - expected_negative).max() < tol
    assert np.array_equal(images, again)
    # moved off the GPU and back: the weights are elsewhere, so the graphs are captured again, with the same images
    pipe.to("cpu")
    pipe.to("cuda")
    assert np.abs(_run(pipe) - expected).max() < tol
    assert graphs["unet"].captures == 2


def test_cuda_graphs_serve_inpainting(inpaint_repo):
    """The inpainting UNet (9 input channels, the masked image concatenated each step) through the graphs: the same
    images as the same compiled models called without them. (Not compared with the eager pipeline: on this tiny
    random-weight model the latents grow to ~28 in 3 steps, and MoVQ turns the 1e-6 rounding of another memory
    layout into up to 3.3e-3 on the image — on the CPU too, with channels_last alone; H200 run 4.)"""
    torch._dynamo.reset()
    pipe = KandinskyV22InpaintCombinedPipeline.from_pretrained(inpaint_repo)
    pipe.set_progress_bar_config(disable=True)
    pipe.to("cuda")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), np.float32)
    mask[:32] = 1
    pipe.enable_fast_path(shapes=[(64, 64)], backend="eager")
    graphs = [pipe.unet._compiled_call_impl, pipe.prior_prior._compiled_call_impl]
    for g in graphs:
        g.enabled = False
    direct = _run(pipe, image=image, mask_image=mask)
    for g in graphs:
        g.enabled = True
    graphed = _run(pipe, image=image, mask_image=mask)
    assert np.abs(graphed - direct).max() < 1e-5
    assert graphs[0].captures == 1


@pytest.mark.parametrize("scope", ["blocks", "none"])
def test_lora_changed_after_capture_reaches_the_replayed_graphs(decoder_repo, scope):
    """A LoRA loaded, reweighted and unloaded after the graphs were captured: the replays read the merged weights
    in place (kandinsky22.lora), with no new capture."""
    peft = pytest.importorskip("peft")
    diffusers = pytest.importorskip("diffusers")
    torch._dynamo.reset()
    reference = diffusers.KandinskyV22CombinedPipeline.from_pretrained(decoder_repo).unet
    torch.manual_seed(4)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]
    reference.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    adapter = {f"unet.{k}": v for k, v in peft.get_peft_model_state_dict(reference).items()}
    eager = KandinskyV22CombinedPipeline.from_pretrained(decoder_repo).to("cuda")
    pipe = KandinskyV22CombinedPipeline.from_pretrained(decoder_repo).to("cuda")
    for p in (eager, pipe):
        p.set_progress_bar_config(disable=True)
    pipe.enable_fast_path(shapes=[(64, 64)], backend="eager", compile_scope=scope)
    base = _run(pipe)
    graphs = pipe.unet._compiled_call_impl
    for p in (eager, pipe):
        p.load_lora_weights(adapter)  # alpha 8 / rank 4 comes with no metadata here: scale 1 on both
    assert np.abs(_run(pipe) - _run(eager)).max() < 1e-3
    assert np.abs(_run(pipe) - base).max() > 1e-2
    for p in (eager, pipe):
        p.set_adapters("default_0", 0.3)
    assert np.abs(_run(pipe) - _run(eager)).max() < 1e-3
    pipe.unload_lora_weights()
    assert np.abs(_run(pipe) - base).max() < 1e-5
    assert graphs.captures == 1


def test_kept_phase_kernels_follow_weights_changed_after_capture(decoder_repo, monkeypatch):
    """Uncompiled, the UNet's graphs read the upsampling convolutions' phase kernels from their buffers, refreshed
    in place once per run: upsampling weights changed after the capture reach the replays (no new capture), and
    the images are those of the same pipeline without graphs."""
    from kandinsky22.models import layers

    monkeypatch.setattr(layers, "_PHASES_MIN_PIXELS", 1)  # the phase form at the tiny sizes
    torch._dynamo.reset()
    pipe = KandinskyV22CombinedPipeline.from_pretrained(decoder_repo).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_fast_path(shapes=[(64, 64)], backend="eager", compile_scope="none")
    convs = pipe.unet._upsampling_convs
    assert convs and all(conv.phase_kernel is not None for conv in convs)
    graphs = pipe.unet._compiled_call_impl
    before = _run(pipe)
    with torch.no_grad():
        for conv in convs:
            conv.weight.data.mul_(1.5)
    graphed = _run(pipe)
    assert graphs.captures == 1 and np.abs(graphed - before).max() > 1e-3
    graphs.enabled = False
    assert np.abs(graphed - _run(pipe)).max() < 1e-5


def test_fast_path_after_an_untimed_eager_run_warns(decoder_repo):
    """An eager image on CUDA with cuDNN autotuning off fixes the convolution plans for the process (PyTorch keeps
    the first it chose per shape): enable_fast_path() then says that it cannot time them; turned on first, or with
    autotuning on from the start, it does not."""
    pipe = KandinskyV22CombinedPipeline.from_pretrained(decoder_repo)
    pipe.set_progress_bar_config(disable=True)
    pipe.to("cuda")
    torch.backends.cudnn.benchmark = True
    _run(pipe)
    fresh = KandinskyV22CombinedPipeline.from_pretrained(decoder_repo).to("cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh.enable_fast_path(shapes=[(64, 64)], backend="eager")  # nothing ran untimed
    assert not [w for w in caught if "cuDNN autotuning" in str(w.message)]
    torch.backends.cudnn.benchmark = False  # (the fast path above turned it on)
    _run(pipe)
    with pytest.warns(UserWarning, match="already ran on CUDA without cuDNN autotuning"):
        pipe.enable_fast_path(shapes=[(64, 64)], backend="eager")
