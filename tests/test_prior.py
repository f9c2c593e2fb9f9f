"""PriorTransformer: parity with diffusers.PriorTransformer, official key layout, round trip, tracing, errors."""

import json
from pathlib import Path

import pytest
import torch

from kandinsky22.models.prior import PriorTransformer

diffusers = pytest.importorskip("diffusers")  # the reference implementation, used as a test oracle only

OFFICIAL_CONFIG = Path(__file__).parents[1].parent / "shared/reference/configs/kandinsky-2-2-prior/prior/config.json"
ATOL = 1e-5

# The dummy of the diffusers prior tests (reference-behaviour.md §4 "Dummy prior components"): 77 + 4 tokens.
TINY = {"num_attention_heads": 2, "attention_head_dim": 12, "embedding_dim": 32, "num_layers": 1}
BATCH = 3


def randomize(model: torch.nn.Module) -> None:
    """Make every weight count: the positional/prd embeddings start at zero, the norms at identity, clip_std at 0."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prior")
    torch.manual_seed(0)
    ref = diffusers.PriorTransformer(**TINY).eval()
    randomize(ref)
    ref.save_pretrained(folder)
    return ref, PriorTransformer.from_pretrained(folder)


def make_inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(BATCH, 77, dtype=torch.bool)
    mask[0, 5:] = False  # a short prompt: most text tokens are padding
    mask[1, 40:] = False
    return {
        "hidden_states": torch.randn(BATCH, 32, generator=g),
        "proj_embedding": torch.randn(BATCH, 32, generator=g),
        "encoder_hidden_states": torch.randn(BATCH, 77, 32, generator=g),
        "attention_mask": mask,
    }


TIMESTEPS = {
    "int": 7,
    "0d": torch.tensor(500),
    "1d_batch": torch.tensor([1, 500, 999]),
    "1d_single": torch.tensor([250]),
}


@pytest.mark.parametrize("timestep", TIMESTEPS.values(), ids=TIMESTEPS.keys())
@torch.no_grad()
def test_forward_matches_reference(models, timestep):
    ref, ours = models
    inputs = make_inputs()
    expected = ref(timestep=timestep, **inputs).predicted_image_embedding
    predicted = ours(timestep=timestep, **inputs).predicted_image_embedding
    assert predicted.shape == (BATCH, 32)
    torch.testing.assert_close(predicted, expected, atol=ATOL, rtol=ATOL)
    (as_tuple,) = ours(timestep=timestep, return_dict=False, **inputs)
    assert torch.equal(as_tuple, predicted)
    torch.testing.assert_close(ours(timestep=timestep, **inputs)[0], expected, atol=ATOL, rtol=ATOL)


@torch.no_grad()
def test_without_mask_matches_reference(models):
    # The reference applies no mask at all (not even the causal one) when attention_mask is None.
    ref, ours = models
    inputs = {**make_inputs(), "attention_mask": None}
    expected = ref(timestep=3, **inputs).predicted_image_embedding
    torch.testing.assert_close(ours(timestep=3, **inputs).predicted_image_embedding, expected, atol=ATOL, rtol=ATOL)


@torch.no_grad()
def test_padded_text_tokens_are_ignored(models):
    _, ours = models
    inputs = make_inputs()
    changed = {**inputs, "encoder_hidden_states": inputs["encoder_hidden_states"].clone()}
    changed["encoder_hidden_states"][0, 5:] = 100.0  # only padding of sample 0
    a = ours(timestep=10, **inputs).predicted_image_embedding
    b = ours(timestep=10, **changed).predicted_image_embedding
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    changed["encoder_hidden_states"][0, 4] = 100.0  # a real token does matter
    assert (ours(timestep=10, **changed).predicted_image_embedding[0] - a[0]).abs().max() > 1e-3


# Three layers: the prompt's keys and values of one layer feed the next.
DEEP = {**TINY, "num_layers": 3}


@pytest.fixture(scope="module")
def deep_models():
    torch.manual_seed(1)
    ref = diffusers.PriorTransformer(**DEEP).eval()
    randomize(ref)
    ours = PriorTransformer(**DEEP).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("cache_prompt", [True, False], ids=["kv", "tokens"])
@torch.no_grad()
def test_context_prepared_once_per_run_matches_reference(deep_models, cache_prompt):
    # A run's loop: the prompt's context (with every step's time token) built once, one row per step.
    ref, ours = deep_models
    inputs = make_inputs()
    text = {k: inputs[k] for k in ("proj_embedding", "encoder_hidden_states", "attention_mask")}
    timesteps = torch.tensor([999, 500, 3, 0])
    context = ours.prepare_context(*text.values(), timesteps=timesteps, cache_prompt=cache_prompt)
    without_time = ours.prepare_context(*text.values(), cache_prompt=cache_prompt)  # takes each step's timestep
    assert (context.kv is not None) == cache_prompt and (context.tokens is None) == cache_prompt
    for i, t in enumerate(timesteps):
        x = torch.randn(BATCH, 32)
        expected = ref(x, t, **text).predicted_image_embedding
        # the step's row replaces the timestep: a wrong timestep argument is not read
        (predicted,) = ours(x, timestep=12345, context=context.at(i), return_dict=False)
        torch.testing.assert_close(predicted, expected, atol=ATOL, rtol=ATOL)
        torch.testing.assert_close(
            ours(x, t, context=without_time).predicted_image_embedding, expected, atol=ATOL, rtol=ATOL
        )


@torch.no_grad()
def test_cached_prompt_step_computes_only_the_step_tokens(deep_models):
    # The kv form runs 3 tokens per sample through the layers instead of 81: a small fraction of the FLOPs.
    from torch.utils.flop_counter import FlopCounterMode

    _, ours = deep_models
    inputs = make_inputs()
    text = [inputs[k] for k in ("proj_embedding", "encoder_hidden_states", "attention_mask")]
    x = inputs["hidden_states"]
    flops = {}
    for cache in (True, False):
        context = ours.prepare_context(*text, cache_prompt=cache)
        with FlopCounterMode(display=False) as counter:
            ours(x, 10, context=context)
        flops[cache] = counter.get_total_flops()
    assert flops[True] < flops[False] / 10, flops


@torch.no_grad()
def test_context_defaults(deep_models):
    _, ours = deep_models
    inputs = make_inputs()
    text = [inputs[k] for k in ("proj_embedding", "encoder_hidden_states", "attention_mask")]
    assert ours.caches_prompt() and ours.prepare_context(*text).kv is not None  # the CPU default: the kv form
    ours.cache_prompt = False  # the attribute overrides the default
    try:
        assert not ours.caches_prompt() and ours.prepare_context(*text).kv is None
    finally:
        ours.cache_prompt = None
    # No mask, no causal attention: every token sees the later ones, nothing can be cached.
    context = ours.prepare_context(*text[:2], None)
    assert context.kv is None and context.mask is None
    with pytest.raises(ValueError, match="proj_embedding"):
        ours(inputs["hidden_states"], 10)


@torch.no_grad()
def test_post_process_latents_matches_reference(models):
    ref, ours = models
    z = torch.randn(BATCH, 32)
    assert ours.clip_std.abs().min() > 0  # randomized, so the test sees both statistics
    torch.testing.assert_close(ours.post_process_latents(z), ref.post_process_latents(z), atol=0, rtol=0)


def test_official_state_dict_layout():
    if not OFFICIAL_CONFIG.is_file():
        pytest.skip(f"no official config at {OFFICIAL_CONFIG}")
    config = json.loads(OFFICIAL_CONFIG.read_text())
    with torch.device("meta"):
        ours = PriorTransformer.from_config(config)
        ref = diffusers.PriorTransformer.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours.num_parameters() == 1_026_225_920


@torch.no_grad()
def test_round_trip_through_reference(tmp_path):
    torch.manual_seed(0)
    ours = PriorTransformer(**TINY).eval()
    randomize(ours)
    ours.save_pretrained(tmp_path)
    ref = diffusers.PriorTransformer.from_pretrained(tmp_path).eval()
    again = PriorTransformer.from_pretrained(tmp_path)
    assert {k: ref.config[k] for k in ours.config} == dict(ours.config)
    inputs = make_inputs(seed=2)
    expected = ours(timestep=torch.tensor([5, 6, 7]), **inputs).predicted_image_embedding
    assert torch.equal(again(timestep=torch.tensor([5, 6, 7]), **inputs).predicted_image_embedding, expected)
    reference = ref(timestep=torch.tensor([5, 6, 7]), **inputs).predicted_image_embedding
    torch.testing.assert_close(reference, expected, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(ref.post_process_latents(expected), ours.post_process_latents(expected), atol=0, rtol=0)


@pytest.mark.parametrize("timestep", [TIMESTEPS["int"], TIMESTEPS["1d_batch"]], ids=["int", "1d_batch"])
def test_traces_without_graph_breaks(timestep):
    torch.manual_seed(0)
    model = PriorTransformer(**TINY).eval()
    inputs = make_inputs()

    def predict(hidden_states, proj_embedding, encoder_hidden_states, attention_mask):
        return model(
            hidden_states, timestep, proj_embedding, encoder_hidden_states, attention_mask
        ).predicted_image_embedding

    with torch.no_grad():
        explanation = torch._dynamo.explain(predict)(**inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("added_emb_type", None),
        ("encoder_hid_proj_type", None),
        ("norm_in_type", "layer"),
        ("embedding_proj_norm_type", "layer"),
        ("time_embed_act_fn", "gelu"),
        ("additional_embeddings", 3),
    ],
)
def test_unsupported_config_is_rejected(key, value):
    with pytest.raises(ValueError, match=key) as err:
        PriorTransformer(**{**TINY, key: value})
    assert f"{key}={value!r}" in str(err.value)
