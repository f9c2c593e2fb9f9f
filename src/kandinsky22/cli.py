"""``kandinsky22``: generate, edit and mix images from a terminal, reproducibly.

Importing this module is cheap (no torch): arguments are parsed and jobs validated first, so a bad argument comes
back at once; torch and the pipelines are imported only when there is something to run.

Exit codes: 0 success; 1 runtime failure (missing folder or file, hub offline, out of memory, …) with one line and
a hint (the traceback with ``--debug``); 2 bad arguments, with one line saying what is wrong and what is allowed;
130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from kandinsky22 import __version__
from kandinsky22.jobs import (
    COMPILE_SCOPES,
    HUB_ID,
    MAX_IMAGES,
    MAX_MASK_BLUR,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    MIN_PRIOR_STEPS,
    MIN_SIDE,
    SCHEDULERS,
    SIGMA_SPACINGS,
    SPACED_SAMPLERS,
    DeviceUnavailable,
    IncompatibleJob,
    Job,
    check_decoder,
    mix_item_kind,
)
from kandinsky22.lora_specs import LoraError, LoraSpec, changed_loras, checked_sources, lora_argument, specs_of_recipe
from kandinsky22.recipe import EXTENSIONS, FORMAT_NAMES, FORMATS, SUFFIX_FORMATS, format_of

PROG = "kandinsky22"
COMMAND_TASKS = {"generate": "text2img", "img2img": "img2img", "inpaint": "inpaint", "mix": "mix", "depth": "depth"}
TASK_COMMANDS = {task: command for command, task in COMMAND_TASKS.items()}
# Input images a task needs: options of its command, unless --from-png or --prompts-file gives them.
REQUIRED_INPUTS = {"img2img": ("image",), "inpaint": ("image", "mask"), "depth": ("hint",)}
# The output file name without --out (or inside an --out folder), with the suffix of the output format.
DEFAULT_NAME = "kandinsky22-{seed}"
# One image per pipeline call by default: batched kernels sum in a different order, so an image made in a batch can
# differ from its --from-png re-run by a rounding level on a few pixels. --batch-size trades that for throughput.
DEFAULT_BATCH = 1
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DTYPES = ("auto", "fp32", "fp16", "bf16")

# Options that map one to one onto Job fields (argparse dest → Job field).
JOB_OPTIONS = {
    "negative": "negative",
    "negative_prior": "negative_prior",
    "seed": "seed",
    "steps": "steps",
    "prior_steps": "prior_steps",
    "guidance": "guidance",
    "prior_guidance": "prior_guidance",
    "scheduler": "scheduler",
    "sigmas": "sigmas",
    "keep_unmasked": "keep_unmasked",
    "mask_blur": "mask_blur",
    "width": "width",
    "height": "height",
    "num_images": "num_images",
    "strength": "strength",
    "image": "image",
    "mask": "mask",
    "hint": "hint",
    "item": "items",
    "weight": "weights",
    "prior": "prior",
    "decoder": "decoder",
}


class UsageError(Exception):
    """A bad argument found after parsing (exit 2)."""


class RuntimeFailure(Exception):
    """A failure with a hint for the user (exit 1)."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


class _Parser(argparse.ArgumentParser):
    """argparse that reports an error as one line (no usage block) and exits 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


# ----------------------------------------------------------------------------------------------------------------------
# Argument types: each names the allowed values in its error
# ----------------------------------------------------------------------------------------------------------------------


def _int_in(low: int, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer from {low} to {high}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {value}")
        return value

    return parse


def _float_in(low: float, high: float, open_low: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        low_ok = value > low if open_low else value >= low
        if not (low_ok and value <= high):
            bound = f"above {low:g} and at most {high:g}" if open_low else f"from {low:g} to {high:g}"
            raise argparse.ArgumentTypeError(f"must be a number {bound}, got {text!r}")
        return value

    return parse


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _device(text: str) -> str:
    if not DEVICE_PATTERN.match(text):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda, cuda:N or mps, got {text!r}")
    return text


def _non_empty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def output_format_type(text: str) -> str:
    """argparse type of ``--format`` (here and in ``kandinsky22 batch``): png, jpeg (or jpg) or webp, any case."""
    name = {"jpg": "jpeg"}.get(text.lower(), text.lower())
    if name not in FORMATS:
        raise argparse.ArgumentTypeError(f"must be png, jpeg (or jpg) or webp, got {text!r}")
    return name


class _RecordOption(argparse.Action):
    """Store the value and, in ``{dest}_option``, the option it was given as (``--from-png`` or ``--from-image``), so
    that errors name what the user typed."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_option", option_string)


