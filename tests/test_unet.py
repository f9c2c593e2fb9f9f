"""Decoder UNet: parity with the reference (diffusers) on tiny random checkpoints, the official state-dict layouts,
save/load round trips in both directions, zero graph breaks, and errors for configs and inputs outside the family."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kandinsky22.models.layers import UpsampleConv2d
from kandinsky22.models.unet import UNet2DConditionModel, UNet2DConditionOutput

diffusers = pytest.importorskip("diffusers")

CONFIGS = Path(__file__).parents[1].parent / "shared" / "reference" / "configs"
TOL = 1e-4  # fp32, max |ours - reference|

# The reference's dummy decoder UNet (reference-behaviour.md §4).
TINY = {
    "in_channels": 4,
    "out_channels": 8,
    "addition_embed_type": "image",
    "down_block_types": ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
    "up_block_types": ("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "encoder_hid_dim": 32,
    "encoder_hid_dim_type": "image_proj",
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "resnet_time_scale_shift": "scale_shift",
    "class_embed_type": None,
}
VARIANTS = {
    "image": TINY,
    "inpaint": {**TINY, "in_channels": 9},
    "image_hint": {**TINY, "in_channels": 8, "addition_embed_type": "image_hint"},
}
# Three levels with attention at the top level and none in the middle, per-level layers and head sizes (the up
# path reads attention_head_dim unreversed), and non-default embedding, kernel, norm and width settings.
THREE_LEVELS = {
    **TINY,
    "down_block_types": ("SimpleCrossAttnDownBlock2D", "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
    "up_block_types": ("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D"),
    "block_out_channels": (16, 32, 48),
    "layers_per_block": (1, 2, 1),
    "attention_head_dim": (4, 8, 8),
    "norm_num_groups": 8,
    "norm_eps": 1e-6,
    "encoder_hid_dim": 24,
    "cross_attention_dim": 20,
    "time_embedding_dim": 40,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "conv_in_kernel": 5,
    "conv_out_kernel": 1,
    "out_channels": 4,
}


def build_reference(config: dict, seed: int = 0) -> nn.Module:
    """A reference UNet with random weights, norm affines included (they start at 1 and 0)."""
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(**config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
                module.weight.add_(0.1 * torch.randn_like(module.weight))
                module.bias.add_(0.1 * torch.randn_like(module.bias))
    return model


def make_inputs(config: dict, batch: int, height: int, width: int, seed: int = 1):
    """Latents (B, C, h, w) and ``added_cond_kwargs`` for ``config``; a hint is 8× the latent size."""
    g = torch.Generator().manual_seed(seed)
    hint = config["addition_embed_type"] == "image_hint"
    channels = config["in_channels"] - 4 if hint else config["in_channels"]
    sample = torch.randn(batch, channels, height, width, generator=g)
    cond = {"image_embeds": torch.randn(batch, config["encoder_hid_dim"], generator=g)}
    if hint:
        cond["hint"] = torch.rand(batch, 3, 8 * height, 8 * width, generator=g)
    return sample, cond


@torch.no_grad()
def max_error(ours: nn.Module, reference: nn.Module, sample, timestep, cond) -> float:
    expected = reference(sample, timestep, None, added_cond_kwargs=cond).sample
    got = ours(sample, timestep, added_cond_kwargs=cond)
    assert isinstance(got, UNet2DConditionOutput)
    assert got.sample.shape == expected.shape
    return (got.sample - expected).abs().max().item()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parity_with_reference(variant, tmp_path, upsampling):
    config = VARIANTS[variant]
    reference = build_reference(config)
    reference.save_pretrained(tmp_path)
    ours = UNet2DConditionModel.from_pretrained(tmp_path)
    sample, cond = make_inputs(config, batch=2, height=8, width=16)
    timesteps = [37, 999.0, torch.tensor(500), torch.tensor([10, 700]), torch.tensor([250])]
    errors = [max_error(ours, reference, sample, t, cond) for t in timesteps]
    assert max(errors) < TOL, errors

    with torch.no_grad():
        as_tuple = ours(sample, 37, added_cond_kwargs=cond, return_dict=False)
        as_output = ours(sample, 37, added_cond_kwargs=cond)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    assert torch.equal(as_tuple[0], as_output.sample)
    # The reference's loops index its output: unet(...)[0]
    with torch.no_grad():
        expected = reference(sample, 37, None, added_cond_kwargs=cond)[0]
    torch.testing.assert_close(as_output[0], expected, atol=TOL, rtol=0)
    assert torch.equal(as_output["sample"], as_output.sample)


def test_parity_three_levels(tmp_path, upsampling):
    reference = build_reference(THREE_LEVELS)
    reference.save_pretrained(tmp_path)
    ours = UNet2DConditionModel.from_pretrained(tmp_path)
    sample, cond = make_inputs(THREE_LEVELS, batch=3, height=8, width=12)
    assert max_error(ours, reference, sample, torch.tensor([1, 400, 999]), cond) < TOL


def test_parity_channels_last(tmp_path, upsampling):
    config = VARIANTS["image_hint"]
    reference = build_reference(config)
    reference.save_pretrained(tmp_path)
    ours = UNet2DConditionModel.from_pretrained(tmp_path).to(memory_format=torch.channels_last)
    sample, cond = make_inputs(config, batch=2, height=16, width=8)
    sample = sample.to(memory_format=torch.channels_last)
    assert max_error(ours, reference, sample, torch.tensor(321), cond) < TOL


@pytest.mark.skipif(not CONFIGS.is_dir(), reason="shared reference configs not found beside the repository")
@pytest.mark.parametrize(
    "repo", ["kandinsky-2-2-decoder", "kandinsky-2-2-decoder-inpaint", "kandinsky-2-2-controlnet-depth"]
)
def test_official_state_dict_layout(repo):
    config = json.loads((CONFIGS / repo / "unet" / "config.json").read_text())
    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel.from_config(config)
        ours = UNet2DConditionModel.from_config(config)
    expected = [(k, tuple(v.shape)) for k, v in reference.state_dict().items()]
    assert [(k, tuple(v.shape)) for k, v in ours.state_dict().items()] == expected
    params = ours.num_parameters()
    assert params == sum(p.numel() for p in reference.parameters())
    # Counts recorded from the reference in reference-behaviour.md §2.1.
    decoder_params = 1_253_057_288
    if repo == "kandinsky-2-2-decoder":
        assert params == decoder_params and len(expected) == 724
    elif repo == "kandinsky-2-2-decoder-inpaint":
        assert params == decoder_params + 17_280
    else:
        assert len(expected) == 740


def test_round_trip_ours_to_reference(tmp_path):
    config = VARIANTS["image_hint"]
    torch.manual_seed(0)
    ours = UNet2DConditionModel(**config).eval()
    ours.save_pretrained(tmp_path / "ours")
    build_reference(config).save_pretrained(tmp_path / "ref")

    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    written_by_reference = json.loads((tmp_path / "ref" / "config.json").read_text())
    written_by_reference.pop("_diffusers_version")
    assert saved == written_by_reference

    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "ours")
    reference = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "ours").eval()
    sample, cond = make_inputs(config, batch=2, height=8, width=8)
    with torch.no_grad():
        original = ours(sample, 123, added_cond_kwargs=cond).sample
        assert torch.equal(reloaded(sample, 123, added_cond_kwargs=cond).sample, original)
    assert max_error(ours, reference, sample, 123, cond) < TOL


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_no_graph_breaks(variant, upsampling):
    config = VARIANTS[variant]
    torch.manual_seed(0)
    model = UNet2DConditionModel(**config).eval()
    sample, cond = make_inputs(config, batch=2, height=8, width=8)
    explanation = torch._dynamo.explain(model)(sample, torch.tensor([3, 900]), added_cond_kwargs=cond)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("down_block_types", ("CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"), "'CrossAttnDownBlock2D'"),
        ("up_block_types", ("SimpleCrossAttnUpBlock2D", "UpBlock2D"), "'UpBlock2D'"),
        ("down_block_types", ("ResnetDownsampleBlock2D",), "one entry per block_out_channels"),
        ("mid_block_type", "UNetMidBlock2DCrossAttn", "'UNetMidBlock2DCrossAttn'"),
        ("resnet_time_scale_shift", "default", "'default'"),
        ("addition_embed_type", "text", "'text'"),
        ("time_embedding_type", "fourier", "'fourier'"),
        ("class_embed_type", "timestep", "'timestep'"),
        ("encoder_hid_dim_type", "text_proj", "'text_proj'"),
        ("act_fn", "gelu", "'gelu'"),
        ("only_cross_attention", True, "True"),
        ("center_input_sample", True, "True"),
        ("attention_head_dim", 5, "5"),
        ("layers_per_block", (1, 2, 3), r"\(1, 2, 3\)"),
        ("block_out_channels", (), r"\(\)"),
    ],
)
def test_unsupported_config_raises(key, value, message):
    with pytest.raises(ValueError, match=rf"{key}.*{message}"):
        UNet2DConditionModel(**{**TINY, key: value})


@pytest.mark.parametrize(("height", "width"), [(6, 8), (8, 10), (7, 7)])
def test_latent_size_the_up_path_cannot_join_raises(height, width):
    """H and W must be divisible by 2 ** (levels - 1) = 4 here: the reference fails deep in its up path, concatenating
    a skip connection of another size."""
    reference = build_reference(THREE_LEVELS)
    sample, cond = make_inputs(THREE_LEVELS, batch=1, height=height, width=width)
    with pytest.raises(RuntimeError, match="Sizes of tensors must match"), torch.no_grad():
        reference(sample, 1, None, added_cond_kwargs=cond)
    torch.manual_seed(0)
    ours = UNet2DConditionModel(**THREE_LEVELS)
    with pytest.raises(ValueError, match=rf"divisible by 4, got shape \(1, 4, {height}, {width}\)"):
        ours(sample, 1, added_cond_kwargs=cond)


def test_missing_conditioning_raises():
    torch.manual_seed(0)
    image = UNet2DConditionModel(**VARIANTS["image"])
    sample, cond = make_inputs(VARIANTS["image"], batch=1, height=8, width=8)
    with pytest.raises(ValueError, match="image_embeds"):
        image(sample, 1)
    with pytest.raises(ValueError, match="image_embeds"):
        image(sample, 1, added_cond_kwargs={})

    hinted = UNet2DConditionModel(**VARIANTS["image_hint"])
    sample, cond = make_inputs(VARIANTS["image_hint"], batch=1, height=8, width=8)
    with pytest.raises(ValueError, match="hint"):
        hinted(sample, 1, added_cond_kwargs={"image_embeds": cond["image_embeds"]})


@pytest.mark.parametrize(
    ("variant", "change", "message"),
    [
        ("image", {"sample": (1, 5, 8, 8)}, r"needs a sample of 4 channels with the conditioning's batch 1, got shape "
         r"\(1, 5, 8, 8\)"),
        ("inpaint", {"sample": (1, 4, 8, 8)}, r"sample of 9 channels"),
        ("image", {"sample": (2, 4, 8, 8)}, r"the conditioning's batch 1, got shape \(2, 4, 8, 8\)"),
        ("image", {"image_embeds": (1, 7)}, r"added_cond_kwargs\['image_embeds'\] must be \(B, 32\) for this UNet, got "
         r"\(1, 7\)"),
        ("image", {"image_embeds": (32,)}, r"must be \(B, 32\) for this UNet, got \(32,\)"),
        ("image_hint", {"hint": (2, 3, 64, 64)}, r"'hint'\] must be \(B, 3, 8H, 8W\) with the image_embeds' batch 1"),
        ("image_hint", {"hint": (1, 1, 64, 64)}, r"'hint'\] must be \(B, 3, 8H, 8W\)"),
        ("image_hint", {"hint": (1, 3, 32, 64)}, r"the hint's size \(4, 8\) after its encoder .* must equal the "
         r"sample's \(8, 8\)"),
    ],
)  # fmt: skip
def test_inputs_that_do_not_fit_the_unet_raise_naming_them(variant, change, message):
    """The reference (and PyTorch inside our layers) fail with a matmul, concatenation or convolution shape error."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**VARIANTS[variant])
    sample, cond = make_inputs(VARIANTS[variant], batch=1, height=8, width=8)
    shapes = {"sample": sample.shape, **{name: value.shape for name, value in cond.items()}, **change}
    sample = torch.randn(shapes.pop("sample"))
    cond = {name: torch.randn(shape) for name, shape in shapes.items()}
    with pytest.raises(ValueError, match=message), torch.no_grad():
        unet(sample, 1, added_cond_kwargs=cond)


