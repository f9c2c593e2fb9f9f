"""The resnets' residual kernel (``models.residual``): ``x + h + bias (+ bias2)`` in one pass, with an upsampling
resnet's input read at half resolution, against float64, and the resnets (UNet and MoVQ) that use it against their
PyTorch form. On a machine without CUDA the kernel runs under Triton's interpreter (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from kandinsky22.models import norms, residual  # noqa: E402
from kandinsky22.models.layers import ResnetBlock2D  # noqa: E402
from kandinsky22.models.movq import ResnetBlock, group_norm, spatial_norm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("true_fp32")  # on a GPU: fp32 comparisons with PyTorch's form (tests/conftest.py)


def channels_last(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(DEVICE, dtype).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("two_biases", [False, True])
@pytest.mark.parametrize("upsample", [False, True])
@pytest.mark.parametrize("batch, channels, height, width", [(2, 64, 6, 8), (1, 96, 4, 10), (3, 40, 2, 2)])
def test_matches_float64(batch, channels, height, width, two_biases, upsample):
    """Channels over one 64-channel block and not a multiple of it, pixels not a whole tile, 1x1 inputs upsampled."""
    h = channels_last(batch, channels, height, width, seed=1)
    x = channels_last(batch, channels, height // 2 if upsample else height, width // 2 if upsample else width)
    bias = torch.randn(channels, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    bias2 = torch.randn(channels, generator=torch.Generator().manual_seed(3)).to(DEVICE) if two_biases else None
    got = residual.add_residual(x, h, bias, bias2, upsample=upsample)
    assert got.is_contiguous(memory_format=torch.channels_last) and got.dtype == h.dtype
    wide = F.interpolate(x.double(), scale_factor=2.0, mode="nearest") if upsample else x.double()
    want = wide + h.double() + bias.double().view(-1, 1, 1)
    if two_biases:
        want = want + bias2.double().view(-1, 1, 1)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)
    # PyTorch's ops where the kernel does not apply (contiguous NCHW inputs): the same sum
    fallback = residual.add_residual(x.contiguous(), h.contiguous(), bias, bias2, upsample=upsample)
    assert fallback.is_contiguous()
    torch.testing.assert_close(fallback.double(), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_sums_in_fp32_and_rounds_once(dtype):
    """The exact sum rounded once to the dtype, within one unit in its last place (Triton's interpreter may truncate
    where a GPU rounds to nearest); PyTorch's ops round after each of their passes."""
    h = channels_last(2, 32, 4, 4, dtype=dtype, seed=1, scale=100.0)
    x = channels_last(2, 32, 4, 4, dtype=dtype, scale=100.0)
    bias = torch.full((32,), 0.3, device=DEVICE, dtype=dtype)
    got = residual.add_residual(x, h, bias, bias)
    assert got.dtype == dtype
    want = x.double() + h.double() + 2 * bias.double().view(-1, 1, 1)
    ulp = torch.finfo(dtype).eps * want.abs().clamp_min(1.0)
    assert ((got.double() - want).abs() <= ulp).all()


def test_bad_shapes_are_clear_errors():
    h, bias = channels_last(2, 16, 4, 6), torch.zeros(16, device=DEVICE)
    with pytest.raises(ValueError, match=r"x must be \(2, 16, 2, 3\) for h of \(2, 16, 4, 6\); got \(2, 16, 4, 6\)"):
        residual.add_residual(h, h, bias, upsample=True)
    with pytest.raises(ValueError, match=r"x must be \(2, 16, 4, 6\)"):
        residual.add_residual(channels_last(2, 16, 2, 3), h, bias)
    with pytest.raises(ValueError, match=r"bias2 must be \(16,\); got \(8,\)"):
        residual.add_residual(h, h, bias, bias[:8])


def spy_on_residual(monkeypatch):
    """Record each ``add_residual`` call's biases and upsample flag, as the resnet modules call it."""
    calls = []
    real = residual.add_residual

    def spy(x, h, bias, bias2=None, upsample=False):
        calls.append((bias, bias2, upsample))
        return real(x, h, bias, bias2, upsample)

    monkeypatch.setattr(residual, "add_residual", spy)
    return calls