# ----------------------------------------------------------------------------------------------------------------------
# The parser
# ----------------------------------------------------------------------------------------------------------------------


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    models = common.add_argument_group("models")
    models.add_argument("--prior", type=_non_empty, help="prior hub id or folder (default: the official prior)")
    models.add_argument(
        "--decoder", type=_non_empty, help="decoder hub id or folder (default: the official repository for the task)"
    )
    models.add_argument(
        "--lora",
        action="append",
        type=lora_argument,
        metavar="SOURCE[:WEIGHT]",
        help="apply a LoRA (repeat for several): a .safetensors/.bin file, a folder holding one, or a hub id; WEIGHT "
        "(default 1) after the last ':'. With --from-png: replaces the recorded LoRAs (default: those)",
    )
    gen = common.add_argument_group("generation")
    gen.add_argument("--negative", help="negative prompt of the decoder (what the image should not look like)")
    gen.add_argument("--negative-prior", help="negative prompt of the prior's guidance")
    gen.add_argument("--steps", type=_int_in(1, MAX_STEPS), help="decoder steps (default 50)")
    gen.add_argument("--prior-steps", type=_int_in(MIN_PRIOR_STEPS, MAX_STEPS), help="prior steps (default 25)")
    gen.add_argument("--guidance", type=_float_in(1, 100), help="decoder guidance scale, 1 = off (default 4)")
    gen.add_argument("--prior-guidance", type=_float_in(1, 100), help="prior guidance scale, 1 = off (default 4)")
    gen.add_argument("--scheduler", choices=SCHEDULERS, help="decoder sampler (default ddpm, as the official repos)")
    gen.add_argument(
        "--sigmas",
        choices=("default", *SIGMA_SPACINGS),
        help=f"spacing of the sampler's noise levels (default: its own); for {', '.join(SPACED_SAMPLERS)}",
    )
    gen.add_argument("--width", type=_int_in(MIN_SIDE, MAX_SIDE), help="exact output width in pixels (default 512)")
    gen.add_argument("--height", type=_int_in(MIN_SIDE, MAX_SIDE), help="exact output height in pixels (default 512)")
    gen.add_argument("--num-images", type=_int_in(1, MAX_IMAGES), help="images per prompt (default 1)")
    gen.add_argument("--seed", type=_int_in(0, MAX_SEED), help="seed of the first image (default: random, printed)")
    run = common.add_argument_group("running")
    run.add_argument("--device", type=_device, default="auto", help="auto (cuda, mps, cpu), cpu, cuda[:N] or mps")
    run.add_argument(
        "--dtype",
        choices=DTYPES,
        help="auto (the default; with --from-png: the recorded one): fp16 on GPUs, fp32 on CPU",
    )
    run.add_argument(
        "--batch-size",
        type=_int_in(1, MAX_IMAGES),
        default=DEFAULT_BATCH,
        help="images per pipeline call (default 1: bit-exact --from-png re-runs)",
    )
    run.add_argument("--fast", action="store_true", help="use the pipelines' fast path where they have one")
    run.add_argument(
        "--compile-scope",
        choices=COMPILE_SCOPES,
        help="with --fast: what it compiles: auto (the default: none on a GPU where Triton runs, else blocks), blocks "
        "(each repeated block once per shape), model (each model whole), none (nothing: fused projections, CUDA "
        "graphs and Triton GroupNorms only, no compilation in the warm-up)",
    )
    run.add_argument(
        "--compile-cache",
        metavar="DIR",
        help="with --fast: keep torch.compile's caches in DIR (default: torch's, in the temporary folder); a later "
        "run with the same models, sizes and torch reads them instead of compiling again (seconds instead of minutes)",
    )
    out = common.add_argument_group("input and output")
    out.add_argument(
        "-o",
        "--out",
        help="output file (.png, .jpg/.jpeg or .webp: the suffix sets the format), folder, or pattern with "
        f"{{n}}/{{seed}} (default {DEFAULT_NAME}.png, or the --format's suffix)",
    )
    out.add_argument(
        "--format",
        type=output_format_type,
        metavar="{png,jpeg,webp}",
        help="png (the default), jpeg or webp: for a folder or the default name; a file's suffix must agree",
    )
    out.add_argument(
        "--quality",
        type=_int_in(1, 100),
        metavar="N",
        help="jpeg and webp quality, 1-100 (default 90); png is lossless",
    )
    out.add_argument("--overwrite", action="store_true", help="replace existing output files")
    out.add_argument("--prompts-file", help="one job per line: a prompt, or a JSON object of job options")
    out.add_argument(
        "--from-png",
        "--from-image",
        action=_RecordOption,
        metavar="FILE",
        help="re-run the job recorded in a PNG, JPEG or WebP file made by this tool (options given override)",
    )
    out.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    out.add_argument("--quiet", action="store_true", help="no progress bars or notes on stderr")
    out.add_argument("--debug", action="store_true", help="show tracebacks")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Kandinsky 2.2 from a terminal: every image (PNG, JPEG or WebP) carries the recipe that "
        "reproduces it.",
        epilog="Run `kandinsky22 make-tiny DIR` to get tiny offline checkpoints (they draw noise) for a smoke test.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    common = _common_options()

    def prompt_command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=help_text, description=help_text)
        sub.add_argument("prompt", nargs="?", metavar="PROMPT", help="what to draw")
        return sub

    prompt_command("generate", "text to image")
    img2img = prompt_command("img2img", "redraw an image following a prompt")
    img2img.add_argument("--image", help="the image to start from (required unless --from-png or --prompts-file)")
    img2img.add_argument("--strength", type=_float_in(0, 1, open_low=True), help="how much to change, 0..1 (0.3)")
    inpaint = prompt_command("inpaint", "repaint the white area of a mask following a prompt")
    inpaint.add_argument("--image", help="the image to edit (required unless --from-png or --prompts-file)")
    inpaint.add_argument("--mask", help="mask image: white = repaint, black = keep (required, as --image)")
    inpaint.add_argument(
        "--mask-blur",
        type=_float_in(0, MAX_MASK_BLUR),
        metavar="PX",
        help="soften the mask's edge: a Gaussian blur of PX pixels (standard deviation; default 0)",
    )
    inpaint.add_argument(
        "--keep-unmasked",
        action=argparse.BooleanOptionalAction,
        help="return the input's own pixels where the mask is black (grey: a mix), not their MoVQ round trip, which "
        "changes them a little at every pass (default: off, as the reference)",
    )
    mix = commands.add_parser(
        "mix", parents=[common], help="mix texts and images by weight", description="mix texts and images by weight"
    )
    mix.add_argument("--item", action="append", help="a text or an image file to mix (repeat)")
    mix.add_argument("--weight", action="append", type=_finite_float, help="weight of each item (default equal)")
    depth = prompt_command("depth", "draw a prompt following a depth map (controlnet-depth)")
    depth.add_argument("--hint", help="depth map image, white = near (required unless --from-png or --prompts-file)")
    depth.add_argument("--image", help="optional image to start from")
    depth.add_argument("--strength", type=_float_in(0, 1, open_low=True), help="with --image: how much to change (0.5)")
    tiny = commands.add_parser(
        "make-tiny",
        help="write tiny random checkpoints (they draw noise) for offline tests",
        description="Write tiny random-weight checkpoints of the four official repositories (prior, decoder, "
        "decoder-inpaint, controlnet-depth) in the official layout. They draw noise, not pictures: they are for "
        "smoke tests and CI without downloads.",
    )
    tiny.add_argument("dir", metavar="DIR", help="folder to create the four repositories in")
    tiny.add_argument("--overwrite", action="store_true", help="replace repositories already in DIR")
    tiny.add_argument("--json", action="store_true", help="print the folders as JSON")
    tiny.add_argument("--debug", action="store_true", help="show tracebacks")
    from kandinsky22.server.command import add_arguments as add_serve_arguments  # argparse only: cheap to import

    serve = commands.add_parser(
        "serve",
        help="HTTP API and web page: many users, one GPU",
        description="Serve an OpenAI-compatible endpoint, a job API with progress and cancellation, and a web page "
        "at /. One worker owns the models; compatible requests are batched.",
    )
    add_serve_arguments(serve)
    from kandinsky22.scale.ray_serve import add_arguments as add_ray_serve_arguments  # argparse only, no ray

    add_ray_serve_arguments(serve)
    from kandinsky22.batch import add_arguments as add_batch_arguments  # argparse only, no torch

    batch = commands.add_parser(
        "batch",
        help="bulk generation from a JSON lines file: resumable, in one process or on a Ray cluster",
        description="Generate every job of JOBS (one JSON object of job fields per line) into DIR, with a manifest; "
        "a re-run skips the jobs that are complete. --ray spreads the work over a Ray cluster's GPUs.",
    )
    add_batch_arguments(batch)
    return parser


