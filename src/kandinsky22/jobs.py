"""Jobs: one generation request, validated, and the :class:`Engine` that loads pipelines and runs jobs.

This layer is shared by the command line tool, the HTTP server and bulk generation. A :class:`Job` is plain data
(JSON-friendly, no torch), so validating one is cheap and a bad argument is reported before any model loads.

Reproducibility: every image has its own seed and its own CPU ``torch.Generator``, so an image depends only on its
job and seed, never on what it was batched with nor on the device's RNG. A job asking for ``num_images`` images with
seed ``s`` makes the images of seeds ``s, s + 1, …``; each image's recipe records its own seed and ``num_images=1``.

Exact sizes: the decoder works on a grid (64 px for the official MoVQ). Any ``width``/``height`` of at least 64 is
honoured exactly: the job is generated at the next multiple of the grid and centre-cropped, and input images (img2img
source, inpaint mask, depth hint) are resized to the requested size and edge-padded to the grid, so that the crop
returns exactly their area. The reference instead rounds the size up and returns the larger image.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    import PIL.Image
    import torch

    from kandinsky22.lora_specs import LoraSpec

TASKS = ("text2img", "img2img", "inpaint", "mix", "depth")
SCHEDULERS = (
    "ddpm",
    "ddim",
    "dpm++",
    "dpm++-karras",
    "euler",
    "euler-a",
    "unipc",
    "lms",
    "dpm++-single",
    "deis",
    "heun",
    "kdpm2",
    "kdpm2-a",
    "dpm++-sde",
    "pndm",
)
# Noise-level spacings a sampler's schedule can take instead of its own (Job.sigmas: kandinsky22.schedulers.tables
# .SIGMA_SPACINGS, here without importing torch), and the samplers that take them: all whose classes have the
# switches, but dpm++-karras (dpm++ with one of them already on)
SIGMA_SPACINGS = ("karras", "exponential", "beta")
SPACED_SAMPLERS = tuple(name for name in SCHEDULERS if name not in ("ddpm", "ddim", "dpm++-karras", "euler-a", "pndm"))
# kandinsky22.fast.COMPILE_SCOPES, here without importing torch (the CLI's and the server's choices)
COMPILE_SCOPES = ("auto", "blocks", "model", "none")

PRIOR_REPO = "kandinsky-community/kandinsky-2-2-prior"
DECODER_REPO = "kandinsky-community/kandinsky-2-2-decoder"
INPAINT_REPO = "kandinsky-community/kandinsky-2-2-decoder-inpaint"
CONTROLNET_REPO = "kandinsky-community/kandinsky-2-2-controlnet-depth"
# A hub repository id (``owner/name``), the rule of ``loading.is_hub_id`` (which imports torch) for what is not a folder
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
DEFAULT_DECODERS = {
    "text2img": DECODER_REPO,
    "img2img": DECODER_REPO,
    "mix": DECODER_REPO,
    "inpaint": INPAINT_REPO,
    "depth": CONTROLNET_REPO,
}

# Strength defaults: the reference img2img pipeline's 0.3; 0.5 for depth + image, as in the authors' notebook.
DEFAULT_STRENGTH = {"img2img": 0.3, "depth": 0.5}
DEFAULT_SIZE = 512
# When the size is not given for a task with an input image, the output takes the input's size, scaled down to fit
# this box (a 12-megapixel photo would otherwise ask for a 4000 px generation).
DEFAULT_MAX_SIDE = 1024
MIN_SIDE, MAX_SIDE = 64, 2048
MAX_STEPS = 1000
# The prior's UnCLIP scheduler spans T-1 down to 0, so it needs at least 2 steps (the reference divides by zero at 1).
MIN_PRIOR_STEPS = 2
MAX_IMAGES = 16
MAX_SEED = 2**63 - 1
MAX_GUIDANCE = 100.0
# A job's LoRA weights (Job.loras) are at most this in size: past it a LoRA swamps the model it adapts.
MAX_LORA_WEIGHT = 8.0
MAX_MASK_BLUR = 64.0  # pixels (standard deviation)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")

# A file path, or an image already in memory (the server's uploads).
ImageSource = Union[str, os.PathLike, "PIL.Image.Image"]
# progress(stage, step, total): stage is "prior", "decoder" or "decode"; step counts from 1.
ProgressFn = Callable[[str, int, int], None]


class Cancelled(Exception):
    """Raised out of :meth:`Engine.run` when the cancellation hook returned true between two steps."""


class IncompatibleJob(ValueError):
    """A job its decoder cannot run: a decoder of another kind than the task needs, or a step count its sampler cannot
    take. Found from the decoder's config files, before it loads where they can be read (:func:`check_decoder`), else
    once it has loaded (:meth:`Engine.run`); a bad argument either way, which the CLI reports as one (exit 2)."""


@dataclass
class Job:
    """One generation request. Defaults follow the authors' usage (prior 25 steps, decoder 50 steps, CFG 4).

    ``sigmas`` respaces the decoder sampler's noise levels ("karras", "exponential" or "beta"; ``None``: the
    sampler's own spacing), for the samplers of :data:`SPACED_SAMPLERS`. ``keep_unmasked`` (inpaint): the result is
    the input image itself where the mask is black (instead of its MoVQ round trip). ``mask_blur`` (inpaint): the
    standard deviation in pixels of a Gaussian blur of the mask at the output size, 0 to :data:`MAX_MASK_BLUR` (a soft
    edge: with ``keep_unmasked``, the new content fades into the kept image). These three are written into recipes
    only when set.

    ``negative`` is the decoder's negative prompt: its prior embedding is the unconditional of the decoder's guidance
    (empty: the CLIP embedding of an empty image, as the reference). ``negative_prior`` is the prior's own negative
    prompt (its guidance unconditional; empty: the empty text). ``None`` for ``width``, ``height``, ``strength``,
    ``prior`` and ``decoder`` means "the task's default" (see :meth:`resolved`).

    ``loras`` chooses among the LoRAs the :class:`Engine` was given (``--lora``), by their source: exactly these, at
    these weights, the Engine's others off (``[]``: all off); ``None``: each at the Engine's own weight. A job cannot
    name a LoRA of its own. It is not one of the JSON fields (:meth:`to_dict`, :meth:`from_dict`): a recipe records
    the LoRAs applied instead, under its own ``loras`` key (:mod:`kandinsky22.recipe`).
    """

    task: str = "text2img"
    prompt: str = ""
    negative: str = ""
    negative_prior: str = ""
    seed: int | None = None
    steps: int = 50
    prior_steps: int = 25
    guidance: float = 4.0
    prior_guidance: float = 4.0
    scheduler: str = "ddpm"
    sigmas: str | None = None
    keep_unmasked: bool = False
    mask_blur: float = 0.0
    width: int | None = None
    height: int | None = None
    num_images: int = 1
    strength: float | None = None
    image: ImageSource | None = None
    mask: ImageSource | None = None
    hint: ImageSource | None = None
    items: list[ImageSource] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    prior: str | None = None
    decoder: str | None = None
    loras: list[LoraSpec] | None = None

    # -- validation --------------------------------------------------------------------------------------------------

    def validate(self) -> Job:
        """Check types, ranges and which inputs the task needs; raise ``ValueError`` naming the field and value."""
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}; got {self.task!r}")
        for name in ("prompt", "negative", "negative_prior"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {type(getattr(self, name)).__name__}")
        for name in ("items", "weights"):
            if not isinstance(getattr(self, name), list):  # a string would be taken as a list of its characters
                raise ValueError(f"{name} must be a list, got {getattr(self, name)!r}")
        if self.task == "mix":
            if self.prompt:
                raise ValueError("prompt is not used by mix; give the texts and images to mix as items")
            self._validate_mix()
        elif not self.prompt.strip():
            raise ValueError(f"prompt must be a non-empty text for {self.task}, got {self.prompt!r}")
        elif self.items or self.weights:
            raise ValueError(f"items and weights are only used by mix, not by {self.task}")
        if self.seed is not None:
            _check_int("seed", self.seed, 0, MAX_SEED)
        _check_int("steps", self.steps, 1, MAX_STEPS)
        _check_int("prior_steps", self.prior_steps, MIN_PRIOR_STEPS, MAX_STEPS)
        _check_float("guidance", self.guidance, 1.0, MAX_GUIDANCE)
        _check_float("prior_guidance", self.prior_guidance, 1.0, MAX_GUIDANCE)
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}; got {self.scheduler!r}")
        if self.sigmas is not None:
            if self.sigmas not in SIGMA_SPACINGS:
                raise ValueError(f"sigmas must be one of {', '.join(SIGMA_SPACINGS)}; got {self.sigmas!r}")
            if self.scheduler not in SPACED_SAMPLERS:
                raise ValueError(
                    f"sigmas {self.sigmas!r} does not apply to the {self.scheduler} sampler; the samplers that take "
                    f"it: {', '.join(SPACED_SAMPLERS)}"
                )
        if not isinstance(self.keep_unmasked, bool):
            raise ValueError(f"keep_unmasked must be true or false, got {self.keep_unmasked!r}")
        if self.keep_unmasked and self.task != "inpaint":
            raise ValueError(f"keep_unmasked is only used by inpaint, not by {self.task}")
        _check_float("mask_blur", self.mask_blur, 0.0, MAX_MASK_BLUR)
        if self.mask_blur and self.task != "inpaint":
            raise ValueError(f"mask_blur is only used by inpaint, not by {self.task}")
        for name in ("width", "height"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), MIN_SIDE, MAX_SIDE)
        _check_int("num_images", self.num_images, 1, MAX_IMAGES)
        if self.seed is not None and self.seed + self.num_images - 1 > MAX_SEED:
            raise ValueError(f"seed {self.seed} + num_images {self.num_images} runs past the largest seed {MAX_SEED}")
        self._validate_inputs()
        for name in ("prior", "decoder"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a hub id or a folder path, got {value!r}")
        check_lora_choice(self.loras)
        return self

    def _validate_mix(self) -> None:
        if not self.items:
            raise ValueError("mix needs at least one item (a text or an image)")
        if len(self.weights) != len(self.items):
            raise ValueError(
                f"mix needs one weight per item: got {len(self.items)} items and {len(self.weights)} weights"
            )
        for i, weight in enumerate(self.weights):
            _check_float(f"weights[{i}]", weight, -MAX_GUIDANCE, MAX_GUIDANCE)
        if not any(self.weights):
            raise ValueError(f"at least one mix weight must be non-zero, got {self.weights}")
        import PIL.Image

        for i, item in enumerate(self.items):
            if not isinstance(item, (str, os.PathLike, PIL.Image.Image)):
                raise ValueError(f"items[{i}] must be a text, an image file or an image, got {item!r}")
            if isinstance(item, str) and not item.strip():
                raise ValueError(f"items[{i}] is empty; give a text or an image file")

    def _validate_inputs(self) -> None:
        needed = {"img2img": ("image",), "inpaint": ("image", "mask"), "depth": ("hint",)}.get(self.task, ())
        allowed = needed + (("image",) if self.task == "depth" else ())
        import PIL.Image

        for name in ("image", "mask", "hint"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike, PIL.Image.Image)):
                raise ValueError(f"{name} must be an image file path or an image, got {value!r}")
            given = value is not None
            if name in needed and not given:
                raise ValueError(f"{self.task} needs {name} (an image file)")
            if given and name not in allowed:
                users = {"image": "img2img, inpaint and depth", "mask": "inpaint", "hint": "depth"}[name]
                raise ValueError(f"{name} is only used by {users}, not by {self.task}")
        uses_strength = self.task == "img2img" or (self.task == "depth" and self.image is not None)
        if self.strength is not None:
            if not uses_strength:
                raise ValueError(f"strength is only used by img2img and by depth with an image, not by {self.task}")
            _check_float("strength", self.strength, 0.0, 1.0)
            if self.strength == 0:
                raise ValueError("strength must be above 0 (0 would return the input unchanged)")
        if uses_strength:
            strength = self.strength if self.strength is not None else DEFAULT_STRENGTH[self.task]
            if int(self.steps * strength) < 1:
                raise ValueError(
                    f"strength {strength} with steps {self.steps} leaves no denoising step "
                    f"(int(steps * strength) = 0); raise steps or strength"
                )

    # -- defaults and derived jobs -----------------------------------------------------------------------------------

    def resolved(self, max_side: int = DEFAULT_MAX_SIDE) -> Job:
        """A validated copy with the task defaults filled in (size, strength, model ids); reads input image sizes.

        A size not given is at most ``max_side`` a side (a server's limit): the default square, or the input image's
        size and aspect scaled down to it.
        """
        self.validate()
        width, height = self.width, self.height
        if width is None or height is None:
            source = {"img2img": self.image, "inpaint": self.image, "depth": self.hint}.get(self.task)
            if source is None:
                default = min(DEFAULT_SIZE, max_side)
                width, height = width or default, height or default
            else:
                width, height = _default_size(image_size(source), width, height, max_side)
        strength = self.strength
        if strength is None and (self.task == "img2img" or (self.task == "depth" and self.image is not None)):
            strength = DEFAULT_STRENGTH[self.task]
        return dataclasses.replace(
            self,
            width=width,
            height=height,
            strength=strength,
            prior=self.prior or PRIOR_REPO,
            decoder=self.decoder or DEFAULT_DECODERS[self.task],
        )

    def with_seed(self) -> Job:
        """This job with a seed: its own, or a fresh random one."""
        return self if self.seed is not None else dataclasses.replace(self, seed=secrets.randbelow(2**32))

    def expand(self) -> list[Job]:
        """One single-image job per image, with seeds ``seed, seed + 1, …`` (draws a random seed if none is set)."""
        job = self.with_seed()
        return [dataclasses.replace(job, seed=job.seed + i, num_images=1) for i in range(job.num_images)]

    def batch_key(self) -> tuple:
        """Jobs with equal keys can run in one pipeline call: they differ only in prompt and seed.

        Only text2img jobs batch across prompts; other tasks batch the images of one job.
        """
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields.pop("seed")
        fields.pop("num_images")
        if self.task == "text2img":
            fields.pop("prompt")
        # The same choice however it is listed: by source, without the LoRAs it turns off (off either way).
        loras = fields.pop("loras")
        fields["loras"] = None if loras is None else tuple(sorted((s.source, s.weight) for s in loras if s.weight))
        return tuple(_hashable(v) for v in fields.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly fields; in-memory images become ``None`` (a file path is kept as a string). Without
        ``loras``: a recipe records the LoRAs applied instead."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _NOT_JSON}
        # Fields added later: absent at their default, so earlier recipes and batch fingerprints stay as they were
        for name in _ONLY_WHEN_SET:
            if data[name] == _DEFAULTS[name]:
                del data[name]
        data["weights"] = list(self.weights)
        for name in ("image", "mask", "hint"):
            data[name] = _source_text(getattr(self, name))
        data["items"] = [_source_text(item) if not _is_text_item(item) else item for item in self.items]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        """Build a job from JSON fields; unknown keys raise ``ValueError`` listing the allowed ones."""
        names = [f.name for f in dataclasses.fields(cls) if f.name not in _NOT_JSON]
        unknown = sorted(k for k in data if k not in names)
        if unknown:
            raise ValueError(f"unknown job field(s) {', '.join(unknown)}; allowed: {', '.join(names)}")
        return cls(**data)


# Job fields that are not among its JSON fields, and JSON fields written only when they differ from their default
_NOT_JSON = ("loras",)
_ONLY_WHEN_SET = ("sigmas", "keep_unmasked", "mask_blur")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Job)}


def check_lora_choice(loras: Any) -> None:
    """A job's LoRA choice (:attr:`Job.loras`): ``None``, or a list of :class:`~kandinsky22.lora_specs.LoraSpec` of
    distinct sources with finite weights from -MAX_LORA_WEIGHT to MAX_LORA_WEIGHT; else ``ValueError`` naming the
    entry and its value. (Whether the sources are the Engine's is for the Engine, or the server, to say.)"""
    if loras is None:
        return
    from kandinsky22.lora_specs import LoraSpec

    if not isinstance(loras, (list, tuple)):
        raise ValueError(f"loras must be a list of LoRAs (source and weight), got {loras!r}")
    first_of: dict[str, int] = {}
    for i, spec in enumerate(loras):
        if not isinstance(spec, LoraSpec) or not isinstance(spec.source, str) or not spec.source:
            raise ValueError(f"loras[{i}] must be a LoRA (a source and a weight), got {spec!r}")
        _check_float(f"loras[{i}].weight", spec.weight, -MAX_LORA_WEIGHT, MAX_LORA_WEIGHT)
        if spec.source in first_of:
            raise ValueError(
                f"loras[{i}].source {spec.source!r} is listed twice (also as loras[{first_of[spec.source]}])"
            )
        first_of[spec.source] = i


class MixText(str):
    """A mix item that is a text whatever it reads as: the server's clients' texts are never looked up as files."""

    __slots__ = ()


def mix_item_kind(item: ImageSource) -> str:
    """``"image"`` for an in-memory image, an existing file or a name with an image suffix; else ``"text"``."""
    return "text" if _is_text_item(item) else "image"


def _is_text_item(item: ImageSource) -> bool:
    if isinstance(item, MixText):
        return True
    if not isinstance(item, (str, os.PathLike)):
        return False
    text = os.fspath(item)
    # A name with an image suffix counts as an image even if it is missing, so that a typo reports a missing file
    # instead of silently mixing in the file name as text.
    return not (text.lower().endswith(IMAGE_SUFFIXES) or Path(text).expanduser().is_file())


def _source_text(source: ImageSource | None) -> str | None:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else None


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    return value if isinstance(value, (str, int, float, type(None), os.PathLike)) else id(value)


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer from {low} to {high}, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be from {low} to {high}, got {value}")


def _check_float(name: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number from {low:g} to {high:g}, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be from {low:g} to {high:g}, got {value:g}")


def _default_size(
    source_size: tuple[int, int], width: int | None, height: int | None, max_side: int = DEFAULT_MAX_SIDE
) -> tuple[int, int]:
    """The output size when one or both sides are missing: the source's aspect. With neither given, the source's size
    scaled down to at most ``max_side`` a side, or up to at least MIN_SIDE (a side is clamped only where the aspect
    cannot fit both)."""
    src_w, src_h = source_size
    if width is not None:
        return width, min(MAX_SIDE, max(MIN_SIDE, round(width * src_h / src_w)))
    if height is not None:
        return min(MAX_SIDE, max(MIN_SIDE, round(height * src_w / src_h))), height
    scale = max(min(1.0, max_side / max(src_w, src_h)), MIN_SIDE / min(src_w, src_h))
    return tuple(min(max_side, max(MIN_SIDE, round(side * scale))) for side in (src_w, src_h))


# ----------------------------------------------------------------------------------------------------------------------
# Input images: loading, exact-size preparation, cropping
# ----------------------------------------------------------------------------------------------------------------------


def load_image(source: ImageSource, what: str = "image") -> PIL.Image.Image:
    """Open a file (or take an in-memory image); a missing file raises ``FileNotFoundError`` naming ``what``."""
    import PIL.Image

    if isinstance(source, PIL.Image.Image):
        return eight_bit(source)
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no such file for {what}: '{path}'")
    try:
        with PIL.Image.open(path) as image:
            image.load()
            return eight_bit(upright(image))
    except PIL.UnidentifiedImageError as err:
        raise ValueError(f"{what} '{path}' is not an image file PIL can read") from err


def upright(image: PIL.Image.Image) -> PIL.Image.Image:
    """A file's image as it is shown: rotated or flipped by its EXIF orientation (phone photos are stored sideways with
    a tag saying so), as the reference's ``diffusers.utils.load_image`` does."""
    import PIL.ImageOps

    return PIL.ImageOps.exif_transpose(image) if image.getexif().get(_EXIF_ORIENTATION, 1) != 1 else image


# EXIF orientation tag, and its values that turn the image a quarter (its width and height swap)
_EXIF_ORIENTATION = 0x0112
_QUARTER_TURNS = (5, 6, 7, 8)


def eight_bit(image: PIL.Image.Image) -> PIL.Image.Image:
    """A 16-bit greyscale image (PIL's ``I;16*`` and ``I`` modes: a 16-bit PNG, e.g. a depth map) scaled to 8-bit
    ``L``; PIL's own conversion to ``L``/``RGB`` clips at 255, which turns such an image nearly white."""
    if not (image.mode.startswith("I;16") or image.mode == "I"):
        return image
    import numpy as np
    import PIL.Image

    values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
    return PIL.Image.fromarray(((values + 128) // 257).astype(np.uint8), mode="L")


def image_size(source: ImageSource) -> tuple[int, int]:
    """(width, height) of an image source, reading only the file header."""
    import PIL.Image

    if isinstance(source, PIL.Image.Image):
        return source.size
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no such file: '{path}'")
    with PIL.Image.open(path) as image:
        width, height = image.size
        return (height, width) if image.getexif().get(_EXIF_ORIENTATION) in _QUARTER_TURNS else (width, height)


def grid_size(width: int, height: int, multiple: int) -> tuple[int, int]:
    """The generation size: each side rounded up to ``multiple``."""
    return math.ceil(width / multiple) * multiple, math.ceil(height / multiple) * multiple


def fit_to_grid(
    image: PIL.Image.Image, size: tuple[int, int], grid: tuple[int, int], mode: str, fill: int | None = None
) -> PIL.Image.Image:
    """Resize ``image`` (converted to ``mode``) to ``size`` and pad it, centred, to ``grid``.

    The padding replicates the border pixels (``fill=None``) so the decoder sees no artificial edge, or is the
    constant ``fill`` (inpaint masks are padded with "keep"). :func:`crop_to_size` undoes the padding.
    """
    import numpy as np
    import PIL.Image

    resample = PIL.Image.LANCZOS if mode == "L" else PIL.Image.BICUBIC
    image = image.convert(mode)
    if image.size != size:
        image = image.resize(size, resample=resample)
    if grid == size:
        return image
    left, top = (grid[0] - size[0]) // 2, (grid[1] - size[1]) // 2
    pad = ((top, grid[1] - size[1] - top), (left, grid[0] - size[0] - left))
    array = np.asarray(image)
    if array.ndim == 3:
        pad = pad + ((0, 0),)
    padded = np.pad(array, pad, mode="edge") if fill is None else np.pad(array, pad, constant_values=fill)
    return PIL.Image.fromarray(padded)


def crop_to_size(image: PIL.Image.Image, size: tuple[int, int]) -> PIL.Image.Image:
    """The centred ``size`` region of ``image`` (the inverse of :func:`fit_to_grid`'s padding)."""
    if image.size == size:
        return image
    left, top = (image.size[0] - size[0]) // 2, (image.size[1] - size[1]) // 2
    return image.crop((left, top, left + size[0], top + size[1]))


# ----------------------------------------------------------------------------------------------------------------------
# The engine: load and cache pipelines, run groups of single-image jobs
# ----------------------------------------------------------------------------------------------------------------------

# Decoder sampler name → (scheduler class, config overrides); "ddpm" keeps the repository's own scheduler config.
SCHEDULER_CLASSES: dict[str, tuple[str, dict[str, Any]]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "dpm++-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpm++-single": ("DPMSolverSinglestepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "kdpm2": ("KDPM2DiscreteScheduler", {}),
    "kdpm2-a": ("KDPM2AncestralDiscreteScheduler", {}),
    # DPM++ SDE: Brownian noise seeded from each image's generator (needs torchsde, the sde extra)
    "dpm++-sde": ("DPMSolverSDEScheduler", {}),
    # PLMS without the Runge–Kutta warm-up: it runs any step count and img2img at every strength (the warm-up needs
    # 4 steps and a run from the schedule's start)
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
}
# The decoder UNet each task needs, as its config says it: (in_channels, addition_embed_type) — the latents alone,
# or with a mask and the masked image's latents (4 + 1 + 4), or with a depth hint encoded beside the image embedding.
_TASK_UNETS = {
    "text2img": (4, "image"),
    "img2img": (4, "image"),
    "mix": (4, "image"),
    "inpaint": (9, "image"),
    "depth": (8, "image_hint"),
}
_DECODER_KINDS = {
    (4, "image"): "a text-to-image decoder",
    (9, "image"): "an inpainting decoder",
    (8, "image_hint"): "a controlnet-depth decoder",
}
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


# ----------------------------------------------------------------------------------------------------------------------
# What a decoder's config files say about a job: checked before loading where they can be read, else after
# ----------------------------------------------------------------------------------------------------------------------

UNET_CONFIG = "unet/config.json"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
# Step counts below a refused one tried for the largest that works, to name it in the error.
_STEPS_TRIED_BELOW = 8


def decoder_config(decoder: str, filename: str) -> dict[str, Any] | None:
    """A decoder's config file (:data:`UNET_CONFIG`, :data:`SCHEDULER_CONFIG`) as it can be read before the decoder
    loads: from its folder, or for a hub id from the local hub cache, without the network. ``None`` where it cannot be
    read yet (a repository not downloaded yet, a damaged folder): loading the decoder then checks it, or reports it."""
    folder = Path(decoder).expanduser()
    if folder.exists():
        path = folder / filename
    elif HUB_ID.match(decoder):
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(decoder, filename)
        except ValueError:  # an id the hub would refuse ("a/b..c"): loading says so
            return None
        if not isinstance(cached, str):  # not in the cache (None), or known to be missing from the repository
            return None
        path = Path(cached)
    else:
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def check_decoder(job: Job, decoder_name: str = "decoder", steps_name: str = "steps") -> None:
    """Before loading: ``job``'s decoder must be of the kind its task needs and its sampler must take ``job.steps``,
    as far as the decoder's config files can be read now (:func:`decoder_config`); raises :class:`IncompatibleJob`.
    ``job`` is resolved; ``decoder_name`` and ``steps_name`` are what the caller's user calls them (``--decoder``).

    The kind is a JSON file's two values; the steps build the sampler (which imports torch) only when its config is
    there. :meth:`Engine.run` makes the same checks once the decoder has loaded, for what could not be read here."""
    unet = decoder_config(job.decoder, UNET_CONFIG)
    if unet is not None:
        check_decoder_kind(job, unet, decoder_name)
    scheduler = decoder_config(job.decoder, SCHEDULER_CONFIG)
    if scheduler is not None:
        check_steps(job, scheduler, steps_name)


def check_decoder_option(task: str, decoder: str, name: str) -> None:
    """A command's decoder option (``name``, e.g. ``--inpaint-decoder``) for ``task``: of the task's kind, as far as
    its UNet config can be read before loading (:func:`decoder_config`); else :class:`IncompatibleJob`."""
    unet = decoder_config(decoder, UNET_CONFIG)
    if unet is not None:
        check_decoder_kind(Job(task=task, decoder=decoder), unet, name)


def check_decoder_kind(job: Job, unet_config: dict[str, Any], name: str = "decoder") -> None:
    """The UNet of ``job``'s decoder (its config) must be the kind the task needs; else :class:`IncompatibleJob`
    naming the kind found, the kind needed and the official repository of that kind."""
    have = (unet_config.get("in_channels"), unet_config.get("addition_embed_type"))
    need = _TASK_UNETS[job.task]
    if have != need:
        raise IncompatibleJob(
            f"{name} '{job.decoder}' is {_decoder_kind(have)}, but {job.task} needs {_decoder_kind(need)}, such as "
            f"{DEFAULT_DECODERS[job.task]}"
        )


def _decoder_kind(unet: tuple[Any, Any]) -> str:
    kind = _DECODER_KINDS.get(unet, "a decoder of no kind kandinsky22 runs")
    return f"{kind} (UNet in_channels {unet[0]}, addition_embed_type {unet[1]!r})"


def make_scheduler(name: str, config: dict[str, Any], sigmas: str | None = None) -> Any:
    """A fresh decoder sampler ``name`` (one of :data:`SCHEDULERS`) built on a decoder's scheduler config, its noise
    levels respaced as ``sigmas`` says (one of :data:`SIGMA_SPACINGS`; ``None``: the sampler's own)."""
    import kandinsky22

    class_name, overrides = SCHEDULER_CLASSES[name]
    if sigmas is not None:  # this spacing alone, whatever the sampler or the config had
        overrides = {**overrides, **{f"use_{spacing}_sigmas": spacing == sigmas for spacing in SIGMA_SPACINGS}}
    return getattr(kandinsky22, class_name).from_config(config, **overrides)


def check_steps(job: Job, scheduler_config: dict[str, Any], name: str = "steps") -> None:
    """``job.steps`` must be a count that ``job.scheduler``, built on ``scheduler_config``, can take: a schedule within
    the timesteps the UNet was trained on, from the step ``job.strength`` starts at — the pipelines' own check
    (:func:`~kandinsky22.pipelines.decoder.untrained_timestep`). Else :class:`IncompatibleJob` naming ``name``, the
    value and, where a few lower counts find it, the largest count that works. ``job`` is resolved (its strength set
    where its task uses one)."""
    from kandinsky22.loading import config_json  # a loaded scheduler's config may hold arrays (trained_betas)

    config = config_json(scheduler_config, sort_keys=True)
    problem = _steps_problem(job.scheduler, job.sigmas, config, job.steps, job.strength)
    if not problem:
        return
    advice = "use fewer steps"
    for steps in range(job.steps - 1, max(0, job.steps - 1 - _STEPS_TRIED_BELOW), -1):
        lower = _steps_problem(job.scheduler, job.sigmas, config, steps, job.strength)
        if lower is None:
            advice = f"use at most {steps} steps"
        if not lower:  # works, or leaves no step (and so will every lower count)
            break
    raise IncompatibleJob(
        f"{name} {job.steps} is more than the {job.scheduler} sampler of decoder '{job.decoder}' can take: {problem}; "
        f"{advice}"
    )


@functools.lru_cache(maxsize=256)
def _steps_problem(sampler: str, sigmas: str | None, config: str, steps: int, strength: float | None) -> str | None:
    """Why ``sampler`` (its σ respaced as ``sigmas`` says) on the scheduler config (JSON) cannot run ``steps`` (from
    ``strength``'s first step): ``None`` when it can; ``""`` when ``strength`` leaves no step of that count (a lower
    count than a job's, which :meth:`Job.validate` refuses for the job's own)."""
    from kandinsky22.pipelines.decoder import untrained_timestep
    from kandinsky22.pipelines.img2img import strength_start

    try:
        scheduler = make_scheduler(sampler, json.loads(config), sigmas)
    except ValueError:  # a config the sampler cannot take: loading the decoder says so
        return None
    try:
        scheduler.set_timesteps(steps)
    except ValueError as err:  # out of its range ("num_inference_steps=… is out of range: …")
        return str(err)
    try:
        first = 0 if strength is None else strength_start(steps, strength)
    except ValueError:
        return ""
    timestep = untrained_timestep(scheduler, scheduler.timesteps[first:])
    if timestep is None:
        return None
    c = scheduler.config
    return (
        f"its schedule would start at timestep {timestep}, past the {c.num_train_timesteps} timesteps the model was "
        f"trained on (timestep_spacing {c.get('timestep_spacing')!r}, steps_offset {c.get('steps_offset')})"
    )


class DeviceUnavailable(RuntimeError):
    """The requested device does not exist on this machine."""


@dataclass
class Result:
    """One image, the single-image job that reproduces it (its own seed), the timings of its pipeline call, and the
    LoRAs applied to it as recipes record them (those of weight other than 0: source, weight, SHA-256)."""

    image: PIL.Image.Image
    job: Job
    timings: dict[str, float]
    loras: list[dict[str, Any]] = field(default_factory=list)


def group_jobs(jobs: Iterable[Job], max_batch: int) -> list[list[Job]]:
    """Single-image jobs grouped by :meth:`Job.batch_key` (first-appearance order), at most ``max_batch`` a group."""
    groups: OrderedDict[tuple, list[Job]] = OrderedDict()
    for job in jobs:
        groups.setdefault(job.batch_key(), []).append(job)
    return [group[i : i + max_batch] for group in groups.values() for i in range(0, len(group), max_batch)]


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda, then mps, then cpu; an unavailable device raises :class:`DeviceUnavailable`."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise DeviceUnavailable(f"device '{name}' is not available: torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceUnavailable(f"device '{name}' is not available on this machine")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` → fp16 on GPUs (as the authors run it), fp32 on the CPU (fp16 matmuls there are slow or missing)."""
    import torch

    if name == "auto":
        name = "fp32" if device.type == "cpu" else "fp16"
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPE_NAMES)}; got {name!r}")
    return getattr(torch, DTYPE_NAMES[name])


class Engine:
    """Loads the pipelines jobs need (cached: one prior, ``max_decoders`` decoder repositories) and runs jobs.

    One run or load at a time (a re-entrant lock), so the server can share one engine between threads.
    ``fast=True`` calls ``enable_fast_path(shapes=warm_up, backend=compile_backend, negative_prompts=...,
    compile_scope=...)`` on every pipeline that has one: ``warm_up`` lists the ``(height, width, images_per_call)`` compiled when a pipeline loads. With
    ``compile_new_shapes=False`` (the server) any other shape runs eagerly instead of compiling — a compilation takes a
    minute or more on full-size models, during which every queued request would wait.
    ``on_load(role, model)`` is called as a model starts loading (role ``"prior"`` or ``"decoder"``), so that a
    caller can say what it is waiting for when it waits for it. ``loras`` (``--lora``) are merged into every UNet and
    prior as it loads (:class:`~kandinsky22.lora_specs.EngineLoras`); :attr:`lora_records` is what recipes record.
    A job's :attr:`Job.loras` chooses among them: before each call the prior and the decoder it uses are re-merged to
    that choice where they hold another (``set_adapters``, from the weights kept on the CPU, in place, so the fast
    path's graphs see it); :attr:`Result.loras` is what that image's recipe records.
    """

    def __init__(
        self,
        device: str = "auto",
        dtype: str = "auto",
        fast: bool = False,
        max_decoders: int = 2,
        warm_up: Sequence[tuple[int, int, int]] = (),
        compile_new_shapes: bool = True,
        compile_backend: str = "inductor",
        negative_prompts: bool = True,
        compile_scope: str = "auto",
        on_load: Callable[[str, str], None] | None = None,
        loras: Sequence[LoraSpec] = (),
    ) -> None:
        from kandinsky22.lora_specs import EngineLoras

        if compile_scope not in COMPILE_SCOPES:
            raise ValueError(f"compile_scope must be one of {', '.join(COMPILE_SCOPES)}; got {compile_scope!r}")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.fast = fast
        self.fast_applied = False
        self.warm_up = list(warm_up)
        self.compile_new_shapes = compile_new_shapes
        self.compile_backend = compile_backend
        self.compile_scope = compile_scope
        self.negative_prompts = negative_prompts
        self.warm_up_seconds = 0.0
        self.max_decoders = max_decoders
        self._priors: OrderedDict[str, Any] = OrderedDict()
        # decoder repository → {pipeline class name: pipeline}; the pipelines of one repository share its modules.
        self._decoders: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._scheduler_configs: dict[str, dict[str, Any]] = {}
        self.on_load = on_load
        self.loras = EngineLoras(loras)
        self._lock = threading.RLock()

    @property
    def device_name(self) -> str:
        return str(self.device)

    @property
    def dtype_name(self) -> str:
        return {v: k for k, v in DTYPE_NAMES.items()}[str(self.dtype).removeprefix("torch.")]

    # -- loading -----------------------------------------------------------------------------------------------------

    def load_loras(self) -> list[dict[str, Any]]:
        """Find, hash and read the LoRAs now (else as the first model loads); what recipes record of them.
        Raises :class:`~kandinsky22.lora_specs.LoraError`, or ``OSError`` for a hub failure."""
        with self._lock:
            self.loras.load()
            return self.loras.records()

    @property
    def lora_records(self) -> list[dict[str, Any]]:
        """The LoRAs as recipes record them (source, weight, SHA-256 of the file read); empty without any."""
        return self.loras.records()

    def missing_models(self, job: Job) -> list[str]:
        """The model ids ``job`` needs that are not loaded yet (the CLI says it is loading them)."""
        job = job if job.prior and job.decoder else job.resolved()
        return [m for m, cache in ((job.prior, self._priors), (job.decoder, self._decoders)) if m not in cache]

    def _prepare(self, pipe: Any) -> Any:
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        if self.fast and hasattr(pipe, "enable_fast_path"):
            started = time.perf_counter()
            pipe.enable_fast_path(
                shapes=self.warm_up,
                backend=self.compile_backend,
                negative_prompts=self.negative_prompts,
                compile_scope=self.compile_scope,
            )
            self.warm_up_seconds += time.perf_counter() - started
            self.fast_applied = True
        return pipe

    def prior_pipeline(self, repo: str) -> Any:
        from kandinsky22.pipelines.prior import KandinskyV22PriorPipeline

        with self._lock:
            if repo not in self._priors:
                self._priors.clear()  # one prior at a time: the official one is 1 B + 2.5 B parameters of CLIP
                if self.on_load is not None:
                    self.on_load("prior", repo)
                pipe = KandinskyV22PriorPipeline.from_pretrained(repo, torch_dtype=self.dtype)
                self.loras.adapt(pipe)  # merged before the fast path fuses and compiles: it reads the merged weights
                self._priors[repo] = self._prepare(pipe)
            return self._priors[repo]

    def decoder_pipeline(self, job: Job) -> Any:
        """The decoder pipeline for ``job``'s task, sharing the modules of its repository once loaded."""
        import kandinsky22

        class_name = _decoder_class(job)
        repo = job.decoder
        with self._lock:
            pipes = self._decoders.get(repo)
            if pipes is None:
                while len(self._decoders) >= self.max_decoders:
                    self._decoders.popitem(last=False)
                if self.on_load is not None:
                    self.on_load("decoder", repo)
                pipe = getattr(kandinsky22, class_name).from_pretrained(repo, torch_dtype=self.dtype)
                _check_decoder(pipe, job)
                self.loras.adapt(pipe)  # the repository's other pipeline classes share this UNet
                pipes = self._decoders[repo] = {class_name: self._prepare(pipe)}
                self._scheduler_configs[repo] = dict(pipe.scheduler.config)
            self._decoders.move_to_end(repo)
            if class_name not in pipes:
                loaded = next(iter(pipes.values()))
                _check_decoder(loaded, job)
                pipes[class_name] = self._prepare(getattr(kandinsky22, class_name)(**loaded.components))
            return pipes[class_name]

    def _scheduler(self, job: Job) -> Any:
        """A fresh decoder scheduler for one run (schedulers keep per-run state)."""
        return make_scheduler(job.scheduler, self._scheduler_configs[job.decoder], job.sigmas)

    # -- running -----------------------------------------------------------------------------------------------------

    def run(
        self, jobs: Sequence[Job], progress: ProgressFn | None = None, cancel: Callable[[], bool] | None = None
    ) -> list[Result]:
        """Run single-image jobs that share a :meth:`Job.batch_key` in one pipeline call; one result per job.

        ``progress(stage, k, n)`` is called after each step of the prior and decoder loops and after decoding;
        ``cancel()`` is checked before each step and raises :class:`Cancelled` when it returns true.
        """
        import torch

        jobs = [job.resolved() for job in jobs]
        if not jobs:
            return []
        if any(job.num_images != 1 for job in jobs):
            raise ValueError("Engine.run takes single-image jobs; split a job with job.expand()")
        if len({job.batch_key() for job in jobs}) > 1:
            raise ValueError("Engine.run needs jobs that differ only in prompt (text2img) and seed; use group_jobs")
        jobs = [job.with_seed() for job in jobs]
        first = jobs[0]
        # no_grad, as the pipelines and the fast path's warm-up run (inference_mode would not match the compiled
        # graphs' guards and make them compile again); on the fast path, shapes not warmed up run eagerly if asked.
        eager_new_shapes = self.fast_applied and not self.compile_new_shapes
        stance, graphs = contextlib.nullcontext(), contextlib.nullcontext()
        if eager_new_shapes:  # ... and capture no CUDA graph for them (each would keep a memory pool)
            from kandinsky22.fast import only_warmed_up_graphs

            stance, graphs = torch.compiler.set_stance("eager_on_recompile"), only_warmed_up_graphs()
        with self._lock, torch.no_grad(), stance, graphs:
            timings: dict[str, float] = {}
            started = time.perf_counter()
            lora_weights = self.loras.weights(first.loras)  # an unknown source fails here, before any model loads
            loading = bool(self.missing_models(first))
            prior = self.prior_pipeline(first.prior)
            decoder = self.decoder_pipeline(first)
            # Pipelines load with the Engine's own weights, and the last call's choice stays merged: this call's now.
            for pipe in (prior, decoder):
                self.loras.select(pipe, lora_weights)
            # What check_decoder could not read before the decoder loaded: refused now, before the prior runs.
            check_steps(first, self._scheduler_configs[first.decoder])
            decoder.scheduler = self._scheduler(first)
            if loading:
                timings["load"] = time.perf_counter() - started
            generators = [torch.Generator("cpu").manual_seed(job.seed) for job in jobs]
            tracker = _StepTracker(progress, cancel)
            with tracker.attach(prior, "prior"):
                started = time.perf_counter()
                embeds, negative = self._embeddings(prior, jobs, generators)
                timings["prior"] = self._elapsed(started)
            # Decoding separately gives the MoVQ its own stage (and timing); a pipeline without latent output
            # decodes inside its call, which the decoder timing then includes.
            latent_output = "latent" in getattr(decoder, "output_types", ())
            inputs = self._decoder_inputs(decoder, first)
            with tracker.attach(decoder, "decoder"):
                started = time.perf_counter()
                output = decoder(
                    image_embeds=embeds,
                    negative_image_embeds=negative,
                    num_inference_steps=first.steps,
                    guidance_scale=first.guidance,
                    generator=generators,
                    output_type="latent" if latent_output else "pil",
                    **inputs,
                ).images
                timings["decoder"] = self._elapsed(started)
            started = time.perf_counter()
            overlay = _unmasked_overlay(inputs) if first.keep_unmasked else None
            images = _decode(decoder, output, overlay) if latent_output else output
            timings["decode"] = self._elapsed(started)
            if progress is not None:
                progress("decode", 1, 1)
        size = (first.width, first.height)
        applied = self.loras.applied(lora_weights)
        return [
            Result(crop_to_size(image, size), job, dict(timings), [dict(lora) for lora in applied])
            for image, job in zip(images, jobs)
        ]

    def _elapsed(self, started: float) -> float:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # kernels run asynchronously; time them, not their launch
        return time.perf_counter() - started

    def _embeddings(self, prior: Any, jobs: list[Job], generators: list) -> tuple[Any, Any]:
        """Image embeddings and negatives for the batch.

        The prior's guidance unconditional is ``negative_prior``, or else ``negative`` (so a job with only a negative
        prompt is the reference's combined pipeline with ``negative_prompt``: one prior run gives both embeddings).
        The decoder's negative is the prior embedding of ``negative``, or the zero-image embedding when it is empty.
        """
        import torch

        first = jobs[0]
        prior_negative = first.negative_prior or first.negative or None
        common = {
            "num_inference_steps": first.prior_steps,
            "guidance_scale": first.prior_guidance,
            "negative_prompt": prior_negative,
        }
        if first.task == "mix":
            items = [
                load_image(item, f"items[{i}]") if mix_item_kind(item) == "image" else item
                for i, item in enumerate(first.items)
            ]
            outs = [
                prior.interpolate(
                    items,
                    list(first.weights),
                    num_inference_steps=first.prior_steps,
                    generator=generator,
                    negative_prior_prompt=prior_negative,
                    negative_prompt=first.negative,
                    guidance_scale=first.prior_guidance,
                )
                for generator in generators
            ]
            embeds = torch.cat([o.image_embeds for o in outs])
            if not first.negative:
                # interpolate would return the prior embedding of `negative_prior` here (the reference's rule); keep
                # the one rule of all tasks: no decoder negative, the zero-image embedding.
                return embeds, prior.zero_image_embeds(len(jobs)).to(embeds.dtype)
            return embeds, torch.cat([o.negative_image_embeds for o in outs])
        out = prior([job.prompt for job in jobs], generator=generators, **common)
        if not first.negative:
            return out.image_embeds, prior.zero_image_embeds(len(jobs)).to(out.image_embeds.dtype)
        if first.negative == prior_negative:
            return out.image_embeds, out.negative_image_embeds
        negative = prior([first.negative] * len(jobs), generator=generators, **common).image_embeds
        return out.image_embeds, negative

    def _decoder_inputs(self, decoder: Any, job: Job) -> dict[str, Any]:
        """Size and the task's image inputs (one for the whole batch), resized to the job's size and padded to the
        decoder's grid."""
        multiple = decoder.movq_scale_factor**2  # the reference's latent rounding: ceil(h / sf²) · sf
        size = (job.width, job.height)
        grid = grid_size(job.width, job.height, multiple)
        inputs: dict[str, Any] = {"width": grid[0], "height": grid[1]}
        if job.image is not None:
            inputs["image"] = fit_to_grid(load_image(job.image, "image"), size, grid, "RGB")
        if job.strength is not None:
            inputs["strength"] = job.strength
        if job.mask is not None:
            mask = fit_to_grid(load_image(job.mask, "mask"), size, size, "L")  # at the job's size
            if job.mask_blur:
                import PIL.ImageFilter

                mask = mask.filter(PIL.ImageFilter.GaussianBlur(job.mask_blur))
            inputs["mask_image"] = fit_to_grid(mask, size, grid, "L", fill=0)  # pad: keep
        if job.hint is not None:
            inputs["hint"] = fit_to_grid(load_image(job.hint, "hint"), size, grid, "RGB")
        return inputs


def _decoder_class(job: Job) -> str:
    if job.task == "depth":
        return "KandinskyV22ControlnetImg2ImgPipeline" if job.image is not None else "KandinskyV22ControlnetPipeline"
    return {
        "text2img": "KandinskyV22Pipeline",
        "mix": "KandinskyV22Pipeline",
        "img2img": "KandinskyV22Img2ImgPipeline",
        "inpaint": "KandinskyV22InpaintPipeline",
    }[job.task]


def _check_decoder(pipe: Any, job: Job) -> None:
    """A decoder of the wrong kind for the task fails here, once loaded (see :func:`check_decoder_kind`)."""
    check_decoder_kind(job, pipe.unet.config)


def _decode(decoder: Any, latents: Any, overlay: Callable[[Any], Any] | None = None) -> list[PIL.Image.Image]:
    """MoVQ-decode unquantized latents to PIL images, as the pipelines do for ``output_type="pil"``; ``overlay``
    applies to the decoded images in [-1, 1] first (the inpaint pipeline's ``keep_unmasked``)."""
    from kandinsky22.pipelines.base import convert_images

    movq = decoder.movq
    pixels = movq.decode(latents.to(movq.dtype), force_not_quantize=True).sample
    return convert_images(pixels if overlay is None else overlay(pixels), "pil")


def _unmasked_overlay(inputs: dict[str, Any]) -> Callable[[Any], Any]:
    """The inpaint pipeline's ``keep_unmasked`` for the Engine's own decode: the decoder's input image where its mask
    (soft values kept) is 0; both are already at the decoder's grid size."""
    from kandinsky22.pipelines.images import image_to_tensor, mask_to_tensor, overlay_unmasked

    image = inputs["image"]
    size = (image.height, image.width)
    original = image_to_tensor(image, size, resize=False)
    repaint = mask_to_tensor(inputs["mask_image"], size, binary=False)
    return lambda decoded: overlay_unmasked(decoded, original, repaint)


class _StepTracker:
    """Progress and cancellation between steps, through each pipeline's ``progress_bar`` hook.

    Every denoising loop — prior, ``interpolate``, every decoder, including the controlnet ones that take no step
    callback — iterates through ``pipe.progress_bar``, so wrapping it reaches them all with one mechanism.
    """

    def __init__(self, progress: ProgressFn | None, cancel: Callable[[], bool] | None) -> None:
        self.progress = progress
        self.cancel = cancel

    def _wrap(self, stage: str) -> Callable[[Iterable], Iterable]:
        def progress_bar(iterable: Iterable) -> Iterable:
            steps = list(iterable)
            for k, item in enumerate(steps, 1):
                if self.cancel is not None and self.cancel():
                    raise Cancelled(f"cancelled before {stage} step {k} of {len(steps)}")
                yield item
                if self.progress is not None:
                    self.progress(stage, k, len(steps))

        return progress_bar

    def attach(self, pipe: Any, stage: str) -> _Attached:
        return _Attached(pipe, self._wrap(stage))


class _Attached:
    """Context manager: ``pipe.progress_bar`` replaced for the duration of one stage."""

    def __init__(self, pipe: Any, progress_bar: Callable[[Iterable], Iterable]) -> None:
        self.pipe = pipe
        self.progress_bar = progress_bar

    def __enter__(self) -> None:
        self.pipe.progress_bar = self.progress_bar

    def __exit__(self, *exc: object) -> None:
        del self.pipe.progress_bar  # back to the class's method
