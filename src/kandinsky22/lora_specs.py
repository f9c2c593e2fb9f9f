"""LoRAs as the command line takes them: ``--lora SOURCE[:WEIGHT]`` of the image commands, ``batch`` and ``serve``.

SOURCE is a LoRA file (.safetensors or a pickled .bin), a folder holding one, or a hub id; WEIGHT (default 1) is the
text after the last ``:`` when it reads as a number, so ``C:\\loras\\style.safetensors`` and ``owner/name`` need none;
``owner/name/FILE.safetensors`` names one file of a hub repository.
A spec is plain data (:class:`LoraSpec`); this module parses and checks specs without torch, so a bad one is refused
before any model loads. :class:`EngineLoras` is what an :class:`~kandinsky22.jobs.Engine` does with them: it finds the
file each LoRA is read from (in a folder or hub repository: the one :mod:`kandinsky22.lora` picks), reads and hashes
it once, and merges each LoRA's part for the UNet and for the prior into those models as their pipelines load (the
Engine loads the prior and the decoders separately, so a LoRA that adapts both is split between them).

What a recipe records of each LoRA (:meth:`LoadedLora.record`): the source (a local path made absolute, so that the
recipe works from any folder), the weight and the SHA-256 of the file read, so that a re-run can tell when the file
changed since.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kandinsky22.jobs import HUB_ID

if TYPE_CHECKING:
    from kandinsky22.lora import LoraFile

OPTION = "--lora"
# ``owner/name/path/in/repo.safetensors``: one file of a hub repository (a LoRA file of any name).
HUB_FILE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.\-]*/[\w.\-]+)/(?P<file>[^:]+\.(?:safetensors|bin|pt|pth|ckpt))$")


class LoraError(ValueError):
    """A LoRA that cannot be used: its file cannot be found or read, or it does not fit the models it adapts.
    ``str()`` names the option and the source as given: ``--lora SOURCE: reason``."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{OPTION} {source}: {reason}")
        self.source = source
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # rebuilt from both arguments (the default would pass the message alone): a Ray worker's error reaches the
        # driver as itself
        return type(self), (self.source, self.reason)


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to apply: a file, folder or hub id, and its weight (0 leaves the models as they are)."""

    source: str
    weight: float = 1.0


def parse_lora(text: str) -> LoraSpec:
    """``SOURCE[:WEIGHT]``: the weight is what follows the last ``:`` if it reads as a number (it must be finite);
    otherwise the whole text is the source. Raises ``ValueError``."""
    source, colon, tail = text.rpartition(":")
    weight = 1.0
    if not colon:
        source = text
    else:
        try:
            weight = float(tail)
        except ValueError:  # part of the source: a Windows drive, a file name with a colon
            source, weight = text, 1.0
        if not math.isfinite(weight):
            raise ValueError(f"WEIGHT must be a finite number, got {tail!r} in {text!r}")
    if not source.strip():
        raise ValueError(f"must be SOURCE[:WEIGHT] (a LoRA file, a folder holding one, or a hub id), got {text!r}")
    return LoraSpec(source, weight)


def lora_argument(text: str) -> LoraSpec:
    """argparse type of ``--lora``."""
    import argparse

    try:
        return parse_lora(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def checked_sources(specs: Sequence[LoraSpec]) -> list[LoraSpec]:
    """``specs`` with local paths made absolute (not resolving links: a hub cache's files are links to blobs without
    a suffix); a source that is neither an existing path nor a hub id (``owner/name``) raises :class:`LoraError`.
    No torch: for the checks made before anything loads."""
    checked = []
    for spec in specs:
        path = Path(spec.source).expanduser()
        if path.exists():
            checked.append(dataclasses.replace(spec, source=os.path.abspath(path)))
        elif HUB_ID.match(spec.source) or HUB_FILE.match(spec.source):
            checked.append(spec)
        else:
            head, colon, tail = spec.source.rpartition(":")
            if colon and Path(head).expanduser().exists():
                raise LoraError(spec.source, f"WEIGHT must be a number, got {tail!r}")
            raise LoraError(
                spec.source,
                "no such file or folder (give a .safetensors or .bin file, a folder holding one, or a hub id)",
            )
    return checked


def specs_of_recipe(recipe: Mapping[str, Any]) -> list[LoraSpec]:
    """The LoRAs a recipe records (none for a recipe without ``loras``); ``ValueError`` for a malformed entry."""
    recorded = recipe.get("loras") or []
    if not isinstance(recorded, list):
        raise ValueError(f"its loras must be a list, got {recorded!r}")
    specs = []
    for entry in recorded:
        source = entry.get("source") if isinstance(entry, dict) else None
        weight = entry.get("weight") if isinstance(entry, dict) else None
        if (
            not isinstance(source, str)
            or not source
            or isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not math.isfinite(weight)
        ):
            raise ValueError(f"its loras hold {entry!r}; each must be {{source, weight, sha256}}")
        specs.append(LoraSpec(source, float(weight)))
    return specs


def changed_loras(recipe: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The sources of ``records`` (LoRAs as read now) whose file, or ``adapter_config.json`` beside it, differs from
    the one the recipe recorded for the same source (a recipe without ``config_sha256``, from before it was recorded,
    says nothing of the config)."""
    recorded = {entry.get("source"): entry for entry in recipe.get("loras") or [] if isinstance(entry, dict)}

    def differs(record: Mapping[str, Any], key: str) -> bool:
        then = recorded[record["source"]].get(key)
        return then is not None and then != record.get(key)

    return [
        record["source"]
        for record in records
        if record["source"] in recorded and (differs(record, "sha256") or differs(record, "config_sha256"))
    ]


