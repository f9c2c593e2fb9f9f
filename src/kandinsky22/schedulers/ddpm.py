"""Ancestral DDPM sampling (Ho et al. 2020): the decoder's ``DDPMScheduler`` and the prior's ``UnCLIPScheduler``.

Both step from x_t to x_prev with the Gaussian posterior q(x_prev | x_t, x̂₀):
mean = √ᾱ_prev·β/(1−ᾱ_t)·x̂₀ + √α·(1−ᾱ_prev)/(1−ᾱ_t)·x_t, variance = (1−ᾱ_prev)/(1−ᾱ_t)·β,
where β = 1 − ᾱ_t/ᾱ_prev spans the skipped steps. Scalars are float32 and combined in the reference's order, so
trajectories match it to float32 rounding (reference-behaviour §2.5).
"""

from __future__ import annotations

from collections.abc import Sequence
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
    f32,
    host_value,
    predict_x0,
)
from .noise import Generators, randn_tensor

_ONE = f32(1.0)
# None (the fast solvers' default, met when swapping back to DDPM) acts as "fixed_small", as in the reference.
DDPM_VARIANCE_TYPES = (
    "fixed_small",
    "fixed_small_log",
    "fixed_large",
    "fixed_large_log",
    "learned",
    "learned_range",
    None,
)


