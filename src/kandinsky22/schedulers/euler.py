"""Euler samplers in the noise-level parametrisation x = x₀ + σ·ε (Karras et al. 2022, Algorithm 2 without churn).

The UNet sees x/√(σ²+1) (``scale_model_input``), which is the variance-preserving x_t of the training schedule.
"""

from __future__ import annotations

import numpy as np
import torch

from . import tables
from .base import PREDICTION_TYPES, SchedulerOutput, SigmaSchedulerMixin, noise_channels
from .noise import Generators, randn_tensor


class _EulerFamily(SigmaSchedulerMixin):
    """σ tables, input scaling and ``add_noise`` shared by both Euler samplers."""

    def _check_config(self) -> None:
        self._check_beta_config()
        self._require_choice("prediction_type", PREDICTION_TYPES)

    def _build(self) -> None:
        self.betas, self.alphas_cumprod = self._training_alphas_cumprod()
        self.num_inference_steps = None
        total = self.config.num_train_timesteps
        train = tables.train_sigmas(self.alphas_cumprod)
        self._install(np.linspace(0, total - 1, total)[::-1], np.append(train[::-1], 0.0), None)

    def _install(self, timesteps: np.ndarray, sigmas: np.ndarray, device: torch.device | str | None) -> None:
        self._set_schedule(timesteps.astype(np.float32), device, torch.float32)
        self.sigmas = torch.from_numpy(np.ascontiguousarray(sigmas, dtype=np.float32))

    def _grid(self, num_steps: int) -> np.ndarray:
        """Descending float32 timesteps; "linspace" is not rounded here (the σ are interpolated between steps)."""
        c = self.config
        if c.timestep_spacing == "linspace":
            return np.linspace(0, c.num_train_timesteps - 1, num_steps, dtype=np.float32)[::-1]
        return tables.spaced_timesteps(c.timestep_spacing, num_steps, c.num_train_timesteps, c.steps_offset).astype(
            np.float32
        )

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial noise, √(σ_max²+1); the reference uses its approximation σ_max (the two
        agree to 0.1 % for a full-range grid) with "linspace" and "trailing" spacing, and so do we."""
        max_sigma = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return float(max_sigma)
        return float((max_sigma**2 + 1) ** 0.5)

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor) -> torch.Tensor:
        sigma = self.sigmas[self._index(timestep)]
        return sample / float((sigma**2 + 1) ** 0.5)

    def _x0(self, model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        prediction_type = self.config.prediction_type
        if prediction_type == "epsilon":
            return sample - float(sigma) * model_output
        if prediction_type == "sample":
            return model_output
        return model_output * float(-sigma / (sigma**2 + 1) ** 0.5) + sample / float(sigma**2 + 1)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return original_samples + noise * self._noise_levels(timesteps, original_samples)


class EulerDiscreteScheduler(_EulerFamily):
    """Deterministic Euler steps in σ; ``use_karras_sigmas`` spaces the σ as Karras et al. 2022 (ρ = 7), optionally
    between ``sigma_min`` and ``sigma_max``.
    """

    config_defaults = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "prediction_type": "epsilon",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "sigma_min": None,
        "sigma_max": None,
        "timestep_spacing": "linspace",
        "timestep_type": "discrete",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "final_sigmas_type": "zero",
    }

    def _check_config(self) -> None:
        super()._check_config()
        self._require_choice("final_sigmas_type", ("zero", "sigma_min"))
        self._require_default("interpolation_type", "use_exponential_sigmas", "use_beta_sigmas", "timestep_type")

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        c = self.config
        tables.check_num_steps(num_inference_steps, c.num_train_timesteps)
        self.num_inference_steps = num_inference_steps
        grid = self._grid(num_inference_steps)
        train = tables.train_sigmas(self.alphas_cumprod)
        sigmas = np.interp(grid, np.arange(len(train)), train)
        if c.use_karras_sigmas:
            low = c.sigma_min if c.sigma_min is not None else float(sigmas[-1])
            high = c.sigma_max if c.sigma_max is not None else float(sigmas[0])
            sigmas = tables.karras_sigmas(low, high, num_inference_steps)
            grid = tables.sigma_to_t(sigmas, np.log(train))
        ac = self.alphas_cumprod
        final = float(((1 - ac[0]) / ac[0]) ** 0.5) if c.final_sigmas_type == "sigma_min" else 0.0
        self._install(grid, np.append(sigmas, final), device)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: Generators = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One Euler step x ← x + (x − x̂₀)/σ · (σ_next − σ). ``generator`` is unused (no noise is drawn)."""
        i = self._index(timestep)
        model_output = noise_channels(model_output, sample)
        sample = sample.to(torch.float32)
        sigma = self.sigmas[i]
        x0 = self._x0(model_output, sample, sigma)
        derivative = (sample - x0) / float(sigma)
        prev_sample = (sample + derivative * float(self.sigmas[i + 1] - sigma)).to(model_output.dtype)
        self._step_index = i + 1
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


class EulerAncestralDiscreteScheduler(_EulerFamily):
    """Euler-ancestral: an Euler step down to σ_down, then fresh noise of σ_up, with σ_down² + σ_up² = σ_next²
    (k-diffusion ``sample_euler_ancestral``, η = 1). One noise draw per step, the last one included (σ_up = 0 there),
    as the reference.
    """

    config_defaults = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "prediction_type": "epsilon",
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        tables.check_num_steps(num_inference_steps, self.config.num_train_timesteps)
        self.num_inference_steps = num_inference_steps
        grid = self._grid(num_inference_steps)
        train = tables.train_sigmas(self.alphas_cumprod)
        self._install(grid, np.append(np.interp(grid, np.arange(len(train)), train), 0.0), device)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: Generators = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        i = self._index(timestep)
        model_output = noise_channels(model_output, sample)
        sample = sample.to(torch.float32)
        sigma_from, sigma_to = self.sigmas[i], self.sigmas[i + 1]
        x0 = self._x0(model_output, sample, sigma_from)
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        derivative = (sample - x0) / float(sigma_from)
        prev_sample = sample + derivative * float(sigma_down - sigma_from)
        noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
        prev_sample = (prev_sample + noise * float(sigma_up)).to(model_output.dtype)
        self._step_index = i + 1
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
