"""Checkpoint I/O: config.json + safetensors/bin weights, hub download, strict loading, saving.

Models are built on the ``meta`` device and their weights are attached with ``load_state_dict(assign=True)``,
so loading a 1.2 B-parameter UNet allocates each weight once (no random init, no second copy).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_STEM = "diffusion_pytorch_model"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class Config(dict):
    """A model or scheduler config: a dict whose keys can also be read as attributes (``unet.config.in_channels``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Config is read-only; build a new model with from_config(config, **overrides)")


def config_json(config: Mapping[str, Any], **dumps_kwargs: Any) -> str:
    """``config`` as JSON; numpy arrays and scalars (e.g. ``trained_betas``, which the reference documents as an array)
    and tensors are written as lists and numbers, as the reference writes arrays."""

    def plain(value: Any) -> Any:
        if hasattr(value, "tolist"):
            return value.tolist()
        raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")

    return json.dumps(config, default=plain, **dumps_kwargs)


class ModelOutput:
    """Base of the models' and schedulers' output dataclasses: attribute (``out.sample``), index (``out[0]``), key
    (``out["sample"]``) and tuple (``out.to_tuple()``) access, as the reference's outputs, whose ``[0]`` its own
    loops use (``scheduler.step(...)[0]``, ``unet(...)[0]``). As there, a field left None is skipped."""

    def to_tuple(self) -> tuple:
        values = (getattr(self, field.name) for field in dataclasses.fields(self))
        return tuple(value for value in values if value is not None)

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            names = {field.name for field in dataclasses.fields(self)}
            value = getattr(self, key) if key in names else None
            if value is None:
                raise KeyError(key)
            return value
        return self.to_tuple()[key]


# ----------------------------------------------------------------------------------------------------------------------
# Finding files: a local folder or a hub repository
# ----------------------------------------------------------------------------------------------------------------------


def is_hub_id(name: str | os.PathLike) -> bool:
    """True for an ``owner/name`` string that is not an existing local path."""
    text = str(name)
    return not Path(text).expanduser().exists() and bool(_HUB_ID.match(text))


def resolve_folder(
    path_or_id: str | os.PathLike,
    subfolder: str | None = None,
    allow_patterns: Iterable[str] | None = None,
    revision: str | None = None,
    **hub_kwargs: Any,
) -> Path:
    """Return a local folder holding ``path_or_id`` (joined with ``subfolder``), downloading from the hub if needed.

    ``allow_patterns`` (relative to ``subfolder``) limits a hub download to the files needed.
    """
    local = Path(path_or_id).expanduser()
    if local.exists():
        folder = local / subfolder if subfolder else local
        if not folder.is_dir():
            raise FileNotFoundError(f"No folder '{folder}' (from '{path_or_id}' with subfolder '{subfolder}')")
        return folder
    if not is_hub_id(path_or_id):
        raise FileNotFoundError(
            f"No such folder: '{path_or_id}'. Pass an existing local folder or a hub id such as "
            "'kandinsky-community/kandinsky-2-2-decoder'."
        )
    patterns = list(allow_patterns) if allow_patterns is not None else ["*"]
    if subfolder:
        patterns = [f"{subfolder}/{p}" for p in patterns]
    root = download_from_hub(str(path_or_id), patterns, revision=revision, **hub_kwargs)
    return root / subfolder if subfolder else root


def download_from_hub(repo_id: str, allow_patterns: list[str], revision: str | None = None, **hub_kwargs: Any) -> Path:
    """``snapshot_download`` of the matching files; a failure names the repository and the local-folder way out."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns, revision=revision, **hub_kwargs))
    except Exception as err:  # network, auth, offline mode, missing repo: all end the same way for the user
        detail = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())  # its lines, on one
        raise OSError(
            f"Could not get '{repo_id}' from the Hugging Face Hub ({type(err).__name__}: {detail}). "
            f"If you are offline, download it elsewhere (e.g. `huggingface-cli download {repo_id}`) and pass the "
            "local folder instead of the hub id."
        ) from err


# snapshot_download's options that the from_pretrained methods pass on (the reference's names for them)
HUB_OPTIONS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "proxies")


def weight_formats(use_safetensors: bool | None) -> tuple[str, ...]:
    """The weight file formats to look for, in order: ``use_safetensors`` True takes safetensors only, False pickled
    .bin only, None (the default) safetensors and else .bin, as the reference's ``use_safetensors``."""
    if use_safetensors is not None and not isinstance(use_safetensors, bool):
        raise ValueError(f"`use_safetensors` must be True, False or None, got {use_safetensors!r}")
    return {None: ("safetensors", "bin"), True: ("safetensors",), False: ("bin",)}[use_safetensors]


def weight_patterns(variant: str | None, formats: Sequence[str] = ("safetensors", "bin")) -> list[str]:
    """The file names a model folder may hold its weights under, for a hub download."""
    return [CONFIG_NAME, *(p for ext in formats for p in _model_weight_patterns(WEIGHTS_STEM, variant, ext))]


def find_weight_files(
    folder: Path, variant: str | None = None, formats: Sequence[str] = ("safetensors", "bin")
) -> list[Path]:
    """The weight files of a model folder, in the order of ``formats`` (safetensors first, then .bin); sharded files
    through their index.

    A folder with both a single file and an index whose shards are all there was saved unsharded, then sharded (the
    reference leaves the single file behind): the shards are the newer weights, which the reference loads too. An
    index whose shards are gone is the stale one (the reference removes the shards, not the index)."""
    v = f".{variant}" if variant else ""
    for ext in formats:
        single = folder / f"{WEIGHTS_STEM}{v}.{ext}"
        index = folder / f"{WEIGHTS_STEM}.{ext}.index{v}.json"
        shards = _index_shards(index) if index.is_file() else []
        missing = [str(s) for s in shards if not s.is_file()]
        if shards and not missing:
            return shards
        if single.is_file():
            return [single]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are missing: {missing[:3]}")
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    wanted = " or ".join(f"{WEIGHTS_STEM}{v}.{ext}" for ext in formats) + " (or a sharded index)"
    raise FileNotFoundError(f"No weights '{wanted}' in '{folder}'. Files there: {present}")


def _index_shards(index: Path) -> list[Path]:
    """The shard files a sharded checkpoint's index names, in order of first use."""
    weight_map = json.loads(index.read_text())["weight_map"]
    return [index.parent / name for name in dict.fromkeys(weight_map.values())]


def read_state_dict(files: list[Path]) -> dict[str, torch.Tensor]:
    """Read weight files into one CPU state dict (safetensors, or pickled .bin with ``weights_only=True``)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            state.update(load_file(file, device="cpu"))
        else:
            state.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
    return state


# ----------------------------------------------------------------------------------------------------------------------
# Strict assignment of a state dict into a meta-built model
# ----------------------------------------------------------------------------------------------------------------------


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise ``ValueError`` listing the first missing, unexpected and mis-shaped keys, naming ``source``."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k}: file {tuple(state[k].shape)} vs model {expected[k]}"
        for k in expected
        if k in state and tuple(state[k].shape) != expected[k]
    ]
    if missing or unexpected or misshaped:
        parts = [f"The weights in '{source}' do not fit {type(model).__name__}:"]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if keys:
                more = f" (and {len(keys) - 5} more)" if len(keys) > 5 else ""
                parts.append(f"{len(keys)} {label}: {keys[:5]}{more}")
        raise ValueError(" ".join(parts))


def assign_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], source: str, dtype: torch.dtype | None = None
) -> None:
    """Check ``state`` strictly, cast floating tensors to ``dtype`` one by one, and attach them to ``model``."""
    check_state_dict(model, state, source)
    if dtype is not None:
        for key, value in state.items():
            if value.is_floating_point() and value.dtype != dtype:
                state[key] = value.to(dtype)
    model.load_state_dict(state, strict=True, assign=True)


# ----------------------------------------------------------------------------------------------------------------------
# The base of every model
# ----------------------------------------------------------------------------------------------------------------------


class ModelMixin(nn.Module):
    """Config handling and checkpoint I/O shared by the UNet, MoVQ and the prior.

    A subclass sets ``config_defaults`` (every key the reference writes to ``config.json``, with its default) and
    calls ``self._register_config(kwargs)`` first thing in ``__init__``. Buffers that are not saved (derived
    constants) are rebuilt by ``_init_buffers`` after loading, since a meta-built model has none.
    """

    config_defaults: ClassVar[dict[str, Any]] = {}
    config: Config

    def _register_config(self, kwargs: Mapping[str, Any]) -> Config:
        unknown = [k for k in kwargs if k not in self.config_defaults and not k.startswith("_")]
        if unknown:
            logger.warning("%s ignores unknown config keys: %s", type(self).__name__, sorted(unknown))
        values = {k: kwargs.get(k, default) for k, default in self.config_defaults.items()}
        object.__setattr__(self, "config", Config(values))  # not an nn.Module attribute
        return self.config

    def _init_buffers(self) -> None:
        """Rebuild non-persistent buffers (derived constants) on the model's device; no-op by default."""

    # -- construction --------------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None, **overrides: Any):
        values = {k: v for k, v in dict(config or {}).items() if not k.startswith("_")}
        values.update(overrides)
        return cls(**values)

    @classmethod
    def load_config(cls, path_or_id: str | os.PathLike, subfolder: str | None = None, **hub_kwargs: Any) -> dict:
        folder = resolve_folder(path_or_id, subfolder, [CONFIG_NAME], **hub_kwargs)
        return read_json(folder / CONFIG_NAME)

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        variant: str | None = None,
        device: str | torch.device | None = None,
        use_safetensors: bool | None = None,
        **hub_kwargs: Any,
    ):
        """Load a model folder (``config.json`` + weights), local or on the hub, without random initialisation.

        ``use_safetensors``: see :func:`weight_formats`; ``hub_kwargs``: ``snapshot_download``'s options
        (``revision``, ``cache_dir``, ``token``, ``local_files_only``, ...)."""
        unknown = sorted(k for k in hub_kwargs if k not in HUB_OPTIONS)
        if unknown:
            raise ValueError(
                f"{cls.__name__}.from_pretrained got unknown options {unknown}; its options are subfolder, "
                f"torch_dtype, variant, device, use_safetensors, {', '.join(HUB_OPTIONS)}"
            )
        if torch_dtype is not None and not (isinstance(torch_dtype, torch.dtype) and torch_dtype.is_floating_point):
            # `Tensor.to` would take a string for a device name ("Invalid device string: 'float16'")
            raise ValueError(
                f"`torch_dtype` must be a floating-point torch.dtype (e.g. torch.float16) or None, got {torch_dtype!r}"
            )
        formats = weight_formats(use_safetensors)
        folder = resolve_folder(path_or_id, subfolder, weight_patterns(variant, formats), **hub_kwargs)
        config = read_json(folder / CONFIG_NAME)
        files = find_weight_files(folder, variant, formats)
        with torch.device("meta"):
            model = cls.from_config(config)
        state = read_state_dict(files)
        assign_state_dict(model, state, source=str(files[0] if len(files) == 1 else folder), dtype=torch_dtype)
        if device is not None:
            model.to(device)
        model._init_buffers()
        model.eval()
        return model

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        variant: str | None = None,
        safe_serialization: bool = True,
        max_shard_size: int | str | None = None,
    ) -> None:
        """Write ``config.json`` and the weights the way the reference does (readable by both libraries).

        ``max_shard_size`` (bytes, or a size such as ``"10GB"`` as the reference takes it) splits the weights into
        shards with an index file.
        """
        from safetensors.torch import save_file

        max_bytes = shard_size_bytes(max_shard_size)
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"_class_name": type(self).__name__, **self.config}
        (folder / CONFIG_NAME).write_text(config_json(config, indent=2, sort_keys=True) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        ext = "safetensors" if safe_serialization else "bin"
        v = f".{variant}" if variant else ""

        def write(tensors: dict[str, torch.Tensor], path: Path) -> None:
            if safe_serialization:
                save_file(tensors, path, metadata={"format": "pt"})
            else:
                torch.save(tensors, path)

        # The weights of an earlier save in this format and variant go first: a single file left next to new shards
        # (or shards next to a new single file) would be found, and loaded, instead of the new weights.
        stale_index = folder / f"{WEIGHTS_STEM}.{ext}.index{v}.json"
        stale = [path for path in _index_shards(stale_index) if path.parent == folder] if stale_index.is_file() else []
        for path in (*stale, stale_index, folder / f"{WEIGHTS_STEM}{v}.{ext}"):
            path.unlink(missing_ok=True)
        shards = _split_shards(state, max_bytes)
        if len(shards) == 1:
            write(state, folder / f"{WEIGHTS_STEM}{v}.{ext}")
            return
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"{WEIGHTS_STEM}-{i:05d}-of-{len(shards):05d}{v}.{ext}"
            write(shard, folder / name)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / f"{WEIGHTS_STEM}.{ext}.index{v}.json").write_text(json.dumps(index, indent=2) + "\n")

    # -- properties ------------------------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# The reference's size units (huggingface_hub's): decimal, so "10GB" is 10**10 bytes.
