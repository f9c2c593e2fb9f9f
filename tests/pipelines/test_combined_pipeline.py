"""Combined pipelines (prior + decoder): parity with the reference, loading the official layouts, the fixes."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from kandinsky22 import (
    KandinskyV22CombinedPipeline,
    KandinskyV22Img2ImgCombinedPipeline,
    KandinskyV22InpaintCombinedPipeline,
    KandinskyV22Pipeline,
    KandinskyV22PriorPipeline,
)

TOL = 1e-4
FAST = {"num_inference_steps": 2, "prior_num_inference_steps": 3, "height": 64, "width": 64, "output_type": "np"}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def picture(seed: int) -> PIL.Image.Image:
    return PIL.Image.fromarray((np.random.default_rng(seed).random((64, 64, 3)) * 255).astype(np.uint8))


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def combined(decoder_repo):
    """Ours and the reference's, each loaded from the decoder repo alone (the prior found through its model card)."""
    import diffusers

    ours = quiet(KandinskyV22CombinedPipeline.from_pretrained(decoder_repo))
    ref = quiet(diffusers.KandinskyV22CombinedPipeline.from_pretrained(decoder_repo))
    return ours, ref


def test_text2img_combined_matches_reference_end_to_end(combined):
    ours, ref = combined
    kwargs = {"prompt": ["horse", "red cat"], "negative_prompt": ["blurry", "dark"], "num_images_per_prompt": 2, **FAST}
    a = ours(generator=gen(), **kwargs).images
    b = ref(generator=gen(), **kwargs).images
    assert a.shape == (4, 64, 64, 3) and np.abs(a - b).max() < TOL


def test_combined_callbacks_prior_latents_and_tuple_match_reference(combined):
    ours, ref = combined

    def prior_callback(pipe, i, t, kwargs):
        return {"latents": kwargs["latents"] * 0.5} if i == 0 else {}

    def callback(pipe, i, t, kwargs):
        return {"latents": kwargs["latents"] * 0.9}

    kwargs = {
        "prompt": "horse",
        "latents": torch.randn(1, 32, generator=gen(3)),
        "prior_callback_on_step_end": prior_callback,
        "callback_on_step_end": callback,
        "return_dict": False,
        **FAST,
    }
    (a,) = ours(generator=gen(), **kwargs)
    (b,) = ref(generator=gen(), **kwargs)
    assert np.abs(a - b).max() < TOL


def test_decoder_latents_go_to_the_decoder(combined, our_prior, our_decoder):
    """The reference sends every `latents` to the prior, where 4-D latents crash (§5.15)."""
    ours, _ = combined
    latents = torch.randn(1, 4, 32, 32, generator=gen(4))
    image = ours("horse", latents=latents, generator=gen(), **FAST).images
    g = gen()
    embeds = our_prior("horse", num_inference_steps=3, generator=g)
    expected = our_decoder(*embeds.to_tuple(), height=64, width=64, num_inference_steps=2, output_type="np",
                           generator=g, latents=latents).images  # fmt: skip
    assert np.abs(image - expected).max() < TOL


def test_generator_list_per_image_with_a_negative_prompt_is_deterministic(combined):
    """One generator per image serves the prior's doubled (negative) batch too; the reference needs 2·N there."""
    ours, _ = combined
    kwargs = {"prompt": ["horse", "cat"], "negative_prompt": "blurry", **FAST}
    a = ours(generator=[gen(1), gen(2)], **kwargs).images
    b = ours(generator=[gen(1), gen(2)], **kwargs).images
    assert a.shape == (2, 64, 64, 3) and np.array_equal(a, b)


def test_img2img_combined_matches_reference_and_pairs_images_with_their_prompts(decoder_repo):
    import diffusers

    ours = quiet(KandinskyV22Img2ImgCombinedPipeline.from_pretrained(decoder_repo))
    ref = quiet(diffusers.KandinskyV22Img2ImgCombinedPipeline.from_pretrained(decoder_repo))
    kwargs = {**FAST, "num_inference_steps": 4, "strength": 0.5}
    a = ours("horse", picture(0), generator=gen(), **kwargs).images
    b = ref("horse", picture(0), generator=gen(), **kwargs).images
    assert np.abs(a - b).max() < TOL
    # Two prompts, one image each, two images per prompt: image i goes with prompt i (the reference tiles the image
    # list, pairing the second prompt with the first image). Per-sample generators make sample 2 reproducible alone.
    gens = [gen(s) for s in range(4)]
    both = ours(["horse", "cat"], [picture(0), picture(1)], num_images_per_prompt=2, generator=gens, **kwargs)
    alone = ours("cat", picture(1), generator=[gen(2)], **kwargs)
    assert np.abs(both.images[2] - alone.images[0]).max() < TOL


