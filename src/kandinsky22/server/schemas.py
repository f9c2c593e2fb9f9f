"""HTTP request bodies, server limits, and their translation into :class:`kandinsky22.jobs.Job`.

Pydantic checks shapes and types; the server's own limits (:class:`Limits`) and :meth:`Job.validate` check values, so
a bad field is reported once, as a 400 naming the field, whichever layer caught it.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from kandinsky22.jobs import (
    IMAGE_SUFFIXES,
    MAX_LORA_WEIGHT,
    MAX_MASK_BLUR,
    MIN_PRIOR_STEPS,
    SCHEDULERS,
    SIGMA_SPACINGS,
    SPACED_SAMPLERS,
    TASKS,
    Job,
    MixText,
    check_lora_choice,
    eight_bit,
    upright,
)
from kandinsky22.lora_specs import LoraSpec
from kandinsky22.recipe import DEFAULT_QUALITY, check_quality

if TYPE_CHECKING:
    import PIL.Image


class RequestError(ValueError):
    """A client mistake: answered with ``status`` and an OpenAI-style error body naming ``param``."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, error_type: str | None = None):
        super().__init__(message)
        self.param = param
        self.status = status
        self.error_type = error_type or "invalid_request_error"


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how much work the server accepts (``kandinsky22 serve`` flags)."""

    max_batch: int = 4
    max_queue: int = 64
    max_n: int = 4
    min_side: int = 64
    max_side: int = 1024
    max_steps: int = 150
    max_prompt_chars: int = 2000
    max_body_bytes: int = 20 * 1024 * 1024
    # Decoded input images: a small compressed file can expand to gigabytes of pixels ("decompression bomb").
    max_input_pixels: int = 4096 * 4096
    result_ttl_s: float = 3600.0
    max_results: int = 256

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class LoraChoice(BaseModel):
    """One of the server's LoRAs, chosen for a request, and its weight there."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="A LoRA source of this server, exactly as GET /v1/models lists it.")
    weight: float = Field(
        description=f"From -{MAX_LORA_WEIGHT:g} to {MAX_LORA_WEIGHT:g} (negative: away from what it learned; 0: off)."
    )

    @field_validator("weight", mode="before")
    @classmethod
    def _no_boolean(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"a boolean is not accepted here, got {value!r}")
        return value


LORAS_USAGE = (
    f'Choose per request with "loras": [{{"source": <a source listed here>, "weight": <-{MAX_LORA_WEIGHT:g} to '
    f"{MAX_LORA_WEIGHT:g}>}}, ...]: exactly those LoRAs at those weights, the others off ([]: none); without "
    f'"loras", the weights listed here. A request cannot load a LoRA of its own.'
)


