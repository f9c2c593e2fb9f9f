"""Img2img and inpaint through the combined and Auto pipelines: image and mask lists line up with the prompts, and
the API text's AutoPipeline examples, rewritten for the tiny folders.

Several prompts with ``num_images_per_prompt`` > 1 give the embeddings [p0, p0, p1, p1]; the images and masks given
per prompt must be repeated the same way (the reference tiles them: [i0, i1, i0, i1]). With one generator per output
image, every sample is reproducible alone, so sample k of a batched call must equal the reference's single-prompt
call k — where the reference is right.
"""

from __future__ import annotations

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch

from kandinsky22 import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    DDPMScheduler,
    KandinskyV22Img2ImgCombinedPipeline,
    KandinskyV22InpaintCombinedPipeline,
)

ATOL = 1e-4  # fp32, np outputs in [0, 1]
FAST = {"num_inference_steps": 2, "prior_num_inference_steps": 3, "height": 64, "width": 64, "output_type": "np"}
PROMPTS = ["horse", "red cat"]


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(seed: int, size: tuple[int, int] = (64, 64)) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def _mask(seed: int) -> np.ndarray:
    mask = np.zeros((64, 64), dtype=np.float32)
    top, left = np.random.default_rng(seed).integers(0, 32, 2)
    mask[top : top + 32, left : left + 32] = 1
    return mask


def _gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def _check_samples_against_single_calls(ours_out: np.ndarray, single_call) -> None:
    """Samples 1 and 2 (prompt 0's second image, prompt 1's first) against the reference's single-prompt calls."""
    assert ours_out.shape == (4, 64, 64, 3)
    for k in (1, 2):
        expected = single_call(prompt_index=k // 2, seed=k)
        np.testing.assert_allclose(ours_out[k : k + 1], expected, atol=ATOL, rtol=0)


def test_img2img_combined_lines_images_up_with_prompts(decoder_repo):
    ours = _quiet(KandinskyV22Img2ImgCombinedPipeline.from_pretrained(decoder_repo))
    ref = _quiet(diffusers.KandinskyV22Img2ImgCombinedPipeline.from_pretrained(decoder_repo))
    images = [_image(0), _image(1)]
    kwargs = {**FAST, "num_inference_steps": 4, "strength": 0.5}
    out = ours(PROMPTS, images, num_images_per_prompt=2, generator=_gens(0, 1, 2, 3), **kwargs).images

    def single_call(prompt_index: int, seed: int) -> np.ndarray:
        return ref(PROMPTS[prompt_index], images[prompt_index], generator=_gens(seed), **kwargs).images

    _check_samples_against_single_calls(out, single_call)


def test_img2img_combined_takes_an_image_list_mixing_kinds_and_sizes(decoder_repo):
    """Each item is resized to the output size on its own, as in the reference (n = 1: its tiling is right)."""
    ours = _quiet(KandinskyV22Img2ImgCombinedPipeline.from_pretrained(decoder_repo))
    ref = _quiet(diffusers.KandinskyV22Img2ImgCombinedPipeline.from_pretrained(decoder_repo))
    images = [_image(4, (80, 56)), torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(5))]
    kwargs = {**FAST, "num_inference_steps": 4, "strength": 0.5}
    expected = ref(PROMPTS, images, generator=_gens(0), **kwargs).images
    np.testing.assert_allclose(ours(PROMPTS, images, generator=_gens(0), **kwargs).images, expected, atol=ATOL, rtol=0)


