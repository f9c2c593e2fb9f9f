"""Pseudo numerical methods for diffusion models (PNDM; Liu et al. 2022, arXiv 2202.09778).

PNDM integrates the probability-flow ODE with classical numerical methods whose Euler-like step is replaced by the
DDIM *transfer function* φ(x_t, ε, t → t′) (the paper's eq. 9):

    x_t′ = √(ᾱ_t′/ᾱ_t) · x_t − (ᾱ_t′ − ᾱ_t) / (ᾱ_t·√(1−ᾱ_t′) + √(ᾱ_t·(1−ᾱ_t)·ᾱ_t′)) · ε

* PRK (pseudo Runge–Kutta, eq. 13): the classical 4-stage Runge–Kutta scheme, each stage a transfer from x_t with
  the stage's ε: ε₁ at t, ε₂ and ε₃ at the midpoint t − δ/2, ε₄ at t − δ, then ε′ = (ε₁ + 2ε₂ + 2ε₃ + ε₄)/6.
* PLMS (pseudo linear multistep, eq. 12): the 4th-order Adams–Bashforth combination of the last four ε, one model
  call per step.

As the paper, the first three steps are PRK (12 model calls) to build the ε history PLMS needs. With
``skip_prk_steps`` they are replaced by one transfer with ε of the first call and then one with the average of that
and the ε at the next timestep (a pseudo improved-Euler step, needing the first timestep after the start twice),
followed by lower-order Adams–Bashforth steps until four ε are known.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from . import tables
from .base import BETA_DEFAULTS, SchedulerMixin, SchedulerOutput, host_value, noise_channels
from .ddpm import add_noise_vp

# Evaluations of one pseudo Runge–Kutta step and the number of such steps before PLMS takes over.
_RK_STAGES = 4
_RK_STEPS = 3


def adams_bashforth(history: list[torch.Tensor]) -> torch.Tensor:
    """The linear multistep ε′ from the last (up to four) ε, oldest first (PNDM eq. 12 and its lower orders).
    The expressions are the reference's, term for term, so that float32 rounding agrees."""
    if len(history) == 1:
        return history[-1]
    if len(history) == 2:
        return (3 * history[-1] - history[-2]) / 2
    if len(history) == 3:
        return (23 * history[-1] - 16 * history[-2] + 5 * history[-3]) / 12
    return (1 / 24) * (55 * history[-1] - 59 * history[-2] + 37 * history[-3] - 9 * history[-4])


