"""VQModel (MoVQ): parity with diffusers.VQModel on tiny checkpoints, official key layout, round trip, tracing, errors."""

import copy
import json
from pathlib import Path

import pytest
import torch

from kandinsky22.models.movq import VQModel

diffusers = pytest.importorskip("diffusers")  # the reference implementation, used as a test oracle only

OFFICIAL_CONFIG = Path(__file__).parents[1].parent / "shared/reference/configs/kandinsky-2-2-decoder/movq/config.json"
ATOL = 1e-4

# The dummies of the diffusers Kandinsky 2.2 tests (reference-behaviour.md §4 "Dummy MoVQ").
TWO_LEVEL = {
    "block_out_channels": [32, 64],
    "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
    "up_block_types": ["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "norm_type": "spatial",
    "num_vq_embeddings": 12,
    "out_channels": 3,
    "vq_embed_dim": 4,
}
FOUR_LEVEL = {
    **TWO_LEVEL,
    "block_out_channels": [32, 32, 64, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"],
    "up_block_types": ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 3,
}


def reference_model(config: dict, folder: Path):
    """A diffusers VQModel with every weight randomized (norm affines included), saved to ``folder``."""
    torch.manual_seed(0)
    ref = diffusers.VQModel(**config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
        # Codes on the scale of the latents, so that the nearest-code search picks many different codes.
        ref.quantize.embedding.weight.normal_()
    ref.save_pretrained(folder)
    return ref


@pytest.fixture(scope="module", params=[TWO_LEVEL, FOUR_LEVEL], ids=["two_level", "four_level"])
def models(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("movq")
    ref = reference_model(request.param, folder)
    return ref, VQModel.from_pretrained(folder)


@pytest.fixture
def image():
    # Non-square; with the four-level model the last level is 4x3, an odd width.
    return torch.randn(2, 3, 32, 24, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_encode_matches_reference(models, image):
    ref, ours = models
    expected = ref.encode(image).latents
    latents = ours.encode(image).latents
    assert latents.shape == expected.shape
    torch.testing.assert_close(latents, expected, atol=ATOL, rtol=0)
    (as_tuple,) = ours.encode(image, return_dict=False)
    assert torch.equal(as_tuple, latents)
    torch.testing.assert_close(ours.encode(image)[0], ref.encode(image)[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("force_not_quantize", [True, False])
@torch.no_grad()
def test_decode_matches_reference(models, image, force_not_quantize, upsampling):
    ref, ours = models
    z = ref.encode(image).latents
    expected = ref.decode(z, force_not_quantize=force_not_quantize).sample
    sample = ours.decode(z, force_not_quantize=force_not_quantize).sample
    assert sample.shape == image.shape
    torch.testing.assert_close(sample, expected, atol=ATOL, rtol=0)
    (as_tuple,) = ours.decode(z, force_not_quantize=force_not_quantize, return_dict=False)
    assert torch.equal(as_tuple, sample)
    indexed = ours.decode(z, force_not_quantize=force_not_quantize)[0]  # as the reference's pipelines index it
    torch.testing.assert_close(indexed, ref.decode(z, force_not_quantize=force_not_quantize)[0], atol=ATOL, rtol=0)
    if not force_not_quantize:  # the codebook lookup really changes the result, so this comparison tests it
        assert (sample - ours.decode(z, force_not_quantize=True).sample).abs().max() > 1e-2


@torch.no_grad()
def test_channels_last_decode_matches_reference(models, image, upsampling):
    """The layout the pipelines use on CUDA, and the fast path everywhere."""
    ref, ours = models
    ours = copy.deepcopy(ours).to(memory_format=torch.channels_last)
    z = ref.encode(image).latents
    expected = ref.decode(z, force_not_quantize=True).sample
    torch.testing.assert_close(ours.decode(z, force_not_quantize=True).sample, expected, atol=ATOL, rtol=0)


@torch.no_grad()
def test_forward_matches_reference(models, image):
    ref, ours = models
    torch.testing.assert_close(ours(image).sample, ref(image).sample, atol=ATOL, rtol=0)


def test_official_state_dict_layout():
    if not OFFICIAL_CONFIG.is_file():
        pytest.skip(f"no official config at {OFFICIAL_CONFIG}")
    config = json.loads(OFFICIAL_CONFIG.read_text())
    with torch.device("meta"):
        ours = VQModel.from_config(config)
        ref = diffusers.VQModel.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert len(shapes) == 431
    assert ours.num_parameters() == 67_832_495


@torch.no_grad()
def test_round_trip_through_reference(tmp_path, image):
    torch.manual_seed(0)
    ours = VQModel(**TWO_LEVEL).eval()
    ours.save_pretrained(tmp_path)
    ref = diffusers.VQModel.from_pretrained(tmp_path).eval()
    again = VQModel.from_pretrained(tmp_path)
    assert {k: ref.config[k] for k in ours.config} == {k: _jsonable(v) for k, v in ours.config.items()}
    z = ours.encode(image).latents
    for force in (True, False):
        expected = ours.decode(z, force_not_quantize=force).sample
        assert torch.equal(again.decode(z, force_not_quantize=force).sample, expected)
        torch.testing.assert_close(ref.decode(z, force_not_quantize=force).sample, expected, atol=1e-5, rtol=0)


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def test_decoder_traces_without_graph_breaks(upsampling):
    torch.manual_seed(0)
    model = VQModel(**TWO_LEVEL).eval()
    z = torch.randn(1, 4, 4, 3)
    with torch.no_grad():
        explanation = torch._dynamo.explain(lambda latents: model.decode(latents, force_not_quantize=True).sample)(z)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("norm_type", "group"),
        ("act_fn", "relu"),
        ("mid_block_add_attention", False),
        ("lookup_from_codebook", True),
        ("vq_embed_dim", 8),
        ("down_block_types", ["DownEncoderBlock2D", "CrossAttnDownBlock2D"]),
        ("up_block_types", ["AttnUpDecoderBlock2D", "UpBlock2D"]),
        ("up_block_types", ["AttnUpDecoderBlock2D"]),
    ],
)
def test_unsupported_config_is_rejected(key, value):
    with pytest.raises(ValueError, match=key) as err:
        VQModel(**{**TWO_LEVEL, key: value})
    assert f"{key}={value!r}" in str(err.value)


@pytest.mark.parametrize(
    ("feature", "latent"),
    [((8, 8), (8, 8)), ((16, 32), (8, 8)), ((64, 64), (8, 8)), ((24, 24), (8, 8)), ((20, 12), (8, 6))],
    ids=["same", "x2-x4", "x8", "x3-fallback", "fractional-fallback"],
)
@torch.no_grad()
def test_spatial_norm_matches_reference(feature, latent):
    # Power-of-two factors run the 1x1 convolutions on the latents and broadcast them (nearest resizing repeats each
    # latent pixel); other sizes resize first, as the reference always does.
    from diffusers.models.attention_processor import SpatialNorm as ReferenceSpatialNorm

    from kandinsky22.models.movq import SpatialNorm

    torch.manual_seed(0)
    ref = ReferenceSpatialNorm(64, 4)
    for p in ref.parameters():
        p.data.normal_()
    ours = SpatialNorm(64, 4)
    ours.load_state_dict(ref.state_dict())
    x, zq = torch.randn(2, 64, *feature), torch.randn(2, 4, *latent)
    torch.testing.assert_close(ours(x, zq), ref(x, zq), atol=1e-5, rtol=1e-5)
    channels_last = ours(x.to(memory_format=torch.channels_last), zq)  # the fast path's layout
    torch.testing.assert_close(channels_last, ref(x, zq), atol=1e-5, rtol=1e-5)
