"""Suite-wide settings: one torch thread per xdist worker (CI runs `pytest -n 2` on 2 cores; more threads only thrash)."""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
