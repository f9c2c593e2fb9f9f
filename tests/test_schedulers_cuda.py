"""On a CUDA device (skipped elsewhere): stepping never waits for the GPU, and a GPU run matches the CPU run.

The pipelines keep ``scheduler.timesteps`` on the device; reading one back (``.item()``) would stall the host once
per step. ``torch.cuda.set_sync_debug_mode("error")`` turns any such synchronisation inside ``step`` into an error.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import kandinsky22.schedulers as ours

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.filterwarnings("ignore:Synchronization debug mode is a prototype:UserWarning"),
]

DECODER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "linear",
    "clip_sample": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "variance_type": "learned_range",
}
PRIOR = {"clip_sample": True, "clip_sample_range": 10.0, "prediction_type": "sample", "variance_type": "learned_range"}
NAMES = (
    "DDPMScheduler",
    "DDIMScheduler",
    "UnCLIPScheduler",
    "DPMSolverMultistepScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "UniPCMultistepScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "DPMSolverSinglestepScheduler",
    "DEISMultistepScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DPMSolverSDEScheduler",
)
SHAPE = (2, 4, 16, 16)


def stand_in_model(x: torch.Tensor, t: float) -> torch.Tensor:
    """8 channels (noise + variance, like K2.2's UNet) from a smooth function of the sample and a host timestep."""
    phase = t / 1000.0
    return torch.cat([0.7 * torch.sin(1.7 * x + phase) + 0.1 * x, torch.tanh(0.5 * x - phase)], dim=1)


def sample_loop(name: str, device: str, generator_device: str, no_sync: bool) -> tuple[torch.Tensor, torch.Tensor]:
    scheduler = getattr(ours, name).from_config(PRIOR if name == "UnCLIPScheduler" else DECODER)
    scheduler.set_timesteps(12, device=device)
    timesteps = scheduler.timesteps
    host_timesteps = timesteps.tolist()  # one read before the loop, for the stand-in model only
    generator = torch.Generator(generator_device).manual_seed(0)
    sample = torch.randn(SHAPE, generator=generator, device=generator_device).to(device) * scheduler.init_noise_sigma
    for i, t in enumerate(timesteps):
        kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        if name == "UnCLIPScheduler":
            kwargs["prev_timestep"] = timesteps[i + 1] if i + 1 < len(timesteps) else None
        torch.cuda.set_sync_debug_mode("error" if no_sync else "default")
        try:
            model_input = scheduler.scale_model_input(sample, t)
            output = stand_in_model(model_input, host_timesteps[i])
            sample = scheduler.step(output, t, sample, **kwargs).prev_sample
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sample.cpu(), torch.randn(3, generator=generator, device=generator_device).cpu()


def test_the_sync_detector_catches_a_device_read() -> None:
    """The check below can fail: reading a device timestep, as ``int(t)`` would, is an error in this mode."""
    timestep = torch.tensor(999, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError):
            timestep.item()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("name", NAMES)
def test_steps_never_wait_for_the_gpu(name: str) -> None:
    sample, _ = sample_loop(name, "cuda", "cuda", no_sync=True)
    assert torch.isfinite(sample).all()


@pytest.mark.parametrize("name", NAMES)
def test_steps_with_a_cpu_generator_never_wait_for_the_gpu(name: str) -> None:
    """The CLI and the server seed a CPU generator per image (the reference's convention): the noise each step draws
    goes to the GPU through pinned memory without blocking the host."""
    sample, _ = sample_loop(name, "cuda", "cpu", no_sync=True)
    assert torch.isfinite(sample).all()


@pytest.mark.parametrize("name", NAMES)
def test_gpu_run_matches_cpu_run(name: str) -> None:
    """With a CPU generator the noise is drawn on the CPU and moved (the reference's rule), so the two runs differ
    only by the device's float32 rounding."""
    on_gpu, gpu_next = sample_loop(name, "cuda", "cpu", no_sync=False)
    on_cpu, cpu_next = sample_loop(name, "cpu", "cpu", no_sync=False)
    torch.testing.assert_close(on_gpu, on_cpu, rtol=0, atol=1e-4)
    assert torch.equal(gpu_next, cpu_next)
