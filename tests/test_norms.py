"""The opt-in Triton GroupNorm (``kandinsky22.models.norms``): its kernels against PyTorch's norm and a float64
reference, the models with it against the reference library, and when it applies. Without a GPU the kernels run
under Triton's interpreter (slow: the shapes stay small)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from test_movq import FOUR_LEVEL, reference_model
from test_unet import THREE_LEVELS, build_reference, make_inputs
from torch import nn

from kandinsky22.models import movq, norms
from kandinsky22.models.movq import VQModel
from kandinsky22.models.unet import UNet2DConditionModel

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # else under Triton's interpreter (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("true_fp32")  # on a GPU: fp32 comparisons with the CPU (tests/conftest.py)


@pytest.fixture(params=["three_kernels", "one_kernel"])
def path(request, monkeypatch):
    """Both ways through the kernels: statistics, finalize and apply, or the one kernel of small groups."""
    monkeypatch.setattr(norms, "_SMALL_GROUP", 0 if request.param == "three_kernels" else 10**9)
    monkeypatch.setattr(norms, "_PLANS", {})  # plans made under the other path's threshold
    return request.param


def expected(x, groups, weight, bias, eps, scale_1=None, shift=None, silu=False):
    """The norm and what follows, in float64."""
    h = F.group_norm(x.double(), groups, weight.double(), bias.double(), eps)
    if scale_1 is not None:
        h = h * scale_1.double() + shift.double()
    return F.silu(h) if silu else h


def inputs(batch, channels, height, width, dtype=torch.float32, offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, height, width, generator=g) * 2 + offset
    weight, bias = 1 + 0.5 * torch.randn(channels, generator=g), 0.5 * torch.randn(channels, generator=g)
    x = x.to(DEVICE, dtype).contiguous(memory_format=torch.channels_last)
    return x, weight.to(DEVICE, dtype), bias.to(DEVICE, dtype)


@pytest.mark.parametrize(
    "batch, channels, height, width, groups",
    [
        (2, 64, 8, 8, 32),  # 2 channels per group, one tile
        (1, 96, 7, 5, 32),  # 3 per group (not a power of two), pixels not a whole tile
        (2, 48, 20, 15, 4),  # 12 per group; several statistics parts
        (3, 160, 3, 3, 8),  # channels over one 64-channel block, 20 per group across two blocks
    ],
)
@pytest.mark.parametrize("modulated", [False, True])
def test_matches_float64_reference(batch, channels, height, width, groups, modulated, path):
    x, weight, bias = inputs(batch, channels, height, width)
    g = torch.Generator().manual_seed(5)
    # as the UNet makes them: views of one projection (batch stride 2C); the shift here shared by the batch
    scale_1, _ = (
        (1 + 0.3 * torch.randn(batch, 2 * channels, generator=g)).to(DEVICE).unflatten(1, (2, -1, 1, 1)).unbind(1)
    )
    shift = torch.randn(1, channels, 1, 1, generator=g).to(DEVICE)
    scale_1, shift = (scale_1, shift) if modulated else (None, None)
    got = norms.group_norm_nhwc(x, groups, weight, bias, 1e-5, scale_1, shift, silu=modulated)
    assert got.dtype == x.dtype and got.is_contiguous(memory_format=torch.channels_last)
    want = expected(x, groups, weight, bias, 1e-5, scale_1, shift, silu=modulated)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("modulated", [False, True])
def test_input_bias_is_normalised_with_x(modulated, path, monkeypatch):
    """``in_bias`` (a convolution's bias left out of its output): the norm of ``x + in_bias``, its statistics and its
    output, on both paths and with few or many statistics parts per sample."""
    x, weight, bias = inputs(2, 64, 9, 11, offset=1.0)
    g = torch.Generator().manual_seed(11)
    in_bias = (3 * torch.randn(64, generator=g)).to(DEVICE)  # far from x's spread: it moves the group's statistics
    scale_1, shift = (1 + 0.3 * torch.randn(2, 64, 1, 1, generator=g)).to(DEVICE), torch.randn(2, 64, 1, 1).to(DEVICE)
    scale_1, shift = (scale_1, shift) if modulated else (None, None)
    want = expected(x + in_bias.view(-1, 1, 1), 16, weight, bias, 1e-5, scale_1, shift, silu=True)
    for programs in (2, 2048):
        monkeypatch.setattr(norms, "_STATS_PROGRAMS", programs)
        monkeypatch.setattr(norms, "_PLANS", {})
        got = norms.group_norm_nhwc(x, 16, weight, bias, 1e-5, scale_1, shift, silu=True, in_bias=in_bias)
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
    # the same call without it: another plan, the plain norm
    plain = norms.group_norm_nhwc(x, 16, weight, bias, 1e-5, scale_1, shift, silu=True)
    want = expected(x, 16, weight, bias, 1e-5, scale_1, shift, silu=True)
    torch.testing.assert_close(plain.double(), want, atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"in_bias must be \(64,\)"):
        norms.group_norm_nhwc(x, 16, weight, bias, 1e-5, in_bias=in_bias[:32])


def test_resnet_folds_its_first_bias_into_its_second_norm(path, monkeypatch):
    """With the Triton norms, a resnet's conv1 runs without its bias and norm2 adds it: the block's output is the one
    PyTorch's norms give, the bias passed once per call; a hook on conv1 (which a bias-less call would skip) keeps
    the plain call."""
    from kandinsky22.models.layers import ResnetBlock2D

    torch.manual_seed(0)
    block = ResnetBlock2D(32, 64, temb_channels=16).to(DEVICE).eval().requires_grad_(False)
    block.to(memory_format=torch.channels_last)
    x = torch.randn(2, 32, 6, 7, device=DEVICE).contiguous(memory_format=torch.channels_last)
    modulation = block.time_modulation(torch.randn(2, 16, device=DEVICE))
    with torch.no_grad():
        want = block(x, modulation)  # PyTorch's norms
        norms.use_triton_norms(block)
        seen = []
        real = norms.group_norm_nhwc

        def spy(*args, **kwargs):
            seen.append(kwargs.get("in_bias"))
            return real(*args, **kwargs)

        monkeypatch.setattr(norms, "group_norm_nhwc", spy)
        got = block(x, modulation)
        assert seen == [None, block.conv1.bias]
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        block.conv1.register_forward_hook(lambda module, args, out: None)
        seen.clear()
        torch.testing.assert_close(block(x, modulation), got, atol=2e-5, rtol=1e-5)
        assert seen == [None, None]


def test_many_parts_and_loops(monkeypatch):
    """Few statistics programs (each loops over many tiles) and a small finalize tile (it loops over the parts)."""
    monkeypatch.setattr(norms, "_SMALL_GROUP", 0)
    monkeypatch.setattr(norms, "_STATS_PROGRAMS", 2)
    monkeypatch.setattr(norms, "_PLANS", {})
    x, weight, bias = inputs(1, 32, 40, 36, offset=3.0)
    few = norms.group_norm_nhwc(x, 8, weight, bias, 1e-6)
    monkeypatch.setattr(norms, "_STATS_PROGRAMS", 4096)
    monkeypatch.setattr(norms, "_FINALIZE_TILE", 8)
    norms._PLANS.clear()  # the plan of the same call made under the settings above
    many = norms.group_norm_nhwc(x, 8, weight, bias, 1e-6)
    want = expected(x, 8, weight, bias, 1e-6)
    for got in (few, many):
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)


def test_large_mean_is_stable(path):
    """Activations far from zero (mean 1,000 × their spread): the variance comes from deviations, not E[x²] − E[x]²."""
    x, weight, bias = inputs(2, 32, 12, 12, offset=2000.0)
    got = norms.group_norm_nhwc(x, 8, weight, bias, 1e-5)
    torch.testing.assert_close(got.double(), expected(x, 8, weight, bias, 1e-5), atol=5e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_rounds_once(dtype, path):
    """In half precision the result is the float64 one rounded once to the dtype (within one unit in the last place);
    PyTorch's ops round after the norm, the modulation and the SiLU each."""
    x, weight, bias = inputs(2, 64, 6, 10, dtype=dtype)
    scale_1 = torch.full((2, 64, 1, 1), 1.5, device=DEVICE, dtype=dtype)
    shift = torch.full((2, 64, 1, 1), -0.25, device=DEVICE, dtype=dtype)
    got = norms.group_norm_nhwc(x, 32, weight, bias, 1e-5, scale_1, shift, silu=True)
    assert got.dtype == dtype
    want = expected(x, 32, weight, bias, 1e-5, scale_1, shift, silu=True)
    ulp = torch.finfo(dtype).eps * want.abs().clamp_min(1.0)
    assert ((got.double() - want).abs() <= ulp).all()


@pytest.mark.parametrize("factors", [(1, 1), (2, 4)])
def test_spatial_modulation_matches_float64_reference(factors):
    """MoVQ's spatial norm: scale and shift maps at the latents' size, each pixel repeated over a block."""
    fh, fw = factors
    x, weight, bias = inputs(2, 64, 3 * fh, 5 * fw)
    g = torch.Generator().manual_seed(7)
    scale, shift = (torch.randn(2, 64, 3, 5, generator=g).to(DEVICE) for _ in range(2))
    got = norms.group_norm_nhwc(x, 32, weight, bias, 1e-6, silu=True, spatial=(scale, shift))
    assert got.is_contiguous(memory_format=torch.channels_last)
    big = [t.repeat_interleave(fh, dim=2).repeat_interleave(fw, dim=3) for t in (scale, shift)]
    want = expected(x, 32, weight, bias, 1e-6, *big, silu=True)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="spatial scale and shift"):
        four_rows = torch.zeros(2, 64, 4, 5, device=DEVICE)  # 4 does not divide the 3·fh rows
        norms.group_norm_nhwc(x, 32, weight, bias, 1e-6, spatial=(four_rows, four_rows))
    # with a convolution's bias folded in (MoVQ's resnets' second norms)
    in_bias = (3 * torch.randn(64, generator=g)).to(DEVICE)
    got = norms.group_norm_nhwc(x, 32, weight, bias, 1e-6, silu=True, spatial=(scale, shift), in_bias=in_bias)
    want = expected(x + in_bias.view(-1, 1, 1), 32, weight, bias, 1e-6, *big, silu=True)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("triton", [False, True])