def lora_file(source: str) -> Path:
    """The file a LoRA is read from: the file itself; in a folder or a hub repository (downloaded if need be), the
    one :func:`kandinsky22.lora.read_lora` picks. ``FileNotFoundError`` where there is none; ``OSError`` for a hub
    failure."""
    path = Path(source).expanduser()
    if path.is_file():
        return Path(os.path.abspath(path))
    from kandinsky22 import loading, lora

    in_repo = HUB_FILE.match(source)
    if in_repo:  # one named file of a hub repository
        folder = loading.resolve_folder(in_repo["repo"], None, [in_repo["file"], lora.PEFT_CONFIG])
        file = folder / in_repo["file"]
        if not file.is_file():
            raise FileNotFoundError(f"no file '{in_repo['file']}' in the hub repository '{in_repo['repo']}'")
        return Path(os.path.abspath(file))
    folder = loading.resolve_folder(source, None, [*lora.LORA_FILES, lora.PEFT_CONFIG])
    try:
        return Path(os.path.abspath(lora.find_lora_file(folder, hub=not path.exists())))
    except FileNotFoundError:
        # kandinsky22.lora's message advises weight_name=, which the command line has not: give the file instead.
        others = sorted(p.name for p in folder.glob("*.safetensors"))
        if not path.exists():  # a hub repository: only the standard names were downloaded
            where, hint = f"hub repository '{source}'", f"; a file of another name: give it as '{source}/FILE'"
        else:
            where = f"folder '{folder}'"
            hint = f", and it holds several other .safetensors files ({', '.join(others)}): give one" if others else ""
        raise FileNotFoundError(f"no LoRA file in the {where}: looked for {', '.join(lora.LORA_FILES)}{hint}") from None


@dataclass
class LoadedLora:
    """A LoRA read from its file, split by the model each part adapts (:class:`kandinsky22.lora.LoraFile`)."""

    spec: LoraSpec
    name: str  # the adapter's name in the models
    file: Path
    sha256: str
    lora: LoraFile
    # peft's adapter_config.json beside the file, whose lora_alpha sets the scale (kandinsky22.lora): its SHA-256
    config_sha256: str | None = None

    def record(self) -> dict[str, Any]:
        """What a recipe keeps of it: source, weight, the file's SHA-256 and, where an ``adapter_config.json`` sits
        beside it, that file's (``config_sha256``)."""
        record = {"source": self.spec.source, "weight": self.spec.weight, "sha256": self.sha256}
        if self.config_sha256 is not None:
            record["config_sha256"] = self.config_sha256
        return record


def load_lora(spec: LoraSpec, name: str) -> LoadedLora:
    """Find, hash and read ``spec``'s file, split by the model each part adapts. Raises :class:`LoraError`, or
    ``OSError`` for a hub failure."""
    from kandinsky22 import lora
    from kandinsky22.recipe import file_sha256

    try:
        file = lora_file(spec.source)
    except FileNotFoundError as err:
        raise LoraError(spec.source, str(err)) from None
    try:
        read = lora.LoraFile.read(file)
    except ValueError as err:
        raise LoraError(spec.source, _reason(err, str(file))) from None
    config = file.parent / lora.PEFT_CONFIG
    config_sha256 = file_sha256(config) if config.is_file() else None
    return LoadedLora(spec, name, file, file_sha256(file), read, config_sha256)


