"""Session fixtures: the tiny reference-built repositories of ``tests/tiny_repos.py``, built once per xdist worker."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ holds tiny_repos.py (no package __init__)

import tiny_repos  # noqa: E402


@pytest.fixture(scope="session")
def prior_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_repos.build_prior_repo(tmp_path_factory.mktemp("repos") / "prior")


@pytest.fixture(scope="session")
def decoder_repo(tmp_path_factory: pytest.TempPathFactory, prior_repo: Path) -> Path:
    """Tiny decoder repo whose README names ``prior_repo`` (the connected-pipe mechanism)."""
    return tiny_repos.build_decoder_repo(tmp_path_factory.mktemp("repos") / "decoder", prior_repo)


@pytest.fixture(scope="session")
def inpaint_repo(tmp_path_factory: pytest.TempPathFactory, prior_repo: Path) -> Path:
    return tiny_repos.build_inpaint_repo(tmp_path_factory.mktemp("repos") / "decoder-inpaint", prior_repo)


@pytest.fixture(scope="session")
def controlnet_repo(tmp_path_factory: pytest.TempPathFactory, prior_repo: Path) -> Path:
    return tiny_repos.build_controlnet_repo(tmp_path_factory.mktemp("repos") / "controlnet-depth", prior_repo)
