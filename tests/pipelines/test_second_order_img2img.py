"""Img2img with a second-order sampler whose start index is odd (the second evaluation of a step).

The reference's K2.2 img2img slices the 2n − 1 timesteps at ``int(steps · strength)`` without multiplying by the order.
At an odd index its Heun looks the (doubled) timestep up and starts one entry later than the timesteps it hands the
UNet — every UNet call then gets the previous entry's timestep — and runs one evaluation past the table, which divides
by σ = 0: NaN latents. We start at that later entry for both: the reference's result when its ``get_timesteps`` is
made to do the same (with the fixes of ``test_swapped_schedulers``: ``scale_model_input``, no generator for Heun).
Its DPM++ SDE, which takes the first evaluation as a predictor whatever its index, steps by zero there and ends in NaN
too.
"""

from __future__ import annotations

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
from test_swapped_schedulers import _with_our_fixes

import kandinsky22

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Should have t:UserWarning"),  # the reference's DPM++ SDE (torchsde clamps)
]


@pytest.mark.parametrize(
    ("name", "options"),
    # DPM++ SDE with a fixed Brownian path (the reference's is seeded from the global RNG otherwise); from an odd
    # index the reference's takes its steps out of phase, with zero length, to NaN latents as well
    [("HeunDiscreteScheduler", {}), ("DPMSolverSDEScheduler", {"noise_sampler_seed": 5})],
)
def test_second_order_img2img_from_an_odd_index_gives_the_references_finite_latents(
    decoder_repo, name, options
) -> None:
    ours = kandinsky22.KandinskyV22Img2ImgPipeline.from_pretrained(decoder_repo)
    ref = diffusers.KandinskyV22Img2ImgPipeline.from_pretrained(decoder_repo)
    ours.scheduler = getattr(kandinsky22, name).from_config(ours.scheduler.config, **options)
    ref.scheduler = getattr(diffusers, name).from_config(ref.scheduler.config, **options)
    hook = _with_our_fixes(ref)  # scale_model_input, and no generator for the reference's step
    for pipe in (ours, ref):
        pipe.set_progress_bar_config(disable=True)
    image = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    kwargs = {
        "image_embeds": torch.randn(1, 32, generator=torch.Generator().manual_seed(10)),
        "negative_image_embeds": torch.randn(1, 32, generator=torch.Generator().manual_seed(11)),
        "image": image,
        "height": 64,
        "width": 64,
        "num_inference_steps": 6,
        "strength": 0.5,  # int(6 · 0.5) = 3: the reference starts at index 6 - 3 = 3 of 11
        "output_type": "latent",
        "callback_steps": 1,  # the reference fails with `callback` alone (reference-behaviour §1)
    }
    calls = []
    get_timesteps = ref.get_timesteps

    def from_the_next_entry(num_inference_steps, strength, device):
        timesteps, count = get_timesteps(num_inference_steps, strength, device)
        ref.scheduler.set_begin_index(len(ref.scheduler.timesteps) - len(timesteps) + 1)
        return timesteps[1:], count

    try:
        expected_nan = ref(**kwargs, generator=torch.Generator().manual_seed(0)).images
        ref.get_timesteps = from_the_next_entry
        expected = ref(**kwargs, generator=torch.Generator().manual_seed(0)).images
    finally:
        hook.remove()
    got = ours(
        **kwargs, generator=torch.Generator().manual_seed(0), callback=lambda i, t, x: calls.append((i, float(t)))
    ).images
    assert expected_nan.isnan().all()
    # Ours: table entries 4..10, i.e. steps (σ-grid 2 → 3, 3 → 4, 4 → 5) and the last Euler step to 0
    assert [t for _, t in calls] == ours.scheduler.timesteps[4:].tolist() and len(calls) == 7
    assert [i for i, _ in calls] == [0, 0, 1, 1, 2, 2, 3]  # callback(i // order)
    assert torch.isfinite(got).all()
    assert (got - expected).abs().max() <= 1e-4 + 1e-5 * expected.abs().max()
