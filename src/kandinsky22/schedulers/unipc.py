"""UniPC (Zhao et al. 2023, arXiv 2302.04867): a multistep predictor (UniP) with a corrector (UniC) that reuses
the model evaluation of the next step, so it costs nothing extra. Strongest in the 5–15 step range
(performance-and-style §A5).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from . import tables
from .base import BETA_DEFAULTS, PREDICTION_TYPES, MultistepSolverMixin, SchedulerOutput, noise_channels


class UniPCMultistepScheduler(MultistepSolverMixin):
    """UniPC with B(h) = h ("bh1") or e^h − 1 ("bh2", the default), in data prediction (``predict_x0``) or noise
    prediction form, order 1–3. Corrector steps listed in ``disable_corrector`` (step indices) are skipped.
    """

    config_defaults = {
        **BETA_DEFAULTS,
        "solver_order": 2,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "predict_x0": True,
        "solver_type": "bh2",
        "lower_order_final": True,
        "disable_corrector": [],
        "solver_p": None,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "final_sigmas_type": "zero",
        "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
        "sigma_min": None,
        "sigma_max": None,
        "shift_terminal": None,
    }

    def _normalize(self, values: dict[str, Any]) -> dict[str, Any]:
        if values["solver_type"] in ("midpoint", "heun", "logrho"):  # DPM-Solver/DEIS types: the reference maps them
            values["solver_type"] = "bh2"
        return values

    def _check_config(self) -> None:
        self._check_beta_config()
        self._require_choice("prediction_type", PREDICTION_TYPES)
        self._require_choice("solver_type", ("bh1", "bh2"))
        self._require_choice("solver_order", (1, 2, 3))
        self._require_choice("final_sigmas_type", ("zero", "sigma_min"))
        self._require_default("solver_p", "use_flow_sigmas", "use_dynamic_shifting", "shift_terminal")

    def _install(self, timesteps: np.ndarray, sigmas: np.ndarray, device: torch.device | str | None) -> None:
        super()._install(timesteps, sigmas, device)
        self._last_sample: torch.Tensor | None = None  # the predictor's input, for the next step's corrector
        self._this_order = 1

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: torch.device | str | None = None,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
    ) -> None:
        """``num_inference_steps`` spaced by ``timestep_spacing`` (or respaced σ: Karras, exponential or beta, between
        ``sigma_min`` and ``sigma_max`` where given). The reference takes custom ``sigmas``
        and ``mu`` only for flow-matching σ (``use_flow_sigmas``, ``use_dynamic_shifting``), which kandinsky22 does
        not implement: either one is refused."""
        c = self.config
        total = c.num_train_timesteps
        if sigmas is not None:  # as the reference (for a config without flow σ)
            raise ValueError(
                f"sigmas={tables.brief(sigmas)} needs use_flow_sigmas=True (flow-matching σ), which kandinsky22 does "
                f"not implement; this UniPCMultistepScheduler has use_flow_sigmas={c.use_flow_sigmas!r}"
            )
        self._refuse_mu(mu)
        tables.check_num_steps(num_inference_steps, total)
        grid = tables.solver_timesteps(c.timestep_spacing, num_inference_steps, total, c.steps_offset)
        train = tables.train_sigmas(self.alphas_cumprod)
        spacing = self._sigma_spacing
        if spacing is not None:
            low = c.sigma_min if c.sigma_min is not None else float(train[0])
            high = c.sigma_max if c.sigma_max is not None else float(train[-1])
            sigmas = tables.spaced_sigmas(spacing, low, high, num_inference_steps)
            grid = tables.sigma_to_t(sigmas, np.log(train))
            if spacing == "karras":  # as the reference; the other timesteps are truncated (as int64)
                grid = grid.round()
            final = float(sigmas[-1]) if c.final_sigmas_type == "sigma_min" else 0.0
        else:
            sigmas = np.interp(grid, np.arange(len(train)), train)
            ac = self.alphas_cumprod
            final = float(((1 - ac[0]) / ac[0]) ** 0.5) if c.final_sigmas_type == "sigma_min" else 0.0
        self.num_inference_steps = len(grid)
        self._install(grid, np.append(sigmas, final), device)

    @property
    def _predicts_x0(self) -> bool:
        return self.config.predict_x0

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
        *,
        generator: torch.Generator | None = None,
    ) -> SchedulerOutput | tuple[torch.Tensor]:
        """Correct the last prediction with this model output (UniC), then predict the next sample (UniP).
        ``generator`` is accepted for a uniform loop; UniPC draws no noise. It is keyword-only so that the
        reference's positional ``step(output, t, sample, False)`` means ``return_dict=False`` here too."""
        c = self.config
        self._check_ready()
        i = self._index(timestep)
        prediction = self._convert(noise_channels(model_output, sample), sample, i)
        if i > 0 and (i - 1) not in c.disable_corrector and self._last_sample is not None:
            sample = self._unipc(i - 1, self._this_order, self._last_sample, prediction)
        self._model_outputs = [*self._model_outputs, prediction][-c.solver_order :]
        order = min(c.solver_order, len(self._host_timesteps) - i) if c.lower_order_final else c.solver_order
        self._this_order = min(order, self._lower_order_nums + 1)  # warm-up: not enough history yet
        self._last_sample = sample
        prev_sample = self._unipc(i, self._this_order, sample)
        self._lower_order_nums = min(self._lower_order_nums + 1, c.solver_order)
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def _unipc(self, s0: int, order: int, x: torch.Tensor, model_t: torch.Tensor | None = None) -> torch.Tensor:
        """From σ_{s0} to σ_{s0+1} with the ``order`` latest stored predictions (Zhao et al. 2023, Algorithms 2–3).

        Without ``model_t`` this is the predictor UniP; with the model's prediction at σ_{s0+1} it is the corrector
        UniC, which returns the corrected sample at σ_{s0+1}.
        """
        t = s0 + 1
        lam = self._lambda
        history = self._model_outputs
        m0 = history[-1]
        h = lam[t] - lam[s0]
        ratios, d1s = [], []  # r_k = (λ_{s_k} − λ_{s0})/h and the scaled differences D1_k = (m_k − m0)/r_k
        for k in range(1, order):
            rk = (lam[s0 - k] - lam[s0]) / h
            ratios.append(rk)
            d1s.append((history[-(k + 1)] - m0) / float(rk))
        rks = torch.stack([*ratios, torch.ones(())])
        hh = -h if self.config.predict_x0 else h
        h_phi_1 = torch.expm1(hh)  # h·φ₁(h) = e^h − 1
        h_phi_k = h_phi_1 / hh - 1
        b_h = hh if self.config.solver_type == "bh1" else torch.expm1(hh)
        factorial = 1
        powers, rhs = [], []
        for k in range(1, order + 1):
            powers.append(torch.pow(rks, k - 1))
            rhs.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        r_matrix, b = torch.stack(powers), torch.stack(rhs)
        # The predictor weighs the order − 1 stored differences; the corrector one more, the new model output.
        size = order - 1 if model_t is None else order
        if size == 0:
            rhos = []
        elif size == 1:
            rhos = [0.5]
        else:
            rhos = torch.linalg.solve(r_matrix[:size, :size], b[:size]).to(x.dtype).tolist()
        if self.config.predict_x0:
            base = float(self._sigma[t] / self._sigma[s0]) * x - float(self._alpha[t] * h_phi_1) * m0
            scale = float(self._alpha[t] * b_h)
        else:
            base = float(self._alpha[t] / self._alpha[s0]) * x - float(self._sigma[t] * h_phi_1) * m0
            scale = float(self._sigma[t] * b_h)
        residual = None
        for rho, d1 in zip(rhos, d1s):
            residual = rho * d1 if residual is None else residual + rho * d1
        if model_t is not None:
            last = rhos[-1] * (model_t - m0)
            residual = last if residual is None else residual + last
        if residual is None:
            return base.to(x.dtype)
        return (base - scale * residual).to(x.dtype)
