"""The API text's own examples for the prior, text2img, combined and Auto pipelines, run on the tiny folders.

Changes from the published examples, and only these: the hub ids become the tiny folders, images come from memory
instead of URLs, sizes and decoder step counts are tiny, "cuda"/float16 become the CPU/float32, and the typos of the
emb2emb examples (wrong class names, undefined variables) are corrected.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

SMALL = {"height": 64, "width": 64, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def images() -> tuple[PIL.Image.Image, PIL.Image.Image]:
    rng = np.random.default_rng(0)
    cat = PIL.Image.fromarray((rng.random((96, 80, 3)) * 255).astype(np.uint8))
    starry_night = PIL.Image.fromarray((rng.random((60, 64, 3)) * 255).astype(np.uint8))
    return cat, starry_night


def test_prior_then_decoder_example(tmp_path, prior_repo, decoder_repo):
    from kandinsky22 import KandinskyV22Pipeline, KandinskyV22PriorPipeline

    pipe_prior = KandinskyV22PriorPipeline.from_pretrained(prior_repo)
    pipe_prior.to("cpu")
    prompt = "red cat, 4k photo"
    image_emb, negative_image_emb = pipe_prior(prompt).to_tuple()
    pipe = KandinskyV22Pipeline.from_pretrained(decoder_repo)
    pipe.to("cpu")
    image = pipe(image_embeds=image_emb, negative_image_embeds=negative_image_emb, **SMALL).images
    image[0].save(tmp_path / "cat.png")
    assert PIL.Image.open(tmp_path / "cat.png").size == (64, 64)


def test_zero_image_negative_example(prior_repo, decoder_repo):
    from kandinsky22 import KandinskyV22Pipeline, KandinskyV22PriorPipeline

    pipe_prior = KandinskyV22PriorPipeline.from_pretrained(prior_repo)
    out = pipe_prior("red cat, 4k photo")
    image_emb = out.image_embeds
    zero_image_emb = out.negative_image_embeds
    pipe = KandinskyV22Pipeline.from_pretrained(decoder_repo)
    image = pipe(image_embeds=image_emb, negative_image_embeds=zero_image_emb, **SMALL).images
    assert image[0].size == (64, 64)
    assert torch.allclose(zero_image_emb, pipe_prior.zero_image_embeds(1))


@pytest.mark.parametrize("prior_class", ["KandinskyV22PriorPipeline", "KandinskyV22PriorEmb2EmbPipeline"])
def test_interpolate_examples(tmp_path, prior_repo, decoder_repo, images, prior_class):
    import kandinsky22
    from kandinsky22 import KandinskyV22Pipeline

    pipe_prior = getattr(kandinsky22, prior_class).from_pretrained(prior_repo, torch_dtype=torch.float32)
    pipe_prior.to("cpu")
    img1, img2 = images
    images_texts = ["a cat", img1, img2]
    weights = [0.3, 0.3, 0.4]
    image_emb, zero_image_emb = pipe_prior.interpolate(images_texts, weights)
    pipe = KandinskyV22Pipeline.from_pretrained(decoder_repo, torch_dtype=torch.float32)
    pipe.to("cpu")
    image = pipe(image_embeds=image_emb, negative_image_embeds=zero_image_emb, **SMALL).images[0]
    image.save(tmp_path / "starry_cat.png")
    assert image_emb.shape == zero_image_emb.shape == (1, 32) and image.size == (64, 64)


def test_emb2emb_example(prior_repo, decoder_repo, images):
    from kandinsky22 import KandinskyV22Pipeline, KandinskyV22PriorEmb2EmbPipeline

    pipe_prior = KandinskyV22PriorEmb2EmbPipeline.from_pretrained(prior_repo, torch_dtype=torch.float32)
    pipe_prior.to("cpu")
    prompt = "red cat, 4k photo"
    img = images[0]
    image_emb, negative_image_emb = pipe_prior(prompt, image=img, strength=0.2).to_tuple()
    pipe = KandinskyV22Pipeline.from_pretrained(decoder_repo, torch_dtype=torch.float32)
    pipe.to("cpu")
    image = pipe(image_embeds=image_emb, negative_image_embeds=negative_image_emb, **SMALL).images
    assert image[0].size == (64, 64)


def test_auto_text2image_example(decoder_repo):
    from kandinsky22 import AutoPipelineForText2Image

    pipe = AutoPipelineForText2Image.from_pretrained(decoder_repo, torch_dtype=torch.float32)
    pipe.enable_model_cpu_offload(device="cpu")
    prompt = "A lion in galaxies, spirals, nebulae, stars, smoke, iridescent, intricate detail, octane render, 8k"
    image = pipe(prompt=prompt, num_inference_steps=2, height=64, width=64).images[0]
    assert image.size == (64, 64)


def test_auto_image2image_example(decoder_repo, images):
    from kandinsky22 import AutoPipelineForImage2Image

    pipe = AutoPipelineForImage2Image.from_pretrained(decoder_repo, torch_dtype=torch.float32)
    pipe.enable_model_cpu_offload(device="cpu")
    prompt = "A fantasy landscape, Cinematic lighting"
    negative_prompt = "low quality, bad quality"
    original_image = images[0].convert("RGB")
    original_image.thumbnail((64, 64))
    kwargs = {**SMALL, "num_inference_steps": 4}  # the default strength 0.3 keeps int(4 * 0.3) = 1 step
    image = pipe(prompt=prompt, negative_prompt=negative_prompt, image=original_image, **kwargs).images[0]
    assert image.size == (64, 64)


def test_auto_inpainting_example(inpaint_repo, images):
    from kandinsky22 import AutoPipelineForInpainting

    pipe = AutoPipelineForInpainting.from_pretrained(inpaint_repo, torch_dtype=torch.float32)
    pipe.enable_model_cpu_offload(device="cpu")
    prompt = "A fantasy landscape, Cinematic lighting"
    negative_prompt = "low quality, bad quality"
    original_image = images[0]
    mask = np.zeros((64, 64), dtype=np.float32)
    # Let's mask out an area above the cat's head
    mask[:20, 20:-20] = 1
    image = pipe(prompt=prompt, negative_prompt=negative_prompt, image=original_image, mask_image=mask, **SMALL)
    assert image.images[0].size == (64, 64)
