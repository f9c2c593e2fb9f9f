"""DEIS multistep (Zhang & Chen 2022, "Fast Sampling of Diffusion Models with Exponential Integrator", arXiv
2204.13902), the "logρ" variant: an Adams–Bashforth method for the probability-flow ODE in ρ = σ_t/α_t.

With x̃ = x/α the ODE is dx̃/dρ = ε̂(x, ρ) exactly (no linear term left to integrate), so a step from ρ_s to ρ_t is
x̃_t = x̃_s + ∫ ε̂ dρ, where ε̂ is interpolated by the Lagrange polynomial in log ρ through the last k predictions
(§4, "ρAB-DEIS"). The integral of a polynomial in log ρ against dρ = e^u du has a closed form, computed here exactly.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from numpy.polynomial import polynomial as P

from . import tables
from .base import (
    BETA_DEFAULTS,
    PREDICTION_TYPES,
    MultistepSolverMixin,
    SchedulerOutput,
    dynamic_threshold,
    noise_channels,
    predict_x0,
)


def deis_coefficients(rho_from: float, rho_to: float, nodes: list[float]) -> list[float]:
    """∫_{ρ_from}^{ρ_to} ℓ_j(log ρ) dρ for each node ρ_j, ℓ_j the Lagrange basis in u = log ρ on the nodes' logs.

    ∫ p(u)·e^u du = e^u · Σ_k (−1)^k p^{(k)}(u) for a polynomial p (integration by parts)."""
    logs = [math.log(node) for node in nodes]
    weights = []
    for j, log_j in enumerate(logs):
        others = logs[:j] + logs[j + 1 :]
        basis = P.polyfromroots(others) / np.prod([log_j - other for other in others])
        series = np.zeros(1)
        for k in range(len(nodes)):
            series = P.polyadd(series, (-1) ** k * P.polyder(basis, k))
        primitive_to = rho_to * P.polyval(math.log(rho_to), series)
        primitive_from = rho_from * P.polyval(math.log(rho_from), series)
        weights.append(float(primitive_to - primitive_from))
    return weights


class DEISMultistepScheduler(MultistepSolverMixin):
    """DEIS (``algorithm_type="deis"``, ``solver_type="logrho"``) of order 1–3; ``lower_order_final`` and
    the σ spacings as in :class:`DPMSolverMultistepScheduler`. The last step goes to the σ of t = 0 (σ_min), never to
    σ = 0 (where ρ = 0 and log ρ = −∞); with respaced σ it goes to the last of them (a step of length zero)."""

    config_defaults = {
        **BETA_DEFAULTS,
        "solver_order": 2,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "algorithm_type": "deis",
        "solver_type": "logrho",
        "lower_order_final": True,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
    }

    def _normalize(self, values: dict[str, Any]) -> dict[str, Any]:
        # Other solvers' names, mapped as the reference maps them
        if values["algorithm_type"] in ("dpmsolver", "dpmsolver++"):
            values["algorithm_type"] = "deis"
        if values["solver_type"] in ("midpoint", "heun", "bh1", "bh2"):
            values["solver_type"] = "logrho"
        return values

    def _check_config(self) -> None:
        self._check_beta_config()
        self._require_choice("prediction_type", PREDICTION_TYPES)
        self._require_choice("algorithm_type", ("deis",))
        self._require_choice("solver_type", ("logrho",))
        self._require_choice("solver_order", (1, 2, 3))
        self._require_default("use_flow_sigmas", "use_dynamic_shifting")

    def set_timesteps(
        self, num_inference_steps: int, device: torch.device | str | None = None, mu: float | None = None
    ) -> None:
        c = self.config
        total = c.num_train_timesteps
        self._refuse_mu(mu)
        tables.check_num_steps(num_inference_steps, total)
        grid = tables.solver_timesteps(c.timestep_spacing, num_inference_steps, total, c.steps_offset)
        train = tables.train_sigmas(self.alphas_cumprod)
        spacing = self._sigma_spacing
        if spacing is not None:
            sigmas = tables.spaced_sigmas(spacing, float(train[0]), float(train[-1]), num_inference_steps)
            grid = tables.sigma_to_t(sigmas, np.log(train))
            if spacing == "karras":  # as the reference; the other timesteps are truncated (as int64)
                grid = grid.round()
            final = float(sigmas[-1])  # a last step of length zero, as the reference
        else:
            sigmas = np.interp(grid, np.arange(len(train)), train)
            ac = self.alphas_cumprod
            final = float(((1 - ac[0]) / ac[0]) ** 0.5)
        self.num_inference_steps = len(grid)
        self._install(grid, np.append(sigmas, final), device)

    def step(
        self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor, return_dict: bool = True
    ) -> SchedulerOutput | tuple[torch.Tensor]:
        c = self.config
        self._check_ready()
        i = self._index(timestep)
        n = len(self._host_timesteps)
        short = c.lower_order_final and n < 15
        alpha, sigma = float(self._alpha[i]), float(self._sigma[i])
        x0 = predict_x0(c.prediction_type, noise_channels(model_output, sample), sample, alpha, sigma)
        if c.thresholding:
            x0 = dynamic_threshold(x0, c.dynamic_thresholding_ratio, c.sample_max_value)
        eps = (sample - alpha * x0) / sigma  # the solver integrates ε̂ (of the thresholded x̂₀, if any)
        self._model_outputs = [*self._model_outputs, eps][-c.solver_order :]
        order = min(c.solver_order, self._lower_order_nums + 1)
        if short and i == n - 1:
            order = 1
        elif short and i == n - 2:
            order = min(order, 2)
        prev_sample = self._update(i, order, sample)
        self._lower_order_nums = min(self._lower_order_nums + 1, c.solver_order)
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def _update(self, i: int, order: int, sample: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self._alpha, self._sigma
        t = i + 1
        if order == 1:  # the exponential-integrator (DDIM) step: α_t/α_s·x − σ_t·(e^h − 1)·ε̂
            h = self._lambda[t] - self._lambda[i]
            return (
                float(alpha[t] / alpha[i]) * sample - float(sigma[t] * (torch.exp(h) - 1.0)) * self._model_outputs[-1]
            )
        rho = [float(sigma[k] / alpha[k]) for k in range(i - order + 1, t + 1)]  # ρ_{s_{k−1}}, …, ρ_{s0}, ρ_t
        nodes = rho[-2::-1]  # ρ_{s0}, ρ_{s1}, …
        weights = deis_coefficients(nodes[0], rho[-1], nodes)
        x = sample / float(alpha[i])
        for weight, eps in zip(weights, reversed(self._model_outputs)):
            x = x + weight * eps
        return float(alpha[t]) * x
