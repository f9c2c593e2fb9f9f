"""Suite-wide settings: one torch thread per xdist worker (CI runs `pytest -n 2` on 2 cores; more threads only thrash)."""

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
if not torch.cuda.is_available():
    # Triton kernels (tests/test_norms.py) run under Triton's interpreter on CPU tensors. Triton reads this when it is
    # first imported, so it is set here, before any test imports it.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(params=["phases", "upsample_first"])
def upsampling(request, monkeypatch):
    """Both forms of the convolution after a nearest ×2 upsampling (``UpsampleConv2d``, in the UNet's up-resnets and
    MoVQ's upsamplers): the tiny test inputs are below its pixel threshold, so the phase form is forced with 0."""
    monkeypatch.setattr("kandinsky22.models.layers._PHASES_MIN_PIXELS", 0 if request.param == "phases" else 10**9)
    return request.param


@pytest.fixture
def true_fp32():
    """On a GPU: fp32 convolutions and matmuls, not TF32 (PyTorch lets cuDNN use TF32's 10-bit mantissas by default),
    for comparisons in fp32 against the CPU or the resident pipeline. Set and restored by hand: these flags are dynamic
    attributes, which pytest's monkeypatch cannot restore. Modules that need it mark themselves
    ``pytest.mark.usefixtures("true_fp32")``."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