# ----------------------------------------------------------------------------------------------------------------------
# Jobs from the command line, a prompts file or a PNG's recipe
# ----------------------------------------------------------------------------------------------------------------------


def _explicit_options(args: argparse.Namespace) -> dict[str, Any]:
    """Job fields given on the command line (argparse leaves the others ``None``)."""
    options = {
        field: getattr(args, dest) for dest, field in JOB_OPTIONS.items() if getattr(args, dest, None) is not None
    }
    if options.get("sigmas") == "default":  # the sampler's own spacing, also over a recipe's (--from-png)
        options["sigmas"] = None
    if args.command == "mix" and "items" in options and "weights" not in options:
        options["weights"] = [1.0 / len(options["items"])] * len(options["items"])
    if getattr(args, "prompt", None) is not None:
        options["prompt"] = args.prompt
    return options


def _read_prompts_file(path: str, task: str, options: dict[str, Any]) -> list[tuple[str, Job]]:
    """One job per non-empty, non-``#`` line: a prompt, or a JSON object of job fields (dashes allowed)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise RuntimeFailure(f"no such prompts file: '{file}'", "check the --prompts-file path")
    try:  # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first line
        text_lines = file.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise UsageError(f"--prompts-file '{path}' is not UTF-8 text ({err.reason} at byte {err.start})") from None
    jobs = []
    for number, line in enumerate(text_lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        where = f"{path} line {number}"
        if text.startswith("{"):
            try:
                fields = json.loads(text)
            except json.JSONDecodeError as err:
                raise UsageError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(fields, dict):
                raise UsageError(f"{where}: a JSON line must be an object of job options")
            fields = {k.replace("-", "_"): v for k, v in fields.items()}
        else:
            fields = {"prompt": text}
        try:
            jobs.append((where, Job.from_dict({"task": task, **options, **fields})))
        except (TypeError, ValueError) as err:
            raise UsageError(f"{where}: {err}") from None
    if not jobs:
        raise UsageError(f"{path} holds no jobs (one prompt or JSON object per line)")
    return jobs


def _job_from_png(path: str, task: str, options: dict[str, Any], option: str) -> tuple[Job, dict[str, Any]]:
    """The job recorded in the image ``path`` (``option``: how the user named it, for errors) and its recipe."""
    from kandinsky22.recipe import job_from_recipe, read_recipe

    try:
        recipe = read_recipe(path)
    except FileNotFoundError as err:
        raise RuntimeFailure(str(err), f"check the {option} path") from None
    except ValueError as err:
        raise UsageError(f"{option}: {err}") from None
    if recipe.get("task") != task and recipe.get("task") in TASK_COMMANDS:
        made_by = TASK_COMMANDS[recipe["task"]]
        raise UsageError(f"'{path}' was made by `{PROG} {made_by}`; re-run it with that command")
    fields = {**recipe, **options}  # the options given override the recorded fields
    missing = [name for name in REQUIRED_INPUTS.get(task, ()) if fields.get(name) is None]
    if missing:  # an input that was in memory (a server upload): the recipe has no file for it
        given = " and ".join(f"--{name}" for name in missing)
        raise UsageError(f"{option}: '{path}' records no file for {given} (it was uploaded); give {given}")
    try:
        job = job_from_recipe(fields)
    except ValueError as err:
        raise UsageError(f"{option}: {err}") from None
    return job, recipe


def _absolute(value: Any) -> Any:
    """An existing local path made absolute (so recipes work from any folder); anything else unchanged."""
    if isinstance(value, str) and value and Path(value).expanduser().exists():
        return str(Path(value).expanduser().resolve())
    return value


def _looks_like_path(value: str) -> bool:
    """Not of the hub's ``owner/name`` form (the rule of ``loading.is_hub_id``, which imports torch)."""
    return not HUB_ID.match(value)


