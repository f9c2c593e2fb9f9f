"""What every scheduler shares: ``scheduler_config.json`` I/O, config swapping, copying, step bookkeeping, and the
small tensor helpers (x₀ from the model output, the noise half of an 8-channel output, dynamic thresholding).

A scheduler holds two kinds of state:

* tables, built in ``__init__`` / ``set_timesteps`` on the host and never modified afterwards;
* per-run state (the step counter, a multistep solver's history), replaced rather than modified in place, so
  ``copy()`` — a shallow copy — gives an independent sampler that shares only the read-only tables.
"""

from __future__ import annotations

import copy as _copy
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ..loading import Config, ModelOutput, config_json, read_json, resolve_folder
from . import tables

logger = logging.getLogger(__name__)

SCHEDULER_CONFIG_NAME = "scheduler_config.json"
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
_HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download")

# Config keys of every scheduler class: a class carries the ones it does not use without a warning, so that
# ``B.from_config(a.config)`` swaps samplers quietly (the reference's "compatibles" rule).
_ALL_SCHEDULER_KEYS: set[str] = set()
# The scheduler classes, in definition order, for ``compatibles``.
_SCHEDULER_CLASSES: list[type] = []


# The training-schedule keys every sampler's config starts with, at the reference's defaults.
BETA_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
}


