"""Scaling out on Ray (the ``ray`` extra): bulk generation on Ray Data (:mod:`~kandinsky22.scale.ray_batch`) and the
HTTP server as a Ray Serve application (:mod:`~kandinsky22.scale.ray_serve`).

Importing these modules is cheap: ``ray`` is imported only when a command runs with ``--ray``, so the package works
without the extra.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from typing import Any

# Seconds to wait for the cluster's GCS port to accept a connection before ray.init is called.
CONNECT_TIMEOUT_S = 10.0


@contextlib.contextmanager
def connected(address: str | None) -> Iterator[Any]:
    """``ray``, joined to the cluster at ``address`` (see ``ray.init``) for the duration of the block.

    A process that has joined a cluster already (a test, a notebook) stays on it, and stays joined afterwards.
    """
    from kandinsky22.cli import RuntimeFailure, UsageError

    try:
        import ray
    except ImportError as err:
        raise RuntimeFailure("--ray needs Ray, which is not installed", 'pip install "kandinsky22[ray]"') from err

    if ray.is_initialized():
        yield ray
        return
    hint = "check --ray ADDRESS: auto needs a running cluster (`ray start --head`), local starts one here"
    try:
        _check_reachable(address)
        ray.init(address=address)
    except ConnectionError as err:  # an OSError, whose generic hint (the hub) would mislead
        raise RuntimeFailure(f"cannot join the Ray cluster at {address or 'the default address'}: {err}", hint) from err
    except ValueError as err:  # Ray's word on an address it cannot parse ("Invalid address format: …")
        raise UsageError(f"--ray {address!r} is not a Ray address: {err}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _check_reachable(address: str | None) -> None:
    """``ConnectionError`` when nothing listens at the cluster address ``ray.init`` would join.

    ``ray.init`` retries an address where nothing listens forever, deaf to Ctrl-C and SIGTERM, so the address it
    would use (``address``, or ``$RAY_ADDRESS``, or the latest local cluster's) is tried here first. Ray Client
    addresses (``ray://``) are left to Ray, which gives up after 30 s by itself.
    """
    from ray._private.services import canonicalize_bootstrap_address  # what ray.init calls (ray is pinned)

    if "://" in (address or os.environ.get("RAY_ADDRESS", "")) or address == "local":
        return
    bootstrap = canonicalize_bootstrap_address(address)  # ValueError for a malformed address
    if bootstrap is None:  # no cluster to join: ray.init starts one here
        return
    host, _, port = bootstrap.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise ConnectionError(f"nothing answers at {bootstrap} ({err.strerror or err})") from None


def default_gpus(ray: Any, requested: float | None) -> float:
    """The GPUs each worker asks for: ``requested``, or one where the cluster has GPUs and none where it has not."""
    if requested is not None:
        return requested
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