@pytest.mark.parametrize("size", [8, 6], ids=["blocks", "resized"])
def test_spatial_norm_adds_an_input_bias(size, triton):
    """``SpatialNorm(x, zq, in_bias=b)`` is its norm of ``x + b``: on the kernels or PyTorch's ops, and where the
    latents are repeated over blocks (8 = 4 × 2) or resized to a size that is not a power-of-two multiple of theirs
    (6 = 3 × 2)."""
    torch.manual_seed(0)
    layer = movq.SpatialNorm(64, 4).to(DEVICE).requires_grad_(False)
    with torch.no_grad():
        layer.norm_layer.weight.add_(torch.randn(64, device=DEVICE))
        layer.norm_layer.bias.add_(torch.randn(64, device=DEVICE))
    norms.use_triton_norms(layer, enabled=triton)
    x = inputs(1, 64, size, size)[0]
    zq = torch.randn(1, 4, 2, 2).to(DEVICE).contiguous(memory_format=torch.channels_last)
    in_bias = 3 * torch.randn(64, device=DEVICE)
    with torch.no_grad():
        got = layer(x, zq, silu=True, in_bias=in_bias)
        norms.use_triton_norms(layer, enabled=False)
        want = layer(x + in_bias.view(-1, 1, 1), zq, silu=True)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_norm_act_uses_the_kernels_only_where_they_apply(monkeypatch):
    calls = []
    real = norms.group_norm_nhwc
    monkeypatch.setattr(norms, "group_norm_nhwc", lambda *a, **k: calls.append(1) or real(*a, **k))
    norm = nn.GroupNorm(4, 16).to(DEVICE)
    x = torch.randn(2, 16, 4, 4, device=DEVICE)
    last = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        plain = norms.norm_act(norm, last, silu=True)  # not switched on
        assert norms.use_triton_norms(norm) == 1
        nchw = norms.norm_act(norm, x, silu=True)  # PyTorch's layout: PyTorch's norm
        fused = norms.norm_act(norm, last, silu=True)
    assert len(calls) == 1
    with_grad = norms.norm_act(norm, last, silu=True)  # autograd on the weights: PyTorch's, which has a backward
    assert len(calls) == 1 and with_grad.requires_grad
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nchw, plain, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        elsewhere = nn.GroupNorm(4, 16).to("meta")  # as under sequential offloading: weights not where x is
        norms.use_triton_norms(elsewhere)
        assert norms.uses_triton(norm, last) and not norms.uses_triton(elsewhere, last)
    assert norms.use_triton_norms(norm, enabled=False) == 1
    with torch.no_grad():
        norms.norm_act(norm, last)
    assert len(calls) == 1


