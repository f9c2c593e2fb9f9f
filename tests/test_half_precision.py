"""Half precision (fp16 / bf16): our models are as accurate as the reference's in the same dtype.

The same image for the same seed cannot mean bit-equal in half precision (any change in the order of operations moves
the last bit), so the property checked is the one that matters: with the same weights and inputs, our output in
fp16 or bf16 is on average no farther from the fp32 result than the reference's output in that dtype is (within
10 %), and ours and the reference's agree with each other to within twice that rounding noise. A systematic
difference — a norm, a softmax or an embedding computed in a different precision, a cast in the wrong place — shows
up as an error above the reference's own (computing the UNet's timestep embedding in fp16 gives 1.3–1.5× in fp16).

On these tiny random models (CPU, mean |error| over the output): UNet fp16 ours 5.6e-4 vs reference 5.7e-4, bf16
4.2e-3 vs 4.4e-3; MoVQ decode fp16 1.02e-3 vs 1.01e-3, bf16 7.9e-3 vs 8.3e-3 (its norms on the latents); the prior's
are equal (also through its prompt context, either form). With the convolutions after an upsampling in their phase
form everywhere (``UpsampleConv2d``; its 2x2 kernels are sums of the 3x3 taps, summed in fp32 and rounded once): UNet
fp16 5.5e-4, bf16 4.1e-3; MoVQ fp16 1.06e-3 (1.05× the reference's), bf16 8.2e-3.
"""

from __future__ import annotations

import tempfile

import pytest
import test_movq as movq_cases
import test_prior as prior_cases
import test_unet as unet_cases
import torch

from kandinsky22.models.movq import VQModel
from kandinsky22.models.prior import PriorTransformer
from kandinsky22.models.unet import UNet2DConditionModel

pytest.importorskip("diffusers")

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
SLACK = 1.1  # ours' mean half-precision error may exceed the reference's by this factor


def errors(ours_fn, ref_fn, ours: torch.nn.Module, ref: torch.nn.Module, dtype: torch.dtype) -> dict[str, float]:
    """Mean |·| of (ours in dtype − fp32), (reference in dtype − fp32) and (ours − reference) in dtype (maxima too,
    for the failure message)."""
    with torch.no_grad():
        truth = ref_fn(torch.float32).float()
        ours.to(dtype), ref.to(dtype)
        try:
            got, expected = ours_fn(dtype).float(), ref_fn(dtype).float()
        finally:
            ours.float(), ref.float()
    return {
        "ours": (got - truth).abs().mean().item(),
        "reference": (expected - truth).abs().mean().item(),
        "between": (got - expected).abs().mean().item(),
        "ours_max": (got - truth).abs().max().item(),
        "reference_max": (expected - truth).abs().max().item(),
    }


def check(err: dict[str, float]) -> None:
    assert err["reference"] > 0, err  # the dtype did round: the comparison has something to compare
    assert err["ours"] <= SLACK * err["reference"], err
    assert err["between"] <= 2 * err["reference"], err


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("variant", list(unet_cases.VARIANTS))
def test_unet(variant, dtype, upsampling):
    config = unet_cases.VARIANTS[variant]
    ref = unet_cases.build_reference(config)
    with tempfile.TemporaryDirectory() as folder:
        ref.save_pretrained(folder)
        ours = UNet2DConditionModel.from_pretrained(folder)
    sample, cond = unet_cases.make_inputs(config, batch=2, height=16, width=16)
    timestep = torch.tensor(500)

    def inputs(dt):
        return sample.to(dt), {k: v.to(dt) for k, v in cond.items()}

    def ours_fn(dt):
        x, c = inputs(dt)
        return ours(x, timestep, added_cond_kwargs=c).sample

    def ref_fn(dt):
        x, c = inputs(dt)
        return ref(x, timestep, None, added_cond_kwargs=c).sample

    check(errors(ours_fn, ref_fn, ours, ref, dtype))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_movq_decode(dtype, tmp_path, upsampling):
    ref = movq_cases.reference_model(movq_cases.FOUR_LEVEL, tmp_path)
    ours = VQModel.from_pretrained(tmp_path)
    latents = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(2))

    def ours_fn(dt):
        return ours.decode(latents.to(dt), force_not_quantize=True).sample

    def ref_fn(dt):
        return ref.decode(latents.to(dt), force_not_quantize=True).sample

    check(errors(ours_fn, ref_fn, ours, ref, dtype))


@pytest.mark.parametrize("context", [None, "kv", "tokens"], ids=["direct", "context-kv", "context-tokens"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_prior(dtype, context, tmp_path):
    # Directly, and as the loop calls it: the prompt's context prepared once, in either form (PriorContext).
    torch.manual_seed(0)
    import diffusers

    ref = diffusers.PriorTransformer(**prior_cases.DEEP).eval()
    prior_cases.randomize(ref)
    ref.save_pretrained(tmp_path)
    ours = PriorTransformer.from_pretrained(tmp_path)
    inputs = prior_cases.make_inputs()

    def cast(dt):
        return {k: v.to(dt) if v.is_floating_point() else v for k, v in inputs.items()}

    def ours_fn(dt):
        if context is None:
            return ours(timestep=500, **cast(dt)).predicted_image_embedding
        x, *text = cast(dt).values()
        prepared = ours.prepare_context(*text, timesteps=torch.tensor([999, 500]), cache_prompt=context == "kv")
        return ours(x, 12345, context=prepared.at(1)).predicted_image_embedding

    def ref_fn(dt):
        return ref(timestep=500, **cast(dt)).predicted_image_embedding

    check(errors(ours_fn, ref_fn, ours, ref, dtype))
