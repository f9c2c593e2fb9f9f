"""DDIM sampling (Song et al. 2021): deterministic for η = 0, the scheduler of the reference's K2.2 tests."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from . import tables
from .base import (
    BETA_DEFAULTS,
    PREDICTION_TYPES,
    SchedulerMixin,
    SchedulerOutput,
    dynamic_threshold,
    host_value,
    noise_channels,
)
from .ddpm import add_noise_vp
from .noise import Generators, randn_tensor


class DDIMScheduler(SchedulerMixin):
    """DDIM (Song et al. 2021, eq. 12). The previous timestep is always t − T//n, even for "trailing"/"linspace"
    spacing, and below 0 it uses ``final_alpha_cumprod`` (1, or ᾱ₀ when ``set_alpha_to_one`` is false) — the
    reference's behaviour (reference-behaviour §5 quirk 19).
    """

    config_defaults = {
        **BETA_DEFAULTS,
        "clip_sample": True,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "clip_sample_range": 1.0,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    }
    init_noise_sigma = 1.0

    def _check_config(self) -> None:
        self._check_beta_config()
        self._require_choice("prediction_type", PREDICTION_TYPES)

    def _build(self) -> None:
        self.betas, self.alphas_cumprod = self._training_alphas_cumprod()
        self.final_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        self.num_inference_steps = None
        self._set_schedule(np.arange(self.config.num_train_timesteps)[::-1], None, torch.int64)

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        c = self.config
        tables.check_num_steps(num_inference_steps, c.num_train_timesteps)
        self.num_inference_steps = num_inference_steps
        grid = tables.spaced_timesteps(c.timestep_spacing, num_inference_steps, c.num_train_timesteps, c.steps_offset)
        self._set_schedule(grid, device, torch.int64)

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        return sample

    def _current_timestep(self, timestep: Any) -> int:
        index = self._advance()
        value = host_value(timestep)
        return self._host_timesteps[index] if value is None else int(value)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: Generators = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step; ``eta`` > 0 adds η·σ_t of fresh noise (η = 1 is DDPM-like), drawn from ``generator`` or
        given as ``variance_noise``. ``use_clipped_model_output`` re-derives ε from the clipped x̂₀ (as GLIDE)."""
        c = self.config
        if self.num_inference_steps is None:
            raise ValueError("Call set_timesteps(num_inference_steps) before step()")
        if eta > 0 and variance_noise is not None:
            if generator is not None:  # as the reference: the noise comes from one or the other
                raise ValueError("Pass either generator or variance_noise to DDIMScheduler.step, not both")
            if variance_noise.shape != sample.shape:
                raise ValueError(
                    f"variance_noise has shape {tuple(variance_noise.shape)}; it must match the sample's "
                    f"{tuple(sample.shape)}"
                )
        model_output = noise_channels(model_output, sample)
        t = self._current_timestep(timestep)
        prev_t = t - c.num_train_timesteps // self.num_inference_steps
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        sqrt_alpha, sqrt_beta = float(alpha_prod_t**0.5), float(beta_prod_t**0.5)
        if c.prediction_type == "epsilon":
            x0 = (sample - sqrt_beta * model_output) / sqrt_alpha
            eps = model_output
        elif c.prediction_type == "sample":
            x0 = model_output
            eps = (sample - sqrt_alpha * x0) / sqrt_beta
        else:
            x0 = sqrt_alpha * sample - sqrt_beta * model_output
            eps = sqrt_alpha * model_output + sqrt_beta * sample
        if c.thresholding:
            x0 = dynamic_threshold(x0, c.dynamic_thresholding_ratio, c.sample_max_value)
        elif c.clip_sample:
            x0 = x0.clamp(-c.clip_sample_range, c.clip_sample_range)
        variance = ((1 - alpha_prod_prev) / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_prev)
        std = eta * variance**0.5
        if use_clipped_model_output:
            eps = (sample - sqrt_alpha * x0) / sqrt_beta
        direction = float((1 - alpha_prod_prev - std**2) ** 0.5) * eps
        prev_sample = float(alpha_prod_prev**0.5) * x0 + direction
        if eta > 0:
            noise = variance_noise
            if noise is None:
                noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
            prev_sample = prev_sample + float(std) * noise
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return add_noise_vp(self._on_device(self.alphas_cumprod, original_samples), original_samples, noise, timesteps)
