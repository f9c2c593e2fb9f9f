"""Prior and emb2emb pipelines: parity with the reference on tiny checkpoints, the fixes, the input errors."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from kandinsky22 import KandinskyPriorPipelineOutput, KandinskyV22PriorEmb2EmbPipeline

TOL = 1e-4
STEPS = 3


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def picture(seed: int, size: tuple[int, int] = (40, 48)) -> PIL.Image.Image:
    return PIL.Image.fromarray((np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8))


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max().item() < TOL


def count_forward(module: torch.nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    calls = [0]
    handle = module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls, handle


@pytest.fixture(scope="module")
def emb2emb(our_prior, ref_prior):
    import diffusers

    ours = KandinskyV22PriorEmb2EmbPipeline(**our_prior.components)
    ref = diffusers.KandinskyV22PriorEmb2EmbPipeline(**ref_prior.components)
    for pipe in (ours, ref):
        pipe.set_progress_bar_config(disable=True)
    return ours, ref


@pytest.mark.parametrize(
    "kwargs",
    [
        {"prompt": "horse"},
        {"prompt": ["horse", "red cat"], "negative_prompt": ["low quality", "blurry"], "num_images_per_prompt": 2},
        {"prompt": ["horse", "red cat"], "num_images_per_prompt": 2, "guidance_scale": 1.0},
    ],
    ids=["plain", "negative-2x2", "no-guidance"],
)
def test_prior_matches_reference(our_prior, ref_prior, kwargs):
    ours = our_prior(num_inference_steps=STEPS, generator=gen(), **kwargs)
    ref = ref_prior(num_inference_steps=STEPS, generator=gen(), **kwargs)
    assert isinstance(ours, KandinskyPriorPipelineOutput)
    assert_close(ours.image_embeds, ref.image_embeds)
    assert_close(ours.negative_image_embeds, ref.negative_image_embeds)


def test_prior_callback_latents_tuple_and_generator_list_match_reference(our_prior, ref_prior):
    def callback(pipe, i, t, kwargs):
        return {"latents": kwargs["latents"] * 0.5} if i == 0 else {}

    kwargs = {"num_inference_steps": STEPS, "callback_on_step_end": callback, "return_dict": False}
    ours = our_prior(["horse", "cat"], generator=[gen(1), gen(2)], output_type="np", **kwargs)
    ref = ref_prior(["horse", "cat"], generator=[gen(1), gen(2)], output_type="np", **kwargs)
    assert isinstance(ours, tuple) and len(ours) == 2
    for a, b in zip(ours, ref):
        assert isinstance(a, np.ndarray) and np.abs(a - b).max() < TOL


def test_prior_callback_swapping_the_prompt_tensors_matches_reference(our_prior, ref_prior):
    # The prompt's context (its keys and values in every layer) is prepared once per run: a callback that replaces a
    # prompt tensor must be seen by the next steps, as in the reference.
    def callback(pipe, i, t, kwargs):
        if i == 0:
            return {"text_encoder_hidden_states": kwargs["text_encoder_hidden_states"] * 0.5}
        if i == 1:
            mask = kwargs["text_mask"].clone()
            mask[:, 3:] = False
            return {"text_mask": mask, "prompt_embeds": kwargs["prompt_embeds"] + 1}
        return {}

    names = ["latents", "prompt_embeds", "text_encoder_hidden_states", "text_mask"]
    kwargs = {"num_inference_steps": STEPS, "callback_on_step_end": callback}
    ours = our_prior("horse", generator=gen(3), callback_on_step_end_tensor_inputs=names, **kwargs)
    ref = ref_prior("horse", generator=gen(3), callback_on_step_end_tensor_inputs=names, **kwargs)
    plain = our_prior("horse", generator=gen(3), num_inference_steps=STEPS)
    assert_close(ours.image_embeds, ref.image_embeds)
    assert (ours.image_embeds - plain.image_embeds).abs().max() > 1e-3  # the swaps did change the result


@pytest.mark.parametrize("negative_prompt", [None, "blurry"])
def test_a_list_of_one_generator_serves_the_whole_batch_as_in_the_reference(our_prior, ref_prior, negative_prompt):
    kwargs = {"num_inference_steps": STEPS, "num_images_per_prompt": 2, "negative_prompt": negative_prompt}
    ours = our_prior("horse", generator=[gen(4)], **kwargs)
    ref = ref_prior("horse", generator=[gen(4)], **kwargs)
    assert_close(ours.image_embeds, ref.image_embeds)
    assert_close(ours.negative_image_embeds, ref.negative_image_embeds)


def test_prior_latents_argument_matches_reference(our_prior, ref_prior):
    latents = torch.randn(2, 32, generator=gen(5))
    ours = our_prior("horse", num_images_per_prompt=2, latents=latents, num_inference_steps=STEPS, generator=gen())
    ref = ref_prior("horse", num_images_per_prompt=2, latents=latents, num_inference_steps=STEPS, generator=gen())
    assert_close(ours.image_embeds, ref.image_embeds)


def test_interpolate_mixing_text_and_images_matches_reference(our_prior, ref_prior):
    items = ["horse", picture(0), "red cat", picture(1)]
    weights = [0.2, 0.3, 0.1, 0.4]
    kwargs = {"num_images_per_prompt": 2, "num_inference_steps": STEPS}
    ours = our_prior.interpolate(items, weights, generator=gen(), **kwargs)
    ref = ref_prior.interpolate(items, weights, generator=gen(), **kwargs)
    assert_close(ours.image_embeds, ref.image_embeds)
    assert_close(ours.negative_image_embeds, ref.negative_image_embeds)


@pytest.mark.parametrize(
    "negatives",
    [
        {"negative_prompt": "blurry"},
        {"negative_prior_prompt": "ugly"},
        {"negative_prompt": ["blurry"], "num_images_per_prompt": 2},
        {"negative_prompt": [""]},  # a list is not "": the reference returns the embedding of the text ""
        {"negative_prompt": [""], "negative_prior_prompt": "ugly"},
    ],
    ids=["text-negative", "prior-neg", "list-negative", "list-empty", "list-empty-prior-neg"],
)
def test_interpolate_text_negatives_match_reference(our_prior, ref_prior, negatives):
    kwargs = {"num_inference_steps": STEPS, **negatives}
    ours = our_prior.interpolate(["horse", picture(2)], [0.5, 0.5], generator=gen(), **kwargs)
    ref = ref_prior.interpolate(["horse", picture(2)], [0.5, 0.5], generator=gen(), **kwargs)
    assert_close(ours.image_embeds, ref.image_embeds)
    assert_close(ours.negative_image_embeds, ref.negative_image_embeds)


def test_interpolate_negative_prompt_none_is_the_default(our_prior, emb2emb):
    """None is the default empty negative (the zero-image embedding); the reference's emb2emb takes it too."""
    kwargs = {"num_inference_steps": STEPS, "num_images_per_prompt": 2}
    for pipe in (our_prior, emb2emb[0]):
        out = pipe.interpolate(["horse", picture(2)], [0.5, 0.5], generator=gen(), negative_prompt=None, **kwargs)
        default = pipe.interpolate(["horse", picture(2)], [0.5, 0.5], generator=gen(), **kwargs)
        assert torch.equal(out.image_embeds, default.image_embeds)
        assert torch.equal(out.negative_image_embeds, our_prior.zero_image_embeds(2))
    emb2emb[1].interpolate([picture(2)], [1.0], negative_prompt=None, **kwargs)  # its text conditions crash


