"""Scaling out on Ray (the ``ray`` extra): bulk generation on Ray Data (:mod:`~kandinsky22.scale.ray_batch`) and the
HTTP server as a Ray Serve application (:mod:`~kandinsky22.scale.ray_serve`).

Importing these modules is cheap: ``ray`` is imported only when a command runs with ``--ray``, so the package works
without the extra.
"""

from __future__ import annotations

from typing import Any


def connect(address: str | None) -> Any:
    """Join the Ray cluster at ``address`` (see ``ray.init``), unless this process is already connected to one."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address)
    return ray


def default_gpus(ray: Any, requested: float | None) -> float:
    """The GPUs each worker asks for: ``requested``, or one where the cluster has GPUs and none where it has not."""
    if requested is not None:
        return requested
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
