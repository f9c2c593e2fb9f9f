"""Recipes: the full job behind an image, stored as JSON in a PNG text chunk and readable back into a :class:`Job`.

The chunk (keyword ``kandinsky22``, an iTXt chunk so any prompt survives as UTF-8) holds every :class:`Job` field of
the single image (its own seed, ``num_images`` 1), plus the tool name and version, the device and dtype it ran on
(fp16 and fp32 give slightly different pixels), and the SHA-256 of every input file, so that a re-run can warn when an
input changed since.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kandinsky22 import __version__
from kandinsky22.jobs import Job, mix_item_kind

if TYPE_CHECKING:
    import PIL.Image

RECIPE_KEY = "kandinsky22"
TOOL = "kandinsky22"
_EXTRA_KEYS = ("tool", "version", "device", "dtype", "inputs_sha256")


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def input_hashes(job: Job) -> dict[str, Any]:
    """SHA-256 of each input given as a file: ``image``, ``mask``, ``hint`` and ``items`` (``None`` for texts)."""
    hashes: dict[str, Any] = {}
    for name in ("image", "mask", "hint"):
        source = getattr(job, name)
        if isinstance(source, (str, os.PathLike)) and Path(source).is_file():
            hashes[name] = file_sha256(source)
    if job.items:
        hashes["items"] = [
            file_sha256(item)
            if mix_item_kind(item) == "image" and isinstance(item, (str, os.PathLike)) and Path(item).is_file()
            else None
            for item in job.items
        ]
    return hashes


def make_recipe(job: Job, device: str, dtype: str) -> dict[str, Any]:
    """The recipe of one image: every job field, tool and version, device and dtype, input file hashes."""
    return {
        "tool": TOOL,
        "version": __version__,
        **job.to_dict(),
        "device": device,
        "dtype": dtype,
        "inputs_sha256": input_hashes(job),
    }


def save_png(image: PIL.Image.Image, path: str | os.PathLike, recipe: dict[str, Any]) -> Path:
    """Write ``image`` as PNG with ``recipe`` in its ``kandinsky22`` text chunk."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt(RECIPE_KEY, json.dumps(recipe, ensure_ascii=False, sort_keys=True))
    path = Path(path)
    image.save(path, format="PNG", pnginfo=info)
    return path


def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """The recipe stored in a PNG made by this tool.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a file that is not such a PNG.
    """
    import PIL.Image

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no such file: '{path}'")
    try:
        with PIL.Image.open(path) as image:
            text = getattr(image, "text", {}).get(RECIPE_KEY)
    except PIL.UnidentifiedImageError as err:
        raise ValueError(f"'{path}' is not an image file") from err
    except (OSError, SyntaxError) as err:  # a damaged PNG (cut short, bad chunk)
        raise ValueError(f"'{path}' is not a readable PNG file ({err})") from err
    if text is None:
        raise ValueError(f"'{path}' holds no {RECIPE_KEY} recipe (only PNGs written by this tool do)")
    try:
        recipe = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"the recipe in '{path}' is not valid JSON ({err})") from err
    if not isinstance(recipe, dict) or recipe.get("tool") != TOOL:
        raise ValueError(f"the {RECIPE_KEY} chunk of '{path}' is not a recipe of this tool")
    return recipe


def job_from_recipe(recipe: dict[str, Any]) -> Job:
    """The :class:`Job` a recipe describes (validated); inputs that were in memory come back as ``None``."""
    return Job.from_dict({k: v for k, v in recipe.items() if k not in _EXTRA_KEYS}).validate()


def changed_inputs(recipe: dict[str, Any], job: Job) -> list[str]:
    """Names of the inputs whose files differ from those the recipe was made with (``items[i]`` for mix items)."""
    recorded = recipe.get("inputs_sha256") or {}
    current = input_hashes(job)
    changed = [name for name in ("image", "mask", "hint") if name in recorded and recorded[name] != current.get(name)]
    for i, (old, new) in enumerate(zip(recorded.get("items") or [], current.get("items") or [])):
        if old is not None and old != new:
            changed.append(f"items[{i}]")
    return changed
