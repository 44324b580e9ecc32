"""The training progress line, the same for both trainers (features and end to end).

One line per stage, readable at 80 columns: the method (and stage), the epoch counter, a short
bar over the epoch's steps, the running loss and the best validation score so far (each
selected part's, e.g. BD's branches), or "–" before the first epoch that can be selected.
"""

from __future__ import annotations

import logging
import math

log = logging.getLogger(__name__)

NO_SCORE = "–"


def describe_best(best: dict[str, float]) -> str:
    """``best 0.861``, or per part ``best multi 0.861 single 0.730``; "–" where none yet."""

    def shown(score: float) -> str:
        return f"{score:.3f}" if math.isfinite(score) else NO_SCORE

    if len(best) == 1:
        return f"best {shown(next(iter(best.values())))}"
    return "best " + " ".join(f"{part} {shown(score)}" for part, score in best.items())


class EpochBar:
    """A rich progress line over one epoch's steps (on stderr, with the other messages)."""

    def __init__(self, enabled: bool, label: str, parts: list[str] | None = None):
        self.enabled = enabled
        self.label = label
        self.best = describe_best({part: -math.inf for part in parts or [label]})
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn

            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(bar_width=10),
                TextColumn("{task.fields[status]}"),
                console=Console(stderr=True),
            )

    def __enter__(self) -> EpochBar:
        if self.enabled:
            self.progress.start()
            self.task = self.progress.add_task(self.label, total=1, status="")
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.progress.stop()

    def note(self, text: str) -> None:
        """A line above the bar (and in the log)."""
        log.info(text)
        if self.enabled:
            self.progress.console.print(text, highlight=False)

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        """``epoch`` counts from 1."""
        if self.enabled:
            self.progress.reset(
                self.task,
                total=steps,
                description=f"{self.label} epoch {epoch}/{epochs}",
                status=self.best,
            )

    def advance(self, running_loss: float) -> None:
        if self.enabled:
            self.progress.update(self.task, advance=1, status=self._status(running_loss))

    def finish_epoch(self, loss: float, best: dict[str, float]) -> None:
        """``best``: each selected part's best validation score so far (-inf: none yet)."""
        self.best = describe_best(best)
        if self.enabled:
            self.progress.update(self.task, status=self._status(loss))

    def _status(self, loss: float) -> str:
        return f"loss {loss:.4f}  {self.best}"