def test_use_triton_norms_without_triton(monkeypatch):
    monkeypatch.setattr(norms, "triton_available", lambda: False)
    with pytest.raises(ValueError, match="triton"):
        norms.use_triton_norms(nn.GroupNorm(2, 4))
    assert norms.use_triton_norms(nn.GroupNorm(2, 4), enabled=False) == 1  # switching off needs nothing


def test_bad_modulation_is_a_clear_error():
    x, weight, bias = inputs(2, 8, 4, 4)
    with pytest.raises(ValueError, match="scale_1 must be"):
        norms.group_norm_nhwc(x, 4, weight, bias, 1e-5, torch.ones(3, 8, 1, 1), torch.zeros(3, 8, 1, 1))
    with pytest.raises(ValueError, match="come together"):
        norms.group_norm_nhwc(x, 4, weight, bias, 1e-5, torch.ones(2, 8, 1, 1), None)
    with pytest.raises(ValueError, match="do not split"):
        norms.group_norm_nhwc(x, 3, weight, bias, 1e-5)


class FakeKernel:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **constants)`` records a dispatched launch and returns a
    compiled kernel whose ``[grid](*values)`` records a direct one, reading three grid sizes as Triton's does (``fail``:
    raises TypeError as a Triton whose compiled kernels take other arguments would)."""

    def __init__(self, fail=False, arg_names=("x", "out", "n", "BLOCK", "SILU")):
        self.log, self.fail, self.arg_names = [], fail, list(arg_names)
        kernel = self

        class Compiled:
            def __getitem__(self, grid):
                def direct(*values):
                    grid[0], grid[1], grid[2]  # noqa: B018  # Triton's compiled kernels read three sizes
                    if kernel.fail:
                        raise TypeError("function takes exactly 3 arguments (5 given)")
                    kernel.log.append(("direct", grid, values))

                return direct

        self.compiled = Compiled()

    def __getitem__(self, grid):
        def dispatch(*args, **constants):
            self.log.append(("dispatch", grid, args, constants))
            return self.compiled

        return dispatch


@pytest.fixture
def direct_launch(monkeypatch):
    """``norms._Launch`` as on a GPU, with fresh caches."""
    monkeypatch.setattr(norms, "_interpreting", lambda: False)
    monkeypatch.setattr(norms, "_LAUNCHERS", {})
    monkeypatch.setattr(norms, "_PLANS", {})
    monkeypatch.setattr(norms, "_direct_launch", True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def fake_launch(kernel):
    """A plan's launch of ``kernel`` (parameters x, out, n, BLOCK, SILU) on a (4, 2) grid, constants out of order."""
    return norms._Launch(kernel, (4, 2, 1), (7,), {"SILU": True, "BLOCK": 32}, tensors=2)