class _Request(BaseModel):
    # Unknown fields are errors, so a typo ("guidance" for "guidance_scale") is reported instead of ignored.
    model_config = ConfigDict(extra="forbid")

    prompt: str = ""
    negative_prompt: str = Field("", description="Decoder negative prompt (its prior embedding is the unconditional).")
    negative_prior_prompt: str = Field("", description="The prior's own negative prompt.")
    seed: int | None = Field(None, description="Seed of the first image; image k uses seed + k. Random when absent.")
    steps: int = Field(50, description="Decoder denoising steps.")
    prior_steps: int = 25
    guidance_scale: float = 4.0
    prior_guidance_scale: float = 4.0
    scheduler: str = Field("ddpm", description=f"One of {', '.join(SCHEDULERS)}.")
    sigmas: str | None = Field(
        None,
        description=f"Spacing of the sampler's noise levels: {', '.join(SIGMA_SPACINGS)}, or null for its own; for "
        f"{', '.join(SPACED_SAMPLERS)}.",
    )
    output_format: Literal["png", "jpeg", "webp"] = Field(
        "png",
        description="File format of the images; each carries its recipe (PNG: a text chunk; JPEG, WebP: Exif).",
    )
    output_compression: int | None = Field(
        None,
        description="jpeg and webp only: the encoder's quality, 0-100 (OpenAI's name and scale: 100 is the best "
        f"quality and the largest file; 0 is read as 1). Default {DEFAULT_QUALITY}.",
    )
    loras: list[LoraChoice] | None = Field(
        None,
        description="The server's LoRAs (GET /v1/models) to apply, at these weights: exactly these, the others off "
        "([]: none). Absent: each at the server's own weight.",
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans(cls, value: Any, info: ValidationInfo) -> Any:
        # Pydantic reads true as 1 for an int or float field; only the flags take a boolean (and only one: not 1,
        # "yes" or "on", which pydantic would read as true; a form's "true" and "false" are its text for them).
        if info.field_name in _FLAGS:
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if not isinstance(value, bool):
                raise ValueError(f"must be true or false, got {value!r}")
            return value
        if isinstance(value, bool) or (isinstance(value, list) and any(isinstance(v, bool) for v in value)):
            raise ValueError(f"a boolean is not accepted here, got {value!r}")
        return value


class ImageGenerationRequest(_Request):
    """OpenAI ``POST /v1/images/generations`` plus our sampling fields."""

    n: int = 1
    size: str | None = Field(
        None, description="WIDTHxHEIGHT in pixels (default 512x512, or the max_side square of /v1/models if smaller)."
    )
    response_format: Literal["b64_json", "url"] = "b64_json"
    # Sent by OpenAI clients; this server has one model and no quality or style presets, so they are accepted and
    # ignored rather than rejected.
    model: str | None = None
    quality: str | None = None
    style: str | None = None
    user: str | None = None


# Request fields that take true or false
_FLAGS = ("keep_unmasked",)


class MixImage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str = Field(description="Base64 image (or a data: URL).")


class JobRequest(_Request):
    """``POST /v1/jobs`` (JSON; multipart forms carry the same fields, with files for the images)."""

    task: Literal[TASKS] = "text2img"  # type: ignore[valid-type]
    n: int = 1
    width: int | None = Field(None, description="Output width; for image tasks the input's size when absent.")
    height: int | None = None
    strength: float | None = Field(None, description="img2img (and depth with an image): how much to change.")
    image: str | None = Field(None, description="Base64 source image (img2img, inpaint, depth).")
    mask_image: str | None = Field(None, description="Base64 inpaint mask: white = repaint.")
    mask_blur: float = Field(
        0.0, description=f"inpaint: a Gaussian blur of the mask, in pixels (standard deviation, 0-{MAX_MASK_BLUR:g})."
    )
    keep_unmasked: bool = Field(
        False,
        description="inpaint: the input's own pixels where the mask is black (grey: a mix), not their MoVQ round "
        "trip, which changes them a little at every pass.",
    )
    hint_image: str | None = Field(None, description="Base64 depth hint (depth).")
    items: list[Union[str, MixImage]] = Field(default_factory=list, description="mix: texts and images to mix.")
    weights: list[float] = Field(default_factory=list, description="mix: one weight per item.")


_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


def parse_size(size: str) -> tuple[int, int]:
    match = _SIZE.match(size)
    if match is None:
        raise RequestError(f"size must be WIDTHxHEIGHT, e.g. '512x512'; got {size!r}", param="size")
    return int(match.group(1)), int(match.group(2))


def decode_image(data: str | bytes, param: str, limits: Limits) -> PIL.Image.Image:
    """Base64 text (``data:`` URLs too) or raw file bytes → a loaded RGB/L/RGBA image; failures name ``param``."""
    import PIL.Image

    if isinstance(data, str):
        text = data.split(",", 1)[1] if data.startswith("data:") else data
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as err:
            raise RequestError(f"{param} is not valid base64 ({err})", param=param) from err
    try:
        image = PIL.Image.open(io.BytesIO(data))
        # The header alone gives the size; refuse huge images before decoding their pixels.
        if image.width * image.height > limits.max_input_pixels:
            raise RequestError(
                f"{param} is {image.width}x{image.height}; at most {limits.max_input_pixels} pixels are accepted",
                param=param,
            )
        image.load()
    except RequestError:
        raise
    except (PIL.UnidentifiedImageError, OSError, ValueError, PIL.Image.DecompressionBombError) as err:
        raise RequestError(f"{param} could not be decoded as an image ({err})", param=param) from err
    return eight_bit(upright(image))


def _check_limits(req: _Request, n: int, width: int | None, height: int | None, limits: Limits) -> None:
    for name in ("prompt", "negative_prompt", "negative_prior_prompt"):
        if len(getattr(req, name)) > limits.max_prompt_chars:
            raise RequestError(
                f"{name} is {len(getattr(req, name))} characters; at most {limits.max_prompt_chars} are accepted",
                param=name,
            )
    if not 1 <= n <= limits.max_n:
        raise RequestError(f"n must be from 1 to {limits.max_n}, got {n}", param="n")
    for name, side in (("width", width), ("height", height)):
        if side is not None and not limits.min_side <= side <= limits.max_side:
            raise RequestError(
                f"{name} must be from {limits.min_side} to {limits.max_side} pixels, got {side}", param=name
            )
    for name, low in (("steps", 1), ("prior_steps", MIN_PRIOR_STEPS)):
        if not low <= getattr(req, name) <= limits.max_steps:
            raise RequestError(f"{name} must be from {low} to {limits.max_steps}, got {getattr(req, name)}", param=name)


# Job field → request field, so that Job.validate's messages can be attributed to the field the client sent.
_JOB_TO_REQUEST = {
    "negative": "negative_prompt",
    "negative_prior": "negative_prior_prompt",
    "guidance": "guidance_scale",
    "prior_guidance": "prior_guidance_scale",
    "num_images": "n",
    "mask": "mask_image",
    "hint": "hint_image",
}


def _validated(job: Job) -> Job:
    try:
        job.validate()
    except ValueError as err:
        message = str(err)
        for job_name, request_name in _JOB_TO_REQUEST.items():
            message = re.sub(rf"\b{job_name}\b", request_name, message)
        # The field is the message's first word ("steps must be ..."), else the last field it names
        # ("img2img needs image ...", "... got 2 items and 1 weights").
        words = re.findall(r"\w+", message)
        named = [word for word in words if word in JobRequest.model_fields]
        param = words[0] if words and words[0] in named else (named[-1] if named else None)
        raise RequestError(message, param=param) from err
    return job


def _lora_choice(req: _Request) -> list[LoraSpec] | None:
    """The request's ``loras`` as the Job takes them, checked here so that the message shows each source as sent
    (whether the server has them is :func:`served_loras`' to say)."""
    if req.loras is None:
        return None
    choice = [LoraSpec(lora.source, lora.weight) for lora in req.loras]
    try:
        check_lora_choice(choice)
    except ValueError as err:
        raise RequestError(str(err), param="loras") from None
    return choice


def served_loras(choice: list[LoraSpec] | None, served: list[LoraSpec]) -> list[LoraSpec] | None:
    """A job's LoRAs on a server started with ``served`` (``--lora``): for a request's choice, every one of the
    server's, in their order, at the request's weight (0 where it leaves one out), so that jobs of equal choices batch
    together however their requests listed them; ``None`` without a choice (the Engine's own weights, which are the
    command line's and may lie outside a request's range). Raises :class:`RequestError` for a source the server has
    not (listing those it has), and for ``loras`` sent to a server without any."""
    if choice is None:
        return None
    if not served:
        raise RequestError(
            f"loras: this server has no LoRAs (they are given at its start: serve --lora SOURCE[:WEIGHT]); got "
            f"{[{'source': spec.source, 'weight': spec.weight} for spec in choice]}",
            param="loras",
        )
    known = [spec.source for spec in served]
    for i, spec in enumerate(choice):
        if spec.source not in known:
            raise RequestError(
                f"loras[{i}].source {spec.source!r} is not a LoRA of this server; its LoRAs (as GET /v1/models lists "
                f"them): {', '.join(repr(source) for source in known)}",
                param="loras",
            )
    weights = {spec.source: spec.weight for spec in choice}
    return [LoraSpec(source, weights.get(source, 0.0)) for source in known]


def _common(req: _Request) -> dict[str, Any]:
    return {
        "loras": _lora_choice(req),
        "prompt": req.prompt,
        "negative": req.negative_prompt,
        "negative_prior": req.negative_prior_prompt,
        "seed": req.seed,
        "steps": req.steps,
        "prior_steps": req.prior_steps,
        "guidance": req.guidance_scale,
        "prior_guidance": req.prior_guidance_scale,
        "scheduler": req.scheduler,
        "sigmas": req.sigmas,
    }


def parse_job_request(fields: dict[str, Any]) -> JobRequest:
    """Fields of a JSON body or a form as a JobRequest; a type error names the field (as FastAPI's 400s do)."""
    try:
        return JobRequest.model_validate(fields)
    except ValidationError as err:
        first = err.errors()[0]
        loc = [str(part) for part in first["loc"]]
        raise RequestError(f"{'.'.join(loc) or 'body'}: {first['msg']}", param=loc[0] if loc else None) from err


def output_encoding(req: _Request) -> tuple[str, int | None]:
    """The request's image format and encoder quality: ``output_compression`` is the quality (0 is read as 1, the
    lowest libjpeg takes), ``None`` for PNG."""
    compression = req.output_compression
    if compression is not None:
        if not 0 <= compression <= 100:
            raise RequestError(f"output_compression must be from 0 to 100, got {compression}", "output_compression")
        if req.output_format == "png":
            raise RequestError(
                "output_compression applies to output_format jpeg and webp (png is lossless)", "output_compression"
            )
    return req.output_format, check_quality(req.output_format, None if compression is None else max(1, compression))


def generation_to_job(req: ImageGenerationRequest, limits: Limits) -> Job:
    width, height = (None, None) if req.size is None else parse_size(req.size)  # None: the default, within max_side
    _check_limits(req, req.n, width, height, limits)
    return _validated(Job(task="text2img", width=width, height=height, num_images=req.n, **_common(req)))


def job_request_to_job(req: JobRequest, limits: Limits, files: dict[str, Any] | None = None) -> Job:
    """``files`` holds multipart uploads (raw bytes) by field name; ``items`` there may mix texts and bytes."""
    files = files or {}
    _check_limits(req, req.n, req.width, req.height, limits)

    def image(name: str) -> PIL.Image.Image | None:
        data = files.get(name, getattr(req, name))
        return None if data is None else decode_image(data, name, limits)

    items: list[Any] = []
    for i, item in enumerate(files.get("items", req.items)):
        if isinstance(item, MixImage):
            item = decode_image(item.image, f"items[{i}]", limits)
        elif isinstance(item, bytes):
            item = decode_image(item, f"items[{i}]", limits)
        elif len(item) > limits.max_prompt_chars:
            raise RequestError(f"items[{i}] is longer than {limits.max_prompt_chars} characters", param="items")
        elif item.lower().endswith(IMAGE_SUFFIXES):
            raise RequestError(
                f"items[{i}] looks like an image file name ({item!r}); send images as {{'image': <base64>}}",
                param="items",
            )
        else:
            # A client's text never reaches the server's files: the job layer would read one naming a file from disk,
            # and refusing it would tell the client that the file exists.
            item = MixText(item)
        items.append(item)
    job = Job(
        task=req.task,
        width=req.width,
        height=req.height,
        num_images=req.n,
        strength=req.strength,
        image=image("image"),
        mask=image("mask_image"),
        hint=image("hint_image"),
        keep_unmasked=req.keep_unmasked,
        mask_blur=req.mask_blur,
        items=items,
        weights=list(req.weights),
        **_common(req),
    )
    return _validated(job)