def test_inpaint_combined_lines_images_and_masks_up_with_prompts(inpaint_repo):
    # The decoder repo's clipped scheduler config, so pixels can be compared (see test_inpaint.py).
    ours = KandinskyV22InpaintCombinedPipeline.from_pretrained(inpaint_repo)
    ours = _quiet(
        type(ours)(
            **{**ours.components, "scheduler": ours.scheduler.from_config(ours.scheduler.config, clip_sample=True)}
        )
    )
    ref = diffusers.KandinskyV22InpaintCombinedPipeline.from_pretrained(inpaint_repo)
    ref_scheduler = diffusers.DDPMScheduler.from_config({**ref.scheduler.config, "clip_sample": True})
    ref = _quiet(diffusers.KandinskyV22InpaintCombinedPipeline(**{**ref.components, "scheduler": ref_scheduler}))
    images, masks = [_image(2), _image(3)], [_mask(2), _mask(3)]
    out = ours(PROMPTS, images, masks, num_images_per_prompt=2, generator=_gens(0, 1, 2, 3), **FAST).images

    def single_call(prompt_index: int, seed: int) -> np.ndarray:
        i = prompt_index
        return ref(PROMPTS[i], images[i], masks[i].copy(), generator=_gens(seed), **FAST).images

    _check_samples_against_single_calls(out, single_call)


# ---------------------------------------------------------------------------------------------------------------------
# The API text's examples (AutoPipelineForImage2Image, AutoPipelineForInpainting), with the tiny folders, 64 px
# outputs, fp32 on the CPU, a random picture for the downloaded one, and a generator. The img2img example is compared
# with the reference's; the inpaint one cannot be at the pixel level (unclipped scheduler, see test_inpaint.py).
# ---------------------------------------------------------------------------------------------------------------------


def test_example_auto_image2image(decoder_repo):
    pipe = AutoPipelineForImage2Image.from_pretrained(decoder_repo)
    pipe.enable_model_cpu_offload()
    pipe.set_progress_bar_config(disable=True)
    prompt = "A fantasy landscape, Cinematic lighting"
    image = _image(4, (96, 128)).convert("RGB")  # stands in for the downloaded sketch
    image.thumbnail((768, 768))
    kwargs = {"prompt": prompt, "image": image, "num_inference_steps": 25, "height": 64, "width": 64}
    out = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images[0]

    assert isinstance(pipe, KandinskyV22Img2ImgCombinedPipeline)
    ref = _quiet(diffusers.AutoPipelineForImage2Image.from_pretrained(decoder_repo))
    expected = ref(**kwargs, generator=torch.Generator().manual_seed(0)).images[0]
    assert out.size == expected.size == (64, 64)
    assert np.abs(np.asarray(out, dtype=np.int16) - np.asarray(expected, dtype=np.int16)).max() <= 1  # uint8 rounding


def test_example_auto_inpainting(inpaint_repo):
    pipe = AutoPipelineForInpainting.from_pretrained(inpaint_repo)
    pipe.enable_model_cpu_offload()
    pipe.set_progress_bar_config(disable=True)
    prompt = "A fantasy landscape, Cinematic lighting"
    negative_prompt = "low quality, bad quality"
    original_image = _image(5, (80, 80))  # stands in for cat.png
    mask = np.zeros((96, 96), dtype=np.float32)  # the example's 768 px mask for a 512 px output, scaled to 64 px
    # Let's mask out an area above the cat's head
    mask[:32, 32:-32] = 1
    kwargs = {"prompt": prompt, "negative_prompt": negative_prompt, "image": original_image, "mask_image": mask}
    kwargs.update(num_inference_steps=25, height=64, width=64)
    image = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images[0]

    assert isinstance(pipe, KandinskyV22InpaintCombinedPipeline)
    assert isinstance(pipe.scheduler, DDPMScheduler) and not pipe.scheduler.config.clip_sample
    assert image.mode == "RGB" and image.size == (64, 64)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"mask_image": np.zeros((64, 32))}, "`mask_image` is 64x32, which does not have the aspect ratio"),
        ({"image": np.zeros((32, 32, 3), np.uint8)}, "size mismatch: `image` is 32x32; expected 64x64"),
    ],
)
def test_inpaint_combined_input_errors(inpaint_repo, bad, match):
    pipe = _quiet(KandinskyV22InpaintCombinedPipeline.from_pretrained(inpaint_repo))
    with pytest.raises(ValueError, match=match):
        pipe(**{"prompt": "horse", "image": _image(6), "mask_image": _mask(6), **FAST, **bad})
