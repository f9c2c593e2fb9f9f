"""DPM-Solver singlestep (Lu et al. 2022: DPM-Solver, arXiv 2206.00927, Algorithms 1–2; DPM-Solver++, arXiv
2211.01095, Algorithm 1): the steps are taken in groups of k (the order), each group a k-th order step from its first
noise level to its last; the group's inner steps are the lower-order solutions that supply its intermediate model
evaluations. One model evaluation per step, as the multistep solvers.

Three forms: ``dpmsolver++`` (data prediction x̂₀, the default), ``dpmsolver`` (noise prediction ε̂) and
``sde-dpmsolver++`` (the SDE variant of DPM-Solver++, which draws fresh noise at every step).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .base import BETA_DEFAULTS, PREDICTION_TYPES, MultistepSolverMixin, SchedulerOutput, noise_channels
from .noise import Generators, randn_tensor

ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++")


def singlestep_orders(steps: int, order: int, lower_order_final: bool, final_sigmas_type: str) -> list[int]:
    """The order of each step: repeated groups 1, 2, …, ``order``. With ``lower_order_final`` a last incomplete group
    is cut short (and a last complete group of 3 becomes 1, 2 + 1); without it, the step count must be a multiple of
    the order. A final step to σ = 0 is first order (the higher orders divide by h = ∞ there)."""
    group = list(range(1, order + 1))
    if not lower_order_final:
        orders = group * (steps // order)
    elif order == 3 and steps % 3 == 0:
        orders = group * (steps // 3 - 1) + [1, 2, 1]
    elif order == 2 and steps % 2 == 0:
        orders = group * (steps // 2 - 1) + [1, 1]
    else:
        orders = group * (steps // order) + group[: steps % order]
    if final_sigmas_type == "zero":
        orders[-1] = 1
    return orders


class DPMSolverSinglestepScheduler(MultistepSolverMixin):
    """DPM-Solver(++) singlestep of order 1–3 with ``solver_type`` "midpoint" or "heun"; the σ spacings
    (``use_karras_sigmas``, ``use_exponential_sigmas``, ``use_beta_sigmas``) and ``lambda_min_clipped`` as in
    :class:`DPMSolverMultistepScheduler`. Timesteps are always "linspace" (the reference
    has no ``timestep_spacing`` for this sampler).

    ``lower_order_final=False`` needs a step count that is a multiple of ``solver_order`` and a final σ > 0
    (``final_sigmas_type="sigma_min"``); otherwise the run uses lower orders at the end. The reference makes that
    switch by rewriting its config, so it sticks for later runs; ours decides per run and leaves the config alone.
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
        "lower_order_final": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -float("inf"),
        "variance_type": None,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
    }

    def _normalize(self, values: dict[str, Any]) -> dict[str, Any]:
        # Other solvers' names, mapped as the reference maps them
        if values["algorithm_type"] == "deis":
            values["algorithm_type"] = "dpmsolver++"
        if values["solver_type"] in ("logrho", "bh1", "bh2"):
            values["solver_type"] = "midpoint"
        return values

    def _check_config(self) -> None:
        c = self.config
        self._check_beta_config()
        self._require_choice("prediction_type", PREDICTION_TYPES)
        self._require_choice("algorithm_type", ALGORITHMS)
        self._require_choice("solver_type", ("midpoint", "heun"))
        self._require_choice("solver_order", (1, 2, 3))
        self._require_choice("final_sigmas_type", ("zero", "sigma_min"))
        self._require_default("use_flow_sigmas", "use_dynamic_shifting")
        if c.algorithm_type == "dpmsolver" and c.final_sigmas_type == "zero":  # as the reference: λ = ∞ at σ = 0
            raise ValueError(
                "DPMSolverSinglestepScheduler: algorithm_type='dpmsolver' needs final_sigmas_type='sigma_min' "
                "(final_sigmas_type='zero' is not supported with it)"
            )
        if c.algorithm_type == "dpmsolver" and c.thresholding:  # the reference fails inside its first step
            raise ValueError(
                "DPMSolverSinglestepScheduler: thresholding=True is not supported with algorithm_type='dpmsolver'"
            )

    def _install(self, timesteps: np.ndarray, sigmas: np.ndarray, device: torch.device | str | None) -> None:
        super()._install(timesteps, sigmas, device)
        self._group_start: torch.Tensor | None = None  # the sample where the current group of steps began
        c = self.config
        n = len(timesteps)
        lower_order_final = c.lower_order_final or n % c.solver_order != 0 or c.final_sigmas_type == "zero"
        self._orders = singlestep_orders(n, c.solver_order, lower_order_final, c.final_sigmas_type)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: torch.device | str | None = None,
        mu: float | None = None,
        timesteps: Sequence[int] | None = None,
    ) -> None:
        """``num_inference_steps`` spaced evenly ("linspace", below ``lambda_min_clipped``) or by a σ spacing, or the
        given ``timesteps`` (strictly descending, in [0, T−1]; not with a σ spacing)."""
        self._refuse_mu(mu)
        self._install_solver_run(num_inference_steps, timesteps, device, "linspace", 0, round_karras=True)

    @property
    def _predicts_x0(self) -> bool:  # the ++ forms integrate x̂₀, "dpmsolver" ε̂
        return self.config.algorithm_type != "dpmsolver"

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: Generators = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[torch.Tensor]:
        """One step; ``generator`` feeds the noise of ``sde-dpmsolver++`` (one draw per step), the others draw none."""
        c = self.config
        self._check_ready()
        i = self._index(timestep)
        prediction = self._convert(noise_channels(model_output, sample), sample, i)
        self._model_outputs = [*self._model_outputs, prediction][-c.solver_order :]
        noise = None
        if c.algorithm_type == "sde-dpmsolver++":
            noise = randn_tensor(prediction.shape, generator, prediction.device, prediction.dtype)
        # A run that starts mid-group (img2img) has fewer predictions than the group's order: it starts a new group
        order = min(self._orders[i], len(self._model_outputs))
        if order == 1:
            self._group_start = sample
        prev_sample = self._update(i, order, self._group_start, noise)
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def _update(self, i: int, order: int, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """The k-th order step from the group's start σ_{i+1−k} to σ_{i+1} (Lu et al. 2022, eqs. 3.3–3.5 and their
        data-prediction counterparts), coefficients float32 on the host in the reference's order."""
        alpha, sigma, lam = self._alpha, self._sigma, self._lambda
        algorithm, heun = self.config.algorithm_type, self.config.solver_type == "heun"
        t, s = i + 1, i + 1 - order
        h = lam[t] - lam[s]
        m = self._model_outputs
        if order == 1:
            d0, d1, d2 = m[-1], None, None
        elif order == 2:
            r0 = (lam[s + 1] - lam[s]) / h
            d0, d1, d2 = m[-2], float(1.0 / r0) * (m[-1] - m[-2]), None
        else:
            r0, r1 = (lam[s + 2] - lam[s]) / h, (lam[s + 1] - lam[s]) / h
            d1_0, d1_1 = float(1.0 / r1) * (m[-2] - m[-3]), float(1.0 / r0) * (m[-1] - m[-3])
            d0 = m[-3]
            if heun:
                d1 = (float(r0) * d1_0 - float(r1) * d1_1) / float(r0 - r1)
                d2 = (2.0 * (d1_1 - d1_0)) / float(r0 - r1)
            else:  # the midpoint form uses the newer difference only
                d1, d2 = d1_1, None
        if algorithm == "dpmsolver++":
            em1 = torch.exp(-h) - 1.0  # e^{−h} − 1
            out = float(sigma[t] / sigma[s]) * x - float(alpha[t] * em1) * d0
            if order == 2 and not heun:
                return out - float(0.5 * (alpha[t] * em1)) * d1
            if order >= 2:
                out = out + float(alpha[t] * (em1 / h + 1.0)) * d1
            if d2 is not None:
                out = out - float(alpha[t] * ((em1 + h) / h**2 - 0.5)) * d2
            return out
        if algorithm == "dpmsolver":
            ep1 = torch.exp(h) - 1.0  # e^{h} − 1
            out = float(alpha[t] / alpha[s]) * x - float(sigma[t] * ep1) * d0
            if order == 2 and not heun:
                return out - float(0.5 * (sigma[t] * ep1)) * d1
            if order >= 2:
                out = out - float(sigma[t] * (ep1 / h - 1.0)) * d1
            if d2 is not None:
                out = out - float(sigma[t] * ((ep1 - h) / h**2 - 0.5)) * d2
            return out
        # sde-dpmsolver++ (Lu et al. 2022b, §4): the data-prediction step with e^{−2h} and fresh noise
        one_m = 1.0 - torch.exp(-2.0 * h)  # 1 − e^{−2h}
        out = float(sigma[t] / sigma[s] * torch.exp(-h)) * x + float(alpha[t] * one_m) * d0
        if order == 2 and not heun:
            out = out + float(0.5 * (alpha[t] * one_m)) * d1
        elif order >= 2:
            out = out + float(alpha[t] * (one_m / (-2.0 * h) + 1.0)) * d1
        if d2 is not None:
            out = out + float(alpha[t] * ((one_m + -2.0 * h) / (-2.0 * h) ** 2 - 0.5)) * d2
        return out + float(sigma[t] * torch.sqrt(1.0 - torch.exp(-2 * h))) * noise
