"""Noise-schedule tables shared by every scheduler: betas, ᾱ, timestep grids and noise levels σ.

Everything here runs once per construction or ``set_timesteps``, on the host. Values are float32 where the
reference keeps float32 (betas, ᾱ, σ tables) and follow its arithmetic, so the tables are bit-identical to the
reference's; this matters because the samplers' coefficients amplify last-bit differences (reference-behaviour §2.5).
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Betas of the cosine schedule, ᾱ(t) = cos²((t + 0.008)/1.008 · π/2) (Nichol & Dhariwal 2021, eq. 17)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def make_betas(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: Sequence[float] | None = None,
) -> torch.Tensor:
    """The training betas (float32), from an explicit list or one of ``BETA_SCHEDULES``."""
    if trained_betas is not None:
        return torch.tensor(trained_betas, dtype=torch.float32)
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":  # linear in √β: the Stable Diffusion / latent-diffusion schedule
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return cosine_betas(num_train_timesteps)
    raise ValueError(f"beta_schedule={beta_schedule!r} is not supported; choose one of {', '.join(BETA_SCHEDULES)}")


def cumulative_alphas(betas: torch.Tensor) -> torch.Tensor:
    """ᾱ_t = ∏_{s≤t} (1 − β_s), float32 like the reference."""
    return torch.cumprod(1.0 - betas, dim=0)


def train_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """σ_t = √((1 − ᾱ_t)/ᾱ_t) for every training step (float32, ascending in t): the k-diffusion noise levels."""
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()


def check_num_steps(num_inference_steps: int, num_train_timesteps: int, minimum: int = 1) -> None:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise ValueError(f"num_inference_steps must be an int, got {num_inference_steps!r}")
    if not minimum <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps={num_inference_steps} is out of range: it must be between {minimum} and "
            f"num_train_timesteps={num_train_timesteps}"
        )


def schedule_source(num_inference_steps: int | None, **custom: Any) -> str:
    """Which one of ``num_inference_steps`` and the custom tables (``timesteps=``, ``sigmas=``) a ``set_timesteps``
    call gives — exactly one, as the reference requires."""
    given = {"num_inference_steps": num_inference_steps, **custom}
    passed = [name for name, value in given.items() if value is not None]
    if len(passed) == 1:
        return passed[0]
    if not passed:
        raise ValueError(f"set_timesteps needs one of {', '.join(given)}; all were None")
    shown = ", ".join(f"{name}={brief(given[name])}" for name in passed)
    raise ValueError(f"set_timesteps takes only one of {', '.join(passed)}; got {shown}")


def brief(values: Any) -> str:
    """A short repr of a user's list (the first few entries) for error messages."""
    if isinstance(values, (torch.Tensor, np.ndarray)):
        values = values.tolist()
    short = reprlib.Repr()
    short.maxlist = short.maxtuple = 8
    return short.repr(values)


