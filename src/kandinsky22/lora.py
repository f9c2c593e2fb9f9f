"""LoRA adapters for the decoder UNets and the prior, merged into the weights they adapt.

The reference cannot load a LoRA into Kandinsky 2.2 any more: its documented call,
``pipe.unet.load_attn_procs(output_dir)`` (the 2.2 LoRA training scripts' README), only accepts Custom Diffusion
files since ``LoRAAttnAddedKVProcessor`` became a stub (diffusers #7606), and its 2.2 pipelines have no
``load_lora_weights``. Here both work, on the files those scripts and later tools write:

* the attention-processor format of the 2023 training scripts (``<attention>.processor.to_q_lora.down.weight``, also
  ``add_k_proj_lora``/``add_v_proj_lora`` of the added-KV attentions), scale 1;
* peft's (``<module>.lora_A.weight`` / ``lora_B``), the alpha from ``adapter_config.json`` or the safetensors
  metadata ``lora_adapter_metadata`` (what diffusers writes), else 1 per rank;
* diffusers' (``<module>.lora.down.weight`` / ``lora.up``) and kohya's (``lora_unet_<module_with_underscores>
  .lora_down.weight`` / ``lora_up`` / ``alpha``), with or without a ``unet.`` / ``prior.`` prefix.

A LoRA of rank ``r`` and alpha ``a`` adds ``(a / r) · up @ down`` to a linear layer's weight (convolutions: the same
on the flattened kernels). Instead of running that as two extra small matmuls per layer and step, as the reference's
processors and peft do, the adapters are **merged into the weights**: a step costs what it costs without a LoRA,
and the fast path's fused projections, compiled graphs and CUDA graphs read the merged weights in place. Each
weight an adapter touches is kept once, on the CPU, as it was before any adapter (``LoraState.originals``), and the
running weight is always rebuilt from it: ``W = W₀ + Σ weightₐ · scaleₐ · upₐ @ downₐ`` over the active adapters,
summed in float32 and cast once. Changing the adapters or their weights rebuilds the touched weights;
``unload_lora_weights()`` puts the originals back exactly.

``save_pretrained`` writes the weights as they run, adapters included (unload them first to save the base model).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kandinsky22 import loading

# File names looked for in a folder or hub repository, in order (the reference's, then peft's).
LORA_FILES = (
    "pytorch_lora_weights.safetensors",
    "adapter_model.safetensors",
    "pytorch_lora_weights.bin",
    "adapter_model.bin",
)
PEFT_CONFIG = "adapter_config.json"
# The models an adapter can target, by the key prefixes that name them.
TARGETS = ("unet", "prior")
_PREFIXES = {"unet.": "unet", "prior.": "prior", "prior_prior.": "prior", "decoder.": "unet"}
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_prior_": "prior"}
_TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.", "lora_te_", "lora_te1_", "lora_te2_", "te.")

# <attention>.processor.<projection>_lora.<down|up>.weight: the reference's LoRA attention processors (2023).
_PROCESSOR_KEY = re.compile(
    r"^(?P<module>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out|add_k_proj|add_v_proj)_lora\.(?P<part>down|up)\.weight$"
)
# <module>.lora_A[.<adapter>].weight (peft), .lora.down.weight (diffusers), .lora_down.weight (kohya),
# .lora_linear_layer.down.weight (diffusers' short-lived LoRACompatible layers).
_MODULE_KEY = re.compile(
    r"^(?P<module>.+?)\.(?:lora_(?P<ab>[AB])(?:\.[\w\-]+)?|lora[._](?P<ud>down|up)|lora_linear_layer\.(?P<ud2>down|up))"
    r"\.weight$"
)
_ALPHA_KEY = re.compile(r"^(?P<module>.+)\.alpha$")


@dataclasses.dataclass
class LoraLayer:
    """One adapted weight's adapter: it adds ``scale · up @ down`` (reshaped like the weight)."""

    down: torch.Tensor  # (rank, in) or (rank, in, kh, kw)
    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1)
    scale: float

    def add_to(self, merged: torch.Tensor, weight: float) -> None:
        """``merged += weight · scale · up @ down``, in place (``merged``: float32, shaped like the adapted weight)."""
        up = self.up.to(merged.device, torch.float32).flatten(1)  # (out, rank)
        down = self.down.to(merged.device, torch.float32).flatten(1)  # (rank, in · kh · kw)
        merged.view(merged.shape[0], -1).addmm_(up, down, alpha=weight * self.scale)


