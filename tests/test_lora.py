"""LoRA adapters (``kandinsky22.lora``): parity with the reference's models running the same adapters through peft,
every file format, the adapters' weights, the fast path's fused projections, exact unloading, and the errors.

The oracle: diffusers' UNet and prior with a peft adapter (``add_adapter`` + ``save_lora_adapter``, random
``lora_B`` so that the adapter changes the output; peft computes ``x @ W.T + scale · B(A(x))`` unmerged), or the
same adapters re-saved in the other formats by the test.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))

import test_prior  # noqa: E402
import test_unet  # noqa: E402

from kandinsky22.models.prior import PriorTransformer  # noqa: E402
from kandinsky22.models.unet import UNet2DConditionModel  # noqa: E402

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

TOL = 1e-4  # fp32, max |ours − reference|
UNET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]
PRIOR_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]


def add_adapter(model, name: str, seed: int, rank: int = 4, alpha: float = 8, modules=UNET_MODULES, **options):
    """A peft adapter on a reference model with random A and B (peft's non-default init: B is zero by default)."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=modules, init_lora_weights=False, **options)
    model.add_adapter(config, adapter_name=name)


def peft_tensors(model, name: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's keys: '<module>.lora_A.weight' / '.lora_B.weight'."""
    return {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(model, adapter_name=name).items()}


def as_format(tensors: dict[str, torch.Tensor], kind: str, alpha: float | None = None) -> dict[str, torch.Tensor]:
    """The same adapter under another format's keys (``alpha``: the per-module alpha key, where the format has one)."""
    out = {}
    for key, value in tensors.items():
        module, _, part = key.rpartition(".lora_")
        down = part.startswith("A")
        if kind == "processor":  # the 2023 training scripts' attention processors
            attention, _, proj = module.rpartition(".")
            if proj == "0":  # to_out.0
                attention, proj = attention.rsplit(".", 1)[0], "to_out"
            out[f"{attention}.processor.{proj}_lora.{'down' if down else 'up'}.weight"] = value
        elif kind == "diffusers":
            out[f"unet.{module}.lora.{'down' if down else 'up'}.weight"] = value
        elif kind == "kohya":
            out[f"lora_unet_{module.replace('.', '_')}.lora_{'down' if down else 'up'}.weight"] = value
            if alpha is not None:
                out[f"lora_unet_{module.replace('.', '_')}.alpha"] = torch.tensor(float(alpha))
        else:
            raise AssertionError(kind)
    return out


@pytest.fixture
def unets():
    """A reference UNet and ours with the same random weights."""
    reference = test_unet.build_reference(test_unet.TINY)
    ours = UNet2DConditionModel(**test_unet.TINY).eval()
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def unet_outputs(reference, ours):
    sample, cond = test_unet.make_inputs(test_unet.TINY, batch=2, height=8, width=16)
    with torch.no_grad():
        expected = reference(sample, torch.tensor([10, 700]), None, added_cond_kwargs=cond).sample
        got = ours(sample, torch.tensor([10, 700]), added_cond_kwargs=cond).sample
    return got, expected


def unet_output(model):
    sample, cond = test_unet.make_inputs(test_unet.TINY, batch=2, height=8, width=16)
    with torch.no_grad():
        return model(sample, torch.tensor([10, 700]), added_cond_kwargs=cond).sample


# ----------------------------------------------------------------------------------------------------------------------
# Parity with the reference's models running peft adapters
# ----------------------------------------------------------------------------------------------------------------------


def test_unet_load_attn_procs_of_a_saved_adapter_matches_the_reference(unets, tmp_path):
    reference, ours = unets
    base = unet_output(ours)
    add_adapter(reference, "style", seed=5, rank=4, alpha=8)  # scale 2, read from the file's metadata
    reference.save_lora_adapter(tmp_path, adapter_name="style")
    assert ours.load_attn_procs(tmp_path) == "default_0"  # the 2.2 training scripts' README call
    got, expected = unet_outputs(reference, ours)
    assert (got - expected).abs().max() < TOL
    assert (expected - base).abs().max() > 0.1  # the adapter matters


@pytest.mark.parametrize("kind", ["processor", "diffusers", "kohya"])
def test_every_file_format_gives_the_reference_output(unets, tmp_path, kind):
    reference, ours = unets
    # The processor and diffusers formats carry no alpha (scale 1: alpha = rank); kohya's carries it per module.
    alpha = 12 if kind == "kohya" else 4
    add_adapter(reference, "a", seed=6, rank=4, alpha=alpha)
    tensors = as_format(peft_tensors(reference, "a"), kind, alpha=alpha)
    name = "pytorch_lora_weights.safetensors" if kind != "processor" else "pytorch_lora_weights.bin"
    if kind == "processor":
        torch.save(tensors, tmp_path / name)
    else:
        save_file(tensors, str(tmp_path / name))
    ours.load_lora_adapter(tmp_path)
    got, expected = unet_outputs(reference, ours)
    assert (got - expected).abs().max() < TOL


def test_peft_folder_with_adapter_config_and_rslora(unets, tmp_path):
    reference, ours = unets
    add_adapter(reference, "a", seed=7, rank=4, alpha=6, use_rslora=True)  # scale 6 / √4
    save_file(peft_tensors(reference, "a"), str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 6, "use_rslora": True}))
    ours.load_lora_adapter(str(tmp_path))
    got, expected = unet_outputs(reference, ours)
    assert (got - expected).abs().max() < TOL