def test_numpy_float32_weights_and_strength_are_numbers_as_in_the_reference(our_prior, ref_prior, emb2emb):
    conds, weights = ["horse", picture(4)], [np.float32(0.6), np.float32(0.4)]
    ours = our_prior.interpolate(conds, weights, num_inference_steps=STEPS, generator=gen())
    ref = ref_prior.interpolate(conds, weights, num_inference_steps=STEPS, generator=gen())
    assert_close(ours.image_embeds, ref.image_embeds)
    kwargs = {"prompt": "horse", "image": picture(0), "strength": np.float32(0.5), "num_inference_steps": 4}
    assert_close(emb2emb[0](**kwargs, generator=gen()).image_embeds, emb2emb[1](**kwargs, generator=gen()).image_embeds)


def test_interpolate_spends_no_prior_run_on_the_zero_negative(our_prior):
    calls, handle = count_forward(our_prior.prior)
    our_prior.interpolate(["horse", picture(0)], [0.5, 0.5], num_inference_steps=STEPS, generator=gen())
    handle.remove()
    assert calls[0] == STEPS  # one text condition; the reference runs the prior twice


def test_zero_image_embedding_is_cached_per_encoder_device_and_dtype(prior_repo):
    from kandinsky22 import KandinskyV22PriorPipeline

    pipe = KandinskyV22PriorPipeline.from_pretrained(prior_repo)
    pipe.set_progress_bar_config(disable=True)
    calls, _ = count_forward(pipe.image_encoder)
    first = pipe("horse", num_inference_steps=2, generator=gen()).negative_image_embeds
    second = pipe("cat", num_inference_steps=2, generator=gen()).negative_image_embeds
    assert calls[0] == 1 and torch.equal(first, second)
    pipe.to(torch.float64)
    again = pipe("horse", num_inference_steps=2, generator=gen()).negative_image_embeds
    assert calls[0] == 2 and again.dtype == torch.float64
    assert (again - first.double()).abs().max() < 1e-5