def _check_models(job: Job) -> None:
    """A model given as a folder that does not exist fails now, before torch is imported."""
    for name in ("prior", "decoder"):
        value = getattr(job, name)
        if value and _looks_like_path(value) and not Path(value).expanduser().exists():
            raise RuntimeFailure(
                f"no such model folder for --{name}: '{value}'",
                f"pass an existing folder or a hub id; `{PROG} make-tiny DIR` writes tiny offline ones for testing",
            )


def _check_inputs(job: Job, where: str) -> None:
    """Every input image exists and decodes, now: not after minutes of loading models, with a hint about the hub."""
    import PIL.Image

    sources = [(f"--{name}", getattr(job, name)) for name in ("image", "mask", "hint")]
    sources += [("--item", item) for item in job.items if mix_item_kind(item) == "image"]
    for option, source in sources:
        if not isinstance(source, (str, os.PathLike)):
            continue
        path = Path(source).expanduser()
        if not path.is_file():
            raise RuntimeFailure(f"{where}no such file for {option}: '{source}'", "check the input file paths")
        try:
            with PIL.Image.open(path) as image:
                image.load()
        except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as err:
            raise UsageError(f"{where}{option} '{source}' is not an image file PIL can read ({err})") from None


def _prepare_job(job: Job, where: str) -> Job:
    try:
        job.validate()
        for name in ("image", "mask", "hint", "prior", "decoder"):
            setattr(job, name, _absolute(getattr(job, name)))
        job.items = [_absolute(item) if mix_item_kind(item) == "image" else item for item in job.items]
    except ValueError as err:
        raise UsageError(f"{where}{err}") from None
    _check_models(job)
    _check_inputs(job, where)
    try:
        return job.resolved()
    except FileNotFoundError as err:
        raise RuntimeFailure(f"{where}{err}", "check the input file paths") from None
    except ValueError as err:
        raise UsageError(f"{where}{err}") from None