def test_two_adapters_with_weights_match_the_references_set_adapters(unets, tmp_path):
    reference, ours = unets
    add_adapter(reference, "a", seed=8, alpha=8)
    add_adapter(reference, "b", seed=9, alpha=4, modules=["to_q", "add_v_proj"])
    for name in ("a", "b"):
        reference.save_lora_adapter(tmp_path / name, adapter_name=name)
        ours.load_lora_adapter(tmp_path / name, adapter_name=name)
    assert ours.active_adapters() == ["a", "b"]
    for weights in ([0.5, -0.75], [1.0, 0.0], [0.0, 2.0]):
        reference.set_adapters(["a", "b"], weights=weights)
        ours.set_adapters(["a", "b"], weights=weights)
        got, expected = unet_outputs(reference, ours)
        assert (got - expected).abs().max() < TOL, weights
    reference.set_adapters("b", weights=1.5)
    ours.set_adapters("b", 1.5)
    assert ours.active_adapters() == ["b"]
    got, expected = unet_outputs(reference, ours)
    assert (got - expected).abs().max() < TOL


def test_prior_adapter_matches_the_reference(tmp_path):
    torch.manual_seed(0)
    reference = diffusers.PriorTransformer(**test_prior.TINY).eval()
    test_prior.randomize(reference)
    reference.save_pretrained(tmp_path / "prior")
    ours = PriorTransformer.from_pretrained(tmp_path / "prior")
    add_adapter(reference, "p", seed=3, rank=2, alpha=3, modules=PRIOR_MODULES)
    # the 2023 prior script's format: transformer_blocks.0.attn1.processor.to_q_lora.down.weight (scale 1) …
    tensors = as_format(peft_tensors(reference, "p"), "processor")
    assert any(k.startswith("transformer_blocks.0.attn1.processor.to_out_lora") for k in tensors)
    # … with the alpha given per module, peft style (these keys carry it for any format)
    tensors.update({f"transformer_blocks.0.attn1.{m}.alpha": torch.tensor(3.0) for m in PRIOR_MODULES})
    ours.load_attn_procs(tensors)
    inputs = test_prior.make_inputs()
    with torch.no_grad():
        expected = reference(timestep=torch.tensor([1, 500, 999]), **inputs).predicted_image_embedding
        got = ours(timestep=torch.tensor([1, 500, 999]), **inputs).predicted_image_embedding
    assert (got - expected).abs().max() < 1e-5 * max(1.0, expected.abs().max().item())


# ----------------------------------------------------------------------------------------------------------------------
# Merging: the fast path's fused projections, exact unloading, disabling, saving
# ----------------------------------------------------------------------------------------------------------------------


def fuse(model) -> None:
    for module in model.modules():
        if hasattr(module, "fuse_projections"):
            module.fuse_projections()


