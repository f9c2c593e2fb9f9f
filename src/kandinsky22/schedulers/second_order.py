"""Second-order σ samplers: Heun (Karras et al. 2022, Algorithm 2 without churn) and DPM2 (k-diffusion's
``sample_dpm_2`` and ``sample_dpm_2_ancestral``), in the noise-level parametrisation x = x₀ + σ·ε of the Euler samplers.

Each step of the σ grid s₀ > s₁ > … > s_{n−1} > 0 evaluates the model twice: a first-order *predictor* at s_k, then a
*corrector* at the point the predictor reached. The reference lists both evaluations in ``timesteps`` — a table of
2n − 1 entries, as the pipelines loop over it — so one ``step`` call is one half-step: even table positions are
predictors, odd ones correctors. The last step goes to σ = 0, where a corrector would divide by zero: it is the
predictor alone (an Euler step), as in Algorithm 2.

* Heun: the corrector evaluates at s_{k+1} and averages the two slopes.
* DPM2: the predictor goes to the midpoint s_mid = √(s_k·s_{k+1}) (geometric mean); the corrector's slope there takes
  the whole step.
* DPM2-ancestral: as DPM2 towards σ_down, then fresh noise of σ_up (σ_down² + σ_up² = s_{k+1}², η = 1); mathematically
  s_mid = √(s_k·σ_down) = s_{k+1}. One noise draw per corrector, none on the last step.

``sigmas`` is the reference's table, one entry per table position plus the final level (s_k twice, once per half-step),
which ``add_noise`` and ``init_noise_sigma`` read as the reference's do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from . import tables
from .base import SchedulerOutput, noise_channels
from .euler import _EulerFamily
from .noise import Generators, randn_tensor

_SHARED_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
}


def _doubled(values: torch.Tensor, *end: torch.Tensor) -> torch.Tensor:
    """[v₀, v₁, v₁, v₂, v₂, …, *end]: every value after the first twice (once per half-step) — the layout of the
    reference's per-position tables."""
    return torch.cat([values[:1], values[1:].repeat_interleave(2), *end])


