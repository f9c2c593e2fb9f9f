"""Euler samplers in the noise-level parametrisation x = x₀ + σ·ε (Karras et al. 2022, Algorithm 2; churn optional).

The UNet sees x/√(σ²+1) (``scale_model_input``), which is the variance-preserving x_t of the training schedule.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from . import tables
from .base import BETA_DEFAULTS, PREDICTION_TYPES, SchedulerOutput, SigmaSchedulerMixin, noise_channels
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

    # The grid's dtype: the reference's float32 (float64 for DPM++ SDE)
    _grid_dtype: type = np.float32

    def _grid(self, num_steps: int) -> np.ndarray:
        """Descending timesteps in ``_grid_dtype``; "linspace" is not rounded here (the σ are interpolated between
        steps)."""
        c = self.config
        if c.timestep_spacing == "linspace":
            return np.linspace(0, c.num_train_timesteps - 1, num_steps, dtype=self._grid_dtype)[::-1]
        return tables.spaced_timesteps(c.timestep_spacing, num_steps, c.num_train_timesteps, c.steps_offset).astype(
            self._grid_dtype
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

    def _x0(
        self,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        sigma: torch.Tensor,
        sigma_hat: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x̂₀ at noise level σ; with churn, ε-prediction uses the raised level σ̂ and v-prediction keeps σ's
        scalings, as the reference."""
        prediction_type = self.config.prediction_type
        if prediction_type == "epsilon":
            return sample - float(sigma if sigma_hat is None else sigma_hat) * model_output
        if prediction_type == "sample":
            return model_output
        return model_output * float(-sigma / (sigma**2 + 1) ** 0.5) + sample / float(sigma**2 + 1)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return original_samples + noise * self._noise_levels(timesteps, original_samples)


class EulerDiscreteScheduler(_EulerFamily):
    """Euler steps in σ, deterministic unless ``step`` is given ``s_churn``; ``use_karras_sigmas`` spaces the σ as
    Karras et al. 2022 (ρ = 7), ``use_exponential_sigmas`` evenly in log σ, ``use_beta_sigmas`` at the quantiles of
    Beta(0.6, 0.6), each optionally between ``sigma_min`` and ``sigma_max``.
    """

    config_defaults = {
        **BETA_DEFAULTS,
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
        self._require_default("interpolation_type", "timestep_type")

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: torch.device | str | None = None,
        timesteps: Sequence[float] | None = None,
        sigmas: Sequence[float] | None = None,
    ) -> None:
        """One of: ``num_inference_steps`` spaced by ``timestep_spacing`` (or respaced σ); ``timesteps`` (strictly
        descending in [0, T−1], fractions allowed; not with a σ spacing), whose σ are interpolated; or ``sigmas``, one
        per step plus the final level (which replaces ``final_sigmas_type``), whose timesteps are interpolated in
        log σ and which take precedence over a σ spacing, as in the reference."""
        c = self.config
        train = tables.train_sigmas(self.alphas_cumprod)
        source = tables.schedule_source(num_inference_steps, timesteps=timesteps, sigmas=sigmas)
        if source == "sigmas":
            levels = tables.custom_sigmas(sigmas)
            self.num_inference_steps = len(levels) - 1
            self._install(tables.sigma_to_t(levels[:-1], np.log(train)), levels, device)
            return
        if source == "timesteps":
            self._refuse_custom_timesteps_with_spacing(timesteps)
            grid = tables.custom_timesteps(timesteps, c.num_train_timesteps, integer=False)
            num_inference_steps = len(grid)
        else:
            tables.check_num_steps(num_inference_steps, c.num_train_timesteps)
            grid = self._grid(num_inference_steps)
        self.num_inference_steps = num_inference_steps
        levels = np.interp(grid, np.arange(len(train)), train)
        spacing = self._sigma_spacing
        if spacing is not None:
            low = c.sigma_min if c.sigma_min is not None else float(levels[-1])
            high = c.sigma_max if c.sigma_max is not None else float(levels[0])
            levels = tables.spaced_sigmas(spacing, low, high, num_inference_steps)
            grid = tables.sigma_to_t(levels, np.log(train))
        ac = self.alphas_cumprod
        final = float(((1 - ac[0]) / ac[0]) ** 0.5) if c.final_sigmas_type == "sigma_min" else 0.0
        self._install(grid, np.append(levels, final), device)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: Generators = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One Euler step x ← x + (x − x̂₀)/σ̂ · (σ_next − σ̂).

        Churn (Karras et al. 2022, Algorithm 2): at the steps whose σ lies in [``s_tmin``, ``s_tmax``], γ =
        min(``s_churn``/n, √2 − 1) of n steps raises the noise level to σ̂ = (1 + γ)·σ by adding fresh noise
        (std √(σ̂² − σ²)·``s_noise``, one draw from ``generator``) before the model output is used. Without churn
        (the default) σ̂ = σ and nothing is drawn.
        """
        if s_churn < 0:  # the reference takes it and steps with σ̂ < σ, adding no noise: not Karras's churn
            raise ValueError(f"s_churn={s_churn!r} must be >= 0")
        i = self._index(timestep)
        model_output = noise_channels(model_output, sample)
        sample = sample.to(torch.float32)
        sigma = self.sigmas[i]
        # γ and σ̂ from the host table, as the reference computes them: the float32 σ compared with the bounds as
        # torch compares a tensor with a Python number; no device value is read.
        in_window = bool(s_tmin <= sigma) and bool(sigma <= s_tmax)
        gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1) if in_window else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
            sample = sample + noise * s_noise * float((sigma_hat**2 - sigma**2) ** 0.5)
        x0 = self._x0(model_output, sample, sigma, sigma_hat)
        derivative = (sample - x0) / float(sigma_hat)
        prev_sample = (sample + derivative * float(self.sigmas[i + 1] - sigma_hat)).to(model_output.dtype)
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
        **BETA_DEFAULTS,
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