@pytest.mark.parametrize("variant", ["image", "image_hint"])
def test_per_run_time_modulation_equals_per_step(variant, monkeypatch):
    """A conditioning prepared with the run's timesteps (one table of every resnet's scale and shift per step) gives
    the outputs of the per-step computation; it must be selected per step; past its size cap it is not built."""
    config = (
        {**THREE_LEVELS, "in_channels": 8, "addition_embed_type": "image_hint"} if variant == "image_hint" else TINY
    )
    torch.manual_seed(0)
    model = UNet2DConditionModel(**config).eval()
    sample, cond = make_inputs(config, batch=2, height=8, width=8)
    timesteps = torch.tensor([999, 500, 3])
    with torch.no_grad():
        per_run = model.prepare_conditioning(cond, timesteps)
        assert per_run.modulation.shape[:3] == (3, 2, 2)
        for i, t in enumerate(timesteps):
            expected = model(sample, t, added_cond_kwargs=cond).sample
            got = model(sample, t, conditioning=per_run.at(i)).sample
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match=r"conditioning.at\(step\)"):
            model(sample, 3, conditioning=per_run)
        monkeypatch.setattr("kandinsky22.models.unet._MODULATION_TABLE_BYTES", per_run.modulation.nbytes - 1)
        assert model.prepare_conditioning(cond, timesteps).modulation is None
        assert model.prepare_conditioning(cond, timesteps).at(1).modulation is None