_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def shard_size_bytes(max_shard_size: int | str | None) -> int | None:
    """``max_shard_size`` in bytes: None (no sharding), an int, or a number with a unit ("10GB", "500MB")."""
    if max_shard_size is None:
        return None
    if isinstance(max_shard_size, int) and not isinstance(max_shard_size, bool) and max_shard_size > 0:
        return max_shard_size
    if isinstance(max_shard_size, str):
        text = max_shard_size.strip()
        unit = _SIZE_UNITS.get(text[-2:].upper())
        try:
            value = float(text[:-2])
        except ValueError:
            value = 0.0
        if unit is not None and math.isfinite(value) and value * unit >= 1:
            return int(value * unit)
    raise ValueError(
        f"max_shard_size must be a positive number of bytes or a size such as '10GB' (units KB, MB, GB, TB), "
        f"got {max_shard_size!r}"
    )


def _split_shards(state: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    if not max_bytes:
        return [state]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"No '{path.name}' in '{path.parent}'")
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------------------------------------
# model_index.json: pipelines as folders of components (written for the pipelines, see pipelines/base.py)
# ----------------------------------------------------------------------------------------------------------------------

MODEL_INDEX_NAME = "model_index.json"
# The reference version whose folder layout we write; the reference reads this key and needs a parseable version.
MODEL_INDEX_VERSION = "0.42.1"