@pytest.mark.parametrize(
    "in_channels, resample", [(32, None), (16, None), (32, "up"), (32, "down")], ids=["same", "shortcut", "up", "down"]
)
def test_unet_resnet_folds_its_biases_into_the_residual_kernel(in_channels, resample, monkeypatch):
    """With the Triton norms, conv2 and the shortcut run without their biases and the residual kernel adds them (and
    upsamples the input of an "up" resnet as it reads it): the output is PyTorch's form's. A hook on conv2 (which a
    bias-less call would skip) keeps the plain form."""
    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels, 32, temb_channels=16, groups=8, resample=resample).to(DEVICE).eval()
    block.requires_grad_(False).to(memory_format=torch.channels_last)
    with torch.no_grad():
        for p in block.parameters():  # biases far from zero: a lost one shows
            p.add_(0.5 * torch.randn_like(p))
    x = channels_last(2, in_channels, 6, 8)
    modulation = block.time_modulation(torch.randn(2, 16, device=DEVICE))
    calls = spy_on_residual(monkeypatch)
    with torch.no_grad():
        want = block(x, modulation)  # PyTorch's norms: no fold
        assert calls == []
        norms.use_triton_norms(block)
        got = block(x, modulation)
        shortcut = block.conv_shortcut.bias if block.conv_shortcut is not None else None
        assert calls == [(block.conv2.bias, shortcut, resample == "up")]
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        block.conv2.register_forward_hook(lambda module, args, out: None)
        calls.clear()
        torch.testing.assert_close(block(x, modulation), want, atol=2e-5, rtol=1e-5)
        assert calls == []


@pytest.mark.parametrize("decoder", [True, False], ids=["decoder", "encoder"])
@pytest.mark.parametrize("in_channels", [64, 32])
def test_movq_resnet_folds_its_biases_into_the_residual_kernel(in_channels, decoder, monkeypatch):
    """A MoVQ resnet with the Triton norms: conv1's bias into the second norm (a decoder's spatial norm, an encoder's
    group norm), conv2's and the shortcut's into the residual kernel; the output is PyTorch's form's."""
    torch.manual_seed(0)
    block = ResnetBlock(in_channels, 64, spatial_norm(4) if decoder else group_norm(32)).to(DEVICE).eval()
    block.requires_grad_(False).to(memory_format=torch.channels_last)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.5 * torch.randn_like(p))
    x, zq = channels_last(1, in_channels, 8, 8), channels_last(1, 4, 2, 2, seed=4) if decoder else None
    calls = spy_on_residual(monkeypatch)
    in_biases = []
    real = norms.group_norm_nhwc

    def spy(*args, **kwargs):
        in_biases.append(kwargs.get("in_bias"))
        return real(*args, **kwargs)

    monkeypatch.setattr("kandinsky22.models.movq.group_norm_nhwc", spy)  # the decoder's spatial norms
    monkeypatch.setattr("kandinsky22.models.norms.group_norm_nhwc", spy)  # the encoder's, through norm_act
    with torch.no_grad():
        want = block(x, zq)
        norms.use_triton_norms(block)
        got = block(x, zq)
    shortcut = block.conv_shortcut.bias if block.conv_shortcut is not None else None
    assert calls == [(block.conv2.bias, shortcut, False)]
    assert in_biases == [None, block.conv1.bias]  # conv1's bias into the second spatial norm
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_a_bias_that_records_gradients_is_not_folded(monkeypatch):
    """Training a resnet's biases with frozen norms: the Triton norms run, but the biases stay in their convolutions,
    so that their gradients are PyTorch's."""
    torch.manual_seed(0)
    block = ResnetBlock2D(16, 32, temb_channels=16, groups=8).to(DEVICE).to(memory_format=torch.channels_last)
    block.requires_grad_(False)
    biases = [block.conv1.bias, block.conv2.bias, block.conv_shortcut.bias]
    for bias in biases:
        bias.requires_grad_(True)
    x = channels_last(2, 16, 6, 8)
    modulation = tuple(t.detach() for t in block.time_modulation(torch.randn(2, 16, device=DEVICE)))
    block(x, modulation).square().sum().backward()
    want = [bias.grad.clone() for bias in biases]
    for bias in biases:
        bias.grad = None
    norms.use_triton_norms(block)
    calls = spy_on_residual(monkeypatch)
    block(x, modulation).square().sum().backward()
    assert calls == []
    for bias, grad in zip(biases, want):
        torch.testing.assert_close(bias.grad, grad, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_kernel_runs_on_the_inputs_gpu_not_the_current_one():
    h, x = channels_last(2, 64, 4, 6, seed=1).to("cuda:1"), channels_last(2, 64, 2, 3).to("cuda:1")
    bias = torch.randn(64, device="cuda:1")
    assert torch.cuda.current_device() == 0
    got = residual.add_residual(x, h, bias, upsample=True)
    want = F.interpolate(x.cpu(), scale_factor=2.0, mode="nearest") + h.cpu() + bias.cpu().view(-1, 1, 1)
    torch.testing.assert_close(got.cpu(), want, atol=1e-6, rtol=1e-6)