def test_zero_image_embedding_called_directly_keeps_no_autograd_graph(prior_repo, ref_prior):
    """Called outside ``torch.no_grad`` (it is public), the cached constant must not hold the encoder's graph."""
    from kandinsky22 import KandinskyV22PriorPipeline

    pipe = KandinskyV22PriorPipeline.from_pretrained(prior_repo)
    zero = pipe.zero_image_embeds(2)
    assert not zero.requires_grad and zero.grad_fn is None
    with torch.no_grad():
        assert_close(zero, ref_prior.get_zero_embed(2))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"strength": 0.5},
        {"strength": 1.0, "negative_prompt": "blurry", "num_images_per_prompt": 2},
        {"strength": 0.7, "image": "embeds", "guidance_scale": 1.0},
    ],
    ids=["image", "negative-2x", "embeds-no-guidance"],
)
def test_emb2emb_matches_reference(emb2emb, kwargs):
    ours, ref = emb2emb
    kwargs = dict(kwargs)
    image = torch.randn(1, 32, generator=gen(3)) if kwargs.pop("image", None) == "embeds" else picture(3)
    a = ours("horse", image, num_inference_steps=4, generator=gen(), **kwargs)
    b = ref("horse", image, num_inference_steps=4, generator=gen(), **kwargs)
    assert_close(a.image_embeds, b.image_embeds)
    assert_close(a.negative_image_embeds, b.negative_image_embeds)


def _array(seed: int, dtype: str) -> np.ndarray:
    pixels = np.asarray(picture(seed))  # HWC uint8
    return pixels if dtype == "uint8" else (pixels / 255).astype(dtype)


@pytest.mark.parametrize(
    ("prompt", "image"),
    [
        ("horse", lambda: _array(5, "uint8")),
        ("horse", lambda: _array(5, "float32")),  # the CLIP processor reads a float array's range itself
        ("horse", lambda: [_array(5, "float64")]),
        ("horse", lambda: _array(5, "uint8")[None]),  # NHWC batch
        (["horse", "red cat"], lambda: [picture(6), _array(7, "float32")]),
    ],
    ids=["uint8", "float32", "list-float64", "nhwc", "mixed-with-pil"],
)
def test_emb2emb_numpy_images_match_reference(emb2emb, prompt, image):
    """numpy images go through the CLIP image processor, as in the reference, alone or mixed with PIL images."""
    ours, ref = emb2emb
    kwargs = {"num_inference_steps": 4, "strength": 0.5}
    a = ours(prompt, image(), generator=gen(), **kwargs)
    b = ref(prompt, image(), generator=gen(), **kwargs)
    assert_close(a.image_embeds, b.image_embeds)