def test_inpaint_combined_matches_reference(inpaint_repo):
    import diffusers

    ours = quiet(KandinskyV22InpaintCombinedPipeline.from_pretrained(inpaint_repo))
    ref = quiet(diffusers.KandinskyV22InpaintCombinedPipeline.from_pretrained(inpaint_repo))
    mask = np.zeros((64, 64), dtype=np.float32)
    mask[:32, :32] = 1
    # Compared as latents: the inpaint scheduler does not clip, latents reach ~10 and the tiny random MoVQ amplifies
    # float32 rounding (a relative 2e-6 in the latents) to ~4e-4 in pixels.
    kwargs = {**FAST, "output_type": "latent"}
    a = ours("horse", picture(5), mask, generator=gen(), **kwargs).images
    b = ref("horse", picture(5), mask, generator=gen(), **kwargs).images
    assert a.shape == (1, 4, 32, 32) and (a - b).abs().max() < TOL
    # keep_unmasked reaches the decoder: the picture's own pixels where the mask is 0
    kept = ours("horse", picture(5), mask, generator=gen(), **{**FAST, "output_type": "np"}, keep_unmasked=True)
    kept = kept.images[0]
    original = np.asarray(picture(5), dtype=np.float32) / 255  # already 64x64: not resized
    np.testing.assert_allclose(kept[mask == 0], original[mask == 0], atol=1e-6, rtol=0)


def test_prior_from_prior_path_or_components_and_a_missing_prior(tmp_path, decoder_repo, prior_repo, our_prior):
    import shutil

    bare = tmp_path / "decoder-without-card"
    shutil.copytree(decoder_repo, bare)
    (bare / "README.md").unlink()
    with pytest.raises(ValueError, match="prior_path"):
        KandinskyV22CombinedPipeline.from_pretrained(bare)
    by_path = KandinskyV22CombinedPipeline.from_pretrained(bare, prior_path=prior_repo)
    assert isinstance(by_path.prior_prior, type(our_prior.prior))
    shared = {f"prior_{name}": value for name, value in our_prior.components.items()}
    by_components = KandinskyV22CombinedPipeline.from_pretrained(bare, **shared)
    assert by_components.prior_pipe.prior is our_prior.prior


def test_components_are_shared_and_replaceable(combined, our_decoder):
    ours, _ = combined
    decoder = KandinskyV22Pipeline(**{k: v for k, v in ours.components.items() if not k.startswith("prior_")})
    assert decoder.unet is ours.unet is ours.decoder_pipe.unet
    prior = KandinskyV22PriorPipeline(**{k[6:]: v for k, v in ours.components.items() if k.startswith("prior_")})
    assert prior.text_encoder is ours.prior_text_encoder is ours.prior_pipe.text_encoder
    again = KandinskyV22CombinedPipeline(**ours.components)
    again.scheduler = our_decoder.scheduler
    assert again.decoder_pipe.scheduler is our_decoder.scheduler and ours.scheduler is not again.scheduler


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prompt": ""}, "prompt"),
        ({"output_type": "jpeg"}, "output_type"),
        ({"height": 0}, "height"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"callback_on_step_end_tensor_inputs": ["noise"]}, "noise"),
        ({"latents": torch.zeros(1, 4, 4)}, "latents"),
        ({"generator": [torch.Generator()] * 3}, "generator"),
        ({"guidance_scale": float("nan")}, r"`guidance_scale` must be a finite number, got nan"),
        ({"prior_guidance_scale": float("nan")}, r"`prior_guidance_scale` must be a finite number, got nan"),
        # the prior's own checks would name its `num_inference_steps` / `callback_on_step_end_tensor_inputs`, which
        # here are the decoder's
        ({"prior_num_inference_steps": 0}, r"`prior_num_inference_steps` must be an integer >= 1, got 0"),
        ({"prior_num_inference_steps": 1}, r"`prior_num_inference_steps`: .*must be between 2 and"),  # UnCLIP's table
        ({"prior_callback_on_step_end_tensor_inputs": ["noise"]}, r"`prior_callback_on_step_end_tensor_inputs` may"),
        ({"prior_callback_on_step_end": 3}, r"`prior_callback_on_step_end` must be a callable or None, got int"),
        ({"callback_on_step_end": 3}, r"`callback_on_step_end` must be a callable or None, got int"),
        # the decoder's legacy callback and its scheduler's step limits
        ({"callback": print, "callback_steps": 0}, r"`callback_steps` must be an integer >= 1, got 0"),
        ({"callback": 3}, r"`callback` must be a callable or None, got int"),
        ({"num_inference_steps": 1001}, r"num_inference_steps=1001 is out of range"),
        ({"num_inference_steps": 1000}, r"`num_inference_steps`=1000 gives timestep 1000"),
        ({"latents": torch.zeros(1, 4, 5, 5)}, r"`latents` must have shape \(1, 4, 32, 32\), got \(1, 4, 5, 5\)"),
    ],
)
def test_combined_input_errors_come_before_the_prior_runs(combined, kwargs, match):
    _raises_before_the_prior_runs(combined[0], ValueError, match, **kwargs)