def read_model_index(path_or_id: str | os.PathLike, **hub_kwargs: Any) -> tuple[Path, dict]:
    """The folder (downloading only ``model_index.json`` and the model card from the hub) and its model index."""
    folder = resolve_folder(path_or_id, allow_patterns=[MODEL_INDEX_NAME, "README.md"], **hub_kwargs)
    return folder, read_json(folder / MODEL_INDEX_NAME)


def read_model_card_list(folder: Path, key: str) -> list[str]:
    """The values of ``key`` in the YAML front matter of ``folder/README.md`` (a list, or [] when absent).

    The official decoder repos name their prior this way (``prior: [kandinsky-community/kandinsky-2-2-prior]``).
    """
    import yaml

    card = folder / "README.md"
    if not card.is_file():
        return []
    text = card.read_text(encoding="utf-8")
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, flags=re.DOTALL)
    if not match:
        return []
    value = (yaml.safe_load(match.group(1)) or {}).get(key)
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def _model_weight_patterns(stem: str, variant: str | None, ext: str) -> list[str]:
    v = f".{variant}" if variant else ""
    return [f"{stem}{v}.{ext}", f"{stem}.{ext}.index{v}.json", f"{stem}{v}-*.{ext}", f"{stem}-*{v}.{ext}"]


def _resolve_weights(
    path_or_id: str | os.PathLike,
    subfolder: str,
    stem: str,
    variant: str | None,
    formats: Sequence[str],
    **hub_kwargs: Any,
):
    """The component folder with its weights present, fetching the first of ``formats`` (safetensors, then .bin) and
    the next only if there are none.

    The official repos hold both formats; downloading only one halves the download (5 GB for the UNet alone).
    """
    for ext in formats:
        patterns = _model_weight_patterns(stem, variant, ext)
        folder = resolve_folder(path_or_id, subfolder, ["config.json", *patterns], **hub_kwargs)
        if any(fnmatch.fnmatch(file.name, pattern) for file in folder.iterdir() for pattern in patterns):
            return folder
    return folder