@dataclass
class SchedulerOutput(ModelOutput):
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class SchedulerMixin:
    """Base of the schedulers. A subclass lists every key the reference writes in ``config_defaults`` (with the
    reference's defaults), checks values in ``_check_config`` and builds its training tables in ``_build``.
    """

    config_defaults: ClassVar[dict[str, Any]] = {}
    order: ClassVar[int] = 1
    # Classes of one family swap configs with each other (the reference's ``_compatibles``); UnCLIP is alone in its.
    _family: ClassVar[str] = "diffusion"
    config: Config
    timesteps: torch.Tensor
    num_inference_steps: int | None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _ALL_SCHEDULER_KEYS.update(cls.config_defaults)
        if "config_defaults" in cls.__dict__:  # a scheduler, not a shared base
            _SCHEDULER_CLASSES.append(cls)

    def __init__(self, **config: Any) -> None:
        unknown = sorted(k for k in config if k not in _ALL_SCHEDULER_KEYS and not k.startswith("_"))
        if unknown:
            logger.warning("%s ignores unknown config keys: %s", type(self).__name__, unknown)
        values = {k: _copy.deepcopy(config.get(k, default)) for k, default in self.config_defaults.items()}
        # Other schedulers' keys ride along unused (as in the reference), so swapping A → B → A keeps A's settings.
        carried = {k: v for k, v in config.items() if k in _ALL_SCHEDULER_KEYS and k not in self.config_defaults}
        self.config = Config({**self._normalize(values), **carried})
        self._check_config()
        self._build()

    # -- hooks ---------------------------------------------------------------------------------------------------

    def _normalize(self, values: dict[str, Any]) -> dict[str, Any]:
        """Rewrite values the reference maps on construction (e.g. another solver's ``solver_type``)."""
        return values

    def _check_config(self) -> None:
        """Raise ``ValueError`` naming any value this class cannot run."""

    def _build(self) -> None:
        """Build the training tables and the default (full) timestep table."""

    # -- config I/O ----------------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None, **overrides: Any):
        """Build from a config dict or another scheduler's ``.config``; ``overrides`` win.

        Keys of another scheduler class are kept in ``.config`` but unused, silently; keys no scheduler knows are
        dropped with a warning. Keys the reference marks as defaulted (``_use_default_values``) take this class's
        defaults instead.
        """
        values = dict(config or {})
        defaulted = set(values.pop("_use_default_values", None) or ())
        kept = {k: v for k, v in values.items() if not k.startswith("_") and k not in defaulted}
        kept.update(overrides)
        return cls(**kept)

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, subfolder: str | None = None, **kwargs: Any):
        """Load ``scheduler_config.json`` from a local folder (or a hub repository via ``resolve_folder``).

        Hub keywords (``revision``, ``cache_dir``, ``token``, ``local_files_only``, ``force_download``) go to the
        download; any other keyword overrides a config value.
        """
        hub_kwargs = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
        folder = resolve_folder(path_or_id, subfolder, [SCHEDULER_CONFIG_NAME], **hub_kwargs)
        return cls.from_config(read_json(folder / SCHEDULER_CONFIG_NAME), **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``scheduler_config.json`` with the reference's keys and ``_class_name``, readable by both libraries."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        data = {"_class_name": type(self).__name__, **self.config}
        (folder / SCHEDULER_CONFIG_NAME).write_text(config_json(data, indent=2, sort_keys=True) + "\n")

    @property
    def compatibles(self) -> list[type]:
        """The scheduler classes that can take this one's place with ``from_config(scheduler.config)``: the
        reference's list, less the samplers kandinsky22 does not have."""
        return [cls for cls in _SCHEDULER_CLASSES if cls._family == self._family]

    def copy(self):
        """An independent scheduler in the same state, for one more concurrent run. Cheap: the tables are shared
        (never modified) and per-run state is only ever replaced, so a shallow copy suffices."""
        return _copy.copy(self)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def __repr__(self) -> str:
        return f"{type(self).__name__}({config_json(self.config, sort_keys=True)})"

    # -- validation helpers --------------------------------------------------------------------------------------

    def _require_choice(self, key: str, allowed: tuple) -> None:
        value = self.config[key]
        if value not in allowed:
            choices = ", ".join(repr(a) for a in allowed)
            raise ValueError(f"{type(self).__name__}: {key}={value!r} is not supported; choose one of {choices}")

    def _require_default(self, *keys: str) -> None:
        """Options the reference has but kandinsky22 does not implement: only their default value is accepted."""
        for key in keys:
            if self.config[key] != self.config_defaults[key]:
                raise ValueError(
                    f"{type(self).__name__}: {key}={self.config[key]!r} is not supported by kandinsky22 "
                    f"(only {self.config_defaults[key]!r})"
                )

    def _check_beta_config(self) -> None:
        if self.config.trained_betas is None:
            self._require_choice("beta_schedule", tables.BETA_SCHEDULES)
        # Only this class's own keys: another sampler's, carried in the config, are not used here
        if "timestep_spacing" in self.config_defaults:
            self._require_choice("timestep_spacing", tables.TIMESTEP_SPACINGS)
        if "rescale_betas_zero_snr" in self.config_defaults:
            self._require_default("rescale_betas_zero_snr")
        chosen = self._spacing_keys()
        if len(chosen) > 1:
            raise ValueError(
                f"{type(self).__name__}: {', '.join(f'{key}=True' for key in chosen)}: only one σ spacing can be used"
            )

    def _spacing_keys(self) -> list[str]:
        """The σ-spacing switches of this class's config that are on (``tables.SIGMA_SPACINGS``)."""
        return [key for key in tables.SIGMA_SPACINGS if key in self.config_defaults and self.config[key]]

    @property
    def _sigma_spacing(self) -> str | None:
        """How a run's noise levels are respaced: "karras", "exponential", "beta" (:func:`tables.spaced_sigmas`), or
        None for the σ of the timestep grid."""
        chosen = self._spacing_keys()
        return tables.SIGMA_SPACINGS[chosen[0]] if chosen else None

    def _refuse_custom_timesteps_with_spacing(self, timesteps: Any) -> None:
        """As the reference: respaced σ make their own timesteps, so custom ``timesteps`` cannot come with them."""
        for key in self._spacing_keys():
            raise ValueError(f"timesteps={tables.brief(timesteps)} cannot be used with {key}=True")

    def _training_alphas_cumprod(self) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        betas = tables.make_betas(c.num_train_timesteps, c.beta_start, c.beta_end, c.beta_schedule, c.trained_betas)
        return betas, tables.cumulative_alphas(betas)

    # -- step bookkeeping ----------------------------------------------------------------------------------------

    @property
    def step_index(self) -> int | None:
        """Index of the next step in this run's tables (None before the first step)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the run at table index ``begin_index`` (img2img: ``t_start``), without looking the timestep up."""
        self._begin_index = begin_index

    def _on_device(self, table: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """One of this scheduler's host tables on ``like``'s device and dtype, copied once and then reused: a copy
        from the host at every call would block the host until the GPU had caught up, at every step that needs it.
        A replaced or modified table is copied again."""
        if table.device == like.device and table.dtype == like.dtype:
            return table
        cache = self.__dict__.setdefault("_device_tables", {})
        key = (id(table), like.device, like.dtype)
        hit = cache.get(key)
        if hit is None or hit[0] is not table or hit[1] != table._version:
            hit = cache[key] = (table, table._version, table.to(device=like.device, dtype=like.dtype))
        return hit[2]

    def _set_schedule(self, timesteps: np.ndarray, device: torch.device | str | None, dtype: torch.dtype) -> None:
        """Install a run's timestep table: a host list for look-ups and ``.timesteps`` on ``device``."""
        self._host_timesteps: list = timesteps.tolist()
        self.timesteps = torch.from_numpy(np.ascontiguousarray(timesteps)).to(device=device, dtype=dtype)
        self._step_index: int | None = None
        self._begin_index: int | None = None

    def _advance(self) -> int:
        """The index of this step by counting (from ``begin_index``, default 0), and move the counter on."""
        index = self._step_index if self._step_index is not None else (self._begin_index or 0)
        self._step_index = index + 1
        return index


def host_value(timestep: Any) -> float | int | None:
    """The Python number of a timestep given as a number or a CPU tensor; None for a tensor on an accelerator, whose
    value is not read (that would wait for the device) — the scheduler's step counter is used instead.
    """
    if isinstance(timestep, torch.Tensor):
        return timestep.item() if timestep.device.type == "cpu" else None
    if isinstance(timestep, np.generic):
        return timestep.item()
    return timestep


def noise_channels(model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """The noise prediction of a learned-variance model (K2.2's decoder UNet has 8 output channels: 4 ε + 4 v).

    The reference's DPM-Solver slices 3 channels here (a pixel-space RGB assumption); the noise is the first half.
    """
    if model_output.shape[1] == 2 * sample.shape[1]:
        return model_output[:, : sample.shape[1]]
    return model_output


def predict_x0(
    prediction_type: str, model_output: torch.Tensor, sample: torch.Tensor, alpha: float, sigma: float
) -> torch.Tensor:
    """x₀ from the model output, for x_t = α·x₀ + σ·ε (DDPM ε-prediction, x₀-prediction, or v = α·ε − σ·x₀,
    Salimans & Ho 2022). ``alpha`` and ``sigma`` are the float32 values of √ᾱ_t and √(1−ᾱ_t).
    """
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha
    if prediction_type == "sample":
        return model_output
    return alpha * sample - sigma * model_output


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, §2.3): per sample, s = the ``ratio`` quantile of |x₀|,
    clamped to [1, ``max_value``]; x₀ is clipped to [−s, s] and divided by s.
    """
    dtype = x0.dtype
    flat = x0.reshape(x0.shape[0], -1)
    if dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # quantile needs float32/64
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(dtype)


def f32(value: float) -> torch.Tensor:
    """A 0-dim float32 tensor: scalar coefficients are computed in float32 like the reference's."""
    return torch.tensor(value, dtype=torch.float32)


class SigmaSchedulerMixin(SchedulerMixin):
    """Schedulers indexed by noise level σ (Euler, DPM-Solver, UniPC): ``self.sigmas`` (host float32, one more entry
    than ``timesteps``) and a step counter that is set once, on the first step, then counts.
    """

    sigmas: torch.Tensor
    # The multistep solvers treat a timestep missing from the table as the last step; Euler rejects it.
    _missing_timestep_is_last: ClassVar[bool] = False

    def _lookup(self, value: float | int) -> int:
        """Index of a timestep in this run's tables. A timestep listed twice (Karras σ that round to the same
        integer) maps to its second entry, so a run started mid-schedule does not repeat a σ — the reference's rule —
        except at the very start of the table: the reference skips σ_max there and then runs past the table's end
        (cosine schedule with Karras σ, ≥ 7 steps), so a full run starts at index 0 instead.
        """
        matches = [i for i, t in enumerate(self._host_timesteps) if t == value]
        if not matches:
            if self._missing_timestep_is_last:
                return len(self._host_timesteps) - 1
            raise ValueError(f"timestep={value} is not in this scheduler's timesteps; call set_timesteps first")
        return matches[1] if len(matches) > 1 and matches[0] > 0 else matches[0]

    def _index(self, timestep: Any) -> int:
        """This step's index: ``begin_index`` or the timestep's position on the first step, then the counter.

        A timestep on an accelerator is not read (no device sync): the run is taken to start at index 0 unless
        ``set_begin_index`` says otherwise.
        """
        if self._step_index is None and self._begin_index is not None:
            self._step_index = self._begin_index
        elif self._step_index is None:
            value = host_value(timestep)
            self._step_index = 0 if value is None else self._lookup(value)
        return self._step_index

    def _noise_levels(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """σ for ``add_noise``, (B, 1, …) on ``like``'s device and dtype: looked up per sample (one read of
        ``timesteps``, before the loop) unless a begin index is set, as the reference; then every sample takes the
        current step's σ, sliced on the device (no index copied from the host at each step)."""
        sigma = self._on_device(self.sigmas, like)
        # A number or a 0-d tensor is one timestep, as add_noise of the DDPM family takes it; a Python float stays
        # float64 (torch.as_tensor would round it to float32, off DPM++ SDE's float64 table)
        if not isinstance(timesteps, torch.Tensor):
            timesteps = torch.from_numpy(np.asarray(timesteps))
        timesteps = timesteps.reshape(-1)
        if self._begin_index is None:
            levels = sigma[[self._lookup(t) for t in timesteps.tolist()]]
        else:
            index = self._step_index if self._step_index is not None else self._begin_index
            levels = sigma[index : index + 1].expand(len(timesteps))
        return levels.reshape((-1,) + (1,) * (like.ndim - 1))


class MultistepSolverMixin(SigmaSchedulerMixin):
    """The exponential-integrator solvers in λ = log(α/σ) (DPM-Solver++, UniPC): they keep the last few model
    predictions, and their tables add α, σ_t and λ per noise level.
    """

    init_noise_sigma = 1.0
    _missing_timestep_is_last = True

    def _build(self) -> None:
        self.betas, self.alphas_cumprod = self._training_alphas_cumprod()
        self.num_inference_steps = None
        total = self.config.num_train_timesteps
        # The full training grid, for add_noise before set_timesteps (stepping needs set_timesteps)
        self._set_schedule(np.arange(total)[::-1], None, torch.int64)
        self.sigmas = torch.from_numpy(tables.train_sigmas(self.alphas_cumprod))

    def _install(self, timesteps: np.ndarray, sigmas: np.ndarray, device: torch.device | str | None) -> None:
        """Install a run: int64 timesteps, the σ table (one entry longer: the σ of the last step's target), its α, σ_t
        and λ, and an empty history."""
        self._set_schedule(timesteps.astype(np.int64), device, torch.int64)
        self.sigmas = torch.from_numpy(np.ascontiguousarray(sigmas, dtype=np.float32))
        self._alpha, self._sigma, self._lambda = tables.alpha_sigma_lambda(self.sigmas)
        self._model_outputs: list[torch.Tensor] = []
        self._lower_order_nums = 0

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        return sample

    def _install_solver_run(
        self,
        num_inference_steps: int | None,
        timesteps: Any,
        device: torch.device | str | None,
        spacing: str,
        offset: int,
        round_karras: bool,
    ) -> None:
        """The DPM-Solver family's run: the given ``timesteps`` (strictly descending, in [0, T−1]; not with a σ
        spacing, and ``lambda_min_clipped`` does not apply to them), or ``num_inference_steps`` spaced by ``spacing``
        below ``lambda_min_clipped``, or respaced σ (Karras, exponential or beta, over the whole training range; Karras
        timesteps rounded where ``round_karras``, the others truncated, as the reference)."""
        c = self.config
        total = c.num_train_timesteps
        ac = self.alphas_cumprod
        train_sigmas = tables.train_sigmas(ac)
        if tables.schedule_source(num_inference_steps, timesteps=timesteps) == "timesteps":
            self._refuse_custom_timesteps_with_spacing(timesteps)
            grid = tables.custom_timesteps(timesteps, total)
        else:
            tables.check_num_steps(num_inference_steps, total)
            # λ_min clipping cuts the noisiest end of the grid (for cosine schedules, whose λ goes to −∞).
            train_lambda = torch.log(torch.sqrt(ac)) - torch.log(torch.sqrt(1 - ac))
            clipped = int(torch.searchsorted(torch.flip(train_lambda, [0]), c.lambda_min_clipped))
            grid = tables.solver_timesteps(spacing, num_inference_steps, total, offset, total - clipped)
        spacing = self._sigma_spacing
        if spacing is not None:
            sigmas = tables.spaced_sigmas(spacing, float(train_sigmas[0]), float(train_sigmas[-1]), num_inference_steps)
            grid = tables.sigma_to_t(sigmas, np.log(train_sigmas))
            if round_karras and spacing == "karras":  # exponential and beta timesteps are truncated (as int64)
                grid = grid.round()
        else:
            sigmas = np.interp(grid, np.arange(len(train_sigmas)), train_sigmas)
        final = float(((1 - ac[0]) / ac[0]) ** 0.5) if c.final_sigmas_type == "sigma_min" else 0.0
        self.num_inference_steps = len(grid)
        self._install(grid, np.append(sigmas, final), device)

    def _refuse_mu(self, mu: float | None) -> None:
        """``set_timesteps(mu=...)`` shifts flow-matching σ (``use_dynamic_shifting``), which kandinsky22 does not
        implement. The reference asserts (DPM-Solver) or ignores ``mu`` silently (UniPC); a shift the caller asked
        for and did not get would change the image unnoticed, so both refuse it."""
        if mu is not None:
            raise ValueError(
                f"mu={mu!r} needs use_dynamic_shifting=True (flow-matching σ), which kandinsky22 does not implement; "
                f"this {type(self).__name__} has use_dynamic_shifting={self.config.use_dynamic_shifting!r}"
            )

    _predicts_x0: bool  # the solver integrates x̂₀ (True) or ε̂ (False): set by each solver from its config

    def _convert(self, model_output: torch.Tensor, sample: torch.Tensor, i: int) -> torch.Tensor:
        """The solver's working prediction at step ``i``: x̂₀ (thresholded if the config says so) or ε̂."""
        c = self.config
        alpha, sigma = float(self._alpha[i]), float(self._sigma[i])
        if self._predicts_x0:
            x0 = predict_x0(c.prediction_type, model_output, sample, alpha, sigma)
            if c.thresholding:
                x0 = dynamic_threshold(x0, c.dynamic_thresholding_ratio, c.sample_max_value)
            return x0
        if c.prediction_type == "epsilon":
            return model_output
        if c.prediction_type == "sample":
            return (sample - alpha * model_output) / sigma
        return alpha * model_output + sigma * sample

    def _check_ready(self) -> None:
        if self.num_inference_steps is None:
            raise ValueError("Call set_timesteps(num_inference_steps) before step()")

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x = α·x₀ + σ_t·ε at the timesteps' noise levels (α = 1/√(σ²+1), σ_t = σ·α)."""
        sigma = self._noise_levels(timesteps, original_samples)
        alpha = 1 / ((sigma**2 + 1) ** 0.5)
        return alpha * original_samples + (sigma * alpha) * noise
