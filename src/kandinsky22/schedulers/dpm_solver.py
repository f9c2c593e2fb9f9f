"""DPM-Solver++ multistep (Lu et al. 2022, arXiv 2211.01095): the recommended fast sampler for K2.2 (2M, 20–25 steps;
performance-and-style §A5).

The solver works in λ = log(α/σ) and on data predictions x̂₀. With h = λ_t − λ_s, the first-order step is
x_t = (σ_t/σ_s)·x_s − α_t·(e^{−h} − 1)·x̂₀ (DDIM); orders 2 and 3 add finite differences of earlier x̂₀ (Algorithms 2
and the third-order variant). Step coefficients are float32, computed on the host in the reference's order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .base import (
    BETA_DEFAULTS,
    PREDICTION_TYPES,
    MultistepSolverMixin,
    SchedulerOutput,
    dynamic_threshold,
    noise_channels,
    predict_x0,
)


class DPMSolverMultistepScheduler(MultistepSolverMixin):
    """DPM-Solver++ (``algorithm_type="dpmsolver++"``) of order 1–3 with ``solver_type`` "midpoint" or "heun".

    ``lower_order_final`` drops to lower orders on the last steps of short (< 15 step) schedules, which stabilises
    them; the final step to σ = 0 is always first order with ``final_sigmas_type="zero"``. ``use_karras_sigmas``
    spaces the noise levels as Karras et al. 2022, ``use_exponential_sigmas`` evenly in log σ, ``use_beta_sigmas`` at
    the quantiles of Beta(0.6, 0.6). An 8-channel (learned-variance) model output is reduced to its 4 noise channels.
    As the reference, the timesteps of exponential and beta σ are truncated to integers (Karras ones are rounded,
    except on the cosine schedule): the model sees a timestep up to one below its σ's.
    """

    config_defaults = {
        **BETA_DEFAULTS,
        "solver_order": 2,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -float("inf"),
        "variance_type": None,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
    }

    def _normalize(self, values: dict[str, Any]) -> dict[str, Any]:
        if values["solver_type"] in ("logrho", "bh1", "bh2"):  # UniPC/DEIS solver types: the reference maps them
            values["solver_type"] = "midpoint"
        if values["algorithm_type"] == "deis":  # DEIS's, mapped as the reference maps it
            values["algorithm_type"] = "dpmsolver++"
        return values

    def _check_config(self) -> None:
        self._check_beta_config()
        self._require_choice("prediction_type", PREDICTION_TYPES)
        self._require_choice("algorithm_type", ("dpmsolver++",))
        self._require_choice("solver_type", ("midpoint", "heun"))
        self._require_choice("solver_order", (1, 2, 3))
        self._require_choice("final_sigmas_type", ("zero", "sigma_min"))
        self._require_default("use_lu_lambdas", "use_flow_sigmas", "use_dynamic_shifting")

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: torch.device | str | None = None,
        mu: float | None = None,
        timesteps: Sequence[int] | None = None,
    ) -> None:
        """``num_inference_steps`` spaced by ``timestep_spacing`` (or respaced σ), or the given ``timesteps``
        (strictly descending, in [0, T−1]; not with a σ spacing, and ``lambda_min_clipped`` does not apply to them).
        ``mu`` (the flow-matching time shift) needs ``use_dynamic_shifting``, which kandinsky22 does not have."""
        self._refuse_mu(mu)
        c = self.config
        round_karras = c.beta_schedule != "squaredcos_cap_v2"  # as the reference
        self._install_solver_run(
            num_inference_steps, timesteps, device, c.timestep_spacing, c.steps_offset, round_karras
        )

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[torch.Tensor]:
        """One solver step. ``generator`` and ``variance_noise`` are accepted for a uniform loop and unused, as in the
        reference: they feed its SDE variants, and DPM-Solver++ draws no noise."""
        c = self.config
        self._check_ready()
        i = self._index(timestep)
        n = len(self._host_timesteps)
        short = c.lower_order_final and n < 15
        final_first_order = i == n - 1 and (c.euler_at_final or short or c.final_sigmas_type == "zero")
        final_second_order = i == n - 2 and short
        eps_or_x0 = noise_channels(model_output, sample)
        x0 = predict_x0(c.prediction_type, eps_or_x0, sample, float(self._alpha[i]), float(self._sigma[i]))
        if c.thresholding:
            x0 = dynamic_threshold(x0, c.dynamic_thresholding_ratio, c.sample_max_value)
        self._model_outputs = [*self._model_outputs, x0][-c.solver_order :]
        warm = self._lower_order_nums
        # A step of zero length (Karras σ end at σ_min, and final_sigmas_type "sigma_min" repeats it) leaves the sample
        # as it is at first order; the higher orders divide by its length (the reference returns NaN there).
        zero_length = bool(self._lambda[i + 1] == self._lambda[i])  # a host table: no device read
        if c.solver_order == 1 or warm < 1 or final_first_order or zero_length:
            order = 1
        elif c.solver_order == 2 or warm < 2 or final_second_order:
            order = 2
        else:
            order = 3
        prev_sample = self._update(i, order, sample.to(torch.float32)).to(x0.dtype)
        self._lower_order_nums = min(warm + 1, c.solver_order)
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def _update(self, i: int, order: int, sample: torch.Tensor) -> torch.Tensor:
        """The multistep DPM-Solver++ update from σ_i to σ_{i+1} (Lu et al. 2022, eqs. 9 and 14–15)."""
        alpha, sigma, lam = self._alpha, self._sigma, self._lambda
        t, s0 = i + 1, i
        h = lam[t] - lam[s0]
        em1 = torch.exp(-h) - 1.0  # e^{−h} − 1
        x0_coeff = alpha[t] * em1
        outputs = self._model_outputs
        m0 = outputs[-1]
        x = float(sigma[t] / sigma[s0]) * sample - float(x0_coeff) * m0
        if order == 1:
            return x
        h0 = lam[s0] - lam[s0 - 1]
        r0 = h0 / h
        m1 = outputs[-2]
        if order == 2:
            d1 = float(1.0 / r0) * (m0 - m1)
            if self.config.solver_type == "midpoint":
                return x - float(0.5 * x0_coeff) * d1
            return x + float(alpha[t] * (em1 / h + 1.0)) * d1
        h1 = lam[s0 - 1] - lam[s0 - 2]
        r1 = h1 / h
        m2 = outputs[-3]
        d1_0 = float(1.0 / r0) * (m0 - m1)
        d1_1 = float(1.0 / r1) * (m1 - m2)
        d1 = d1_0 + float(r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = float(1.0 / (r0 + r1)) * (d1_0 - d1_1)
        x = x + float(alpha[t] * (em1 / h + 1.0)) * d1
        return x - float(alpha[t] * ((em1 + h) / h**2 - 0.5)) * d2