def test_per_run_time_modulation_compiles_once(upsampling):
    """The compiled UNet takes each step's row of the table without a graph break or a recompilation per step."""
    torch.manual_seed(0)
    model = UNet2DConditionModel(**TINY).eval()
    sample, cond = make_inputs(TINY, batch=2, height=8, width=8)
    timesteps = torch.tensor([999, 666, 333, 1])
    counts = {"graphs": 0}

    def backend(graph, example_inputs):
        counts["graphs"] += 1
        return graph.forward

    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    with torch.no_grad():
        per_run = model.prepare_conditioning(cond, timesteps)
        for i, t in enumerate(timesteps):
            expected = model(sample, t, conditioning=per_run.at(i)).sample
            torch.testing.assert_close(compiled(sample, t, conditioning=per_run.at(i)).sample, expected)
    assert counts["graphs"] == 1


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("batch", "height", "width"), [(1, 5, 7), (2, 8, 3), (3, 1, 1)])
@torch.no_grad()
def test_upsample_conv_equals_upsampling_then_convolving(batch, height, width, channels_last, upsampling):
    """Both forms, with phase kernels made at the call or passed in, in both memory formats (fp64: only the order of
    the sums differs)."""
    torch.manual_seed(0)
    conv = UpsampleConv2d(6, 5).double()
    x = torch.randn(batch, 6, height, width, dtype=torch.float64)
    expected = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), conv.weight, conv.bias, padding=1)
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    for got in (conv(x), conv(x, conv.phase_weight())):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
        assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert set(conv.state_dict()) == {"weight", "bias"}  # the 3x3 convolution's keys, nothing derived


