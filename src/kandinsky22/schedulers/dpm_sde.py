"""DPM-Solver++ SDE ("DPM++ SDE", k-diffusion's ``sample_dpmpp_sde`` with r = 1/2, η = 1): a stochastic second-order
sampler in σ whose noise comes from a Brownian path, so the noise between two noise levels is the same whatever the
number of steps.

Each σ step s_k → s_{k+1} works in t = −log σ. With t_mid = (t_k + t_{k+1})/2 (the geometric midpoint of the σ):

* predictor: from x at s_k, an ancestral DPM-Solver-1 step to σ(t_mid) — the data-prediction exponential integrator
  x ← (σ_down/s_k)·x + (1 − σ_down/s_k)·x̂₀ towards σ_down, plus σ_up times Brownian noise (σ_down² + σ_up² = σ(t_mid)²);
* corrector: the model evaluated there gives x̂₀(t_mid), and the same kind of step from the predictor's start x to
  s_{k+1} uses it (the midpoint's x̂₀ takes the whole step, k-diffusion's ``fac`` = 1/(2r) = 1).

The last step goes to σ = 0 by an Euler step alone. As in ``second_order``, ``timesteps`` lists both evaluations (2n − 1
entries: even positions predictors, odd ones the midpoints' timesteps) and ``sigmas`` holds s_k once per half-step.

The Brownian path W(σ) comes from ``torchsde`` (an optional dependency: ``pip install "kandinsky22[sde]"``), one
``BrownianInterval`` over [σ_min, σ_max] of the table; the noise of a half-step from σ_a to σ_b is
(W(σ_a) − W(σ_b))/√|σ_a − σ_b|, standard normal.
"""

from __future__ import annotations

import hashlib
import importlib
import secrets
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from . import tables
from .base import SchedulerOutput, noise_channels
from .noise import Generators, _to_device
from .second_order import _SHARED_DEFAULTS, _doubled, _SecondOrder

_INSTALL_HINT = 'DPMSolverSDEScheduler needs torchsde for its Brownian noise: pip install "kandinsky22[sde]"'


def _torchsde() -> Any:
    """``torchsde``, imported on first use: the package imports without it."""
    try:
        return importlib.import_module("torchsde")
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err


def _t(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.log().neg()


def _sigma(t: torch.Tensor) -> torch.Tensor:
    return t.neg().exp()


def _seed_from_generator(generator: torch.Generator) -> int:
    """A 63-bit seed that is a function of ``generator``'s state. A hash of the state rather than a draw: reading a
    CUDA generator's state (its seed and offset) does not wait for the device, where a drawn number would have to be
    copied back; and the generator's own sequence is left as the reference leaves it (its sampler draws nothing)."""
    state = generator.get_state().numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(state, digest_size=8).digest(), "little") >> 1


class _BrownianNoise:
    """Normalised increments of fixed Brownian paths over σ ∈ [``sigma_min``, ``sigma_max``] (k-diffusion's
    ``BrownianTreeNoiseSampler``): one path for the whole batch, or one per sample (one seed each) so that a sample's
    noise does not depend on the rest of the batch. The paths are built where the noise is drawn (``device``)."""

    def __init__(
        self,
        seeds: Sequence[int],
        shape: torch.Size,
        dtype: torch.dtype,
        device: torch.device,
        sigma_min: float,
        sigma_max: float,
    ) -> None:
        torchsde = _torchsde()
        self.per_sample = len(seeds) > 1
        size = tuple(shape[1:]) if self.per_sample else tuple(shape)
        # The reference's tree settings: the path depends on the seed alone (halfway_tree), not on the queries' order
        self.trees = [
            torchsde.BrownianInterval(
                t0=sigma_min,
                t1=sigma_max,
                size=size,
                dtype=dtype,
                device=device,
                entropy=seed,
                tol=1e-6,
                pool_size=24,
                halfway_tree=True,
            )
            for seed in seeds
        ]
        # The range as torchsde keeps it: rounded to the digits of its tolerance (0.2.6 has no public accessor)
        self.start, self.end = self.trees[0]._start, self.trees[0]._end

    def __call__(self, sigma_from: torch.Tensor, sigma_to: torch.Tensor) -> torch.Tensor:
        """(W(σ_from) − W(σ_to))/√|σ_from − σ_to| for σ_from > σ_to (host float32 values)."""
        low, high = float(sigma_to), float(sigma_from)
        # σ(t(σ)), or σ_max itself, may lie outside the path's rounded range; torchsde clamps such a query (with a
        # warning), so clamping here gives the same increment quietly
        low, high = min(max(low, self.start), self.end), min(max(high, self.start), self.end)
        increments = [tree(low, high) for tree in self.trees]
        w = torch.stack(increments) if self.per_sample else increments[0]
        return w * -1.0 / float((sigma_to - sigma_from).abs().sqrt())