def _geometric_midpoint(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """√(a·b) as exp of the mean of the logs (float32, the reference's rounding); 0 where either is 0."""
    mid = torch.lerp(a.log(), b.log(), 0.5).exp()
    return torch.where((a == 0) | (b == 0), torch.zeros_like(mid), mid)


def _timesteps_float32(sigmas: torch.Tensor, log_train_sigmas: np.ndarray) -> np.ndarray:
    """``tables.sigma_to_t`` with the interpolation in float32, as the reference computes the midpoints' timesteps
    (float32 tensors): the float64 arithmetic of ``sigma_to_t`` differs there in the last bit."""
    log_train = torch.from_numpy(log_train_sigmas)
    log_sigma = torch.from_numpy(np.array([np.log(np.maximum(s, np.float32(1e-10))) for s in sigmas.numpy()]))
    low_idx = (torch.searchsorted(log_train, log_sigma, right=True) - 1).clamp(0, len(log_train) - 2)
    low, high = log_train[low_idx], log_train[low_idx + 1]
    w = ((low - log_sigma) / (low - high)).clamp(0, 1)
    return ((1 - w) * low_idx + w * (low_idx + 1)).numpy()


class _SecondOrder(_EulerFamily):
    """The σ grid, the half-step bookkeeping and the predictor's state shared by the three samplers."""

    order = 2

    def _build(self) -> None:
        self.betas, self.alphas_cumprod = self._training_alphas_cumprod()
        # As the reference: a full-length run is installed until set_timesteps (add_noise may come first)
        self.set_timesteps(self.config.num_train_timesteps)

    def _sigma_grid(
        self, num_inference_steps: int | None, timesteps: Sequence[float] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The run's grid: (timesteps (n,), σ (n,) float64), from ``num_inference_steps`` spaced by
        ``timestep_spacing`` or from custom ``timesteps``; with a σ spacing (Karras, exponential or beta) the σ are
        respaced over the same range and the timesteps follow them."""
        c = self.config
        source = tables.schedule_source(num_inference_steps, timesteps=timesteps)
        if source == "timesteps":
            self._refuse_custom_timesteps_with_spacing(timesteps)
            grid = tables.custom_timesteps(timesteps, c.num_train_timesteps, integer=False)
        else:
            tables.check_num_steps(num_inference_steps, c.num_train_timesteps)
            grid = self._grid(num_inference_steps)
        self.num_inference_steps = len(grid)
        train = tables.train_sigmas(self.alphas_cumprod)
        levels = np.interp(grid, np.arange(len(train)), train)
        spacing = self._sigma_spacing
        if spacing is not None:
            levels = tables.spaced_sigmas(spacing, float(levels[-1]), float(levels[0]), len(grid))
            grid = tables.sigma_to_t(levels, np.log(train))
        return grid, levels

    def _check_train_timesteps(self, num_train_timesteps: int | None) -> None:
        """The reference's ``set_timesteps(…, num_train_timesteps)`` spreads the grid over another range than the σ
        table it interpolates; only the config's own value (or None) is taken."""
        if num_train_timesteps not in (None, self.config.num_train_timesteps):
            raise ValueError(
                f"num_train_timesteps={num_train_timesteps!r} is not supported: the schedule uses the config's "
                f"num_train_timesteps={self.config.num_train_timesteps}"
            )

    def _start_run(self, timesteps: np.ndarray, doubled_sigmas: torch.Tensor, device: Any) -> None:
        self._install(timesteps, doubled_sigmas.numpy(), device)
        self._predictor: tuple[torch.Tensor, ...] | None = None  # replaced, never modified (copy())

    # -- bookkeeping ------------------------------------------------------------------------------------------------

    @property
    def state_in_first_order(self) -> bool:
        """Whether the next ``step`` is a predictor (the first evaluation of a σ-grid step)."""
        index = self._step_index if self._step_index is not None else (self._begin_index or 0)
        return index % 2 == 0

    def _half_step(self, timestep: Any) -> tuple[int, int, bool]:
        """(table position, σ-grid step k, whether this is the corrector) of this call."""
        position = self._index(timestep)
        if position >= len(self._host_timesteps):
            raise ValueError(f"this run has {len(self._host_timesteps)} timesteps; step() was called once too often")
        corrector = position % 2 == 1
        if corrector and self._predictor is None:
            raise ValueError(
                f"{type(self).__name__}: the run starts at table index {position}, the second evaluation of a "
                f"σ step; begin at an even index (set_begin_index({position + 1}) or {position - 1})"
            )
        return position, position // 2, corrector

    def _model_sigma(self, k: int, corrector: bool) -> torch.Tensor:
        """The noise level the model evaluates at."""
        return self._grid_sigmas[k]

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor) -> torch.Tensor:
        position = self._index(timestep)
        sigma = self._model_sigma(position // 2, position % 2 == 1)
        return sample / float((sigma**2 + 1) ** 0.5)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
        *,
        generator: Generators = None,
    ) -> SchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One half-step: the predictor of σ step k, or its corrector. ``generator``: for the ancestral sampler's
        noise; keyword-only here, so the reference's positional ``step(output, t, sample, False)`` means
        ``return_dict=False`` (the deterministic samplers draw nothing)."""
        position, k, corrector = self._half_step(timestep)
        model_output = noise_channels(model_output, sample)
        half = self._correct if corrector else self._predict
        prev_sample, x0 = half(model_output, sample, k, generator)
        self._step_index = position + 1
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


class HeunDiscreteScheduler(_SecondOrder):
    """Heun's method in σ (Karras et al. 2022, Algorithm 2, no churn): an Euler predictor to s_{k+1}, then the
    trapezoidal corrector with the mean of the two slopes. ``clip_sample`` clamps x̂₀ to ±``clip_sample_range``."""

    config_defaults = {**_SHARED_DEFAULTS, "clip_sample": False, "clip_sample_range": 1.0}

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: torch.device | str | None = None,
        num_train_timesteps: int | None = None,
        timesteps: Sequence[float] | None = None,
    ) -> None:
        """``num_inference_steps`` σ steps (2n − 1 model evaluations), or custom ``timesteps`` (strictly descending
        in [0, T−1], fractions allowed; not with a σ spacing). ``num_train_timesteps``: only the config's."""
        self._check_train_timesteps(num_train_timesteps)
        grid, levels = self._sigma_grid(num_inference_steps, timesteps)
        sigmas = torch.from_numpy(np.append(levels, 0.0).astype(np.float32))
        self._grid_sigmas = sigmas
        steps = torch.from_numpy(np.array(grid, dtype=np.float32))  # a copy: a 1-step grid may have a negative stride
        self._start_run(_doubled(steps).numpy(), _doubled(sigmas[:-1], sigmas[-1:]), device)

    def _x0(self, model_output, sample, sigma, sigma_hat=None):
        x0 = super()._x0(model_output, sample, sigma)
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return x0

    def _model_sigma(self, k: int, corrector: bool) -> torch.Tensor:
        return self._grid_sigmas[k + 1] if corrector else self._grid_sigmas[k]

    def _predict(self, model_output, sample, k, generator):
        sigma, sigma_next = self._grid_sigmas[k], self._grid_sigmas[k + 1]
        x0 = self._x0(model_output, sample, sigma)
        slope = (sample - x0) / float(sigma)
        self._predictor = (sample, slope)
        return sample + slope * float(sigma_next - sigma), x0

    def _correct(self, model_output, sample, k, generator):
        sigma, sigma_next = self._grid_sigmas[k], self._grid_sigmas[k + 1]
        x0 = self._x0(model_output, sample, sigma_next)
        start, first_slope = self._predictor
        slope = (first_slope + (sample - x0) / float(sigma_next)) / 2
        self._predictor = None
        return start + slope * float(sigma_next - sigma), x0


class _DPM2Family(_SecondOrder):
    """DPM2's grid: every corrector evaluates at a midpoint σ, listed with its own timestep. ``prediction_type``
    "sample" (x̂₀ = the model output), which the reference's DPM2 classes refuse in ``step``, works here."""

    def set_timesteps(
        self,
        num_inference_steps: int,
        device: torch.device | str | None = None,
        num_train_timesteps: int | None = None,
    ) -> None:
        """``num_inference_steps`` σ steps (2n − 1 model evaluations); the corrector's timesteps are those of the
        midpoints' σ. ``num_train_timesteps``: only the config's."""
        self._check_train_timesteps(num_train_timesteps)
        grid, levels = self._sigma_grid(num_inference_steps, None)
        if self.config.use_karras_sigmas:
            grid = grid.round()  # the reference rounds Karras timesteps here (not Heun's)
        sigmas = torch.from_numpy(np.append(levels, 0.0).astype(np.float32))
        self._grid_sigmas = sigmas
        self._build_midpoints(sigmas)
        train = tables.train_sigmas(self.alphas_cumprod)
        mid_steps = _timesteps_float32(self._mid_sigmas[:-1], np.log(train))
        interleaved = np.stack([mid_steps, grid[1:]], axis=1).reshape(-1)
        self._start_run(np.concatenate([grid[:1], interleaved]), _doubled(sigmas, sigmas[-1:]), device)

    def _predict(self, model_output, sample, k, generator):
        """An Euler step to the midpoint σ."""
        sigma = self._grid_sigmas[k]
        x0 = self._x0(model_output, sample, sigma)
        self._predictor = (sample,)
        return sample + (sample - x0) / float(sigma) * float(self._mid_sigmas[k] - sigma), x0

    def _model_sigma(self, k: int, corrector: bool) -> torch.Tensor:
        return self._mid_sigmas[k] if corrector else self._grid_sigmas[k]


class KDPM2DiscreteScheduler(_DPM2Family):
    """DPM2 (Karras et al. 2022's DPM-Solver-2 variant in k-diffusion): an Euler predictor to the geometric midpoint
    of s_k and s_{k+1}, then the whole step with the midpoint's slope."""

    config_defaults = dict(_SHARED_DEFAULTS)

    def _build_midpoints(self, sigmas: torch.Tensor) -> None:
        # (n,): the midpoint of step k; the last step's is 0 (its predictor goes to σ = 0)
        self._mid_sigmas = _geometric_midpoint(sigmas[1:], sigmas[:-1])

    def _correct(self, model_output, sample, k, generator):
        x0 = self._x0(model_output, sample, self._mid_sigmas[k])
        (start,) = self._predictor
        self._predictor = None
        step = float(self._grid_sigmas[k + 1] - self._grid_sigmas[k])
        return start + (sample - x0) / float(self._mid_sigmas[k]) * step, x0


class KDPM2AncestralDiscreteScheduler(_DPM2Family):
    """Ancestral DPM2: the DPM2 step aims at σ_down, then adds fresh noise of σ_up (k-diffusion
    ``sample_dpm_2_ancestral``, η = 1). One draw from ``generator`` per corrector, in the model output's shape."""

    config_defaults = dict(_SHARED_DEFAULTS)

    def _build_midpoints(self, sigmas: torch.Tensor) -> None:
        current, following = sigmas[:-1], sigmas[1:]  # (n,) each
        self._sigma_up = (following**2 * (current**2 - following**2) / current**2) ** 0.5
        self._sigma_down = (following**2 - self._sigma_up**2) ** 0.5
        # σ_down = s_{k+1}²/s_k can underflow to 0: the midpoint is then 0 (the reference's is NaN)
        mid = _geometric_midpoint(current, self._sigma_down)
        mid[-1] = 0.0  # the last step: the predictor alone, to σ = 0
        self._mid_sigmas = mid

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: Generators = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One half-step; the corrector draws its noise from ``generator`` (positional, as the reference's)."""
        return super().step(model_output, timestep, sample, return_dict, generator=generator)

    def _correct(self, model_output, sample, k, generator):
        sigma_mid = self._mid_sigmas[k]
        x0 = self._x0(model_output, sample, sigma_mid)
        (start,) = self._predictor
        self._predictor = None
        if sigma_mid > 0:
            prev_sample = start + (sample - x0) / float(sigma_mid) * float(self._sigma_down[k] - self._grid_sigmas[k])
        else:  # σ_down = 0 (float32 underflow): the predictor has landed there; k-diffusion takes the Euler step
            prev_sample = sample
        noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
        return prev_sample + noise * float(self._sigma_up[k]), x0