def _from_option(args: argparse.Namespace) -> str:
    """``--from-png`` or ``--from-image``, as given (``--from-png`` where the namespace was built by other code)."""
    return getattr(args, "from_png_option", None) or "--from-png"


def build_jobs(args: argparse.Namespace) -> tuple[list[tuple[str, Job]], dict[str, Any] | None]:
    """The validated, resolved jobs of the command line, each with where it comes from for errors (``""``, or
    ``FILE line N: `` for a prompts file), and the recipe they came from (``--from-png``)."""
    task = COMMAND_TASKS[args.command]
    options = _explicit_options(args)
    recipe = None
    from_option = _from_option(args)
    if args.from_png and args.prompts_file:
        raise UsageError(f"{from_option} and --prompts-file cannot be combined; use one of them")
    if args.from_png:
        job, recipe = _job_from_png(args.from_png, task, options, from_option)
        sources = [("", job)]
    elif args.prompts_file:
        if options.get("prompt") is not None:
            raise UsageError("give either PROMPT or --prompts-file, not both")
        sources = [(f"{where}: ", job) for where, job in _read_prompts_file(args.prompts_file, task, options)]
    else:
        if task != "mix" and options.get("prompt") is None:
            raise UsageError(f"{args.command} needs a PROMPT (or --prompts-file, or --from-png)")
        if task == "mix" and not options.get("items"):
            raise UsageError("mix needs at least one --item TEXT_OR_IMAGE (with a --weight each, or equal weights)")
        missing = [f"--{name}" for name in REQUIRED_INPUTS.get(task, ()) if options.get(name) is None]
        if missing:
            raise UsageError(f"{args.command} needs {' and '.join(missing)} (or --prompts-file, or --from-png)")
        try:
            sources = [("", Job.from_dict({"task": task, **options}))]
        except (TypeError, ValueError) as err:
            raise UsageError(str(err)) from None
    return [(where, _prepare_job(job, where)) for where, job in sources], recipe


def _check_decoders(sources: list[tuple[str, Job]]) -> None:
    """Each job's decoder is of its task's kind and its sampler takes its steps, as far as the decoder's config files
    tell before it loads (a folder, or a hub repository in the local cache); the rest is checked once it loads."""
    checked = set()
    for where, job in sources:
        key = (job.task, job.decoder, job.scheduler, job.sigmas, job.steps, job.strength)
        if key in checked:
            continue
        checked.add(key)
        try:
            check_decoder(job, decoder_name="--decoder", steps_name="--steps")
        except IncompatibleJob as err:
            raise UsageError(f"{where}{err}") from None


# ----------------------------------------------------------------------------------------------------------------------
# Output files
# ----------------------------------------------------------------------------------------------------------------------


