"""Session fixtures: the tiny reference-built repositories of ``tests/tiny_repos.py``, built once per xdist worker."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ holds tiny_repos.py (no package __init__)

import tiny_repos  # noqa: E402

# Under pytest-xdist every worker would start one intra-op thread per core: with 2 workers on 2 cores the OpenMP
# threads oversubscribe the cores and spin-wait, which makes these tiny models 5-10x slower (measured: 0.5 s vs 4 s
# for a 2-step text2img call). One thread per worker keeps the cores busy without contention.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


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


# Loaded pipelines, shared read-only by the tests of a worker. A test that changes a pipeline (scheduler, offload,
# dtype) builds its own from ``pipe.components`` or loads a fresh one.


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def ref_prior(prior_repo: Path):
    import diffusers

    return _quiet(diffusers.KandinskyV22PriorPipeline.from_pretrained(prior_repo))


@pytest.fixture(scope="session")
def our_prior(prior_repo: Path):
    from kandinsky22 import KandinskyV22PriorPipeline

    return _quiet(KandinskyV22PriorPipeline.from_pretrained(prior_repo))


@pytest.fixture(scope="session")
def ref_decoder(decoder_repo: Path):
    import diffusers

    return _quiet(diffusers.KandinskyV22Pipeline.from_pretrained(decoder_repo))


@pytest.fixture(scope="session")
def our_decoder(decoder_repo: Path):
    from kandinsky22 import KandinskyV22Pipeline

    return _quiet(KandinskyV22Pipeline.from_pretrained(decoder_repo))