@torch.no_grad()
def test_conditioning_holds_the_phase_kernels_where_the_weights_are(upsampling):
    """prepare_conditioning makes each upsampling resnet's phase kernels once per run, and forward uses them; it leaves
    them out for a compiled UNet (its graph derives them) and where the weights are not on the inputs' device
    (sequential offload moves them in for each call)."""
    torch.manual_seed(0)
    model = UNet2DConditionModel(**THREE_LEVELS).eval()
    sample, cond = make_inputs(THREE_LEVELS, batch=2, height=8, width=12)
    conditioning = model.prepare_conditioning(cond)
    convs = [r.conv1 for block in model.up_blocks for r in block.upsamplers]
    assert len(conditioning.phase_weights) == len(convs) == 2
    for (weight, bias), conv in zip(conditioning.phase_weights, convs):
        expected_weight, expected_bias = conv.phase_weight()
        assert torch.equal(weight, expected_weight) and torch.equal(bias, expected_bias)
    with_kernels = model(sample, 7, conditioning=conditioning).sample
    without = model(sample, 7, conditioning=dataclasses.replace(conditioning, phase_weights=None)).sample
    torch.testing.assert_close(with_kernels, without, atol=0, rtol=0)
    # forward takes the kernels it is given (the phase form) or does without them (upsampling first)
    zeroed = [(torch.zeros_like(weight), bias) for weight, bias in conditioning.phase_weights]
    changed = model(sample, 7, conditioning=dataclasses.replace(conditioning, phase_weights=zeroed)).sample
    assert (changed - with_kernels).abs().max() > 1e-3 if upsampling == "phases" else torch.equal(changed, with_kernels)

    model.compile(backend="eager")
    assert model.prepare_conditioning(cond).phase_weights is None
    model._compiled_call_impl = None
    assert model.prepare_conditioning(cond).phase_weights is not None
    convs[0].weight = nn.Parameter(torch.empty_like(convs[0].weight, device="meta"))
    assert model.prepare_conditioning(cond).phase_weights is None