_TRANSFORMERS_FILES = {
    "tokenizer": ["*.json", "*.txt", "*.model"],
    "processor": ["preprocessor_config.json"],
}


def load_component(
    path_or_id: str | os.PathLike,
    name: str,
    library: str,
    class_name: str,
    torch_dtype: torch.dtype | None = None,
    variant: str | None = None,
    use_safetensors: bool | None = None,
    **hub_kwargs: Any,
) -> Any:
    """Load component ``name`` of a pipeline folder, as ``model_index.json`` describes it (``[library, class_name]``).

    ``diffusers`` components are built from our own classes of the same name (models, schedulers); ``transformers``
    components (CLIP towers, tokenizer, image processor) through transformers.
    """
    formats = weight_formats(use_safetensors)
    if library == "transformers":
        return _load_transformers_component(
            path_or_id, name, class_name, torch_dtype, variant, use_safetensors, **hub_kwargs
        )
    import kandinsky22

    cls = getattr(kandinsky22, class_name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ValueError(
            f"Component '{name}' of '{path_or_id}' is a {library}.{class_name}, which kandinsky22 does not provide. "
            f"Pass your own `{name}=` to from_pretrained."
        )
    if isinstance(cls, type) and issubclass(cls, ModelMixin):
        folder = _resolve_weights(path_or_id, name, WEIGHTS_STEM, variant, formats, **hub_kwargs)
        if variant and not any(folder.glob(f"*.{variant}.*")):
            logger.warning("No '%s' weights in '%s'; loading the default ones", variant, folder)
            variant = None
        return cls.from_pretrained(folder, torch_dtype=torch_dtype, variant=variant, use_safetensors=use_safetensors)
    return cls.from_pretrained(resolve_folder(path_or_id, name, ["*.json"], **hub_kwargs))


def _load_transformers_component(
    path_or_id: str | os.PathLike,
    name: str,
    class_name: str,
    torch_dtype: torch.dtype | None,
    variant: str | None,
    use_safetensors: bool | None,
    **hub_kwargs: Any,
) -> Any:
    import transformers

    if class_name.startswith("CLIPImageProcessor"):
        # Saved as CLIPImageProcessor (official) or CLIPImageProcessorPil (transformers 5 without torchvision):
        # the same preprocessing; take the PIL one when torchvision is missing, as transformers itself would.
        from importlib.util import find_spec

        pil = getattr(transformers, "CLIPImageProcessorPil", None)
        cls = pil if pil is not None and find_spec("torchvision") is None else transformers.CLIPImageProcessor
        return cls.from_pretrained(resolve_folder(path_or_id, name, _TRANSFORMERS_FILES["processor"], **hub_kwargs))
    cls = getattr(transformers, class_name, None)
    if cls is None:
        raise ValueError(f"Component '{name}' of '{path_or_id}' names transformers.{class_name}, which does not exist")
    if "Tokenizer" in class_name:
        return cls.from_pretrained(resolve_folder(path_or_id, name, _TRANSFORMERS_FILES["tokenizer"], **hub_kwargs))
    folder = _resolve_weights(path_or_id, name, "model", variant, weight_formats(use_safetensors), **hub_kwargs)
    if variant and not any(folder.glob(f"*.{variant}.*")):
        logger.warning("No '%s' weights in '%s'; loading the default ones", variant, folder)
        variant = None
    options: dict[str, Any] = {"variant": variant, "use_safetensors": use_safetensors}
    if torch_dtype is not None:
        major = int(transformers.__version__.split(".")[0])
        options["dtype" if major >= 5 else "torch_dtype"] = torch_dtype  # transformers 5 renamed the argument
    return cls.from_pretrained(folder, **options)


def component_library(component: Any) -> str:
    """The library ``model_index.json`` names for a component: ours are saved as the reference's (``diffusers``)."""
    return "transformers" if type(component).__module__.startswith("transformers") else "diffusers"


def _index_class_name(component: Any) -> str:
    name = type(component).__name__
    # The official model_index names CLIPImageProcessor; its Pil/Fast variants load from the same files.
    return "CLIPImageProcessor" if name.startswith("CLIPImageProcessor") else name


def write_model_index(folder: Path, class_name: str, components: Mapping[str, Any]) -> None:
    """Write ``model_index.json``. Our models and schedulers are saved in the reference's format under the reference's
    class names, so they are listed as ``diffusers`` components (and load back into our classes of the same name)."""
    index: dict[str, Any] = {"_class_name": class_name, "_diffusers_version": MODEL_INDEX_VERSION}
    for name, component in sorted(components.items()):
        index[name] = [component_library(component), _index_class_name(component)]
    (Path(folder) / MODEL_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