class EngineLoras:
    """An Engine's LoRAs: read once (:meth:`load`), then merged into each UNet and prior as its pipeline loads
    (:meth:`adapt`), each at its weight; a job's choice of them (:attr:`Job.loras <kandinsky22.jobs.Job.loras>`)
    becomes adapter weights (:meth:`weights`), merged into a pipeline's models by :meth:`select`."""

    def __init__(self, specs: Sequence[LoraSpec] = ()) -> None:
        self.specs = list(specs)
        self._loaded: list[LoadedLora] | None = None

    def load(self) -> list[LoadedLora]:
        if self._loaded is None:
            self._loaded = [load_lora(spec, f"lora{i}") for i, spec in enumerate(self.specs, 1)]
        return self._loaded

    def records(self) -> list[dict[str, Any]]:
        """What recipes record (empty before :meth:`load`, and without LoRAs)."""
        return [lora.record() for lora in self._loaded or []]

    def weights(self, choice: Sequence[LoraSpec] | None) -> dict[str, float]:
        """Adapter name → weight for a job's choice: ``None``, each LoRA's own weight; a list (of known sources,
        checked by :func:`kandinsky22.jobs.check_lora_choice`), its weights and 0 for the LoRAs it leaves out.
        ``ValueError`` for a source that is not one of these LoRAs'."""
        loaded = self.load()
        if choice is None:
            return {lora.name: lora.spec.weight for lora in loaded}
        by_source = {lora.spec.source: lora for lora in loaded}
        for i, spec in enumerate(choice):
            if spec.source not in by_source:
                known = ", ".join(repr(source) for source in by_source) or "none"
                raise ValueError(f"loras[{i}].source {spec.source!r} is not one of the Engine's LoRAs ({known})")
        chosen = {by_source[spec.source].name: spec.weight for spec in choice}
        return {lora.name: chosen.get(lora.name, 0.0) for lora in loaded}

    def applied(self, weights: Mapping[str, float]) -> list[dict[str, Any]]:
        """What a recipe records of the LoRAs at ``weights`` (:meth:`weights`): those of weight other than 0."""
        return [{**lora.record(), "weight": weights[lora.name]} for lora in self.load() if weights[lora.name] != 0]

    def select(self, pipe: Any, weights: Mapping[str, float]) -> None:
        """Re-merge ``pipe``'s UNet or prior to ``weights`` (:meth:`weights`) where it holds others: the model-level
        ``set_adapters``, over the adapters it has (a LoRA without a part for it has none there)."""
        if not self.specs:
            return
        from kandinsky22 import lora

        for model in pipe.components.values():
            if not isinstance(model, lora.LoraModelMixin):
                continue
            state = lora.state_of(model)
            wanted = {name: weight for name, weight in weights.items() if name in state.adapters}
            if wanted and state.active != wanted:
                model.set_adapters(list(wanted), list(wanted.values()))

    def adapt(self, pipe: Any) -> None:
        """Merge each LoRA's part for ``pipe``'s UNet or prior (whichever it holds) into it; :class:`LoraError` for a
        LoRA whose modules are not in the model or do not fit it (the model is left part-adapted: drop it)."""
        if not self.specs:
            return
        from kandinsky22 import lora

        for model in pipe.components.values():
            if not isinstance(model, lora.LoraModelMixin):
                continue
            for loaded in self.load():
                if model._lora_target not in loaded.lora.parts:
                    continue
                try:
                    loaded.lora.load_into(model, loaded.name, loaded.spec.weight)
                except ValueError as err:
                    raise LoraError(loaded.spec.source, _reason(err, loaded.lora.source)) from None


def _reason(err: Exception, shown: str) -> str:
    """``kandinsky22.lora``'s message without its ``LoRA <file>: `` (or ``LoRA <file> ``) start: the error names the
    source already."""
    text = str(err)
    for start in (f"LoRA {shown}: ", f"LoRA {shown} "):
        if text.startswith(start):
            return text[len(start) :]
    return text
