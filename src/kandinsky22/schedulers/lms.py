"""Linear multistep sampling in σ (k-diffusion's ``sample_lms``; Karras et al. 2022 parametrisation x = x₀ + σ·ε).

The ODE dx/dσ = (x − x̂₀)/σ = d(σ) is integrated with an Adams–Bashforth method on the non-uniform σ grid: d is
interpolated by the Lagrange polynomial through the last ``order`` derivatives, and that polynomial is integrated
over [σ_i, σ_{i+1}]. The reference integrates it numerically (``scipy.integrate.quad``); a polynomial integrates
exactly, so we do that with ``numpy.polynomial`` (the two agree to ~1e-7 relative: the reference evaluates its
integrand in float32).
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.polynomial import polynomial as P

from . import tables
from .base import BETA_DEFAULTS, SchedulerOutput, noise_channels
from .euler import _EulerFamily


def lms_coefficients(sigmas: list[float], i: int, order: int) -> list[float]:
    """∫_{σ_i}^{σ_{i+1}} ℓ_j(σ) dσ for j = 0 … order−1, where ℓ_j is the Lagrange basis polynomial that is 1 at
    σ_{i−j} and 0 at the other nodes σ_i, σ_{i−1}, …, σ_{i−order+1}. Weight j multiplies the derivative of step i − j.
    """
    nodes = [float(sigmas[i - k]) for k in range(order)]
    weights = []
    for j, node in enumerate(nodes):
        others = nodes[:j] + nodes[j + 1 :]
        basis = P.polyfromroots(others) / np.prod([node - other for other in others])  # ascending coefficients
        antiderivative = P.polyint(basis)
        weights.append(float(P.polyval(sigmas[i + 1], antiderivative) - P.polyval(sigmas[i], antiderivative)))
    return weights


class LMSDiscreteScheduler(_EulerFamily):
    """Linear multistep of order ``step(order=4)``: the first steps of a run use as many past derivatives as exist
    (1, 2, 3, then 4). ``use_karras_sigmas`` spaces the σ as Karras et al. 2022 (ρ = 7), ``use_exponential_sigmas``
    evenly in log σ, ``use_beta_sigmas`` at the quantiles of Beta(0.6, 0.6), over the run's range.

    The reference takes the order from the step's index in the schedule, not from the derivatives it holds: a run that
    starts mid-schedule (img2img) then weighs its few derivatives with the coefficients of a higher-order polynomial
    whose other nodes have no derivative (the first step of an img2img run is not an Euler step). We count the
    derivatives, as k-diffusion does; a run from the start is the reference's.
    """

    config_defaults = {
        **BETA_DEFAULTS,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "prediction_type": "epsilon",
        "timestep_spacing": "linspace",
        "steps_offset": 0,
    }

    def _build(self) -> None:
        self.betas, self.alphas_cumprod = self._training_alphas_cumprod()
        # As the reference: the table before set_timesteps is that of a run of every training step
        self.set_timesteps(self.config.num_train_timesteps)

    def _install(self, timesteps: np.ndarray, sigmas: np.ndarray, device: torch.device | str | None) -> None:
        super()._install(timesteps, sigmas, device)
        self._host_sigmas: list[float] = self.sigmas.tolist()
        self._derivatives: list[torch.Tensor] = []

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        c = self.config
        tables.check_num_steps(num_inference_steps, c.num_train_timesteps)
        grid = self._grid(num_inference_steps)
        train = tables.train_sigmas(self.alphas_cumprod)
        levels = np.interp(grid, np.arange(len(train)), train)
        spacing = self._sigma_spacing
        if spacing is not None:
            levels = tables.spaced_sigmas(spacing, float(levels[-1]), float(levels[0]), num_inference_steps)
            grid = tables.sigma_to_t(levels, np.log(train))
        self.num_inference_steps = num_inference_steps
        self._install(grid, np.append(levels, 0.0), device)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        order: int = 4,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One linear multistep step from σ_i to σ_{i+1} with up to ``order`` derivatives (the last ones kept)."""
        if isinstance(order, bool) or not isinstance(order, int) or order < 1:
            raise ValueError(f"order={order!r} must be an int >= 1")
        i = self._index(timestep)
        model_output = noise_channels(model_output, sample)
        sigma = self.sigmas[i]
        x0 = self._x0(model_output, sample, sigma)
        derivative = (sample - x0) / float(sigma)
        self._derivatives = [*self._derivatives, derivative][-order:]
        used = min(len(self._derivatives), order)
        weights = lms_coefficients(self._host_sigmas, i, used)
        # Newest derivative first, summed in that order as the reference does (float32 rounding)
        update = None
        for weight, d in zip(weights, reversed(self._derivatives)):
            update = weight * d if update is None else update + weight * d
        prev_sample = sample + update
        self._step_index = i + 1
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