def test_repeated_launch_calls_the_compiled_kernel(direct_launch):
    kernel, x = FakeKernel(), torch.zeros(64)
    launch = fake_launch(kernel)
    launch(0, x, x)
    launch(0, x, x)
    assert [entry[0] for entry in kernel.log] == ["dispatch", "direct"]
    assert kernel.log[0][2:] == ((x, x, 7), {"SILU": True, "BLOCK": 32})
    assert kernel.log[1] == ("direct", (4, 2, 1), (x, x, 7, 32, True))  # the constants in the kernel's order


def test_a_new_alignment_or_device_is_dispatched(direct_launch):
    """What Triton specialises on besides the plan's key: a tensor's 16-byte alignment, and the device."""
    kernel, x = FakeKernel(), torch.zeros(64)
    launch = fake_launch(kernel)
    launch(0, x, x)
    launch(0, x[1:], x)  # 4 bytes in: not 16-byte aligned
    launch(1, x, x)  # another device
    assert [entry[0] for entry in kernel.log] == ["dispatch"] * 3
    launch(0, x[1:], x)  # as the second
    launch(0, x[4:], x)  # 16 bytes in: as the first
    assert [entry[0] for entry in kernel.log[3:]] == ["direct"] * 2


def test_direct_launch_that_raises_type_error_falls_back_for_good(direct_launch):
    kernel, x = FakeKernel(fail=True), torch.zeros(64)
    launch = fake_launch(kernel)
    for _ in range(3):
        launch(0, x, x)
    assert [entry[0] for entry in kernel.log] == ["dispatch"] * 3
    assert norms._direct_launch is False and norms._LAUNCHERS == {}