class DPMSolverSDEScheduler(_SecondOrder):
    """DPM-Solver++ SDE (k-diffusion's ``sample_dpmpp_sde``): two model evaluations per step, Brownian noise.

    ``noise_sampler_seed`` fixes the Brownian path (the reference's trajectory for the same seed). With None (the
    default) the reference seeds the path from torch's global RNG, so a pipeline's ``generator`` does not reproduce
    its images; here the seed comes from the ``generator`` passed to ``step`` (from its state at the run's first step,
    which leaves its sequence untouched), one path per sample for a list of generators. Without either, the path is
    seeded from the OS (the global RNG is never used). The path lies where ``randn_tensor`` would draw: on the CPU
    for a CPU generator (a GPU run then equals the CPU run), else on the sample's device; in float32 at least (the
    reference's is in the sample's dtype, which half precision makes wrong by tenths over short intervals).

    ``prediction_type`` "sample", which the reference refuses in ``step``, works here. ``timesteps`` are float64, as
    the reference's (float32 on MPS).
    """

    config_defaults = {**_SHARED_DEFAULTS, "noise_sampler_seed": None}

    def _check_config(self) -> None:
        super()._check_config()
        seed = self.config.noise_sampler_seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"noise_sampler_seed={seed!r} must be None or a non-negative integer")
        _torchsde()  # fail at construction, with the install hint, rather than at the first noisy step

    _grid_dtype = np.float64  # as the reference (the other samplers' grid is float32)

    def set_timesteps(
        self,
        num_inference_steps: int,
        device: torch.device | str | None = None,
        num_train_timesteps: int | None = None,
    ) -> None:
        """``num_inference_steps`` σ steps (2n − 1 model evaluations); the correctors' timesteps are those of the
        midpoints' σ. ``num_train_timesteps``: only the config's."""
        self._check_train_timesteps(num_train_timesteps)
        grid, levels = self._sigma_grid(num_inference_steps, None)
        # The midpoints' timesteps from the float64 σ, as the reference's (vectorised numpy, like its own)
        t = -np.log(levels)
        mid_levels = np.exp(-(t[:-1] + np.diff(t) * 0.5))
        mid_steps = tables.sigma_to_t(mid_levels, np.log(tables.train_sigmas(self.alphas_cumprod)))
        timesteps = np.concatenate([grid[:1], np.stack([mid_steps, grid[1:]], axis=1).reshape(-1)])
        sigmas = torch.from_numpy(np.append(levels, 0.0).astype(np.float32))
        self._grid_sigmas = sigmas
        # The Brownian path's range: the table's σ, read here on the host (the reference reads them in `step`)
        self._path_range = (float(sigmas[sigmas > 0].min()), float(sigmas.max()))
        dtype = torch.float32 if str(device).startswith("mps") else torch.float64  # MPS has no float64
        self._set_schedule(timesteps, device, dtype)
        self.sigmas = _doubled(sigmas[:-1], sigmas[-1:])
        self._predictor = None  # replaced, never modified (copy())
        self._noise_source: tuple[list[int], torch.device | None] | None = None  # seeds, device: set at step 1
        self._noise: _BrownianNoise | None = None  # built from _noise_source at the first noisy half-step

    def copy(self):
        """As the base's; the Brownian path (mutable caches inside torchsde) is rebuilt from the same seeds, so the
        twin draws the same noise without sharing it."""
        twin = super().copy()
        twin._noise = None
        return twin

    # -- the half-steps --------------------------------------------------------------------------------------------

    def _midpoint_sigma(self, k: int) -> torch.Tensor:
        """σ(t_mid) of step k, computed as the reference's ``step`` does (float32 0-dim tensors, on the host)."""
        t, t_next = _t(self._grid_sigmas[k]), _t(self._grid_sigmas[k + 1])
        return _sigma(t + (t_next - t) * 0.5)

    def _model_sigma(self, k: int, corrector: bool) -> torch.Tensor:
        return self._midpoint_sigma(k) if corrector else self._grid_sigmas[k]

    def _noise_seeds(self, generator: Generators, batch: int) -> tuple[list[int], torch.device | None]:
        """The Brownian paths' seeds and where they lie (None: the sample's device), fixed at a run's first step."""
        if isinstance(generator, Sequence) and len(generator) == 1:
            generator = generator[0]
        first = generator[0] if isinstance(generator, Sequence) else generator
        device = torch.device("cpu") if first is not None and first.device.type == "cpu" else None
        if self.config.noise_sampler_seed is not None:
            return [self.config.noise_sampler_seed], device
        if generator is None:
            return [secrets.randbits(63)], device
        if isinstance(generator, Sequence):
            if len(generator) != batch:
                raise ValueError(f"Got {len(generator)} generators for a batch of {batch}: pass one per sample")
            return [_seed_from_generator(g) for g in generator], device
        return [_seed_from_generator(generator)], device

    def _brownian(self, sample: torch.Tensor, sigma_from: torch.Tensor, sigma_to: torch.Tensor) -> torch.Tensor:
        if self._noise is None:
            seeds, device = self._noise_source
            device = sample.device if device is None else device
            # At least float32: the path sums increments down to the tree's 1e-6 resolution and divides short ones by
            # √Δσ, which half precision cannot carry (the reference builds it in the sample's dtype)
            dtype = torch.promote_types(sample.dtype, torch.float32)
            self._noise = _BrownianNoise(seeds, sample.shape, dtype, device, *self._path_range)
        return _to_device(self._noise(sigma_from, sigma_to), sample.device).to(sample.dtype)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
        s_noise: float = 1.0,
        *,
        generator: Generators = None,
    ) -> SchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One half-step: the predictor of σ step k, or its corrector. ``s_noise`` scales the added noise.
        ``generator`` seeds the Brownian path at the run's first step unless ``noise_sampler_seed`` is set."""
        position, k, corrector = self._half_step(timestep)
        model_output = noise_channels(model_output, sample)
        if self._noise_source is None:
            self._noise_source = self._noise_seeds(generator, sample.shape[0])
        sigma, sigma_next = self._grid_sigmas[k], self._grid_sigmas[k + 1]
        x0 = self._x0(model_output, sample, self._model_sigma(k, corrector))
        if sigma_next == 0:  # the last step (a predictor): Euler to σ = 0, no noise
            prev_sample = sample + (sample - x0) / float(sigma) * float(sigma_next - sigma)
        else:
            # The scalars in float32 on the host, in the reference's order of operations
            t, t_next = _t(sigma), _t(sigma_next)
            start, t_to = (self._predictor, t_next) if corrector else (sample, t + (t_next - t) * 0.5)
            sigma_from, sigma_to = _sigma(t), _sigma(t_to)
            sigma_up = min(sigma_to, (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
            t_down = _t((sigma_to**2 - sigma_up**2) ** 0.5)
            prev_sample = float(_sigma(t_down) / sigma_from) * start - float((t - t_down).expm1()) * x0
            noise = self._brownian(sample, sigma_from, sigma_to)
            prev_sample = prev_sample + noise * s_noise * float(sigma_up)
            self._predictor = None if corrector else sample
        self._step_index = position + 1
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