def test_emb2emb_interpolate_accepts_text_and_returns_the_zero_negative(emb2emb, our_prior, ref_prior):
    ours, ref = emb2emb
    kwargs = {"num_inference_steps": STEPS, "num_images_per_prompt": 2}
    mixed = ours.interpolate(["horse", picture(4)], [0.6, 0.4], generator=gen(), **kwargs)
    expected = our_prior.interpolate(["horse", picture(4)], [0.6, 0.4], generator=gen(), **kwargs)
    assert_close(mixed.image_embeds, expected.image_embeds)
    assert_close(mixed.negative_image_embeds, ref_prior.get_zero_embed(2))
    images_only = ours.interpolate([picture(4)], [1.0], **kwargs)
    assert_close(images_only.image_embeds, ref.interpolate([picture(4)], [1.0], **kwargs).image_embeds)
    assert torch.equal(images_only.negative_image_embeds, ours.interpolate([picture(4)], [1.0], **kwargs)[1])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["horse", 3]}, "prompt"),
        ({"prompt": ["a", "b"], "negative_prompt": ["x", "y", "z"]}, "negative_prompt"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"output_type": "pil"}, "output_type"),
        ({"callback_on_step_end_tensor_inputs": ["latents", "noise"]}, "noise"),
        ({"generator": [torch.Generator()] * 3}, "generator"),
        ({"latents": torch.zeros(2, 32)}, "latents"),
        ({"guidance_scale": float("nan")}, r"`guidance_scale` must be a finite number, got nan"),
        ({"guidance_scale": "4"}, r"`guidance_scale` must be a finite number, got '4'"),
        (
            {"latents": np.zeros((1, 32), np.float32)},
            r"`latents` must be a torch.Tensor of shape \(1, 32\), got ndarray",
        ),
        ({"callback_on_step_end": 3}, r"`callback_on_step_end` must be a callable or None, got int"),
    ],
)
def test_prior_input_errors(our_prior, kwargs, match):
    kwargs = {"prompt": "horse", "num_inference_steps": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        our_prior(**kwargs)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((["horse", picture(0)], [1.0]), "weights"),
        ((["horse", picture(0)], [0.5, float("nan")]), r"`weights` must be finite numbers, got \[nan\]"),
        ((["horse", picture(0)], [0.5, float("inf")]), r"`weights` must be finite numbers, got \[inf\]"),
        (([], []), "images_and_prompts"),
        (([3.0], [1.0]), r"images_and_prompts\[0\]"),
        (([torch.zeros(1, 7)], [1.0]), r"images_and_prompts\[0\]"),
        (([torch.zeros(1, 1, 32, 32)], [1.0]), r"`images_and_prompts\[0\]` pixels must have shape \(B, 3, 32, 32\)"),
        (([torch.zeros(1, 3, 64, 64)], [1.0]), r"`images_and_prompts\[0\]` pixels must have shape \(B, 3, 32, 32\)"),
        (
            (["horse"], [1.0], {"negative_prompt": ["a", "b"]}),
            r"`negative_prompt` must be a string, a list of one string, or None, got \['a', 'b'\]",
        ),
        ((["horse"], [1.0], {"negative_prompt": 3}), r"`negative_prompt` must be a string, a list of one string"),
    ],
)
def test_interpolate_input_errors(our_prior, args, match):
    kwargs = args[2] if len(args) == 3 else {}
    with pytest.raises(ValueError, match=match):
        our_prior.interpolate(*args[:2], num_inference_steps=2, **kwargs)


def test_interpolate_refuses_a_guidance_scale_that_is_not_a_finite_number(our_prior):
    with pytest.raises(ValueError, match=r"`guidance_scale` must be a finite number, got nan"):
        our_prior.interpolate(["horse"], [1.0], num_inference_steps=2, guidance_scale=float("nan"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strength": 0.0}, "strength"),
        ({"strength": 0.1, "num_inference_steps": 4}, "strength"),
        ({"image": torch.zeros(1, 16)}, "image"),
        ({"image": [picture(0), picture(1), picture(2)], "prompt": ["a", "b"]}, "image"),
        ({"guidance_scale": float("nan")}, r"`guidance_scale` must be a finite number, got nan"),
        (
            {"image": [torch.zeros(1, 32), torch.zeros(1, 16)]},
            r"`image` tensors must .*got shapes \[\(1, 32\), \(1, 16\)\]",
        ),
        ({"image": [torch.zeros(1, 32), torch.zeros(1, 3, 32, 32)]}, r"`image` tensors must .*got shapes"),
        ({"image": [torch.tensor(1.0)]}, r"`image` tensors must .*got shapes \[\(\)\]"),
        (
            {"image": np.zeros((32, 32), np.uint8)},
            r"`image` numpy arrays must be HWC images .*got shapes \[\(32, 32\)\]",
        ),
        ({"image": [picture(0), torch.zeros(1, 32)]}, r"`image` must be PIL images and numpy arrays, or tensors"),
        (
            {"image": torch.zeros(1, 1, 32, 32)},
            r"`image` pixels must have shape \(B, 3, 32, 32\).*got \(1, 1, 32, 32\)",
        ),
        (
            {"image": torch.zeros(1, 3, 64, 64)},
            r"`image` pixels must have shape \(B, 3, 32, 32\).*got \(1, 3, 64, 64\)",
        ),
    ],
)
def test_emb2emb_input_errors(emb2emb, kwargs, match):
    kwargs = {"prompt": "horse", "image": picture(0), "num_inference_steps": 4, "strength": 0.5, **kwargs}
    with pytest.raises(ValueError, match=match):
        emb2emb[0](**kwargs)


def test_a_long_prompt_is_named_by_its_start_in_the_truncation_warning(our_prior, caplog):
    prompt = "a red cat on a blue mat " * 400
    with caplog.at_level("WARNING", logger="kandinsky22.pipelines.prior"):
        our_prior(prompt, num_inference_steps=2, generator=gen())
    [message] = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert f"{len(prompt)} characters" in message
    assert len(message) < 300
