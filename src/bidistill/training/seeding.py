"""Seeding: same config + same seed ⇒ the same numbers on CPU."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed the global random states of Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: each loader worker's NumPy/Python seeds from torch's (which is
    ``base_seed + worker_id``); they would otherwise repeat the parent's state in every worker."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