@pytest.mark.parametrize("order", ["fused_then_loaded", "loaded_then_fused"])
def test_fused_projections_take_the_adapter(unets, tmp_path, order):
    reference, ours = unets
    add_adapter(reference, "a", seed=10)
    reference.save_lora_adapter(tmp_path, adapter_name="a")
    if order == "fused_then_loaded":
        fuse(ours)
        ours.load_lora_adapter(tmp_path)
    else:
        ours.load_lora_adapter(tmp_path)
        fuse(ours)
    assert any(n.endswith("qkv_weight") for n, _ in ours.named_parameters())
    got, expected = unet_outputs(reference, ours)
    assert (got - expected).abs().max() < TOL
    ours.set_adapters("default_0", 0.5)  # rebuilt inside the fused weights
    reference.set_adapters("a", weights=0.5)
    got, expected = unet_outputs(reference, ours)
    assert (got - expected).abs().max() < TOL


def test_unload_disable_and_delete_restore_the_original_weights_exactly(unets, tmp_path):
    reference, ours = unets
    original = {k: v.clone() for k, v in ours.state_dict().items()}
    add_adapter(reference, "a", seed=11)
    add_adapter(reference, "b", seed=12)
    for name in ("a", "b"):
        reference.save_lora_adapter(tmp_path / name, adapter_name=name)
        ours.load_lora_adapter(tmp_path / name, adapter_name=name)

    def unchanged() -> bool:
        return all(torch.equal(original[k], v) for k, v in ours.state_dict().items())

    assert not unchanged()
    ours.disable_lora()
    assert unchanged() and ours.active_adapters() == []
    ours.enable_lora()
    assert not unchanged() and ours.active_adapters() == ["a", "b"]
    ours.delete_adapters("a")
    reference.delete_adapters("a")
    got, expected = unet_outputs(reference, ours)
    assert (got - expected).abs().max() < TOL
    ours.unload_lora()
    assert unchanged()
    fuse(ours)  # the fused weights too
    ours.load_lora_adapter(tmp_path / "a")
    ours.unload_lora()
    fused = {k: v.clone() for k, v in ours.state_dict().items()}
    assert all(torch.equal(original[k], fused[k]) for k in original)


def test_save_pretrained_writes_the_merged_weights(unets, tmp_path):
    reference, ours = unets
    add_adapter(reference, "a", seed=13)
    reference.save_lora_adapter(tmp_path / "lora", adapter_name="a")
    ours.load_lora_adapter(tmp_path / "lora")
    ours.save_pretrained(tmp_path / "merged")
    merged = UNet2DConditionModel.from_pretrained(tmp_path / "merged")
    got, expected = unet_outputs(reference, merged)
    assert (got - expected).abs().max() < TOL


# ----------------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter():
    reference = test_unet.build_reference(test_unet.TINY)
    add_adapter(reference, "a", seed=18)
    return peft_tensors(reference, "a")


