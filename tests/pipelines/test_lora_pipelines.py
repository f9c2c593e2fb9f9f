"""LoRA adapters on the pipelines: parity with the reference's pipelines whose models run the same adapters through
peft, one file routed to the UNet and the prior, the adapters' weights, and the pipelines' errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parents[1]))

import test_unet  # noqa: E402
from graph_standin import fast_path_as_on_cuda  # noqa: E402
from test_lora import PRIOR_MODULES, TOL, add_adapter, peft_tensors  # noqa: E402

from kandinsky22 import KandinskyV22CombinedPipeline, KandinskyV22Pipeline, KandinskyV22PriorPipeline  # noqa: E402
from kandinsky22.fast import CudaGraphCall  # noqa: E402

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")


def images_of(pipes, **kwargs) -> list[np.ndarray]:
    """Each pipeline's images for the same call and seed (64², 2 steps)."""
    images = []
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(0)
        call = {"height": 64, "width": 64, "num_inference_steps": 2, "output_type": "np", **kwargs}
        images.append(pipe(generator=generator, **call).images)
    return images


def test_text2img_with_a_decoder_lora_matches_the_reference(decoder_repo, tmp_path):
    reference = diffusers.KandinskyV22Pipeline.from_pretrained(decoder_repo)
    ours = KandinskyV22Pipeline.from_pretrained(decoder_repo)
    add_adapter(reference.unet, "a", seed=14)
    reference.unet.save_lora_adapter(tmp_path, adapter_name="a")
    assert ours.load_lora_weights(tmp_path, adapter_name="style") == "style"
    assert ours.get_list_adapters() == {"unet": ["style"]} and ours.get_active_adapters() == ["style"]
    embeds = torch.randn(1, 32, generator=torch.Generator().manual_seed(1))
    negative = torch.randn(1, 32, generator=torch.Generator().manual_seed(2))
    images = images_of((ours, reference), image_embeds=embeds, negative_image_embeds=negative)
    assert np.abs(images[0] - images[1]).max() < TOL


def test_combined_pipeline_routes_one_file_to_the_unet_and_the_prior(decoder_repo, tmp_path):
    reference = diffusers.KandinskyV22CombinedPipeline.from_pretrained(decoder_repo)
    ours = KandinskyV22CombinedPipeline.from_pretrained(decoder_repo)
    add_adapter(reference.unet, "a", seed=15, alpha=8)
    add_adapter(reference.prior_prior, "a", seed=16, rank=2, alpha=4, modules=PRIOR_MODULES)
    tensors = {f"unet.{k}": v for k, v in peft_tensors(reference.unet, "a").items()}
    tensors |= {f"prior.{k}": v for k, v in peft_tensors(reference.prior_prior, "a").items()}
    # diffusers' metadata for a pipeline's file: each model's peft config under its prefix
    metadata = {"unet.r": 4, "unet.lora_alpha": 8, "prior.r": 2, "prior.lora_alpha": 4}
    save_file(tensors, str(tmp_path / "both.safetensors"), metadata={"lora_adapter_metadata": json.dumps(metadata)})
    ours.load_lora_weights(tmp_path / "both.safetensors")
    assert ours.get_list_adapters() == {"prior_prior": ["default_0"], "unet": ["default_0"]}
    images = images_of((ours, reference), prompt="a red cat", prior_num_inference_steps=2)
    assert np.abs(images[0] - images[1]).max() < TOL
    ours.unload_lora_weights()
    assert ours.get_list_adapters() == {} and ours.get_active_adapters() == []


def test_pipeline_set_adapters_and_delete(decoder_repo, tmp_path):
    ours = KandinskyV22Pipeline.from_pretrained(decoder_repo)
    reference = test_unet.build_reference(test_unet.TINY)
    add_adapter(reference, "a", seed=17)
    tensors = peft_tensors(reference, "a")
    ours.load_lora_weights(tensors, adapter_name="x")
    ours.load_lora_weights(tensors, adapter_name="y")
    ours.set_adapters(["x", "y"], adapter_weights=[0.25, 0.75])
    both = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    ours.set_adapters("x")  # weight 1 = x at 0.25 + y at 0.75: the same tensors
    assert ours.get_active_adapters() == ["x"]
    assert all(torch.allclose(both[k], v, atol=1e-6) for k, v in ours.unet.state_dict().items())
    ours.delete_adapters(["x"])
    assert ours.get_list_adapters() == {"unet": ["y"]} and ours.get_active_adapters() == []


def test_a_lora_for_a_model_the_pipeline_lacks_is_refused(decoder_repo, prior_repo):
    reference = test_unet.build_reference(test_unet.TINY)
    add_adapter(reference, "a", seed=18)
    adapter = peft_tensors(reference, "a")
    decoder = KandinskyV22Pipeline.from_pretrained(decoder_repo)
    prior_lora = {"transformer_blocks.0.attn1.processor.to_q_lora.down.weight": torch.ones(2, 24)}
    prior_lora["transformer_blocks.0.attn1.processor.to_q_lora.up.weight"] = torch.ones(24, 2)
    with pytest.raises(ValueError, match="adapts the prior; KandinskyV22Pipeline holds the unet"):
        decoder.load_lora_weights(prior_lora)
    prior = KandinskyV22PriorPipeline.from_pretrained(prior_repo)
    prior.load_lora_weights(prior_lora)  # the same file where there is a prior
    assert prior.get_list_adapters() == {"prior": ["default_0"]}
    with pytest.raises(ValueError, match="adapts the unet; KandinskyV22PriorPipeline holds the prior"):
        prior.load_lora_weights(adapter)


@pytest.mark.parametrize("scope", ["blocks", "none"])
def test_adapters_changed_after_the_fast_path_reach_its_compiled_models(decoder_repo, scope, monkeypatch):
    """Loaded, reweighted and unloaded after ``enable_fast_path``: the compiled blocks, the fused projections and the
    CUDA graphs (the CPU stand-in here) read the merged weights in place (aot_eager traces as Inductor would, without
    generating code). A real CUDA graph replays the addresses it captured: no parameter may move."""
    fast_path_as_on_cuda(monkeypatch)
    reference = test_unet.build_reference(test_unet.TINY)
    add_adapter(reference, "a", seed=19)
    adapter = peft_tensors(reference, "a")
    eager = KandinskyV22Pipeline.from_pretrained(decoder_repo)
    fast = KandinskyV22Pipeline.from_pretrained(decoder_repo)
    fast.enable_fast_path(backend="aot_eager", compile_scope=scope)
    embeds = torch.randn(1, 32, generator=torch.Generator().manual_seed(1))

    def image(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(
            image_embeds=embeds,
            negative_image_embeds=-embeds,
            height=64,
            width=64,
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images

    base = image(fast)
    addresses = {name: p.data_ptr() for name, p in fast.unet.named_parameters()}
    assert isinstance(fast.unet._compiled_call_impl, CudaGraphCall)
    for pipe in (eager, fast):
        pipe.load_lora_weights(adapter)
    assert np.abs(image(fast) - image(eager)).max() < TOL
    assert np.abs(image(fast) - base).max() > 1e-3
    for pipe in (eager, fast):
        pipe.set_adapters("default_0", 0.4)
    assert np.abs(image(fast) - image(eager)).max() < TOL
    fast.unload_lora_weights()
    assert np.abs(image(fast) - base).max() == 0
    assert {name: p.data_ptr() for name, p in fast.unet.named_parameters()} == addresses
