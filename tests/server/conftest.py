"""Fixtures of the server tests: tiny checkpoints (built once for all xdist workers) and ``kandinsky22 serve``
processes (see server_harness.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from filelock import FileLock
from server_harness import API_KEY, Server, limit_args, model_args


@pytest.fixture(scope="session")
def tiny_repos(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> dict[str, Path]:
    """``make_tiny_repos`` output, built once per test session and shared by the xdist workers."""
    from kandinsky22.tiny import make_tiny_repos

    base = tmp_path_factory.getbasetemp()
    root = (base if worker_id == "master" else base.parent) / "server-tiny-repos"
    with FileLock(f"{root}.lock"):
        done = root / "done.json"
        if not done.exists():
            repos = make_tiny_repos(root)
            done.write_text(json.dumps({name: str(path) for name, path in repos.items()}))
    return {name: Path(path) for name, path in json.loads(done.read_text()).items()}


@pytest.fixture(scope="session")
def server(tiny_repos: dict[str, Path]):
    server = Server([*model_args(tiny_repos), *limit_args()])
    yield server
    server.stop()


@pytest.fixture(scope="session")
def other_server(tiny_repos: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """The options the main server does not use, in one process (each start costs seconds of CPU): an API key
    (from the environment), --batch-invariant and the fast path with a warm-up (compiled with torch.compile's
    "eager" backend, which traces without generating kernels) and a compile cache folder. Its client sends the key
    unless a request gives other headers."""
    args = ["--prior", str(tiny_repos["prior"]), "--decoder", str(tiny_repos["decoder"]), *limit_args()]
    cache = tmp_path_factory.mktemp("compile-cache") / "new"
    server = Server(
        [*args, "--batch-invariant", "--fast", "--compile-backend", "eager", "--warm-up", "64x64"]
        + ["--compile-cache", str(cache)],
        env={"KANDINSKY22_API_KEY": API_KEY},
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    server.compile_cache = cache
    yield server
    server.stop()
