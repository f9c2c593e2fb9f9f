"""Gaussian noise drawn from the caller's generator(s), in the reference's order (``randn_tensor``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

Generators = torch.Generator | Sequence[torch.Generator] | None


def randn_tensor(
    shape: Sequence[int],
    generator: Generators = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Standard normal noise of ``shape`` on ``device``, drawn the way the reference draws it so a seed reproduces.

    * One generator: a single draw of the whole shape.
    * A list of generators: one ``(1, …)`` draw per sample from its own generator, concatenated, so each sample's
      noise does not depend on the rest of the batch (a list of one acts as a single generator).
    * A CPU generator with another target device: drawn on the CPU, then moved.
    * No generator: a fresh generator seeded from the OS, never the global RNG (which other requests share).
    """
    device = torch.device(device or "cpu")
    shape = tuple(shape)
    if isinstance(generator, Sequence) and len(generator) == 1:
        generator = generator[0]
    if generator is None:
        generator = torch.Generator(device=device)
        generator.seed()
    first = generator[0] if isinstance(generator, Sequence) else generator
    if first.device.type != device.type and first.device.type != "cpu":
        raise ValueError(f"Cannot draw noise for device '{device}' from a generator on '{first.device}'")
    draw_device = torch.device("cpu") if first.device.type == "cpu" else device
    if isinstance(generator, Sequence):
        if len(generator) != shape[0]:
            raise ValueError(f"Got {len(generator)} generators for a batch of {shape[0]}: pass one per sample")
        per_sample = (1, *shape[1:])
        parts = [torch.randn(per_sample, generator=g, device=draw_device, dtype=dtype) for g in generator]
        return _to_device(torch.cat(parts), device)
    return _to_device(torch.randn(shape, generator=generator, device=draw_device, dtype=dtype), device)


def _to_device(noise: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``noise`` on ``device``. From the CPU to a GPU it goes through pinned memory without waiting: a plain copy from
    pageable memory blocks the host until the GPU has finished all the work queued before it, so a sampler drawing
    noise at every step from a CPU generator (the reference's seeding convention) would stall the loop each step.
    The pinned buffer is not reused before its copy has completed (PyTorch's host allocator records the stream)."""
    if noise.device == device:
        return noise
    if noise.device.type == "cpu" and device.type == "cuda":
        return noise.pin_memory().to(device, non_blocking=True)
    return noise.to(device)