@dataclasses.dataclass
class Adapter:
    name: str
    source: str
    layers: dict[str, LoraLayer]  # the adapted module's name in the model (official key without ".weight") → layer


@dataclasses.dataclass
class LoraState:
    """A model's adapters (in loading order), which are active with which weight, and the original weights."""

    adapters: dict[str, Adapter] = dataclasses.field(default_factory=dict)
    active: dict[str, float] = dataclasses.field(default_factory=dict)
    enabled: bool = True
    originals: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # module name → weight, on the CPU


# ----------------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------------


def read_lora(
    source: str | Path | Mapping[str, torch.Tensor],
    weight_name: str | None = None,
    subfolder: str | None = None,
    **hub_kwargs: Any,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """The state dict of a LoRA file, folder or hub repository (or a dict, as it is), the adapter settings found
    beside it (peft's ``adapter_config.json`` or the file's ``lora_adapter_metadata``; by target model, "" for all)
    and a name for messages."""
    unknown = sorted(k for k in hub_kwargs if k not in loading.HUB_OPTIONS)
    if unknown:
        raise ValueError(
            f"unknown LoRA loading options {unknown}; the options are weight_name, subfolder, "
            f"{', '.join(loading.HUB_OPTIONS)}"
        )
    if isinstance(source, Mapping):
        state = dict(source)
        if not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError("a LoRA given as a dict must map its keys to tensors")
        return state, {}, "<state dict>"
    if not isinstance(source, (str, Path)):
        raise ValueError(f"a LoRA is a file, a folder, a hub id or a state dict; got {type(source).__name__}")
    path = Path(source).expanduser()
    if path.is_file():
        file = path
    else:
        patterns = [weight_name] if weight_name else list(LORA_FILES)
        folder = loading.resolve_folder(source, subfolder, [*patterns, PEFT_CONFIG], **hub_kwargs)
        file = find_lora_file(folder, weight_name, hub=not path.exists())
    if file.suffix not in (".safetensors", ".bin", ".pt", ".pth", ".ckpt"):
        raise ValueError(f"LoRA file {str(file)!r}: expected a .safetensors or a pickled .bin/.pt file")
    try:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                metadata = f.metadata() or {}
                state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        else:
            metadata = {}
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"LoRA file {str(file)!r} cannot be read: {err}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"LoRA file {str(file)!r} does not hold a state dict of tensors")
    settings: dict[str, dict[str, Any]] = {}
    config = file.parent / PEFT_CONFIG
    if config.is_file():
        settings = {"": loading.read_json(config)}
    elif "lora_adapter_metadata" in metadata:
        settings = _lora_metadata(metadata["lora_adapter_metadata"], file)
    return state, settings, str(file)


def find_lora_file(folder: Path, weight_name: str | None = None, hub: bool = False) -> Path:
    """The LoRA file of a folder: ``weight_name``, else the first of ``LORA_FILES`` there, else (not for a ``hub``
    repository's snapshot, which holds whatever earlier downloads left) its only .safetensors."""
    if weight_name:
        file = folder / weight_name
        if not file.is_file():
            raise FileNotFoundError(f"No LoRA file '{weight_name}' in '{folder}'")
        return file
    for name in LORA_FILES:
        if (folder / name).is_file():
            return folder / name
    candidates = [] if hub else sorted(p.name for p in folder.glob("*.safetensors"))
    if len(candidates) == 1:
        return folder / candidates[0]
    raise FileNotFoundError(
        f"No LoRA file in '{folder}': looked for {', '.join(LORA_FILES)}"
        + (f"; pass weight_name= to choose one of {candidates}" if candidates else "")
    )


def _lora_metadata(text: str, file: Path) -> dict[str, dict[str, Any]]:
    """The peft settings diffusers writes into a file: one model's config as it is, or a pipeline's, each model's
    under its prefix ("unet.lora_alpha", …)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"LoRA file {str(file)!r}: its lora_adapter_metadata is not JSON") from None
    if not isinstance(data, dict):
        return {}
    settings: dict[str, dict[str, Any]] = {}
    for key, value in data.items():
        prefix, _, name = key.partition(".")
        target = _PREFIXES.get(f"{prefix}.")
        if target and name:
            settings.setdefault(target, {})[name] = value
        else:
            settings.setdefault("", {})[key] = value
    return settings


# ----------------------------------------------------------------------------------------------------------------------
# Parsing keys into layers per target model
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Parts:
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None


def split_by_target(state: Mapping[str, torch.Tensor], source: str) -> dict[str | None, dict[str, _Parts]]:
    """Group the LoRA tensors by target model ("unet", "prior", or None where the key does not say) and module.
    Module names are the models' own, except for kohya's (``kohya:<name with underscores>``), resolved later."""
    grouped: dict[str | None, dict[str, _Parts]] = {}
    for key, tensor in state.items():
        if "lora_magnitude_vector" in key:
            raise ValueError(f"LoRA {source}: DoRA adapters ({key!r}) are not supported")
        if re.search(r"\.lora(_B|_up|\.up)\.bias$", key):
            raise ValueError(f"LoRA {source}: adapters of biases ({key!r}) are not supported")
        if key.startswith(_TEXT_ENCODER_PREFIXES):
            raise ValueError(
                f"LoRA {source} adapts a text encoder ({key!r}): only the decoder UNet and the prior take adapters "
                "here (the CLIP text tower comes from transformers as published)"
            )
        target, name, part = _parse_key(key)
        if part is None:
            raise ValueError(
                f"LoRA {source}: key {key!r} is not a LoRA weight (expected e.g. '<module>.lora_A.weight', "
                "'<module>.lora.down.weight', '<attention>.processor.to_q_lora.down.weight' or kohya's "
                "'lora_unet_<module>.lora_down.weight')"
            )
        parts = grouped.setdefault(target, {}).setdefault(name, _Parts())
        if part == "alpha":
            parts.alpha = float(tensor.float().reshape(-1)[0])
        else:
            setattr(parts, part, tensor)
    for target, modules in grouped.items():
        for name, parts in modules.items():
            if parts.down is None or parts.up is None:
                missing = "up (lora_B)" if parts.up is None else "down (lora_A)"
                raise ValueError(f"LoRA {source}: module {_shown(target, name)!r} has no {missing} weight")
    return grouped


def _parse_key(key: str) -> tuple[str | None, str, str | None]:
    """(target, module, part) of one key; part is None for a key that is not a LoRA tensor."""
    target = None
    for prefix, model in _KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            rest = key[len(prefix) :]
            module, _, suffix = rest.partition(".")
            part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(suffix)
            return model, f"kohya:{module}", part
    if key.startswith("base_model.model."):  # a peft model's own state dict
        key = key[len("base_model.model.") :]
    for prefix, model in _PREFIXES.items():
        if key.startswith(prefix):
            target, key = model, key[len(prefix) :]
            break
    match = _PROCESSOR_KEY.match(key)
    if match:
        proj = "to_out.0" if match["proj"] == "to_out" else match["proj"]
        return target, f"{match['module']}.{proj}", match["part"]
    match = _MODULE_KEY.match(key)
    if match:
        part = {"A": "down", "B": "up"}.get(match["ab"] or "") or match["ud"] or match["ud2"]
        return target, match["module"], part
    match = _ALPHA_KEY.match(key)
    if match:
        return target, match["module"], "alpha"
    return target, key, None


def _shown(target: str | None, name: str) -> str:
    return f"{target}.{name}" if target else name


# Module names only one of the two models has (the official structures): an unprefixed file adapts one model, told by
# its names; the time embedding's linears are in both.
_PRIOR_ONLY = (
    "transformer_blocks.",
    "proj_in",
    "embedding_proj",
    "encoder_hidden_states_proj",
    "proj_to_clip_embeddings",
)
_UNET_ONLY = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "encoder_hid_proj.", "add_embedding.")


@dataclasses.dataclass
class LoraFile:
    """A LoRA as read, its tensors grouped by the model each part adapts ("unet", "prior") and by module; not yet
    in any model. ``LoraFile.read`` reads one; ``load_into`` merges its part for a model into it."""

    source: str  # for messages: the file read, or "<state dict>"
    settings: dict[str, dict[str, Any]]  # read_lora's
    parts: dict[str, dict[str, _Parts]]  # target model → module → its tensors

    @classmethod
    def read(
        cls,
        source: str | Path | Mapping[str, torch.Tensor],
        weight_name: str | None = None,
        subfolder: str | None = None,
        prefix: str | None = None,
        **hub_kwargs: Any,
    ) -> LoraFile:
        """Read a LoRA (see ``read_lora``). Keys prefixed ``unet.`` / ``prior.`` (kohya: ``lora_unet_`` /
        ``lora_prior_``) name their model; the unprefixed ones adapt one model, the one their module names belong
        to. ``prefix``: take only the keys under it, as keys of that model."""
        tensors, settings, shown = read_lora(source, weight_name, subfolder, **hub_kwargs)
        if prefix:
            start = f"{prefix.rstrip('.')}."
            tensors = {key[len(start) :]: value for key, value in tensors.items() if key.startswith(start)}
            if not tensors:
                raise ValueError(f"LoRA {shown} has no keys under prefix={prefix!r}")
        grouped = split_by_target(tensors, shown)
        if not grouped:
            raise ValueError(f"LoRA {shown} holds no LoRA weights")
        unprefixed = grouped.pop(None, {})
        if unprefixed:
            prior = [n for n in unprefixed if n.startswith(_PRIOR_ONLY)]
            unet = [n for n in unprefixed if n.startswith(_UNET_ONLY)]
            if prior and unet:
                raise ValueError(
                    f"LoRA {shown} adapts modules of the prior ({prior[0]}) and of the UNet ({unet[0]}) without "
                    "naming the model: prefix its keys with 'prior.' and 'unet.'"
                )
            target = "prior" if prior else "unet"
            grouped[target] = {**grouped.get(target, {}), **unprefixed}
        return cls(shown, settings, grouped)  # type: ignore[arg-type]

    def layers_for(self, model: nn.Module, target: str) -> dict[str, LoraLayer]:
        """Its layers for ``model`` (the ``target`` model), checked against its weights; ``ValueError`` if none."""
        return resolve_layers(model, self.parts.get(target, {}), self.settings, self.source, target)

    def load_into(self, model: nn.Module, name: str, weight: float = 1.0) -> None:
        """Merge its part for ``model`` (a UNet or a prior) in, as adapter ``name`` active at ``weight``."""
        target = model._lora_target  # type: ignore[attr-defined]
        add_adapter(model, Adapter(name, self.source, self.layers_for(model, target)), weight)


# ----------------------------------------------------------------------------------------------------------------------
# The weights of a model that adapters can change
# ----------------------------------------------------------------------------------------------------------------------


def adaptable_weights(model: nn.Module) -> dict[str, tuple[nn.Module, str, slice | None]]:
    """Module name (the official key without ``.weight``) → (module, parameter name, rows): every linear and
    convolution weight of ``model``, including the projections the fast path fused into one weight (their rows of
    it)."""
    from kandinsky22.models.layers import FusibleProjections

    weights: dict[str, tuple[nn.Module, str, slice | None]] = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            weights[name] = (module, "weight", None)
        if isinstance(module, FusibleProjections):
            for group, sizes in module.fused_sizes.items():
                start = 0
                for child, size in zip(module.projection_groups[group], sizes):
                    weights[f"{name}.{child}"] = (module, f"{group}_weight", slice(start, start + size))
                    start += size
    return weights


def _weight_view(entry: tuple[nn.Module, str, slice | None]) -> torch.Tensor:
    module, parameter, rows = entry
    weight = getattr(module, parameter)
    return weight.data if rows is None else weight.data[rows]


def resolve_layers(
    model: nn.Module, parts: Mapping[str, _Parts], all_settings: Mapping[str, Any], source: str, target: str
) -> dict[str, LoraLayer]:
    """Check each module's LoRA against ``model``'s weight and make its layer, with its scale from its alpha key or
    from ``all_settings`` (``read_lora``'s: the ``target``'s, else those for every model)."""
    settings = all_settings.get(target) or all_settings.get("") or {}
    weights = adaptable_weights(model)
    kohya = {name.replace(".", "_"): name for name in weights}
    layers: dict[str, LoraLayer] = {}
    unknown = []
    for key, part in parts.items():
        name = kohya.get(key[len("kohya:") :]) if key.startswith("kohya:") else key
        if name not in weights:
            unknown.append(key.removeprefix("kohya:"))
            continue
        weight = _weight_view(weights[name])
        down, up = part.down, part.up
        assert down is not None and up is not None  # checked by split_by_target
        rank = down.shape[0]
        fits = (
            down.dim() == weight.dim()
            and up.dim() == weight.dim()
            and up.shape[0] == weight.shape[0]
            and up[0].numel() == rank
            and down[0].numel() == weight[0].numel()
        )
        if not fits:
            raise ValueError(
                f"LoRA {source}: the {target}'s {name} weight is {tuple(weight.shape)}; its LoRA's down "
                f"{tuple(down.shape)} and up {tuple(up.shape)} do not fit it (is this a LoRA for another model?)"
            )
        layers[name] = LoraLayer(
            down=down.detach().cpu(), up=up.detach().cpu(), scale=_scale(name, rank, part, settings)
        )
    if unknown:
        raise ValueError(
            f"LoRA {source}: {len(unknown)} module(s) are not in the Kandinsky 2.2 {target}, e.g. "
            f"{unknown[:3]} (is this a LoRA for another model?)"
        )
    return layers


def _scale(name: str, rank: int, part: _Parts, settings: Mapping[str, Any]) -> float:
    """alpha / rank (peft's use_rslora: alpha / √rank); without any alpha 1, as the reference's processors."""
    alpha = part.alpha
    if alpha is None:
        patterns = settings.get("alpha_pattern") or {}
        alpha = next((float(v) for k, v in patterns.items() if name == k or name.endswith(f".{k}")), None)
    if alpha is None and settings.get("lora_alpha") is not None:
        alpha = float(settings["lora_alpha"])
    if alpha is None:
        return 1.0
    return alpha / (math.sqrt(rank) if settings.get("use_rslora") else rank)


# ----------------------------------------------------------------------------------------------------------------------
# A model's adapters
# ----------------------------------------------------------------------------------------------------------------------


def state_of(model: nn.Module) -> LoraState:
    state = getattr(model, "_lora_state", None)
    if state is None:
        state = LoraState()
        object.__setattr__(model, "_lora_state", state)  # not a submodule, not in the state dict
    return state


def add_adapter(model: nn.Module, adapter: Adapter, weight: float = 1.0) -> None:
    state = state_of(model)
    if adapter.name in state.adapters:
        raise ValueError(f"an adapter named {adapter.name!r} is already loaded; choose another adapter_name")
    state.adapters[adapter.name] = adapter
    state.active[adapter.name] = weight
    apply(model)


def default_name(models: Iterable[nn.Module]) -> str:
    taken = {name for model in models for name in state_of(model).adapters}
    return next(f"default_{i}" for i in range(len(taken) + 1) if f"default_{i}" not in taken)


def set_adapters(model: nn.Module, weights: Mapping[str, float]) -> None:
    """Make exactly ``weights``' adapters active, with those weights (names checked by the caller)."""
    state = state_of(model)
    state.active = {name: weights[name] for name in state.adapters if name in weights}
    apply(model)


def delete_adapters(model: nn.Module, names: Iterable[str]) -> None:
    state = state_of(model)
    for name in names:
        state.adapters.pop(name, None)
        state.active.pop(name, None)
    apply(model)


def set_enabled(model: nn.Module, enabled: bool) -> None:
    state_of(model).enabled = enabled
    apply(model)


@torch.no_grad()
def apply(model: nn.Module) -> None:
    """Rebuild every weight an adapter touches, or touched, from its original and the active adapters."""
    state = state_of(model)
    active = [(state.adapters[name], weight) for name, weight in state.active.items() if state.enabled and weight != 0]
    touched = {name for adapter in state.adapters.values() for name in adapter.layers} | set(state.originals)
    if not touched:
        return
    weights = adaptable_weights(model)
    for name in sorted(touched):
        view = _weight_view(weights[name])
        original = state.originals.get(name)
        if original is None:
            original = state.originals[name] = view.detach().to("cpu", copy=True)
        terms = [(adapter.layers[name], weight) for adapter, weight in active if name in adapter.layers]
        if not terms:
            view.copy_(original)
            if not any(name in adapter.layers for adapter in state.adapters.values()):
                del state.originals[name]
            continue
        merged = original.to(view.device, torch.float32, memory_format=torch.contiguous_format, copy=True)
        for layer, weight in terms:
            layer.add_to(merged, weight)
        view.copy_(merged)


# ----------------------------------------------------------------------------------------------------------------------
# The methods: on the UNet and the prior (the reference's model-level names) and on the pipelines
# ----------------------------------------------------------------------------------------------------------------------


def _adapter_names(names: str | Sequence[str], what: str) -> list[str]:
    listed = [names] if isinstance(names, str) else list(names)
    if not listed or not all(isinstance(n, str) for n in listed):
        raise ValueError(f"{what} must be an adapter name or a list of them, got {names!r}")
    return listed


def _checked_weights(
    names: str | Sequence[str], weights: float | Sequence[float] | None, loaded: Iterable[str]
) -> dict[str, float]:
    """``set_adapters``' arguments checked: known names, one weight each (a single number for all)."""
    listed = _adapter_names(names, "adapter_names")
    missing = [n for n in listed if n not in set(loaded)]
    if missing:
        raise ValueError(f"adapter_names: {missing} not loaded; loaded: {sorted(set(loaded))}")
    if weights is None:
        values = [1.0] * len(listed)
    elif isinstance(weights, (int, float)) and not isinstance(weights, bool):
        values = [float(weights)] * len(listed)
    else:
        values = list(weights)
        if len(values) != len(listed):
            raise ValueError(f"adapter_weights: {len(values)} weights for {len(listed)} adapters ({listed})")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"adapter_weights must be finite numbers, got {weights!r}")
    return dict(zip(listed, map(float, values)))


class LoraModelMixin:
    """LoRA methods of the UNet and the prior (the reference's names for them on a model)."""

    _lora_target: str  # "unet" or "prior"

    def load_attn_procs(
        self,
        pretrained_model_name_or_path_or_dict: str | Path | Mapping[str, torch.Tensor],
        weight_name: str | None = None,
        adapter_name: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Load a LoRA into this model and make it active (weight 1), merged into the weights it adapts: the call
        the Kandinsky 2.2 LoRA training scripts document (``pipe.unet.load_attn_procs(output_dir)``,
        ``pipe.prior_prior.load_attn_procs(output_dir)``). Returns the adapter's name."""
        return self.load_lora_adapter(
            pretrained_model_name_or_path_or_dict, weight_name=weight_name, adapter_name=adapter_name, **kwargs
        )

    def load_lora_adapter(
        self,
        pretrained_model_name_or_path_or_dict: str | Path | Mapping[str, torch.Tensor],
        adapter_name: str | None = None,
        weight_name: str | None = None,
        subfolder: str | None = None,
        prefix: str | None = None,
        **hub_kwargs: Any,
    ) -> str:
        """Load a LoRA file, folder, hub repository or state dict into this model (see ``kandinsky22.lora``);
        returns the adapter's name (``default_<n>`` unless given). ``prefix``: take only the keys under it (e.g.
        "unet" in a file for a whole pipeline); by default, those of this model, prefixed or not."""
        file = LoraFile.read(pretrained_model_name_or_path_or_dict, weight_name, subfolder, prefix, **hub_kwargs)
        others = sorted(t for t in file.parts if t != self._lora_target)
        if others:
            raise ValueError(f"LoRA {file.source} adapts the {others[0]}, not this {self._lora_target}")
        name = adapter_name or default_name([self])  # type: ignore[list-item]
        file.load_into(self, name)  # type: ignore[arg-type]
        return name

    def set_adapters(self, adapter_names: str | Sequence[str], weights: float | Sequence[float] | None = None) -> None:
        """Make exactly these adapters active, with these weights (default 1)."""
        set_adapters(self, _checked_weights(adapter_names, weights, state_of(self).adapters))  # type: ignore[arg-type]

    def active_adapters(self) -> list[str]:
        state = state_of(self)  # type: ignore[arg-type]
        return list(state.active) if state.enabled else []

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        names = _adapter_names(adapter_names, "adapter_names")
        missing = [n for n in names if n not in state_of(self).adapters]  # type: ignore[arg-type]
        if missing:
            raise ValueError(f"adapter_names: {missing} not loaded")
        delete_adapters(self, names)  # type: ignore[arg-type]

    def unload_lora(self) -> None:
        """Remove every adapter: the weights are the original ones again, exactly."""
        delete_adapters(self, list(state_of(self).adapters))  # type: ignore[arg-type]

    def disable_lora(self) -> None:
        set_enabled(self, False)  # type: ignore[arg-type]

    def enable_lora(self) -> None:
        set_enabled(self, True)  # type: ignore[arg-type]


class LoraPipelineMixin:
    """LoRA methods of every pipeline: adapters for its decoder UNet and its prior (the SD pipelines' names for
    them; the reference's Kandinsky 2.2 pipelines have none)."""

    components: dict[str, Any]

    def _lora_models(self) -> dict[str, tuple[str, nn.Module]]:
        """ "unet" / "prior" → (component name, model), for those this pipeline holds."""
        from kandinsky22.models.prior import PriorTransformer
        from kandinsky22.models.unet import UNet2DConditionModel

        found: dict[str, tuple[str, nn.Module]] = {}
        for name, component in self.components.items():
            if isinstance(component, UNet2DConditionModel):
                found["unet"] = (name, component)
            elif isinstance(component, PriorTransformer):
                found["prior"] = (name, component)
        return found

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | Path | Mapping[str, torch.Tensor],
        adapter_name: str | None = None,
        weight_name: str | None = None,
        subfolder: str | None = None,
        **hub_kwargs: Any,
    ) -> str:
        """Load a LoRA (file, folder, hub repository or state dict) into this pipeline's UNet and/or prior, as its
        keys say, and make it active with weight 1 beside the adapters already active; returns its name
        (``default_<n>`` unless ``adapter_name`` is given). ``weight_name`` picks the file in a folder or repository;
        ``hub_kwargs``: ``revision``, ``cache_dir``, ``token``, ``local_files_only``, …

        The adapter is merged into the weights it changes (``kandinsky22.lora``): no cost per step. Formats: the
        2023 Kandinsky 2.2 training scripts' attention processors, peft, diffusers and kohya."""
        models = self._lora_models()
        file = LoraFile.read(pretrained_model_name_or_path_or_dict, weight_name, subfolder, **hub_kwargs)
        for target in file.parts:
            if target not in models:
                held = " and ".join(models) or "neither"
                raise ValueError(
                    f"LoRA {file.source} adapts the {target}; {type(self).__name__} holds the {held}: load it on a "
                    f"pipeline with a {target} (e.g. a combined pipeline)"
                )
        name = adapter_name or default_name(model for _, model in models.values())
        taken = [models[t][0] for t in file.parts if name in state_of(models[t][1]).adapters]
        if taken:
            raise ValueError(f"an adapter named {name!r} is already loaded in {taken}; choose another adapter_name")
        layers = {t: file.layers_for(models[t][1], t) for t in file.parts}  # all checked before any is merged
        for target, adapted in layers.items():
            add_adapter(models[target][1], Adapter(name, file.source, adapted))
        return name

    def _loaded_adapters(self) -> dict[str, list[str]]:
        return {name: list(state_of(model).adapters) for name, model in self._lora_models().values()}

    def get_list_adapters(self) -> dict[str, list[str]]:
        """The loaded adapters per component (``{"unet": [...], "prior": [...]}``, by component name)."""
        return {name: adapters for name, adapters in self._loaded_adapters().items() if adapters}

    def get_active_adapters(self) -> list[str]:
        """The active adapters' names, in loading order."""
        names: dict[str, None] = {}
        for _, model in self._lora_models().values():
            state = state_of(model)
            names.update(dict.fromkeys(state.active if state.enabled else ()))
        return list(names)

    def set_adapters(
        self, adapter_names: str | Sequence[str], adapter_weights: float | Sequence[float] | None = None
    ) -> None:
        """Make exactly ``adapter_names`` active, with ``adapter_weights`` (one per adapter, or one for all;
        default 1): ``pipe.set_adapters(["style", "subject"], adapter_weights=[0.7, 0.5])``."""
        loaded = [n for adapters in self._loaded_adapters().values() for n in adapters]
        weights = _checked_weights(adapter_names, adapter_weights, loaded)
        for _, model in self._lora_models().values():
            set_adapters(model, weights)

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        """Remove these adapters (their share of the weights goes with them)."""
        names = _adapter_names(adapter_names, "adapter_names")
        loaded = {n for adapters in self._loaded_adapters().values() for n in adapters}
        missing = [n for n in names if n not in loaded]
        if missing:
            raise ValueError(f"adapter_names: {missing} not loaded; loaded: {sorted(loaded)}")
        for _, model in self._lora_models().values():
            delete_adapters(model, names)

    def unload_lora_weights(self) -> None:
        """Remove every adapter: the UNet's and the prior's weights are the original ones again, exactly."""
        for _, model in self._lora_models().values():
            delete_adapters(model, list(state_of(model).adapters))

    def disable_lora(self) -> None:
        """Run with the original weights, keeping the adapters loaded (``enable_lora()`` brings them back)."""
        for _, model in self._lora_models().values():
            set_enabled(model, False)

    def enable_lora(self) -> None:
        for _, model in self._lora_models().values():
            set_enabled(model, True)
