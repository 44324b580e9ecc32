"""Transient progress bars: shown while the work runs, gone after it."""

from __future__ import annotations

from collections.abc import Iterable


def transient_track(sequence: Iterable, description: str) -> Iterable:
    """``rich.progress.track`` that leaves nothing behind. Off where the output is no terminal
    (a pipe, a log file, a test): there rich cannot erase the bar and leaves a blank line."""
    from rich.console import Console
    from rich.progress import track

    console = Console()
    return track(
        sequence,
        description=description,
        transient=True,
        console=console,
        disable=not console.is_terminal,
    )
