"""A stand-in for CUDA-graph capture on the CPU, for tests of ``kandinsky22.fast.CudaGraphCall``."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kandinsky22 import fast
from kandinsky22.models import norms


def rerun_capture(call):
    """A CUDA graph's semantics on the CPU: ``replay`` runs the captured call again on the same static inputs and
    writes its results into the same output tensors, which the caller got at capture."""
    output = call()
    static_out: list[torch.Tensor] = []
    fast._signature(output, static_out)

    class Graph:
        def replay(self) -> None:
            fresh: list[torch.Tensor] = []
            fast._signature(call(), fresh)
            for static, value in zip(static_out, fresh):
                static.copy_(value)

    return Graph(), output


def fast_path_as_on_cuda(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Make ``enable_fast_path`` on the CPU install CUDA graphs as it does on CUDA, with the stand-in capture; returns
    the real ``CudaGraphCall`` class (for isinstance checks)."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # the fast path sets it
    monkeypatch.setattr(fast, "_on_cuda", lambda model: True)
    # compile_scope="none" switches the Triton norms on "on CUDA": they stay PyTorch's here (under the tests' Triton
    # interpreter they would run, ~100 times slower; tests/test_norms.py runs them)
    monkeypatch.setattr(norms, "_triton_applies", lambda norm, x: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(fast, "_capture", rerun_capture)
    original = fast.CudaGraphCall

    class CpuGraphCall(original):
        def __init__(self, model: torch.nn.Module, fn: Any) -> None:
            super().__init__(model, fn, device_type="cpu")

    monkeypatch.setattr(fast, "CudaGraphCall", CpuGraphCall)
    return original