def _numbers(name: str, values: Any) -> np.ndarray:
    """A user's sequence of numbers as a non-empty, finite, 1-d float64 array (ValueError naming it otherwise)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        array = None
    if array is None or array.ndim != 1:
        raise ValueError(f"{name} must be a list of numbers, got {brief(values)}")
    if len(array) == 0:
        raise ValueError(f"{name}={brief(values)} is empty")
    if not np.isfinite(array).all():
        raise ValueError(f"{name}={brief(values)} must be finite")
    return array


def _check_descending(name: str, values: np.ndarray) -> None:
    for i in range(1, len(values)):
        if values[i] >= values[i - 1]:
            raise ValueError(
                f"{name} must be strictly descending: {name}[{i}]={values[i].item()!r} follows "
                f"{name}[{i - 1}]={values[i - 1].item()!r}"
            )


def custom_timesteps(timesteps: Any, num_train_timesteps: int, integer: bool = True) -> np.ndarray:
    """A user's ``set_timesteps(timesteps=...)``: non-empty, strictly descending, within [0, T−1]; int64, or float32
    for the Euler samplers, which take fractional timesteps (as the reference converts them).

    Stricter than the reference, which checks only DDPM's order and first value: elsewhere it clamps out-of-range
    timesteps to the end of its σ table or truncates fractions without a word, and a repeated timestep makes a
    multistep solver divide by a zero step.
    """
    values = _numbers("timesteps", timesteps)
    if integer and not (values == np.round(values)).all():
        raise ValueError(f"timesteps={brief(timesteps)} must be whole numbers")
    values = values.astype(np.int64 if integer else np.float32)
    _check_descending("timesteps", values)
    if values[0] > num_train_timesteps - 1 or values[-1] < 0:
        bad = values[0] if values[0] > num_train_timesteps - 1 else values[-1]
        raise ValueError(
            f"timesteps={brief(timesteps)} is out of range: {bad.item()!r} is not in [0, num_train_timesteps - 1 = "
            f"{num_train_timesteps - 1}]"
        )
    return values


def custom_sigmas(sigmas: Any) -> np.ndarray:
    """A user's ``set_timesteps(sigmas=...)``: float32 noise levels, one per step plus the final level the last step
    goes to (so at least 2), strictly descending to a final σ ≥ 0 (the steps divide by every other σ)."""
    values = _numbers("sigmas", sigmas)
    if len(values) < 2:
        raise ValueError(
            f"sigmas={brief(sigmas)} has {len(values)} value: it needs one per step plus the final noise level "
            "(at least 2)"
        )
    values = values.astype(np.float32)  # the reference's precision, before the checks (rounding may tie values)
    _check_descending("sigmas", values)
    if values[-1] < 0:
        raise ValueError(f"sigmas={brief(sigmas)} must be non-negative: the last is {values[-1].item()!r}")
    return values


def spaced_timesteps(spacing: str, num_steps: int, num_train_timesteps: int, steps_offset: int = 0) -> np.ndarray:
    """Descending int64 timesteps, ``num_steps`` of them (Lin et al. 2023, arXiv 2305.08891, Table 2).

    "leading" keeps multiples of ``T // n`` (plus ``steps_offset``) and never reaches T−1; "linspace" spans [0, T−1]
    rounded; "trailing" counts down from T−1 in steps of T/n.
    """
    n, total = num_steps, num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, total - 1, n).round()[::-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(n) * (total // n)).round()[::-1].astype(np.int64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(total, 0, -total / n)).astype(np.int64) - 1
    raise ValueError(f"timestep_spacing={spacing!r} is not supported; choose one of {', '.join(TIMESTEP_SPACINGS)}")


def solver_timesteps(
    spacing: str, num_steps: int, num_train_timesteps: int, steps_offset: int = 0, last_timestep: int | None = None
) -> np.ndarray:
    """Timesteps of the multistep ODE solvers (DPM-Solver, UniPC): the grid has ``n + 1`` points and the final one
    (t≈0) is dropped, because the solver's last step goes to σ = 0 rather than evaluating the model there.

    ``last_timestep`` (default T) cuts the top of the grid, for DPM-Solver's ``lambda_min_clipped``.
    """
    n, total = num_steps, num_train_timesteps
    last = total if last_timestep is None else last_timestep
    if spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(n + 1) * (last // (n + 1))).round()[::-1][:-1].astype(np.int64) + steps_offset
    if spacing == "trailing":
        return np.arange(last, 0, -total / n).round().astype(np.int64) - 1
    raise ValueError(f"timestep_spacing={spacing!r} is not supported; choose one of {', '.join(TIMESTEP_SPACINGS)}")


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Noise levels evenly spaced in σ^(1/ρ) from σ_max down to σ_min (Karras et al. 2022, eq. 5, ρ = 7)."""
    ramp = np.linspace(0, 1, num_steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


# The config switches that respace a run's noise levels, and the spacing each one names (at most one may be on).
SIGMA_SPACINGS = {"use_karras_sigmas": "karras", "use_exponential_sigmas": "exponential", "use_beta_sigmas": "beta"}


def spaced_sigmas(spacing: str, sigma_min: float, sigma_max: float, num_steps: int) -> np.ndarray:
    """``num_steps`` noise levels from σ_max down to σ_min (float64): "karras" (:func:`karras_sigmas`),
    "exponential" (evenly spaced in log σ, k-diffusion's ``get_sigmas_exponential``) or "beta" (σ_min + (σ_max −
    σ_min)·q at the quantiles q of Beta(0.6, 0.6) at 1, …, 0 evenly spaced: Lee et al. 2024, "Beta Sampling is All
    You Need", which spends more steps at both ends of the range)."""
    if spacing == "karras":
        return karras_sigmas(sigma_min, sigma_max, num_steps)
    if spacing == "exponential":
        return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_steps))
    if spacing == "beta":
        return sigma_min + beta_quantiles(1 - np.linspace(0, 1, num_steps), 0.6, 0.6) * (sigma_max - sigma_min)
    raise ValueError(f"unknown σ spacing {spacing!r}; choose one of {', '.join(SIGMA_SPACINGS.values())}")