class PNDMScheduler(SchedulerMixin):
    """PNDM: three pseudo Runge–Kutta steps (four model calls each), then pseudo linear multistep, one call per step.

    ``timesteps`` lists one entry per model call: n + 9 of them with the PRK warm-up (which needs n ≥ 4), n + 1 with
    ``skip_prk_steps`` (the second timestep repeated for the improved-Euler call). The step between grid points is
    always T // n, for every ``timestep_spacing``, and the PRK midpoint is (T // n) // 2 above the next grid point —
    the reference's arithmetic, kept for the same results.

    Runs that start mid-schedule (img2img with ``strength`` < 1, ``set_begin_index(k)`` with k > 0):

    * With the PRK warm-up the reference still takes the noise levels of the *full* schedule's first entries for its
      Runge–Kutta steps, whatever the sample's actual level: its img2img transfers a barely noised image as if it were
      pure noise. We refuse such a start (``set_begin_index`` raises ``ValueError``); use ``skip_prk_steps=True``.
    * With ``skip_prk_steps`` the pipelines slice the table at the step index, as the reference: a start at index k ≥ 2
      is past the repeated timestep, so after the warm-up every later call is labelled one grid point lower than the
      sample's level and the run ends with one step of denoising left undone (at k = 1 the improved-Euler call gets
      the start timestep again and a transfer from the level above). We copy this for the reference's results.

    The reference converts a ``v_prediction`` output to ε once per step, from the step's start sample and timestep,
    after combining the outputs of the calls — kept as well (the decoder's checkpoints predict ε).

    The reference has no ``begin_index``; ours is the table index a pipeline starts at, as for the other samplers.
    """

    config_defaults = {
        **BETA_DEFAULTS,
        "skip_prk_steps": False,
        "set_alpha_to_one": False,
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
        "steps_offset": 0,
    }
    init_noise_sigma = 1.0

    def _check_config(self) -> None:
        self._check_beta_config()
        self._require_choice("prediction_type", ("epsilon", "v_prediction"))

    def _build(self) -> None:
        self.betas, self.alphas_cumprod = self._training_alphas_cumprod()
        self.final_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        self.num_inference_steps = None
        self._set_schedule(np.arange(self.config.num_train_timesteps)[::-1], None, torch.int64)
        self._reset_run()

    def _reset_run(self) -> None:
        self._calls = 0  # model calls so far in this run (the reference's ``counter``)
        self._history: list[torch.Tensor] = []  # ε at the start of each step, the newest last
        self._rk_sum: torch.Tensor | None = None  # the weighted ε of the current Runge–Kutta step so far
        self._start_sample: torch.Tensor | None = None  # x at the start of a multi-call step

    @property
    def _use_prk(self) -> bool:
        return not self.config.skip_prk_steps

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        c = self.config
        tables.check_num_steps(num_inference_steps, c.num_train_timesteps)
        if self._use_prk and num_inference_steps < _RK_STEPS + 1:
            raise ValueError(
                f"num_inference_steps={num_inference_steps} is too few for PNDMScheduler's Runge–Kutta warm-up, which "
                f"takes the first {_RK_STEPS} steps: use at least {_RK_STEPS + 1}, or skip_prk_steps=True"
            )
        grid = tables.spaced_timesteps(c.timestep_spacing, num_inference_steps, c.num_train_timesteps, c.steps_offset)
        self.num_inference_steps = num_inference_steps
        if self._use_prk:
            half = c.num_train_timesteps // num_inference_steps // 2
            # Per Runge–Kutta step t → t′: the stages at t, t′ + δ/2 (twice) and t′
            prk = [[t, t_next + half, t_next + half, t_next] for t, t_next in zip(grid[:_RK_STEPS], grid[1:])]
            table = np.concatenate([np.array(prk, dtype=np.int64).reshape(-1), grid[_RK_STEPS:]])
        else:
            table = np.concatenate([grid[:2], grid[1:]]) if num_inference_steps > 1 else grid
        self._set_schedule(table, device, torch.int64)
        self._reset_run()

    def set_begin_index(self, begin_index: int = 0) -> None:
        if begin_index > 0 and self._use_prk:
            raise ValueError(
                f"PNDMScheduler with skip_prk_steps=False cannot start at step {begin_index} of its schedule (img2img "
                "with strength < 1): the Runge–Kutta warm-up would use the noise levels of the schedule's start, not "
                "the sample's. Use PNDMScheduler.from_config(config, skip_prk_steps=True)"
            )
        super().set_begin_index(begin_index)

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[torch.Tensor]:
        """One model call's update: a Runge–Kutta stage during the warm-up, else a linear multistep step. Returns
        ``(prev_sample,)`` without ``return_dict``, as the reference (no x̂₀)."""
        if self.num_inference_steps is None:
            raise ValueError("Call set_timesteps(num_inference_steps) before step()")
        model_output = noise_channels(model_output, sample)
        index = self._advance()
        value = host_value(timestep)
        t = self._host_timesteps[index] if value is None else int(value)
        if self._use_prk and self._calls < _RK_STAGES * _RK_STEPS:
            prev_sample = self._runge_kutta_stage(model_output, t, sample)
        else:
            prev_sample = self._multistep(model_output, t, sample)
        self._calls += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def _runge_kutta_stage(self, eps: torch.Tensor, t: int, sample: torch.Tensor) -> torch.Tensor:
        """Stage k of the current PRK step: every stage transfers from the step's start sample, at the step's start
        timestep, to the midpoint (stages 0–1) or the end (stages 2–3); the last uses the weighted mean of all four ε."""
        stage = self._calls % _RK_STAGES
        start_t = self._host_timesteps[self._calls - stage]
        half = self.config.num_train_timesteps // self.num_inference_steps // 2
        target = t - half if stage % 2 == 0 else t
        if stage == 0:
            self._rk_sum = 1 / 6 * eps
            self._history = [*self._history, eps]
            self._start_sample = sample
        elif stage < _RK_STAGES - 1:
            self._rk_sum = self._rk_sum + 1 / 3 * eps
        else:
            eps = self._rk_sum + 1 / 6 * eps
            self._rk_sum = None
        return self._transfer(self._start_sample, start_t, target, eps)

    def _multistep(self, eps: torch.Tensor, t: int, sample: torch.Tensor) -> torch.Tensor:
        """A PLMS step t → t − T//n. Without the PRK warm-up, the run's first step is a DDIM step and the second
        call, at its end point, redoes it from the same start with the mean of both ε (improved Euler)."""
        stride = self.config.num_train_timesteps // self.num_inference_steps
        if self._calls == 1 and not self._use_prk:
            combined = (eps + self._history[-1]) / 2
            start, self._start_sample = self._start_sample, None
            return self._transfer(start, t + stride, t, combined)
        self._history = [*self._history[-3:], eps]
        if self._calls == 0:
            self._start_sample = sample
        return self._transfer(sample, t, t - stride, adams_bashforth(self._history))

    def _transfer(self, sample: torch.Tensor, t: int, t_prev: int, eps: torch.Tensor) -> torch.Tensor:
        """The DDIM transfer φ (PNDM eq. 9) from timestep ``t`` to ``t_prev`` (below 0: ``final_alpha_cumprod``),
        with float32 coefficients as the reference."""
        alpha = self.alphas_cumprod[t]
        alpha_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else self.final_alpha_cumprod
        beta, beta_prev = 1 - alpha, 1 - alpha_prev
        if self.config.prediction_type == "v_prediction":  # ε = √ᾱ·v + √(1−ᾱ)·x
            eps = float(alpha**0.5) * eps + float(beta**0.5) * sample
        sample_coeff = float((alpha_prev / alpha) ** 0.5)
        denominator = float(alpha * beta_prev**0.5 + (alpha * beta * alpha_prev) ** 0.5)
        return sample_coeff * sample - float(alpha_prev - alpha) * eps / denominator

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return add_noise_vp(self._on_device(self.alphas_cumprod, original_samples), original_samples, noise, timesteps)
