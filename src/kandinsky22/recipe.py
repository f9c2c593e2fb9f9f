"""Recipes: the full job behind an image, stored in the image file and readable back into a :class:`Job`.

A recipe is JSON holding every :class:`Job` field of the single image (its own seed, ``num_images`` 1), plus the tool
name and version, the device and dtype it ran on (fp16 and fp32 give slightly different pixels), and the SHA-256 of
every input file, so that a re-run can warn when an input changed since; and the LoRAs it was made with, if any
(``loras``: source, weight and the SHA-256 of the file read; see :mod:`kandinsky22.lora_specs`). Where it is stored
depends on the format:

* PNG: an iTXt chunk with the keyword ``kandinsky22`` (UTF-8, so any prompt survives).
* JPEG and WebP: the Exif UserComment tag (0x9286, in the Exif IFD), as other generators (AUTOMATIC1111's web UI)
  store their parameters: the character code ``UNICODE\0`` and the text in UTF-16. We write big-endian Exif and
  big-endian UTF-16, so readers that follow the Exif byte order (exiftool) and readers that assume big-endian (piexif)
  agree; :func:`read_recipe` reads either byte order.

The recipe holds nothing about the file format: a JPEG's recipe re-makes the same job as the PNG's would.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kandinsky22 import __version__
from kandinsky22.jobs import Job, mix_item_kind

if TYPE_CHECKING:
    import PIL.Image

RECIPE_KEY = "kandinsky22"
TOOL = "kandinsky22"
_EXTRA_KEYS = ("tool", "version", "device", "dtype", "inputs_sha256", "loras")

FORMATS = ("png", "jpeg", "webp")
# The file name suffix each format is written with, and the suffixes read as each format (any case).
EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
SUFFIX_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
FORMAT_NAMES = {"png": "PNG", "jpeg": "JPEG", "webp": "WebP"}
# JPEG and WebP quality when none is given: visually close to lossless at a fraction of the PNG's size (Pillow's own
# defaults, 75 for JPEG and 80 for WebP, show artefacts on smooth gradients).
DEFAULT_QUALITY = 90

EXIF_IFD = 0x8769
USER_COMMENT = 0x9286
_UNICODE = b"UNICODE\0"
# A JPEG's Exif block is one APP1 segment: its 16-bit length field counts itself, so 65533 bytes of payload at most.
_MAX_JPEG_EXIF = 65533
# Where each format keeps the recipe, for the error about a text that is someone else's.
_PLACE = {"PNG": f"{RECIPE_KEY} chunk", "JPEG": "Exif UserComment", "WebP": "Exif UserComment"}


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


def make_recipe(job: Job, device: str, dtype: str, loras: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The recipe of one image: every job field, tool and version, device and dtype, input file hashes, and the LoRAs
    it was made with (``{source, weight, sha256}`` each, and ``config_sha256`` for a peft folder's config,
    :meth:`kandinsky22.lora_specs.LoadedLora.record`; the key only where there are some)."""
    recipe = {
        "tool": TOOL,
        "version": __version__,
        **job.to_dict(),
        "device": device,
        "dtype": dtype,
        "inputs_sha256": input_hashes(job),
    }
    if loras:
        recipe["loras"] = [dict(lora) for lora in loras]
    return recipe


def check_quality(output_format: str, quality: int | None) -> int | None:
    """The quality to encode with: ``None`` for PNG (lossless: a quality is refused), else 1..100 (default 90).

    Raises ``ValueError`` naming ``quality`` for an unknown format, a quality out of range or one given for PNG.
    """
    if output_format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {output_format!r}")
    if output_format == "png":
        if quality is not None:
            raise ValueError(f"quality applies to jpeg and webp only (PNG is lossless), got quality {quality}")
        return None
    if quality is None:
        return DEFAULT_QUALITY
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"quality must be an integer from 1 to 100, got {quality!r}")
    return quality


def format_of(path: str | os.PathLike) -> str | None:
    """The format a file name's suffix stands for (``.png``, ``.jpg``/``.jpeg``, ``.webp``, any case), else ``None``."""
    return SUFFIX_FORMATS.get(os.path.splitext(os.fspath(path))[1].lower())


def encode_image(
    image: PIL.Image.Image, recipe: dict[str, Any], output_format: str = "png", quality: int | None = None
) -> bytes:
    """The file of ``image`` in ``output_format`` (png, jpeg or webp) with ``recipe`` inside; see the module docstring.

    ``quality``: JPEG and WebP, 1..100 (default 90); ``None`` for PNG. Raises ``ValueError`` for a bad format or
    quality, and for a recipe too long for a JPEG's Exif segment (64 KiB; WebP and PNG have no such limit).
    """
    quality = check_quality(output_format, quality)
    text = json.dumps(recipe, ensure_ascii=False, sort_keys=True)
    buffer = io.BytesIO()
    if output_format == "png":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_itxt(RECIPE_KEY, text)
        image.save(buffer, format="PNG", pnginfo=info)
        return buffer.getvalue()
    exif = _exif_with_comment(text)
    if output_format == "jpeg":
        _check_jpeg_exif(len(exif))
    image.save(buffer, format=output_format.upper(), quality=quality, exif=exif)
    return buffer.getvalue()


def check_job_fits(job: Job, output_format: str, loras: Sequence[dict[str, Any]] | None = None) -> None:
    """Raise ``ValueError`` when the recipe of ``job``'s images is too long for ``output_format`` (a JPEG's Exif
    segment holds 64 KiB, a prompt of tens of thousands of characters does not; WebP and PNG have no such limit): to
    refuse a job before it runs rather than when its image is written. The device and dtype are recorded only then:
    the longest names stand in for them, as a SHA-256 for each of ``loras``' files."""
    if output_format == "jpeg":
        loras = [{**lora, "sha256": "0" * 64} for lora in loras or ()]
        recipe = make_recipe(job, device="cuda:99", dtype="bf16", loras=loras)
        _check_jpeg_exif(len(_exif_with_comment(json.dumps(recipe, ensure_ascii=False, sort_keys=True))))