def _beta_cdf_series(x: np.ndarray, a: float, b: float) -> np.ndarray:
    """The regularised incomplete beta function I_x(a, b) for x ≤ (a + 1)/(a + b + 2), where its continued fraction
    (modified Lentz, float64) converges in a few dozen terms."""
    tiny = 1e-300
    front = np.exp(a * np.log(x) + b * np.log1p(-x) + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)) / a
    c = np.ones_like(x)
    d = 1 - (a + b) * x / (a + 1)
    d = 1 / np.where(np.abs(d) < tiny, tiny, d)
    f = d.copy()
    for m in range(1, 300):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1 + numerator * d
            d = 1 / np.where(np.abs(d) < tiny, tiny, d)
            c = 1 + numerator / c
            c = np.where(np.abs(c) < tiny, tiny, c)
            f = f * c * d
        if np.all(np.abs(c * d - 1) < 2 * np.finfo(np.float64).eps):
            break
    return front * f


def beta_cdf(x: np.ndarray, a: float, b: float) -> np.ndarray:
    """I_x(a, b), the cumulative distribution of Beta(a, b) at ``x`` in [0, 1], to float64 precision."""
    x = np.asarray(x, dtype=np.float64)
    inner = np.clip(x, 1e-300, 1 - 1e-16)
    lower = inner < (a + 1) / (a + b + 2)
    value = np.where(
        lower,
        _beta_cdf_series(np.where(lower, inner, 0.5), a, b),
        1 - _beta_cdf_series(np.where(lower, 0.5, 1 - inner), b, a),
    )
    return np.where(x <= 0, 0.0, np.where(x >= 1, 1.0, value))


def beta_quantiles(q: np.ndarray, a: float, b: float) -> np.ndarray:
    """The quantile function of Beta(a, b) at ``q`` in [0, 1] (float64; 0 at q = 0, 1 at q = 1): Newton's method on
    :func:`beta_cdf`, kept inside a shrinking bracket (bisection where a step would leave it), until a step is below
    1e-12 relative (Newton's error after it is about its square: below float64's resolution). Beyond the median it is
    solved as 1 − the quantile of Beta(b, a) at 1 − q, so that the values near either end keep their relative
    precision."""
    q = np.asarray(q, dtype=np.float64)
    upper = q > 0.5
    x = np.where(q <= 0, 0.0, 1.0)
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    for mirrored, first, second, p in ((False, a, b, q), (True, b, a, 1 - q)):
        inside = (upper == mirrored) & (p > 0) & (p < 1)
        target = p[inside]
        low, high = np.zeros_like(target), np.ones_like(target)
        # The start: where the CDF's leading term near 0, x^a / (a·B(a, b)), reaches the target (at most 0.5)
        guess = np.minimum(np.exp((np.log(target * first) + log_beta) / first), 0.5)
        for _ in range(200):
            gap = beta_cdf(guess, first, second) - target
            low, high = np.where(gap < 0, guess, low), np.where(gap < 0, high, guess)
            density = np.exp((first - 1) * np.log(guess) + (second - 1) * np.log1p(-guess) - log_beta)
            newton = guess - gap / density
            converged = np.abs(newton - guess) <= 1e-12 * guess
            guess = np.where((newton > low) & (newton < high) | converged, newton, low + (high - low) / 2)
            if converged.all():
                break
        x[inside] = 1 - guess if mirrored else guess
    return x


def sigma_to_t(sigmas: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps of the noise levels ``sigmas``, interpolating linearly in log σ.

    ``log_train_sigmas`` is the ascending float32 table log σ_t; the arithmetic keeps its float32 differences as the
    reference does. The logs are taken one value at a time, as the reference does (numpy's vectorised log may round
    differently), in the precision of ``sigmas``: float64 for computed σ, float32 for a user's list.
    """
    log_sigma = np.array([np.log(np.maximum(s, 1e-10)) for s in np.atleast_1d(sigmas)])
    count_below = np.searchsorted(log_train_sigmas.astype(np.float64), log_sigma, side="right")
    low_idx = np.clip(count_below - 1, 0, len(log_train_sigmas) - 2)
    high_idx = low_idx + 1
    low, high = log_train_sigmas[low_idx], log_train_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return (1 - w) * low_idx + w * high_idx


def alpha_sigma_lambda(sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per noise level σ: α = 1/√(σ²+1), σ_t = σ·α and the half log-SNR λ = log α − log σ_t (DPM-Solver's λ).

    The logs are taken one 0-dim float32 tensor at a time, as the reference does per step: torch's vectorised log may
    round differently in the last bit, which h = λ_t − λ_s magnifies. (+, ×, ÷ and √ round the same either way.)
    """
    alphas = 1 / ((sigmas**2 + 1) ** 0.5)
    sigma_ts = sigmas * alphas
    lambdas = torch.stack([torch.log(a) - torch.log(s) for a, s in zip(alphas, sigma_ts)])
    return alphas, sigma_ts, lambdas
