"""``kandinsky22 serve``: its arguments (importing this module is cheap) and the command itself.

The command binds the socket itself and prints the address it got, so ``--port 0`` (any free port) is usable by
scripts and tests; it logs ``ready`` once the models are loaded.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys

from kandinsky22.jobs import (
    COMPILE_SCOPES,
    CONTROLNET_REPO,
    DECODER_REPO,
    INPAINT_REPO,
    MAX_IMAGES,
    MAX_SIDE,
    MAX_STEPS,
    PRIOR_REPO,
    IncompatibleJob,
    check_decoder_option,
)
from kandinsky22.lora_specs import LoraError, checked_sources, lora_argument

API_KEY_ENV = "KANDINSKY22_API_KEY"
DEFAULT_PORT = 8000


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 (any free port) to 65535, got {text!r}")
    return int(text)


def _device(text: str) -> str:
    from kandinsky22.cli import DEVICE_PATTERN  # argparse only: cheap to import

    if not DEVICE_PATTERN.match(text):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda, cuda:N or mps, got {text!r}")
    return text


def _sizes(text: str) -> list[tuple[int, int]]:
    if text.strip().lower() == "none":
        return []
    sizes = []
    for part in text.split(","):
        width, sep, height = part.strip().lower().partition("x")
        if not (
            sep and width.isdigit() and height.isdigit() and 0 < int(width) <= MAX_SIDE and 0 < int(height) <= MAX_SIDE
        ):
            raise argparse.ArgumentTypeError(
                f"must be WIDTHxHEIGHT sizes up to {MAX_SIDE}, separated by commas (e.g. 512x512,768x768), or 'none'; "
                f"got {text!r}"
            )
        sizes.append((int(width), int(height)))
    return sizes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``serve`` options, on ``parser``."""
    net = parser.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    net.add_argument("--port", type=_port, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free)")
    net.add_argument(
        "--api-key",
        help=f"require this key on every route but /v1/health (default: ${API_KEY_ENV} if set; prefer the variable, "
        "a command line is visible to other users of the machine)",
    )
    models = parser.add_argument_group("models")
    models.add_argument("--prior", default=PRIOR_REPO, help="prior hub id or folder (default: the official prior)")
    models.add_argument("--decoder", default=DECODER_REPO, help="decoder for text2img, img2img and mix")
    models.add_argument("--inpaint-decoder", help=f"inpainting decoder: serves inpaint (e.g. {INPAINT_REPO})")
    models.add_argument("--depth-decoder", help=f"controlnet-depth decoder: serves depth (e.g. {CONTROLNET_REPO})")
    models.add_argument(
        "--lora",
        action="append",
        type=lora_argument,
        metavar="SOURCE[:WEIGHT]",
        help="load a LoRA (repeat for several), applied at WEIGHT unless a request's 'loras' chooses otherwise: a "
        ".safetensors/.bin file, a folder holding one, or a hub id; WEIGHT (default 1) after the last ':'. Listed by "
        "/v1/models and recorded in each image's recipe",
    )
    models.add_argument("--device", type=_device, default="auto", help="auto (cuda, mps, cpu), cpu, cuda[:N] or mps")
    models.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto", help="auto: fp16 on GPUs")
    fast = models.add_mutually_exclusive_group()
    fast.add_argument(
        "--no-fast", action="store_true", help="do not use the pipelines' fast path (on by default on CUDA)"
    )
    fast.add_argument("--fast", action="store_true", help="use the fast path on any device (default: on CUDA only)")
    models.add_argument(
        "--warm-up",
        type=_sizes,
        metavar="SIZES",
        help="WIDTHxHEIGHT[,WIDTHxHEIGHT...] the fast path warms up at start-up, each for 1 and --max-batch images "
        "per call (seconds each with Triton on the GPU; compiled, a minute or more); other sizes and batch sizes run "
        "eagerly instead of compiling while "
        "requests wait. 'none': compile nothing, everything runs eagerly (default 512x512, the API's default size)",
    )
    models.add_argument(
        "--compile-backend",
        choices=("inductor", "aot_eager", "eager"),
        default="inductor",
        help="torch.compile backend of the fast path (default inductor; the others only trace, for checks)",
    )
    models.add_argument(
        "--compile-scope",
        choices=COMPILE_SCOPES,
        default="auto",
        help="what the fast path compiles: auto (default: none on a GPU where Triton runs, else blocks), blocks "
        "(each repeated block once per shape), model (each model whole: a longer warm-up), none (nothing: fused "
        "projections, CUDA graphs and Triton GroupNorms only, no compilation at start-up)",
    )
    models.add_argument(
        "--compile-cache",
        metavar="DIR",
        help="keep the fast path's torch.compile caches in DIR (default: torch's, in the temporary folder): a restart "
        "with the same models, --warm-up and torch reads them instead of compiling (seconds instead of minutes); "
        "use a folder that outlives the machine's temporary files, e.g. a container volume (with --ray: a path valid on "
        "every replica's node)",
    )
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-batch", type=_positive, default=4, help="images per pipeline call (default 4)")
    limits.add_argument(
        "--batch-invariant",
        action="store_true",
        help="run every pipeline call with --max-batch images (padding with throwaway copies), so that an image is "
        "bit-identical whatever it was batched with. Without it an image looks the same but some pixel values may "
        "differ by a level or a few (more in fp16), since matmul kernels choose their summation order by batch size. "
        "Costs compute when the queue is short",
    )
    limits.add_argument("--max-queue", type=_positive, default=64, help="jobs waiting before 429 (default 64)")
    limits.add_argument(
        "--max-n", type=_positive, default=4, help=f"images per request, up to {MAX_IMAGES} (default 4)"
    )
    limits.add_argument("--max-side", type=_positive, default=1024, help=f"pixels, up to {MAX_SIDE} (default 1024)")
    limits.add_argument("--max-steps", type=_positive, default=150, help=f"steps, up to {MAX_STEPS} (default 150)")
    limits.add_argument("--max-body-mb", type=_positive, default=20, help="request body size in MiB (default 20)")
    limits.add_argument("--result-ttl", type=_positive, default=3600, help="seconds results are kept (default 3600)")
    limits.add_argument("--max-results", type=_positive, default=256, help="finished jobs kept (default 256)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(args: argparse.Namespace) -> int:
    """Run the server until interrupted; 2 for a bad argument, 1 when the address cannot be bound."""
    import uvicorn

    from kandinsky22.server.app import ServerConfig, create_app
    from kandinsky22.server.schemas import Limits

    prog = "kandinsky22 serve"
    from kandinsky22.batch import needs_ray
    from kandinsky22.scale.ray_serve import ray_options_given  # argparse only, no ray

    given = ray_options_given(args)
    if getattr(args, "ray", None) is None and given:
        print(
            f"{prog}: error: {needs_ray(given)} (Ray Serve's model replicas; without it, this process serves alone)",
            file=sys.stderr,
        )
        return 2
    if args.max_side > MAX_SIDE or args.max_steps > MAX_STEPS or args.max_n > MAX_IMAGES:
        print(
            f"{prog}: error: --max-side is at most {MAX_SIDE}, --max-steps at most {MAX_STEPS} and --max-n at most "
            f"{MAX_IMAGES}; got {args.max_side}, {args.max_steps} and {args.max_n}",
            file=sys.stderr,
        )
        return 2
    # The default is the API's default size, when requests may have it; a size given that no request can have is a mistake.
    warm_up = args.warm_up if args.warm_up is not None else [(512, 512)] if args.max_side >= 512 else []
    too_large = [f"{width}x{height}" for width, height in warm_up if max(width, height) > args.max_side]
    if too_large:
        print(
            f"{prog}: error: --warm-up {', '.join(too_large)} is larger than --max-side {args.max_side}: no request "
            "could use it",
            file=sys.stderr,
        )
        return 2
    if args.compile_cache is not None:
        if args.no_fast:
            print(
                f"{prog}: error: --compile-cache has no use with --no-fast (only the fast path compiles)",
                file=sys.stderr,
            )
            return 2
        from kandinsky22.fast import use_compile_cache

        try:  # here, so that a folder that cannot be one is an argument error (the model loader uses it: Ray replicas)
            args.compile_cache = str(use_compile_cache(args.compile_cache))
        except ValueError as err:
            print(f"{prog}: error: --compile-cache: {err}", file=sys.stderr)
            return 2
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not _is_loopback(args.host) and api_key is None:
        print(
            f"{prog}: warning: listening on {args.host} without an API key: anyone who can reach it can use it",
            file=sys.stderr,
        )
    decoders = {"text2img": args.decoder, "img2img": args.decoder, "mix": args.decoder}
    if args.inpaint_decoder:
        decoders["inpaint"] = args.inpaint_decoder
    if args.depth_decoder:
        decoders["depth"] = args.depth_decoder
    for option, task in (("--decoder", "text2img"), ("--inpaint-decoder", "inpaint"), ("--depth-decoder", "depth")):
        try:  # now, from its config file where it can be read, not once the server has loaded the others
            if task in decoders:
                check_decoder_option(task, decoders[task], option)
        except IncompatibleJob as err:
            print(f"{prog}: error: {err}", file=sys.stderr)
            return 2
    try:  # a local file or folder that is not there: now, not once the models are loading
        loras = checked_sources(args.lora or [])
    except LoraError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    config = ServerConfig(
        prior=args.prior,
        decoders=decoders,
        loras=loras,
        device=args.device,
        dtype=args.dtype,
        fast=False if args.no_fast else True if args.fast else None,
        warm_up=warm_up,
        compile_backend=args.compile_backend,
        compile_scope=args.compile_scope,
        compile_cache=args.compile_cache,
        batch_invariant=args.batch_invariant,
        api_key=api_key,
        limits=Limits(
            max_batch=args.max_batch,
            max_queue=args.max_queue,
            max_n=args.max_n,
            max_side=args.max_side,
            max_steps=args.max_steps,
            max_body_bytes=args.max_body_mb * 1024 * 1024,
            result_ttl_s=float(args.result_ttl),
            max_results=args.max_results,
        ),
    )
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if getattr(args, "ray", None) is not None:
        from kandinsky22.scale.ray_serve import serve_on_ray  # Ray only with --ray: the plain server needs none

        return serve_on_ray(args, config)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as err:
        print(f"{prog}: error: cannot listen on {args.host}:{args.port}: {err.strerror}", file=sys.stderr)
        return 1
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    print(f"{prog}: listening on http://{shown}:{port}/ (models loading; GET /v1/health says when ready)", flush=True)
    server = uvicorn.Server(uvicorn.Config(create_app(config), log_level=args.log_level, timeout_graceful_shutdown=10))
    server.run(sockets=[sock])
    return 0
