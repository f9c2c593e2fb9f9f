"""On a CUDA device (skipped elsewhere): the channels_last GroupNorm of eager CUDA runs against PyTorch's kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kandinsky22.models.layers import GroupNorm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@torch.no_grad()
def test_channels_last_group_norm_is_as_close_to_fp64_as_pytorchs(dtype):
    torch.manual_seed(0)
    norm = GroupNorm(32, 384, eps=1e-5).cuda().to(dtype)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    # UNet-like activations: an offset and a spread per channel
    x = torch.randn(2, 384, 48, 40, device="cuda") * torch.rand(384, 1, 1, device="cuda") * 4 + torch.randn(
        384, 1, 1, device="cuda"
    )
    x = x.to(dtype).to(memory_format=torch.channels_last)
    exact = F.group_norm(x.double(), 32, norm.weight.double(), norm.bias.double(), 1e-5)
    ours = norm(x)
    pytorchs = F.group_norm(x, 32, norm.weight, norm.bias, 1e-5)
    assert ours.dtype == dtype and ours.is_contiguous(memory_format=torch.channels_last)
    ours_err = float((ours.double() - exact).abs().max())
    pytorch_err = float((pytorchs.double() - exact).abs().max())
    assert ours_err <= 1.5 * pytorch_err + 1e-7, (ours_err, pytorch_err)