def posterior_step(
    x0: torch.Tensor,
    sample: torch.Tensor,
    alpha_prod_t: torch.Tensor,
    alpha_prod_prev: torch.Tensor,
    beta: torch.Tensor,
    alpha: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of q(x_prev | x_t, x₀) and its variance (a 0-dim float32 tensor), Ho et al. 2020 eqs. 6–7."""
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_prev = 1 - alpha_prod_prev
    x0_coeff = (alpha_prod_prev**0.5 * beta) / beta_prod_t
    sample_coeff = alpha**0.5 * beta_prod_prev / beta_prod_t
    mean = float(x0_coeff) * x0 + float(sample_coeff) * sample
    return mean, beta_prod_prev / beta_prod_t * beta


def posterior_std(
    variance_type: str, variance: torch.Tensor, beta: torch.Tensor, predicted: torch.Tensor | None
) -> float | torch.Tensor:
    """Standard deviation of the step's noise.

    ``learned_range`` interpolates log σ² between the posterior variance and β with the model's v ∈ [−1, 1]
    (Nichol & Dhariwal 2021, eq. 15). The variance is floored at 1e−20 so the last step (ᾱ_prev = 1) stays finite.
    """
    variance = torch.clamp(variance, min=1e-20)
    if variance_type in ("fixed_small", None):
        return float(variance**0.5)
    if variance_type == "fixed_small_log":
        return float(torch.exp(0.5 * torch.log(variance)))
    if variance_type in ("fixed_large", "fixed_large_log"):
        # The reference takes √(log β) for fixed_large_log (NaN); the intended σ² is β either way.
        return float(beta**0.5)
    if predicted is None:
        raise ValueError(
            f"variance_type={variance_type!r} needs the model's variance channels: the model output must have "
            "twice the sample's channels"
        )
    if variance_type == "learned":
        return predicted**0.5
    frac = (predicted + 1) / 2
    log_variance = frac * float(torch.log(beta)) + (1 - frac) * float(torch.log(variance))
    return torch.exp(0.5 * log_variance)


def split_variance(model_output: torch.Tensor, sample: torch.Tensor, variance_type: str):
    """(noise-or-x₀ prediction, predicted variance or None): an 8-channel output is split in half."""
    if model_output.shape[1] == 2 * sample.shape[1]:
        prediction, variance = torch.split(model_output, sample.shape[1], dim=1)
        return prediction, variance if variance_type in ("learned", "learned_range") else None
    return model_output, None


class DDPMScheduler(SchedulerMixin):
    """Ancestral DDPM sampling: the official K2.2 decoder scheduler (linear betas, ε-prediction, clip to ±1).

    Random draws follow the reference: one noise draw per step whenever t > 0 — including the "leading" schedule's
    last step t = 1 → −1, whose σ is 1e−10 (reference-behaviour §5 quirk 4).
    """

    config_defaults = {
        **BETA_DEFAULTS,
        "variance_type": "fixed_small",
        "clip_sample": True,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "clip_sample_range": 1.0,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }
    init_noise_sigma = 1.0

    def _check_config(self) -> None:
        self._check_beta_config()
        self._require_choice("prediction_type", PREDICTION_TYPES)
        self._require_choice("variance_type", DDPM_VARIANCE_TYPES)

    def _build(self) -> None:
        self.betas, self.alphas_cumprod = self._training_alphas_cumprod()
        self.num_inference_steps = None
        self.custom_timesteps = False
        self._set_schedule(np.arange(self.config.num_train_timesteps)[::-1], None, torch.int64)

    def _set_schedule(self, timesteps: np.ndarray, device: torch.device | str | None, dtype: torch.dtype) -> None:
        super()._set_schedule(timesteps, device, dtype)
        # t → first position: the previous timestep is the table's next entry (reference: by index, first match)
        self._positions = {t: i for i, t in reversed(list(enumerate(self._host_timesteps)))}

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: torch.device | str | None = None,
        timesteps: Sequence[int] | None = None,
    ) -> None:
        """``num_inference_steps`` spaced by ``timestep_spacing``, or the given ``timesteps`` (strictly descending,
        in [0, T−1]): each step then goes to the next timestep in the list, the last one to x₀ (t = −1)."""
        c = self.config
        if tables.schedule_source(num_inference_steps, timesteps=timesteps) == "timesteps":
            grid = tables.custom_timesteps(timesteps, c.num_train_timesteps)
            self.custom_timesteps = True
            # The reference leaves num_inference_steps as it was (stale, or None); the list's length is the truth
            self.num_inference_steps = len(grid)
        else:
            tables.check_num_steps(num_inference_steps, c.num_train_timesteps)
            grid = tables.spaced_timesteps(
                c.timestep_spacing, num_inference_steps, c.num_train_timesteps, c.steps_offset
            )
            self.custom_timesteps = False
            self.num_inference_steps = num_inference_steps
        self._set_schedule(grid, device, torch.int64)

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        return sample

    def previous_timestep(self, timestep: int | torch.Tensor) -> int:
        """The timestep a step from ``timestep`` goes to: the next one in this run's table, −1 after the last (x₀).
        Reads ``timestep`` (a device sync for a tensor on an accelerator): for use outside the sampling loop."""
        value = int(timestep)
        if value not in self._positions:
            raise ValueError(f"timestep={value} is not in this scheduler's timesteps")
        index = self._positions[value] + 1
        return self._host_timesteps[index] if index < len(self._host_timesteps) else -1

    def _current(self, timestep: Any) -> tuple[int, int]:
        """(t, t_prev): by value when the timestep is readable on the host, else by the step counter."""
        value = host_value(timestep)
        if value is not None and int(value) not in self._positions:
            raise ValueError(f"timestep={value} is not in this scheduler's timesteps; call set_timesteps first")
        if value is not None:
            self._step_index = self._positions[int(value)]
        index = self._advance()
        steps = self._host_timesteps
        return steps[index], (steps[index + 1] if index + 1 < len(steps) else -1)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: Generators = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        t, prev_t = self._current(timestep)
        model_output, predicted_variance = split_variance(model_output, sample, c.variance_type)
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else _ONE
        alpha = alpha_prod_t / alpha_prod_prev
        beta = 1 - alpha
        x0 = predict_x0(
            c.prediction_type, model_output, sample, float(alpha_prod_t**0.5), float((1 - alpha_prod_t) ** 0.5)
        )
        if c.thresholding:
            x0 = dynamic_threshold(x0, c.dynamic_thresholding_ratio, c.sample_max_value)
        elif c.clip_sample:
            x0 = x0.clamp(-c.clip_sample_range, c.clip_sample_range)
        prev_sample, variance = posterior_step(x0, sample, alpha_prod_t, alpha_prod_prev, beta, alpha)
        if t > 0:
            noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
            prev_sample = prev_sample + posterior_std(c.variance_type, variance, beta, predicted_variance) * noise
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return add_noise_vp(self._on_device(self.alphas_cumprod, original_samples), original_samples, noise, timesteps)


def add_noise_vp(
    alphas_cumprod: torch.Tensor, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """q(x_t | x₀) = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε, per sample; indexed on the samples' device (no host round trip; no copy
    at all when ``alphas_cumprod`` and ``timesteps`` are already there)."""
    table = alphas_cumprod.to(device=original_samples.device, dtype=original_samples.dtype)
    alpha_prod = table[torch.as_tensor(timesteps, device=original_samples.device)].flatten()
    shape = (-1,) + (1,) * (original_samples.ndim - 1)
    return (alpha_prod**0.5).view(shape) * original_samples + ((1 - alpha_prod) ** 0.5).view(shape) * noise


class UnCLIPScheduler(SchedulerMixin):
    """The K2.2 prior's sampler: DDPM with the cosine schedule and usually x₀-prediction (``prediction_type="sample"``).

    ``step`` takes ``prev_timestep`` as the reference does (default t − 1); the pipeline passes the next timestep.
    No noise is drawn at t = 0 (reference-behaviour §5 quirk 4). Timesteps round with numpy's half-to-even
    (quirk 18).
    """

    config_defaults = {
        "num_train_timesteps": 1000,
        "variance_type": "fixed_small_log",
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "prediction_type": "epsilon",
        "beta_schedule": "squaredcos_cap_v2",
    }
    init_noise_sigma = 1.0
    _family = "unclip"

    def _check_config(self) -> None:
        self._require_choice("beta_schedule", ("squaredcos_cap_v2",))
        self._require_choice("prediction_type", ("epsilon", "sample"))
        self._require_choice("variance_type", ("fixed_small_log", "learned_range"))

    def _build(self) -> None:
        self.betas = tables.cosine_betas(self.config.num_train_timesteps)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = tables.cumulative_alphas(self.betas)
        self.num_inference_steps = None
        self._set_schedule(np.arange(self.config.num_train_timesteps)[::-1], None, torch.int64)

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """``n`` timesteps from T−1 down to 0 inclusive (so at least 2)."""
        total = self.config.num_train_timesteps
        tables.check_num_steps(num_inference_steps, total, minimum=2)
        self.num_inference_steps = num_inference_steps
        step_ratio = (total - 1) / (num_inference_steps - 1)
        grid = (np.arange(num_inference_steps) * step_ratio).round()[::-1].astype(np.int64)
        self._set_schedule(grid, device, torch.int64)

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        return sample

    def _current(self, timestep: Any, prev_timestep: Any) -> tuple[int, int]:
        """(t, t_prev) as Python ints; device tensors are not read — the step counter indexes the table instead."""
        index = self._advance()
        steps = self._host_timesteps
        value = host_value(timestep)
        t = steps[index] if value is None else int(value)
        if prev_timestep is None:
            return t, t - 1
        prev_value = host_value(prev_timestep)
        if prev_value is not None:
            return t, int(prev_value)
        return t, steps[index + 1] if index + 1 < len(steps) else -1

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        prev_timestep: int | torch.Tensor | None = None,
        generator: Generators = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        t, prev_t = self._current(timestep, prev_timestep)
        model_output, predicted_variance = split_variance(model_output, sample, c.variance_type)
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else _ONE
        if prev_t == t - 1:  # a single training step: the table's β_t (not recomputed from ᾱ), as the reference
            beta, alpha = self.betas[t], self.alphas[t]
        else:
            beta = 1 - alpha_prod_t / alpha_prod_prev
            alpha = 1 - beta
        x0 = predict_x0(
            c.prediction_type, model_output, sample, float(alpha_prod_t**0.5), float((1 - alpha_prod_t) ** 0.5)
        )
        if c.clip_sample:
            x0 = torch.clamp(x0, -c.clip_sample_range, c.clip_sample_range)
        prev_sample, variance = posterior_step(x0, sample, alpha_prod_t, alpha_prod_prev, beta, alpha)
        if t > 0:
            noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
            prev_sample = prev_sample + posterior_std(c.variance_type, variance, beta, predicted_variance) * noise
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return add_noise_vp(self._on_device(self.alphas_cumprod, original_samples), original_samples, noise, timesteps)