def test_errors_name_what_is_wrong(adapter, tmp_path):
    ours = UNet2DConditionModel(**test_unet.TINY).eval()
    cases = {
        "not in the Kandinsky 2.2 unet": {k.replace("down_blocks.1.", "up_blocks.9."): v for k, v in adapter.items()},
        "do not fit": {k: torch.cat([v, v], dim=-1) if k.endswith("lora_A.weight") else v for k, v in adapter.items()},
        "has no up (lora_B) weight": {k: v for k, v in adapter.items() if "lora_B" not in k},
        "adapters of biases": {**adapter, "down_blocks.1.attentions.0.to_q.lora_B.bias": torch.ones(32)},
        "DoRA": {**adapter, "down_blocks.1.attentions.0.to_q.lora_magnitude_vector": torch.ones(32)},
        "text encoder": {**adapter, "text_encoder.text_model.encoder.layers.0.q_proj.lora_A.weight": torch.ones(4, 32)},
        "not a LoRA weight": {"down_blocks.1.attentions.0.to_q.weight": torch.ones(32, 32)},
        "holds no LoRA weights": {},
        "without naming the model": {
            **adapter,
            "transformer_blocks.0.attn1.to_q.lora_A.weight": torch.ones(4, 24),
            "transformer_blocks.0.attn1.to_q.lora_B.weight": torch.ones(24, 4),
        },
        "adapts the prior, not this unet": {
            "prior.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.ones(4, 24),
            "prior.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.ones(24, 4),
        },
    }
    for message, tensors in cases.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            ours.load_lora_adapter(tensors)
    assert ours.active_adapters() == []  # nothing half-loaded

    ours.load_lora_adapter(adapter, adapter_name="a")
    with pytest.raises(ValueError, match="already loaded"):
        ours.load_lora_adapter(adapter, adapter_name="a")
    with pytest.raises(ValueError, match=r"\['b'\] not loaded"):
        ours.set_adapters(["a", "b"])
    with pytest.raises(ValueError, match="2 weights for 1 adapters"):
        ours.set_adapters(["a"], [0.5, 0.5])
    with pytest.raises(ValueError, match="finite numbers"):
        ours.set_adapters(["a"], [float("nan")])
    with pytest.raises(ValueError, match=r"\['c'\] not loaded"):
        ours.delete_adapters("c")

    with pytest.raises(FileNotFoundError, match="No LoRA file"):
        ours.load_lora_adapter(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="expected a .safetensors"):
        ours.load_lora_adapter(tmp_path / "notes.txt")
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="cannot be read"):
        ours.load_lora_adapter(tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match="unknown LoRA loading options"):
        ours.load_lora_adapter(tmp_path / "broken.safetensors", revisoin="main")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_convolution_adapters_in_either_layout(unets, tmp_path, layout):
    """peft's Conv2d LoRA (down: a k×k convolution to the rank, up: 1×1), saved kohya style, on a UNet laid out as
    the pipelines lay it out on CUDA."""
    reference, ours = unets
    add_adapter(reference, "c", seed=20, rank=3, alpha=6, modules=["conv1", "conv_shortcut", "to_q"])
    save_file(as_format(peft_tensors(reference, "c"), "kohya", alpha=6), str(tmp_path / "locon.safetensors"))
    if layout == "channels_last":
        ours.to(memory_format=torch.channels_last)
    ours.load_lora_adapter(tmp_path / "locon.safetensors")
    assert any(v.dim() == 4 for k, v in peft_tensors(reference, "c").items())
    got, expected = unet_outputs(reference, ours)
    assert (got - expected).abs().max() < TOL


def test_prefix_picks_this_models_keys_from_a_pipelines_file(unets):
    reference, ours = unets
    add_adapter(reference, "a", seed=21, alpha=4)
    tensors = {f"unet.{k}": v for k, v in peft_tensors(reference, "a").items()}
    tensors["prior.transformer_blocks.0.attn1.to_q.lora_A.weight"] = torch.ones(2, 24)
    tensors["prior.transformer_blocks.0.attn1.to_q.lora_B.weight"] = torch.ones(24, 2)
    with pytest.raises(ValueError, match="adapts the prior, not this unet"):
        ours.load_lora_adapter(tensors)
    with pytest.raises(ValueError, match="no keys under prefix='transformer'"):
        ours.load_lora_adapter(tensors, prefix="transformer")
    ours.load_lora_adapter(tensors, prefix="unet")
    got, expected = unet_outputs(reference, ours)
    assert (got - expected).abs().max() < TOL


def test_a_hub_repository_reads_its_standard_file_or_the_one_named(unets, tmp_path, monkeypatch):
    """The hub stood in for by a folder (no network). A snapshot folder holds whatever earlier downloads left, so only
    a standard name or ``weight_name=`` picks the file there; a local folder also takes its only .safetensors."""
    from kandinsky22 import loading

    reference, ours = unets
    add_adapter(reference, "a", seed=22, alpha=4)
    save_file(peft_tensors(reference, "a"), str(tmp_path / "my_style.safetensors"))
    monkeypatch.setattr(loading, "download_from_hub", lambda repo_id, allow_patterns, revision=None, **kw: tmp_path)
    with pytest.raises(FileNotFoundError, match="No LoRA file in"):
        ours.load_lora_adapter("owner/name")
    ours.load_lora_adapter("owner/name", weight_name="my_style.safetensors")
    got, expected = unet_outputs(reference, ours)
    assert (got - expected).abs().max() < TOL
    ours.unload_lora()
    ours.load_lora_adapter(tmp_path)  # the same folder given as a local path
    got, expected = unet_outputs(reference, ours)
    assert (got - expected).abs().max() < TOL