def test_img2img_combined_checks_strength_before_the_prior_runs(combined):
    img2img = KandinskyV22Img2ImgCombinedPipeline(**combined[0].components)
    # int(2 * 0.3) = 0 steps
    _raises_before_the_prior_runs(img2img, ValueError, "strength", image=picture(0), strength=0.3)
    latents = torch.zeros(1, 4, 32, 32)
    _raises_before_the_prior_runs(img2img, ValueError, "latents", image=picture(0), strength=1.0, latents=latents)


def _raises_before_the_prior_runs(pipe, error: type[Exception], match: str, **kwargs) -> None:
    calls = []
    handle = pipe.prior_prior.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(error, match=match):
            pipe(**{"prompt": "horse", **FAST, **kwargs})
    finally:
        handle.remove()
    assert not calls


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image": "photo.png"}, r"`image` must be a PIL image, a numpy array, a torch tensor or a list of them"),
        ({"image": torch.full((1, 3, 64, 64), 2.0)}, r"`image` values must lie in \[0, 1\]"),
        ({"image": [picture(0), picture(1)]}, r"`image` has 2 items but there are 1 image embeddings"),
        ({"image": torch.zeros(1, 4, 16, 16)}, r"size mismatch: `image` is 16x16; expected 32x32"),
        ({"callback": print, "callback_steps": 0}, r"`callback_steps` must be an integer >= 1, got 0"),
        ({"num_inference_steps": 1001}, r"num_inference_steps=1001 is out of range"),
        ({"num_inference_steps": 1000, "strength": 1.0}, r"`num_inference_steps`=1000 gives timestep 1000"),
    ],
)
def test_img2img_combined_input_errors_come_before_the_prior_runs(combined, kwargs, match):
    img2img = quiet(KandinskyV22Img2ImgCombinedPipeline(**combined[0].components))
    _raises_before_the_prior_runs(img2img, ValueError, match, **{"image": picture(0), "strength": 0.5, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"image": 5}, ValueError, r"`image` must be a PIL image, a numpy array, a torch tensor or a list of them"),
        ({"image": np.zeros((32, 32, 3), np.uint8)}, ValueError, r"size mismatch: `image` is 32x32; expected 64x64"),
        ({"mask_image": np.zeros((64, 32))}, ValueError, r"`mask_image` is 64x32, which does not have the aspect"),
        ({"mask_image": np.full((64, 64), 2.0)}, ValueError, r"`mask_image` values must lie in \[0, 1\]"),
        ({"mask_image": [np.zeros((64, 64))] * 2}, ValueError, r"`mask_image` has 2 items but there are 1 image"),
        ({"callback": print, "callback_steps": 0}, ValueError, r"`callback_steps` must be an integer >= 1, got 0"),
        ({"callbak": print}, TypeError, r"unexpected keyword arguments \['callbak'\]"),
        ({"num_inference_steps": 1001}, ValueError, r"num_inference_steps=1001 is out of range"),
        ({"latents": torch.zeros(1, 4, 5, 5)}, ValueError, r"`latents` must have shape \(1, 4, \d+, \d+\), got"),
        ({"keep_unmasked": "yes"}, ValueError, r"keep_unmasked must be True or False, got 'yes'"),
        ({"keep_unmasked": True, "output_type": "latent"}, ValueError, r"keep_unmasked=True needs images"),
    ],
)
def test_inpaint_combined_input_errors_come_before_the_prior_runs(inpaint_repo, kwargs, error, match):
    inpaint = quiet(KandinskyV22InpaintCombinedPipeline.from_pretrained(inpaint_repo))
    mask = np.zeros((64, 64), np.float32)
    _raises_before_the_prior_runs(inpaint, error, match, **{"image": picture(0), "mask_image": mask, **kwargs})