def _check_jpeg_exif(size: int) -> None:
    if size > _MAX_JPEG_EXIF:
        raise ValueError(
            f"the recipe takes {size} bytes of Exif, more than a JPEG holds ({_MAX_JPEG_EXIF}); write a PNG or WebP "
            "file instead"
        )


def _exif_with_comment(text: str) -> bytes:
    """An Exif block holding only the Exif IFD's UserComment, ``UNICODE\\0`` and ``text`` in UTF-16 big-endian.

    Written by hand: Pillow's :class:`PIL.Image.Exif` stores a bytes value with type BYTE (1), where the Exif standard
    (and piexif, which AUTOMATIC1111's web UI reads with) has UserComment as UNDEFINED (7).
    """
    comment = _UNICODE + text.encode("utf-16-be")
    # TIFF header ("MM": big-endian; IFD0 at offset 8). IFD0 (8..26): one entry, the Exif IFD's offset (LONG), and
    # no next IFD. The Exif IFD (26..44): one entry, UserComment (UNDEFINED, its bytes at 44), no next IFD.
    header = b"MM\x00\x2a" + struct.pack(">I", 8)
    ifd0 = struct.pack(">HHHII I", 1, EXIF_IFD, 4, 1, 26, 0)
    exif_ifd = struct.pack(">HHHII I", 1, USER_COMMENT, 7, len(comment), 44, 0)
    return b"Exif\x00\x00" + header + ifd0 + exif_ifd + comment


def save_image(
    image: PIL.Image.Image,
    path: str | os.PathLike,
    recipe: dict[str, Any],
    output_format: str | None = None,
    quality: int | None = None,
) -> Path:
    """Write ``image`` with ``recipe`` to ``path``, in ``output_format`` or the one its suffix names.

    Raises ``ValueError`` when neither gives a format (see :func:`encode_image` for the others).
    """
    path = Path(path)
    output_format = output_format or format_of(path)
    if output_format is None:
        raise ValueError(f"'{path}' has no .png, .jpg, .jpeg or .webp suffix; give the format")
    path.write_bytes(encode_image(image, recipe, output_format, quality))
    return path


def transcode(png: bytes, output_format: str, quality: int | None = None) -> bytes:
    """A PNG written by :func:`encode_image` re-encoded in ``output_format``, recipe included; PNG comes back as is.

    The PNG is lossless, so this gives the bytes :func:`encode_image` gives for the image the PNG was made from.
    """
    import PIL.Image

    if output_format == "png":
        check_quality(output_format, quality)
        return png
    recipe = read_recipe(png)
    with PIL.Image.open(io.BytesIO(png)) as image:
        image.load()
        return encode_image(image, recipe, output_format, quality)


def read_recipe(source: str | os.PathLike | bytes) -> dict[str, Any]:
    """The recipe stored in a PNG, JPEG or WebP file made by this tool: a path, or the file's bytes.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a file that is not such an image.
    """
    import PIL.Image

    if isinstance(source, bytes):
        where, file = "the image", io.BytesIO(source)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no such file: '{path}'")
        where, file = f"'{path}'", path
    kind = "image"
    try:
        with PIL.Image.open(file) as image:
            kind = {"WEBP": "WebP"}.get(image.format, image.format or "image")
            text = _recipe_text(image)
    except PIL.UnidentifiedImageError as err:
        raise ValueError(f"{where} is not an image file") from err
    except (OSError, SyntaxError) as err:  # a damaged file (cut short, bad chunk)
        raise ValueError(f"{where} is not a readable {kind} file ({err})") from err
    if text is None:
        raise ValueError(
            f"{where} holds no {RECIPE_KEY} recipe (only PNG, JPEG and WebP files written by this tool do)"
        )
    try:
        recipe = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"the recipe in {where} is not valid JSON ({err})") from err
    if not isinstance(recipe, dict) or recipe.get("tool") != TOOL:
        raise ValueError(f"the {_PLACE.get(kind, 'recipe')} of {where} is not a recipe of this tool")
    return recipe


def _recipe_text(image: PIL.Image.Image) -> str | None:
    """The recipe's text: a PNG's ``kandinsky22`` chunk, or an Exif UserComment holding a JSON object."""
    if image.format == "PNG":
        return getattr(image, "text", {}).get(RECIPE_KEY)
    exif = image.getexif()
    comment = exif.get_ifd(EXIF_IFD).get(USER_COMMENT)
    if not isinstance(comment, bytes) or not comment.startswith(_UNICODE):
        return None
    body = comment[len(_UNICODE) :]
    # The Exif standard leaves the UTF-16 byte order open. A BOM decides; else a recipe starts with "{", whose zero
    # byte comes first in big-endian; else (another writer's comment) the Exif block's own byte order.
    if body[:2] in (b"\xfe\xff", b"\xff\xfe"):
        codec = "utf-16"
    elif body[:1] == b"\x00" and body[1:2] != b"\x00":
        codec = "utf-16-be"
    elif body[1:2] == b"\x00" and body[:1] != b"\x00":
        codec = "utf-16-le"
    else:
        codec = "utf-16-le" if exif.endian == "<" else "utf-16-be"
    try:
        text = body.decode(codec).rstrip("\x00")
    except UnicodeDecodeError:
        return None
    # A comment that is not a JSON object is another program's (a camera's, another generator's parameters).
    return text if text.lstrip().startswith("{") else None


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