def plan_outputs(
    pattern: str | None,
    jobs: Sequence[Job],
    overwrite: bool,
    output_format: str | None = None,
    quality: int | None = None,
) -> list[Path]:
    """The file of each single-image job: ``pattern`` filled with ``{n}`` (1, 2, …) and ``{seed}``.

    A folder (or no pattern) gets the default name with the suffix of ``output_format`` (default png); a file's suffix
    (.png, .jpg/.jpeg, .webp, any case) sets the format, and an ``output_format`` that differs is an error. Several
    images and a pattern without ``{n}`` or ``{seed}`` get ``-{n}`` before the suffix. Names that repeat are an error;
    existing files are one unless ``overwrite``. A ``quality`` for PNG files is an error (PNG is lossless).
    """
    default_name = DEFAULT_NAME + EXTENSIONS[output_format or "png"]
    if pattern is None:
        pattern = default_name
    elif pattern.endswith(("/", os.sep)) or Path(pattern).expanduser().is_dir():
        pattern = str(Path(pattern) / default_name)
    stem, suffix = os.path.splitext(pattern)
    suffix_format = SUFFIX_FORMATS.get(suffix.lower())
    if suffix_format is None:
        raise UsageError(
            "--out must name a .png, .jpg, .jpeg or .webp file (the recipe is stored in each), a folder or a "
            f"pattern; got {pattern!r}"
        )
    if output_format is not None and output_format != suffix_format:
        raise UsageError(
            f"--out {pattern!r} names a {FORMAT_NAMES[suffix_format]} file but --format is {output_format}; "
            "drop --format, or give --out a matching suffix"
        )
    if quality is not None and suffix_format == "png":
        raise UsageError(f"--quality applies to jpeg and webp files; {pattern!r} is a PNG (lossless)")
    if len(jobs) > 1 and "{n" not in pattern and "{seed" not in pattern:
        pattern = stem + "-{n}" + suffix
    paths = []
    for n, job in enumerate(jobs, 1):
        try:
            paths.append(Path(pattern.format(n=n, seed=job.seed)).expanduser())
        except (KeyError, IndexError, ValueError) as err:
            raise UsageError(
                f"--out pattern {pattern!r} may only use {{n}} and {{seed}} ({type(err).__name__}: {err})"
            ) from None
    seen: dict[Path, int] = {}
    for n, path in enumerate(paths, 1):
        if path in seen:
            raise UsageError(f"--out gives '{path}' to images {seen[path]} and {n}; add {{n}} to the pattern")
        seen[path] = n
    for path in dict.fromkeys(p.parent for p in paths):
        # The folder is made when the first image is saved: a file in the way would fail only after the generation.
        folder = path
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise UsageError(f"--out needs '{path}' to be a folder, but '{folder}' is a file")
    if not overwrite:
        existing = [p for p in paths if p.exists()]
        if existing:
            raise RuntimeFailure(
                f"output file '{existing[0]}' exists", "pass --overwrite to replace it, or choose --out"
            )
    return paths


# ----------------------------------------------------------------------------------------------------------------------
# Progress on stderr
# ----------------------------------------------------------------------------------------------------------------------


class StageBars:
    """One tqdm bar per stage (prior, decoder, decode) on stderr; each closes when its stage finishes."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None
        self.stage: str | None = None

    def __call__(self, stage: str, step: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if self.bar is None or stage != self.stage or step <= self.bar.n:
            self.close()
            self.bar = tqdm(
                total=total, desc=f"{stage:>7}", unit="step", file=sys.stderr, leave=False, dynamic_ncols=True
            )
            self.stage = stage
        self.bar.update(step - self.bar.n)
        if step >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _note(args: argparse.Namespace, text: str) -> None:
    if not getattr(args, "quiet", False):
        print(text, file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------------------------


def _make_tiny(args: argparse.Namespace) -> int:
    from kandinsky22.tiny import REPO_NAMES, make_tiny_repos

    root = Path(args.dir).expanduser()
    if root.exists() and not root.is_dir():
        raise UsageError(f"DIR '{root}' is a file; give a folder (it is created if missing)")
    existing = [root / name for name in REPO_NAMES if (root / name).exists()]
    if existing and not args.overwrite:
        raise RuntimeFailure(f"'{existing[0]}' exists", "pass --overwrite to replace it, or choose another DIR")
    started = time.perf_counter()
    repos = make_tiny_repos(root)
    if args.json:
        print(json.dumps({name: str(path) for name, path in repos.items()}))
    else:
        for name, path in repos.items():
            print(f"{name:>16}: {path}")
        print(
            f"wrote tiny random-weight checkpoints in {time.perf_counter() - started:.1f}s; they draw noise, not "
            f'pictures. Try: {PROG} generate "a red cat" --prior {repos["prior"]} --decoder {repos["decoder"]} '
            "--steps 4 --prior-steps 4 --width 256 --height 256 -o cat.png"
        )
    return 0


def apply_compile_cache(args: argparse.Namespace) -> None:
    """``--compile-cache``: checked (it needs ``--fast``; the folder must be one) and made this process's cache, its
    absolute path put back in ``args`` for the workers (``kandinsky22 batch``)."""
    if args.compile_cache is None:
        return
    if not args.fast:
        raise UsageError("--compile-cache needs --fast (only the fast path compiles)")
    from kandinsky22.fast import use_compile_cache

    try:
        args.compile_cache = str(use_compile_cache(args.compile_cache))
    except ValueError as err:
        raise UsageError(f"--compile-cache: {err}") from None


def _check_recipes_fit(jobs: list[Job], output_format: str | None, loras: Sequence[LoraSpec] = ()) -> None:
    """Each image's recipe must fit its file (:func:`kandinsky22.recipe.check_job_fits`), before the models run."""
    if output_format != "jpeg":  # the only format with a limit
        return
    from kandinsky22.recipe import check_job_fits

    records = [{"source": lora.source, "weight": lora.weight} for lora in loras]
    for job in jobs:
        try:
            check_job_fits(job, output_format, records)
        except ValueError as err:
            raise UsageError(f"--out (JPEG): {err}") from None


