"""The seam between the trainer and its data: ``BagSource`` (chosen once from ``training.mode``
by ``training.train.open_bag_source``), a step's forward passes (``Pass``) and a stage's
optimiser and schedule (``Schedule``)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from bidistill.models import Method
from bidistill.models.batch import Batch


def warmup_cosine(optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up to the base LR, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass(frozen=True)
class Pass:
    """One forward pass of a step: its bags (on the device), the torch seed to draw its dropout
    from (None: the running generator) and the number of passes of its step."""

    batch: Batch
    seed: int | None = None
    passes: int = 1


@dataclass
class Schedule:
    """A stage's optimiser and learning-rate schedule (stepped per step or per epoch); the
    epochs of its warm-up are no candidates for selection."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    per_step: bool
    warmup_epochs: int = 0


@dataclass(frozen=True)
class Patients:
    """The patients of one split, in the order a source predicts them."""

    ids: list[str]
    labels: np.ndarray  # int [n]
    clinical_present: np.ndarray  # bool [n]


class BagSource(Protocol):
    """What the trainer needs of a mode's data (see the module docstring)."""

    in_dim: int  # D, the method's instance dimension
    patch_encoder: Callable[[], nn.Module] | None  # builds a trainable patch encoder, or None
    precision: torch.dtype  # of the forward passes
    resumable: bool  # keeps its state at epoch boundaries
    patients: dict[str, Patients]  # train, val, test

    def start(self, method: Method, device: torch.device) -> None:
        """Ready the bags for ``method`` (built with ``in_dim`` and ``patch_encoder``)."""

    def cpu_threads(
        self, method: Method, device: torch.device
    ) -> contextlib.AbstractContextManager:
        """The torch threads that suit a step's work (``training.threads``)."""

    def schedule(self, method: Method, epochs: int, steps: int) -> Schedule:
        """A stage's optimiser and schedule over the method's trainable parameters."""

    def steps_per_epoch(self) -> int: ...

    def train_steps(self, drawn: int) -> Iterator[Iterator[Pass]]:
        """One pass's steps over the training patients, each its forward passes; ``drawn``
        (passes run before) draws the bags."""

    def probabilities(
        self, method: Method, split: str, *, final: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """P(label = 1) per patient of ``split`` with clinical data given and withheld;
        ``final``: the predictions table's (whole bags, in bounded memory)."""

    def meta(self) -> dict[str, Any]:
        """The source's ``model.json`` blocks (``features``, ``end_to_end``)."""

    def fingerprint(self) -> str:
        """What the weights depend on beyond the settings and the patients' rows."""

    def close(self) -> None: ...
