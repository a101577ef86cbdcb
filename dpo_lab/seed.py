"""The project's one seed function: same seed, same numbers on the same machine."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch.Generator seeded the same way. Deterministic algorithms
    are requested with ``warn_only``: CPU runs are bit-exact, and GPU kernels without one still run."""
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 -- libraries that draw from the legacy global state
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.Generator().manual_seed(seed)
