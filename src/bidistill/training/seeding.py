"""Seeding: same config + same seed ⇒ the same numbers on CPU."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch generator for the data loader's shuffling.

    Side effects: sets the global random states of ``random``, ``numpy`` and ``torch``.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: derive each loader worker's NumPy/Python seeds from torch's.

    torch already gives every worker ``base_seed + worker_id``, drawn from the loader's
    generator; NumPy and ``random`` would otherwise repeat the parent's state in every worker.
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
