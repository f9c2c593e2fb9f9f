"""AutoPipelines: the official model_index class names map to the task's combined pipeline; wrong repos are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kandinsky22 import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    KandinskyV22CombinedPipeline,
    KandinskyV22Img2ImgCombinedPipeline,
    KandinskyV22Img2ImgPipeline,
    KandinskyV22InpaintCombinedPipeline,
    KandinskyV22Pipeline,
)


def test_decoder_repos_give_the_tasks_combined_pipelines_as_the_reference(decoder_repo, inpaint_repo):
    import diffusers

    cases = [
        (AutoPipelineForText2Image, diffusers.AutoPipelineForText2Image, decoder_repo, KandinskyV22CombinedPipeline),
        (AutoPipelineForImage2Image, diffusers.AutoPipelineForImage2Image, decoder_repo, KandinskyV22Img2ImgCombinedPipeline),
        (AutoPipelineForInpainting, diffusers.AutoPipelineForInpainting, inpaint_repo, KandinskyV22InpaintCombinedPipeline),
    ]  # fmt: skip
    for ours, ref, repo, expected in cases:
        pipe = ours.from_pretrained(repo)
        assert type(pipe) is expected
        assert type(ref.from_pretrained(repo)).__name__ == expected.__name__
        assert pipe.unet.config.in_channels == (9 if expected is KandinskyV22InpaintCombinedPipeline else 4)


def test_a_folder_saved_by_a_combined_pipeline_loads(tmp_path, decoder_repo):
    combined = KandinskyV22CombinedPipeline.from_pretrained(decoder_repo)
    combined.save_pretrained(tmp_path / "combined")
    pipe = AutoPipelineForImage2Image.from_pretrained(tmp_path / "combined", prior_path=None)
    assert type(pipe) is KandinskyV22Img2ImgCombinedPipeline
    assert torch.equal(pipe.prior_prior.clip_mean, combined.prior_prior.clip_mean)


@pytest.mark.parametrize(
    ("auto", "repo", "match"),
    [
        (AutoPipelineForInpainting, "decoder_repo", "4 input channels.*decoder-inpaint"),
        (AutoPipelineForText2Image, "inpaint_repo", "9 input channels"),
        (AutoPipelineForText2Image, "controlnet_repo", "KandinskyV22ControlnetPipeline"),
        (AutoPipelineForText2Image, "prior_repo", "prior repository"),
    ],
)
def test_repos_that_cannot_do_the_task_are_refused_when_loading(request, auto, repo, match):
    with pytest.raises(ValueError, match=match):
        auto.from_pretrained(request.getfixturevalue(repo))


def test_from_pipe_shares_modules_and_keeps_the_kind(our_decoder, decoder_repo):
    img2img = AutoPipelineForImage2Image.from_pipe(our_decoder)
    assert type(img2img) is KandinskyV22Img2ImgPipeline and img2img.unet is our_decoder.unet
    combined = KandinskyV22CombinedPipeline.from_pretrained(decoder_repo)
    combined_img2img = AutoPipelineForImage2Image.from_pipe(combined)
    assert type(combined_img2img) is KandinskyV22Img2ImgCombinedPipeline
    assert combined_img2img.prior_text_encoder is combined.prior_text_encoder
    back = AutoPipelineForText2Image.from_pipe(img2img, movq=our_decoder.movq)
    assert type(back) is KandinskyV22Pipeline and back.movq is our_decoder.movq
    with pytest.raises(ValueError, match="4 input channels"):
        AutoPipelineForInpainting.from_pipe(our_decoder)
    with pytest.raises(ValueError, match="vae"):
        AutoPipelineForText2Image.from_pipe(our_decoder, vae=None)
    with pytest.raises(TypeError, match="from_pretrained"):
        AutoPipelineForText2Image()


def test_auto_text2image_runs_like_the_combined_pipeline(decoder_repo):
    auto = AutoPipelineForText2Image.from_pretrained(decoder_repo)
    auto.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 2, "prior_num_inference_steps": 2, "height": 64, "width": 64, "output_type": "np"}
    a = auto("horse", generator=torch.Generator().manual_seed(0), **kwargs).images
    b = auto("horse", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert a.shape == (1, 64, 64, 3) and np.array_equal(a, b)