def _lora_specs(args: argparse.Namespace, recipe: dict[str, Any] | None) -> list[LoraSpec]:
    """``--lora`` as given, else (``--from-png``) the LoRAs the recipe records; local paths must exist (made
    absolute)."""
    where = ""
    if args.lora is not None:
        specs = args.lora
    elif recipe is not None:
        try:
            specs = specs_of_recipe(recipe)
        except ValueError as err:
            raise UsageError(f"{_from_option(args)}: the recipe of '{args.from_png}': {err}") from None
        where = f" (recorded in '{args.from_png}')"
    else:
        return []
    try:
        return checked_sources(specs)
    except LoraError as err:
        raise UsageError(f"{err}{where}") from None


def _load_loras(args: argparse.Namespace, engine: Any, recipe: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Find, read and hash the engine's LoRAs before the models load; with ``--from-png``, warn about a LoRA file that
    is not the one the image was made with."""
    try:
        records = engine.load_loras()
    except LoraError as err:
        raise UsageError(str(err)) from None
    except OSError as err:  # a hub failure: its message runs over several lines
        raise RuntimeFailure(
            " ".join(str(err).split()), "check the network and the --lora hub id, or pass a local LoRA file or folder"
        ) from err
    for loaded in engine.loras.load():
        read = "" if str(loaded.file) == loaded.spec.source else f": {loaded.file}"
        _note(args, f"lora {loaded.spec.source} (weight {loaded.spec.weight:g}){read}")
    if recipe is not None:
        for source in changed_loras(recipe, records):
            print(
                f"{PROG} {args.command}: warning: --lora {source}: the file is not the one '{args.from_png}' was made "
                "with (its SHA-256, or its adapter_config.json's, differs); the image may differ",
                file=sys.stderr,
            )
    return records


def _run_jobs(args: argparse.Namespace) -> int:
    apply_compile_cache(args)
    if args.compile_scope is not None and not args.fast:
        raise UsageError(f"--compile-scope {args.compile_scope} needs --fast (it says what the fast path compiles)")
    scope = args.compile_scope or "auto"
    sources, recipe = build_jobs(args)
    loras = _lora_specs(args, recipe)
    singles = [single for _, job in sources for single in job.expand()]
    paths = plan_outputs(args.out, singles, args.overwrite, args.format, args.quality)
    output_format = format_of(paths[0])
    _check_recipes_fit(singles, output_format, loras)
    _check_decoders(sources)  # after the checks that need no torch: a sampler's schedule needs it
    if recipe is not None:
        from kandinsky22.recipe import changed_inputs

        changed = changed_inputs(recipe, singles[0])
        if changed:
            _note(args, f"note: {', '.join(changed)} changed since '{args.from_png}' was made; the image will differ")

    started = time.perf_counter()
    from transformers.utils import logging as transformers_logging

    from kandinsky22.jobs import Engine, group_jobs
    from kandinsky22.recipe import make_recipe, save_image

    transformers_logging.disable_progress_bar()  # its per-file "Loading weights" bars; ours show the stages
    if args.quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()

    groups = group_jobs(singles, args.batch_size)
    # With --fast, the shapes of this run are compiled when the models load (a note says so), not in the middle of
    # the first step's progress bar; the prior's doubled batch only if a job has a negative prompt.
    shapes = sorted({(group[0].height, group[0].width, len(group)) for group in groups}) if args.fast else []
    negative = any(job.negative or job.negative_prior for job in singles)
    # --from-png: the recorded dtype unless --dtype is given (fp16, bf16 and fp32 give different pixels)
    dtype = args.dtype or (recipe or {}).get("dtype") or "auto"
    engine = Engine(
        device=args.device,
        dtype=dtype,
        fast=args.fast,
        warm_up=shapes,
        negative_prompts=negative,
        compile_scope=scope,
        on_load=lambda role, model: _note(
            args, f"loading {role} {model}" + ("" if Path(model).exists() else " (downloads on first use)")
        ),
        loras=loras,
    )
    _note(args, f"device {engine.device_name}, {engine.dtype_name}; seeds {', '.join(str(j.seed) for j in singles)}")
    lora_records = _load_loras(args, engine, recipe)
    if shapes:
        sizes = ", ".join(f"{width}x{height} ({n} per call)" for height, width, n in shapes)
        if scope == "none":
            _note(
                args,
                f"fast path: preparing {sizes} as the models load (no compilation; on a GPU: CUDA graphs, Triton norms)",
            )
        elif scope == "auto":
            _note(
                args,
                f"fast path: preparing {sizes} as the models load (on a GPU with Triton: CUDA graphs and Triton "
                "norms, seconds; elsewhere compiled, a minute or more per size on a GPU)",
            )
        else:
            _note(args, f"fast path: compiling for {sizes} as the models load (a minute or more per size on a GPU)")
    bars = StageBars(enabled=not args.quiet)
    index = {id(job): i for i, job in enumerate(singles)}
    records: list[dict[str, Any] | None] = [None] * len(singles)
    totals: dict[str, float] = {}
    try:
        for group in groups:
            try:
                results = engine.run(group, progress=bars)
            except IncompatibleJob as err:  # what the decoder's config told only once it loaded (a hub download)
                raise UsageError(str(err)) from None
            except LoraError as err:  # a LoRA whose modules are not in the models it adapts, or do not fit them
                raise UsageError(str(err)) from None
            bars.close()
            for job, result in zip(group, results):
                i = index[id(job)]
                recipe_of_image = make_recipe(result.job, engine.device_name, engine.dtype_name, lora_records)
                try:
                    paths[i].parent.mkdir(parents=True, exist_ok=True)
                    save_image(result.image, paths[i], recipe_of_image, output_format, args.quality)
                except ValueError as err:  # a recipe too long for a JPEG's Exif segment
                    raise RuntimeFailure(f"cannot write '{paths[i]}': {err}", "use --out with .png or .webp") from err
                except OSError as err:
                    raise RuntimeFailure(
                        f"cannot write '{paths[i]}': {err.strerror or err}", "check the --out folder and the free space"
                    ) from err
                records[i] = {
                    "path": str(paths[i]),
                    "seed": result.job.seed,
                    "task": result.job.task,
                    "prompt": result.job.prompt,
                    "width": result.image.width,
                    "height": result.image.height,
                    "timings": result.timings,
                }
                if not args.json:
                    stages = "  ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
                    print(f"{paths[i]}  seed {result.job.seed}  {result.image.width}x{result.image.height}  {stages}")
            for stage, seconds in results[0].timings.items():
                totals[stage] = totals.get(stage, 0.0) + seconds
    finally:
        bars.close()
    if engine.fast and not engine.fast_applied:
        _note(args, "note: --fast had no effect: these pipelines have no fast path yet")
    totals["total"] = time.perf_counter() - started
    if args.json:
        summary = {
            "version": __version__,
            "device": engine.device_name,
            "dtype": engine.dtype_name,
            "loras": lora_records,
            "images": records,
            "timings": {k: round(v, 4) for k, v in totals.items()},
        }
        print(json.dumps(summary))
    return 0


def _failure_of(err: BaseException) -> RuntimeFailure:
    """A runtime error as one line and a hint."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, RuntimeFailure):
        return err
    if "out of memory" in str(err).lower() or type(err).__name__ == "OutOfMemoryError":
        return RuntimeFailure(
            f"out of memory: {text}",
            "try --dtype fp16, a smaller --width/--height, a smaller --batch-size or --num-images, or --device cpu",
        )
    if isinstance(err, DeviceUnavailable):
        return RuntimeFailure(text, "use --device auto (CUDA, else mps, else the CPU) or --device cpu")
    if isinstance(err, FileNotFoundError):
        return RuntimeFailure(
            text, f"check the path; for models pass a folder or a hub id (`{PROG} make-tiny DIR` makes offline ones)"
        )
    if isinstance(err, OSError):
        # A hub failure quotes huggingface_hub's message, which runs over several lines: its first line alone stops
        # mid-sentence, before the advice. All of it, on one line.
        return RuntimeFailure(
            " ".join(str(err).split()) or text,
            "check the network and the hub id, or pass a local folder with --prior/--decoder",
        )
    return RuntimeFailure(f"{type(err).__name__}: {text}", "run again with --debug for the traceback")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error(f"choose a command: {', '.join([*COMMAND_TASKS, 'make-tiny', 'serve', 'batch'])} (see --help)")
    prog = f"{PROG} {args.command}"
    try:
        if args.command == "serve":
            from kandinsky22.server.command import serve

            return serve(args)
        if args.command == "batch":
            from kandinsky22.batch import run_command

            return run_command(args)
        return _make_tiny(args) if args.command == "make-tiny" else _run_jobs(args)
    except UsageError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # every runtime failure ends as one line and a hint; --debug shows where it came from
        if args.debug:
            traceback.print_exc()
        failure = _failure_of(err)
        print(f"{prog}: error: {failure}", file=sys.stderr)
        print(f"{prog}: hint: {failure.hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    # `python -m kandinsky22.cli` runs this file as __main__; batch and serve raise kandinsky22.cli's UsageError and
    # RuntimeFailure, which __main__'s handlers would not recognise (exit 1 and no hint): run that module's main.
    from kandinsky22.cli import main as module_main

    sys.exit(module_main())