def test_norm_calls_launch_directly_what_their_first_call_dispatched(direct_launch, monkeypatch, path):
    """``group_norm_nhwc`` makes its launches' arguments once per distinct call (its plan): a repeated call passes
    Triton's compiled kernels exactly the values the first call's dispatch got, in the kernel's order. A misaligned
    tensor, which Triton compiles another variant for, and a new plan (another eps, another dtype) go through the
    dispatch first."""
    from kandinsky22.models import norm_kernels

    names = ("small", "stats", "finalize", "apply")
    kernels = {name: FakeKernel(arg_names=getattr(norm_kernels, name).arg_names) for name in names}
    monkeypatch.setattr(norms, "_kernels", lambda: type("Kernels", (), kernels))
    x, weight, bias = inputs(2, 64, 24, 20)
    scale_1 = torch.randn(2, 64, 1, 1, device=DEVICE)
    shift = torch.randn(2 * 64 + 1, device=DEVICE)[:-1].view(2, 64, 1, 1)  # at offset 0: 16-byte aligned
    misaligned = torch.randn(2 * 64 + 1, device=DEVICE)[1:].view(2, 64, 1, 1)  # 4 bytes in; same shape and strides
    for shift_now, eps in ((shift, 1e-5), (shift, 1e-5), (misaligned, 1e-5), (misaligned, 1e-5), (shift, 1e-6)):
        norms.group_norm_nhwc(x, 8, weight, bias, eps, scale_1, shift_now, silu=True)
    norms.group_norm_nhwc(x.double(), 8, weight, bias, 1e-5, scale_1, shift, silu=True)  # another dtype: a new plan
    used = [name for name in names if kernels[name].log]
    assert used == (["small"] if path == "one_kernel" else ["stats", "finalize", "apply"])
    assert len(norms._PLANS) == 3
    for name in used:
        log = kernels[name].log
        reads_shift = name in ("small", "finalize")
        kinds = (
            ["dispatch", "direct", "dispatch", "direct"] if reads_shift else ["dispatch", "direct", "direct", "direct"]
        )
        assert [entry[0] for entry in log] == [*kinds, "dispatch", "dispatch"]
        _, grid, args, constants = log[0]
        dispatched = (*args, *(constants[n] for n in kernels[name].arg_names[len(args) :]))
        _, direct_grid, direct = log[1]
        assert direct_grid == (*grid, 1, 1)[:3] and len(direct) == len(dispatched)
        for first, second in zip(dispatched, direct):
            if isinstance(first, torch.Tensor):  # the inputs themselves, or new buffers of the same layout
                assert second.shape == first.shape and second.stride() == first.stride()
                assert second.dtype == first.dtype
                assert (second is first) == any(first is t for t in (x, weight, bias, scale_1, shift))
            else:
                assert type(second) is type(first) and second == first


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton's compiled kernels run on a GPU")
def test_direct_launches_give_the_dispatched_results(path, monkeypatch):
    """The second call of each shape launches the compiled kernels directly: the same output as the first, dispatched
    call, to the bit."""
    monkeypatch.setattr(norms, "_LAUNCHERS", {})
    x, weight, bias = inputs(2, 64, 24, 20, dtype=torch.float16)
    scale_1, shift = (torch.randn(2, 64, 1, 1, device=DEVICE, dtype=torch.float16) for _ in range(2))
    first = norms.group_norm_nhwc(x, 8, weight, bias, 1e-5, scale_1, shift, silu=True)
    launchers = len(norms._LAUNCHERS)
    assert launchers == (1 if path == "one_kernel" else 3)
    second = norms.group_norm_nhwc(x, 8, weight, bias, 1e-5, scale_1, shift, silu=True)
    assert len(norms._LAUNCHERS) == launchers and norms._direct_launch
    torch.testing.assert_close(second, first, atol=0, rtol=0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_kernels_run_on_the_inputs_gpu_not_the_current_one():
    x, weight, bias = (t.to("cuda:1") for t in inputs(2, 64, 24, 20))
    assert torch.cuda.current_device() == 0
    got = norms.group_norm_nhwc(x, 8, weight, bias, 1e-5, silu=True)
    want = expected(x.cpu(), 8, weight.cpu(), bias.cpu(), 1e-5, silu=True)
    torch.testing.assert_close(got.cpu().double(), want, atol=2e-5, rtol=1e-5)


def test_unet_with_triton_norms_matches_reference(tmp_path, path):
    """Every norm of the UNet (resnets with their time modulation, attentions, the output norm) through the kernels,
    channels_last, against the reference library's model."""
    reference = build_reference(THREE_LEVELS)
    reference.save_pretrained(tmp_path)
    ours = UNet2DConditionModel.from_pretrained(tmp_path).to(DEVICE, memory_format=torch.channels_last)
    assert norms.use_triton_norms(ours) == sum(isinstance(m, nn.GroupNorm) for m in ours.modules())
    sample, cond = make_inputs(THREE_LEVELS, batch=2, height=8, width=12)
    timestep = torch.tensor([1, 999])
    with torch.no_grad():
        want = reference(sample, timestep, None, added_cond_kwargs=cond).sample
        got = ours(
            sample.to(DEVICE, memory_format=torch.channels_last),
            timestep.to(DEVICE),
            added_cond_kwargs={name: value.to(DEVICE) for name, value in cond.items()},
        )
    torch.testing.assert_close(got.sample.cpu(), want, atol=1e-4, rtol=1e-4)


def test_movq_decode_with_triton_norms_matches_reference(tmp_path, monkeypatch):
    """MoVQ's spatial norms through the kernels (the modulation and the SiLU folded in), channels_last."""
    spatial_calls = []
    real = movq.group_norm_nhwc
    monkeypatch.setattr(
        movq, "group_norm_nhwc", lambda *a, **k: spatial_calls.append(k["spatial"] is not None) or real(*a, **k)
    )
    reference = reference_model(FOUR_LEVEL, tmp_path)
    ours = VQModel.from_pretrained(tmp_path).to(DEVICE, memory_format=torch.channels_last)
    norms.use_triton_norms(copy.deepcopy(ours))  # switches the copy's norms only
    assert not any(getattr(m, "triton_norm", False) for m in ours.modules())
    norms.use_triton_norms(ours)
    latents = torch.randn(1, FOUR_LEVEL["latent_channels"], 4, 3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = reference.decode(latents, force_not_quantize=True).sample
        got = ours.decode(latents.to(DEVICE, memory_format=torch.channels_last), force_not_quantize=True).sample
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)
    assert len(spatial_calls) >= 10 and all(spatial_calls)  # every decoder norm is a spatial norm


COMPILE_FOR_HOPPER = textwrap.dedent(
    """
    import json, pathlib, re, subprocess, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from kandinsky22.models import norm_kernels as k

    def compile_ptx(fn, signature, constexprs, aligned, **options):
        names = list(signature)
        attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]

    def count(ptx, op):
        return {width: len(re.findall(rf"{op}\\.global\\.{width}", ptx)) for width in ("v4", "v2", "b16")}

    def spilled_bytes(ptx):
        # Triton's own ptxas for PTX this recent, verbose: it reports the registers and spills per kernel
        ptxas = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas-blackwell"
        with tempfile.TemporaryDirectory() as folder:
            source = pathlib.Path(folder) / "kernel.ptx"
            source.write_text(ptx)
            done = subprocess.run(
                [str(ptxas), "-arch=sm_90a", "-v", str(source), "-o", str(source.with_suffix(".cubin"))],
                capture_output=True, text=True, check=True,
            )
        return sum(int(n) for n in re.findall(r"(\\d+) bytes spill stores", done.stderr))

    half, single, ints = "*fp16", "*fp32", "i32"
    out = {}
    signature = dict(x_ptr=half, mean_ptr=single, m2_ptr=single, pixels=ints, channels=ints, rows=ints, parts=ints)
    signature.update(BLOCK_HW="constexpr", BLOCK_C="constexpr")
    ptx = compile_ptx(k.stats, signature, dict(BLOCK_HW=64, BLOCK_C=64), ["x_ptr", "mean_ptr", "m2_ptr", "channels"])
    out["stats"] = count(ptx, "ld")
    signature = dict(mean_ptr=single, m2_ptr=single, weight_ptr=half, bias_ptr=half, in_bias_ptr=half)
    signature.update(scale_ptr=half, shift_ptr=half, factor_ptr=single, offset_ptr=single)
    signature.update({name: ints for name in ("pixels", "channels", "group_size", "rows", "parts")})
    signature.update(scale_stride=ints, shift_stride=ints, inv_numel="fp32", eps="fp32")
    signature.update(MODULATED="constexpr", IN_BIAS="constexpr", BLOCK_P="constexpr", BLOCK_G="constexpr")
    for modulated in (False, True):
        for in_bias in (False, True):
            constexprs = dict(MODULATED=modulated, IN_BIAS=in_bias, BLOCK_P=64, BLOCK_G=16)
            compile_ptx(k.finalize, signature, constexprs, [])
    signature = dict(x_ptr=half, factor_ptr=single, offset_ptr=single, spatial_scale_ptr=half, spatial_shift_ptr=half)
    signature.update(y_ptr=half)
    signature.update({name: ints for name in ("pixels", "channels", "width", "factor_h", "factor_w")})
    signature.update(small_pixels=ints, small_w=ints)
    signature.update(SPATIAL="constexpr", SILU="constexpr", BLOCK_HW="constexpr", BLOCK_C="constexpr")
    aligned = [name for name in signature if name.endswith("_ptr")] + ["channels"]
    small = dict(x_ptr=half, weight_ptr=half, bias_ptr=half, in_bias_ptr=half, scale_ptr=half, shift_ptr=half)
    small.update(y_ptr=half)
    small.update({name: ints for name in ("pixels", "channels", "scale_stride", "shift_stride")})
    small.update(inv_numel="fp32", eps="fp32", GROUP="constexpr", MODULATED="constexpr", IN_BIAS="constexpr")
    small.update(SILU="constexpr", BLOCK_HW="constexpr", BLOCK_G="constexpr")
    # The largest tile norms._plan makes, with its 16 warps, at the official UNet's 768x768 levels that take this
    # path: 36 and 48 channels per group (1152 and 1536 wide, 12x12); the resnets' second norms with conv1's bias.
    for group in (36, 48):
        for modulated in (False, True):
            constexprs = dict(GROUP=group, MODULATED=modulated, IN_BIAS=modulated, SILU=True, BLOCK_HW=256, BLOCK_G=64)
            ptx = compile_ptx(k.small, small, constexprs, ["x_ptr", "y_ptr", "channels"], num_warps=16)
            key = f"small_{group}_modulated_{modulated}"
            out[key] = {"ld": count(ptx, "ld"), "st": count(ptx, "st"), "spilled_bytes": spilled_bytes(ptx)}
    for spatial in (False, True):
        constexprs = dict(SPATIAL=spatial, SILU=True, BLOCK_HW=64, BLOCK_C=64)
        ptx = compile_ptx(k.apply, signature, constexprs, aligned)
        out[f"apply_spatial_{spatial}"] = {"ld": count(ptx, "ld"), "st": count(ptx, "st")}
    signature = dict(x_ptr=half, h_ptr=half, bias_ptr=half, bias2_ptr=half, y_ptr=half)
    signature.update({name: ints for name in ("rows", "channels", "height", "width")})
    signature.update(TWO_BIASES="constexpr", UPSAMPLE="constexpr", BLOCK_R="constexpr", BLOCK_C="constexpr")
    aligned = [name for name in signature if name.endswith("_ptr")] + ["channels"]
    for upsample in (False, True):
        constexprs = dict(TWO_BIASES=True, UPSAMPLE=upsample, BLOCK_R=64, BLOCK_C=64)
        ptx = compile_ptx(k.residual, signature, constexprs, aligned)
        out[f"residual_upsample_{upsample}"] = {"ld": count(ptx, "ld"), "st": count(ptx, "st")}
    print(json.dumps(out))
    """
)


def test_kernels_compile_for_hopper_with_vector_loads():
    """Triton compiles every kernel variant for an H100/H200 (sm_90) without a GPU, in a process without the
    interpreter: the code generator accepts what the interpreter ran. With the channel count a multiple of 16 (as in
    every model here; Triton specialises on it at launch) the fp16 loads and stores are 128-bit vectors."""
    import triton

    if not triton.__version__.startswith("3.9."):  # ASTSource's arguments change between Triton releases
        pytest.skip(f"written against Triton 3.9's compile API (CI pins 3.9.0); this is {triton.__version__}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9 warns when it is unset
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert counts["stats"]["v4"] > 0 and counts["stats"]["b16"] == 0
    for spatial in (False, True):
        apply = counts[f"apply_spatial_{spatial}"]
        assert apply["ld"]["v4"] > 0 and apply["ld"]["b16"] == 0
        assert apply["st"]["v4"] > 0 and apply["st"]["b16"] == 0
    for upsample in (False, True):  # models.residual's kernel, its upsampled input read as vectors too
        summed = counts[f"residual_upsample_{upsample}"]
        assert summed["ld"]["v4"] > 0 and summed["ld"]["b16"] == 0
        assert summed["st"]["v4"] > 0 and summed["st"]["b16"] == 0
    # The one-kernel path: a group's row of channels as vectors (16 bytes where its width is a multiple of 8 halves,
    # else 8), its large tile in registers.
    for group, width in ((36, "v2"), (48, "v4")):
        for modulated in (False, True):
            small = counts[f"small_{group}_modulated_{modulated}"]
            assert small["ld"][width] > 0 and small["st"][width] > 0 and small["st"]["b16"] == 0
            assert small["spilled_bytes"] == 0
