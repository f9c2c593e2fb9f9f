"""KandinskyV22Img2ImgPipeline: parity with the reference on the tiny decoder repo, the fixes, the input errors."""

from __future__ import annotations

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch

from kandinsky22 import KandinskyV22Img2ImgPipeline

ATOL = 1e-4  # fp32, np outputs in [0, 1]


@pytest.fixture(scope="module")
def ref(ref_decoder):
    pipe = diffusers.KandinskyV22Img2ImgPipeline(**ref_decoder.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ours(our_decoder):
    pipe = KandinskyV22Img2ImgPipeline(**our_decoder.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _embeds(batch: int = 1) -> dict[str, torch.Tensor]:
    return {
        "image_embeds": torch.randn(batch, 32, generator=torch.Generator().manual_seed(0)),
        "negative_image_embeds": torch.randn(batch, 32, generator=torch.Generator().manual_seed(1)),
    }


def _image(seed: int = 0, size: tuple[int, int] = (64, 64)) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def _seed(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _close(ours_out: np.ndarray, ref_out: np.ndarray) -> None:
    assert ours_out.shape == ref_out.shape
    np.testing.assert_allclose(ours_out, ref_out, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Parity (square sizes, where the reference is right)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "strength", "guidance_scale"),
    [(10, 0.3, 4.0), (3, 1.0, 4.0), (4, 0.5, 1.0)],
    ids=["3-of-10-steps", "full-strength", "no-guidance"],
)
def test_parity_pil(ref, ours, steps, strength, guidance_scale):
    kwargs = {
        **_embeds(),
        "image": _image(0, (80, 56)),  # resized to 64x64 by both
        "height": 64,
        "width": 64,
        "num_inference_steps": steps,
        "strength": strength,
        "guidance_scale": guidance_scale,
        "output_type": "np",
    }
    _close(ours(**kwargs, generator=_seed()).images, ref(**kwargs, generator=_seed()).images)


def test_parity_tensor_batch_per_sample_generators(ref, ours):
    # A [-1, 1] tensor batch, 2 images per embedding, one generator per output image.
    images = torch.rand(2, 3, 64, 64, generator=_seed(5)) * 2 - 1
    kwargs = {**_embeds(2), "image": images, "height": 64, "width": 64, "num_inference_steps": 4, "strength": 0.5}
    kwargs.update(num_images_per_prompt=2, output_type="np")
    with pytest.warns(FutureWarning):  # the reference deprecates [-1, 1] tensors (ours always take them)
        expected = ref(**kwargs, generator=[_seed(s) for s in range(4)]).images
    _close(ours(**kwargs, generator=[_seed(s) for s in range(4)]).images, expected)


def test_parity_unit_range_tensor(ref, ours):
    """A tensor with no negative value is an image in [0, 1], as in the reference (which normalizes it to [-1, 1])."""
    images = torch.rand(2, 3, 64, 64, generator=_seed(6))
    kwargs = {**_embeds(2), "image": images, "height": 64, "width": 64, "num_inference_steps": 4, "strength": 0.5}
    kwargs["output_type"] = "np"
    _close(ours(**kwargs, generator=_seed()).images, ref(**kwargs, generator=_seed()).images)


def test_parity_list_mixing_kinds_and_sizes(ref, ours):
    """Each item of an `image` list is resized to the output size on its own, as the reference preprocesses each
    item: PIL images, tensors of other sizes (one in [0, 1], one in [-1, 1]) and, ours only, a numpy array."""
    unit = torch.rand(1, 3, 40, 40, generator=_seed(8))
    signed = torch.rand(3, 96, 96, generator=_seed(9)) * 2 - 1
    kwargs = {**_embeds(3), "height": 64, "width": 64, "num_inference_steps": 4, "strength": 0.5}
    kwargs["output_type"] = "np"
    with pytest.warns(FutureWarning):  # the reference deprecates [-1, 1] tensors
        expected = ref(**kwargs, image=[_image(0, (80, 56)), unit, signed], generator=_seed()).images
    _close(ours(**kwargs, image=[_image(0, (80, 56)), unit, signed], generator=_seed()).images, expected)
    array = unit[0].permute(1, 2, 0).numpy()  # HWC float in [0, 1], 40x40: resized like the tensor
    mixed = ours(**kwargs, image=[_image(0, (80, 56)), array, signed], generator=_seed()).images
    _close(mixed, expected)


def test_parity_1000_steps_when_the_kept_timesteps_are_trained(ref, ours):
    """At 1000 steps the official DDPM table starts at the untrained timestep 1000, but a strength that keeps only
    its last two timesteps (2 and 1) runs, as in the reference."""
    kwargs = {**_embeds(), "image": _image(5), "height": 64, "width": 64, "num_inference_steps": 1000}
    kwargs.update(strength=0.002, output_type="np")
    _close(ours(**kwargs, generator=_seed()).images, ref(**kwargs, generator=_seed()).images)


def test_parity_numpy_float32_strength(ref, ours):
    """A numpy float32 strength (e.g. read from an array of settings) is a number, as in the reference."""
    kwargs = {**_embeds(), "image": _image(7), "height": 64, "width": 64, "num_inference_steps": 4, "output_type": "np"}
    expected = ref(**kwargs, strength=np.float32(0.5), generator=_seed()).images
    _close(ours(**kwargs, strength=np.float32(0.5), generator=_seed()).images, expected)


def test_parity_multistep_scheduler(ref, ours):
    """A run that starts mid-schedule with a multistep solver (whose step index must start at the kept part)."""
    import kandinsky22

    name = "DPMSolverMultistepScheduler"
    ref = diffusers.KandinskyV22Img2ImgPipeline(
        unet=ref.unet, movq=ref.movq, scheduler=getattr(diffusers, name).from_config(ref.scheduler.config)
    )
    ours = KandinskyV22Img2ImgPipeline(
        unet=ours.unet, movq=ours.movq, scheduler=getattr(kandinsky22, name).from_config(ours.scheduler.config)
    )
    for pipe in (ref, ours):
        pipe.set_progress_bar_config(disable=True)
    kwargs = {**_embeds(), "image": _image(4), "height": 64, "width": 64, "num_inference_steps": 8, "strength": 0.5}
    kwargs["output_type"] = "np"
    _close(ours(**kwargs, generator=_seed()).images, ref(**kwargs, generator=_seed()).images)


# ---------------------------------------------------------------------------------------------------------------------
# Fixes
# ---------------------------------------------------------------------------------------------------------------------


def test_non_square_keeps_orientation(ref, ours):
    """The reference resizes to (height=width, width=height): asking it for 128x64 gives what we give for 64x128."""
    kwargs = {**_embeds(), "image": _image(1, (40, 90)), "num_inference_steps": 4, "strength": 0.5}
    kwargs["output_type"] = "np"
    out = ours(**kwargs, height=64, width=128, generator=_seed()).images
    assert out.shape == (1, 64, 128, 3)
    _close(out, ref(**kwargs, height=128, width=64, generator=_seed()).images)


@pytest.mark.parametrize("mode", ["RGBA", "L"])
def test_rgba_and_gray_inputs(ref, ours, mode):
    image = _image(2).convert(mode)
    kwargs = {**_embeds(), "height": 64, "width": 64, "num_inference_steps": 4, "strength": 0.5}
    kwargs["output_type"] = "np"
    expected = ref(**kwargs, image=image.convert("RGB"), generator=_seed()).images  # the reference needs RGB
    _close(ours(**kwargs, image=image, generator=_seed()).images, expected)


def test_numpy_and_latent_inputs_equal_pil(ours):
    image = _image(3)
    kwargs = {**_embeds(), "height": 64, "width": 64, "num_inference_steps": 4, "strength": 0.5}
    kwargs["output_type"] = "latent"
    from_pil = ours(**kwargs, image=image, generator=_seed()).images
    assert torch.equal(ours(**kwargs, image=np.asarray(image), generator=_seed()).images, from_pil)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255 * 2 - 1).permute(2, 0, 1)[None]
    latents = ours.movq.encode(pixels).latents
    assert torch.equal(ours(**kwargs, image=latents, generator=_seed()).images, from_pil)


@pytest.mark.parametrize(("steps", "strength"), [(10, 0.05), (3, 0.0)])
def test_strength_without_steps_raises(ours, steps, strength):
    with pytest.raises(ValueError, match=r"`strength`=.* leaves no denoising step"):
        ours(**_embeds(), image=_image(), height=64, width=64, num_inference_steps=steps, strength=strength)


def test_callback_on_step_end_replaces_latents(ours):
    seen = []

    def zero_last(pipe, i, t, tensors):  # 6 steps at strength 0.5 run 3: i = 0, 1, 2
        seen.append((i, sorted(tensors)))
        return {"latents": torch.zeros_like(tensors["latents"])} if i == 2 else {}

    out = ours(
        **_embeds(),
        image=_image(),
        height=64,
        width=64,
        num_inference_steps=6,
        strength=0.5,
        output_type="latent",
        callback_on_step_end=zero_last,
        callback_on_step_end_tensor_inputs=["latents", "image_embeds"],
        generator=_seed(),
    ).images
    assert seen == [(i, ["image_embeds", "latents"]) for i in range(3)]
    assert out.shape == (1, 4, 32, 32) and out.abs().sum() == 0


# ---------------------------------------------------------------------------------------------------------------------
# Input errors
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"strength": 1.5}, r"`strength` must be a number in \[0, 1\], got 1.5"),
        ({"strength": "0.3"}, r"`strength` must be a number in \[0, 1\], got '0.3'"),
        ({"image": [_image(0), _image(1), _image(2)]}, "`image` has 3 items but there are 2 image embeddings"),
        ({"image": "photo.png"}, "`image` must be a PIL image, a numpy array, a torch tensor or a list of them"),
        ({"image": torch.zeros(1, 4, 16, 16)}, r"size mismatch: `image` is 16x16; expected 32x32"),
        ({"image": torch.full((1, 3, 64, 64), 2.0)}, r"`image` values must lie in \[0, 1\] \(a tensor with no neg"),
        ({"image": torch.full((1, 3, 64, 64), -2.0)}, r"`image` values must lie in \[-1, 1\]"),
        ({"callback_on_step_end_tensor_inputs": ["noise"]}, "may only name"),
        ({"guidance_scale": float("nan")}, r"`guidance_scale` must be a finite number, got nan"),
        ({"num_inference_steps": 1000, "strength": 1.0}, r"`num_inference_steps`=1000 gives timestep 1000"),
        (
            {"image": [torch.zeros(1, 4, 32, 32), torch.zeros(1, 4, 16, 16)]},
            r"the items of `image` have different sizes",
        ),
    ],
)
def test_bad_inputs(ours, change, match):
    kwargs = {**_embeds(2), "image": _image(), "height": 64, "width": 64, "num_inference_steps": 10, **change}
    with pytest.raises(ValueError, match=match):
        ours(**kwargs)
