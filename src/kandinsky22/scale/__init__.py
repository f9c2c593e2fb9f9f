"""Scaling out on Ray (the ``ray`` extra): bulk generation on Ray Data (:mod:`~kandinsky22.scale.ray_batch`) and the
HTTP server as a Ray Serve application (:mod:`~kandinsky22.scale.ray_serve`).

Importing these modules is cheap: ``ray`` is imported only when a command runs with ``--ray``, so the package works
without the extra.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def connected(address: str | None) -> Iterator[Any]:
    """``ray``, joined to the cluster at ``address`` (see ``ray.init``) for the duration of the block.

    A process that has joined a cluster already (a test, a notebook) stays on it, and stays joined afterwards.
    """
    from kandinsky22.cli import RuntimeFailure

    try:
        import ray
    except ImportError as err:
        raise RuntimeFailure("--ray needs Ray, which is not installed", 'pip install "kandinsky22[ray]"') from err

    if ray.is_initialized():
        yield ray
        return
    try:
        ray.init(address=address)
    except ConnectionError as err:  # an OSError, whose generic hint (the hub) would mislead
        raise RuntimeFailure(
            f"cannot join the Ray cluster at {address or 'the default address'}: {err}",
            "check --ray ADDRESS: auto needs a running cluster (`ray start --head`), local starts one here",
        ) from err
    try:
        yield ray
    finally:
        ray.shutdown()


def default_gpus(ray: Any, requested: float | None) -> float:
    """The GPUs each worker asks for: ``requested``, or one where the cluster has GPUs and none where it has not."""
    if requested is not None:
        return requested
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
