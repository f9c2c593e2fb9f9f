"""``kandinsky22 serve --ray``: its extra arguments (importing this module is cheap) and the command.

The application itself is in :mod:`kandinsky22.scale.serve_app`. The command deploys it on the cluster, prints the
address, and deletes it again when interrupted (Ctrl-C or SIGTERM), as the plain server stops with its process.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
from typing import TYPE_CHECKING, Any

from kandinsky22.batch import add_ray_address_argument, resource_amount

if TYPE_CHECKING:
    from kandinsky22.server.app import ServerConfig

PROG = "kandinsky22 serve"
STOP_TIMEOUT_S = 30.0
# The --ray options (argparse destinations) and their defaults. argparse leaves them None, so that one given without
# --ray is an error instead of being silently ignored; --gpus-per-replica's default depends on the cluster.
RAY_OPTION_DEFAULTS: dict[str, float | None] = {
    "min_replicas": 1,
    "max_replicas": 1,
    "gpus_per_replica": None,
    "cpus_per_replica": 1.0,
    "target_ongoing_requests": 1.0,
    "downscale_delay": 600.0,
}


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 0, got {text!r}")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--ray`` options of ``serve``, on ``parser``."""
    ray = parser.add_argument_group("Ray Serve (one ingress replica; model replicas autoscaled on the cluster)")
    add_ray_address_argument(ray, "serve")
    ray.add_argument("--min-replicas", type=_count, help="model replicas kept up, 0 allowed (default 1)")
    ray.add_argument("--max-replicas", type=_count, help="model replicas at most (default 1)")
    ray.add_argument(
        "--gpus-per-replica",
        type=resource_amount,
        help="GPUs per model replica (default: 1 if the cluster has GPUs, else 0)",
    )
    ray.add_argument("--cpus-per-replica", type=resource_amount, help="CPUs per model replica (default 1)")
    ray.add_argument(
        "--target-ongoing-requests",
        type=resource_amount,
        help="pipeline calls per replica (running or waiting) the autoscaler aims at (default 1)",
    )
    ray.add_argument(
        "--downscale-delay", type=resource_amount, help="seconds of low load before removing a replica (600)"
    )


def ray_options_given(args: argparse.Namespace) -> list[str]:
    """The --ray options given on the command line, as written there (``--min-replicas``)."""
    return ["--" + dest.replace("_", "-") for dest in RAY_OPTION_DEFAULTS if getattr(args, dest, None) is not None]


def serve_on_ray(args: argparse.Namespace, config: ServerConfig) -> int:
    """Deploy on the cluster of ``args.ray`` and wait until interrupted; 2 for bad replica counts."""
    for dest, default in RAY_OPTION_DEFAULTS.items():
        if getattr(args, dest, None) is None:
            setattr(args, dest, default)
    if args.max_replicas < max(1, args.min_replicas):
        print(f"{PROG}: error: --max-replicas must be at least 1 and at least --min-replicas", file=sys.stderr)
        return 2
    if args.target_ongoing_requests <= 0:
        print(f"{PROG}: error: --target-ongoing-requests must be above 0", file=sys.stderr)
        return 2
    from kandinsky22.scale import connected

    with connected(args.ray or None) as ray:
        _deploy_and_wait(ray, args, config)
    return 0


def _deploy_and_wait(ray: Any, args: argparse.Namespace, config: ServerConfig) -> None:
    from ray import serve

    from kandinsky22.scale import default_gpus
    from kandinsky22.scale.serve_app import APP_NAME, ReplicaOptions, build_app, replica_error

    replicas = ReplicaOptions(
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        gpus_per_replica=default_gpus(ray, args.gpus_per_replica),
        cpus_per_replica=args.cpus_per_replica,
        target_ongoing_requests=args.target_ongoing_requests,
        downscale_delay_s=args.downscale_delay,
    )
    # Ray Serve's proxy needs a port number: --port 0 takes one that is free now.
    port = args.port or _free_port(args.host)
    serve.start(http_options={"host": args.host, "port": port})
    # Serve outlives the command on the cluster (a second run finds it running) and keeps the address it started
    # with, ignoring the one asked for here: serve there, or say so when a given address cannot be had.
    from ray.serve.context import _get_global_client

    http = _get_global_client().http_config
    if (http.host, http.port) != (args.host, port):
        if args.port:
            from kandinsky22.cli import RuntimeFailure

            raise RuntimeFailure(
                f"Ray Serve already runs on this cluster, on {http.host}:{http.port}, not --host {args.host} "
                f"--port {args.port}",
                f"pass --host {http.host} --port {http.port}, or --port 0, or stop it first (`serve shutdown`)",
            )
        port = http.port
    host = http.host
    _refuse_a_second_server(serve.status().applications, host, port)
    # SIGTERM ends the process through the `finally` below, so the application does not outlive the command.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        try:
            serve.run(build_app(config, replicas), name=APP_NAME, route_prefix="/")
        except RuntimeError as err:  # "Deploying application … failed": the replicas' own error says why
            from kandinsky22.cli import RuntimeFailure

            raise RuntimeFailure(
                f"the model replicas could not start: {replica_error() or err}",
                "check --prior and the decoders: folders readable on every node, or hub ids (--debug shows more)",
            ) from err
        shown = f"[{host}]" if ":" in host else host
        print(
            f"{PROG}: listening on http://{shown}:{port}/ (Ray Serve application '{APP_NAME}', "
            f"{replicas.min_replicas} to {replicas.max_replicas} model replica(s) with "
            f"{replicas.gpus_per_replica:g} GPU(s) each; GET /v1/health says when ready)",
            flush=True,
        )
        # From here Ctrl-C and SIGTERM only set a flag that the main thread polls: Python runs a signal handler
        # between bytecodes of the main thread, which a poll gives it at least twice a second, whatever Ray's own
        # threads are doing (an untimed wait left a SIGINT unanswered for minutes once, on a loaded machine).
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        # Bounded: when the cluster goes down too (a local one, signalled with this process group), the deletion
        # would wait for it forever.
        stopper = threading.Thread(target=serve.delete, args=(APP_NAME,), daemon=True)
        stopper.start()
        stopper.join(STOP_TIMEOUT_S)


def _refuse_a_second_server(applications: dict[str, Any], host: str, port: int) -> None:
    """A cluster serves one ``kandinsky22 serve --ray``: Ray Serve has one HTTP address per cluster, and deploying
    the application again under its name would replace the running one (its models, its queue and its jobs), which
    its own command would then delete on exit. Refused, naming the running one, before anything is deployed."""
    from kandinsky22.scale.serve_app import APP_NAME

    if APP_NAME not in applications:
        return
    from kandinsky22.cli import RuntimeFailure

    shown = f"[{host}]" if ":" in host else host
    status = getattr(applications[APP_NAME], "status", None)
    status = str(getattr(status, "value", status) or "").lower()
    raise RuntimeFailure(
        f"a kandinsky22 server already runs on this Ray cluster (Ray Serve application '{APP_NAME}'"
        f"{', ' + status if status else ''}, at http://{shown}:{port}/); a cluster serves one, and a second would "
        "replace it",
        f"use that server, or stop it first: Ctrl-C its `{PROG} --ray` command, or, if that command is gone, "
        f"`serve delete {APP_NAME}`; or serve on another Ray cluster",
    )


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