@torch.no_grad()
def test_kept_phase_kernels_follow_the_weights_once_per_run(upsampling):
    """The fast path's CUDA graphs read the phase kernels from the convolutions' buffers (``keep_phase_weight``):
    prepare_conditioning then passes none and refreshes the buffers in place, once per run, so a weight changed in
    place (a LoRA merged through ``.data``, which bumps no version counter) reaches the next run at the same
    addresses; the buffers stay out of the state dict and ``keep_phase_weight(False)`` drops them."""
    torch.manual_seed(0)
    model = UNet2DConditionModel(**THREE_LEVELS).eval()
    sample, cond = make_inputs(THREE_LEVELS, batch=2, height=8, width=12)
    expected = model(sample, 7, conditioning=model.prepare_conditioning(cond)).sample
    convs = model._upsampling_convs
    for conv in convs:
        conv.keep_phase_weight()
    conditioning = model.prepare_conditioning(cond)
    assert conditioning.phase_weights is None
    addresses = [conv.phase_kernel.data_ptr() for conv in convs]
    torch.testing.assert_close(model(sample, 7, conditioning=conditioning).sample, expected, atol=0, rtol=0)
    assert set(model.state_dict()) == set(UNet2DConditionModel(**THREE_LEVELS).state_dict())

    for conv in convs:
        conv.weight.data.mul_(1.5)
        conv.bias.data.add_(0.25)
    fresh = [conv.phase_weight() for conv in convs]
    assert not torch.equal(convs[0].phase_kernel, fresh[0][0])  # not followed before the next run...
    conditioning = model.prepare_conditioning(cond)
    for conv, (kernel, bias) in zip(convs, fresh):  # ...then refreshed in place
        assert torch.equal(conv.phase_kernel, kernel) and torch.equal(conv.phase_bias, bias)
    assert [conv.phase_kernel.data_ptr() for conv in convs] == addresses
    changed = model(sample, 7, conditioning=conditioning).sample
    for conv in convs:
        conv.keep_phase_weight(False)
    assert all(conv.phase_kernel is None and conv.phase_bias is None for conv in convs)
    conditioning = model.prepare_conditioning(cond)
    assert conditioning.phase_weights is not None
    torch.testing.assert_close(model(sample, 7, conditioning=conditioning).sample, changed, atol=0, rtol=0)
    assert (changed - expected).abs().max() > 1e-3
