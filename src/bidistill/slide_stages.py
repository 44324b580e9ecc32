"""The per-slide stage runner that `tile` and `extract` share.

A per-slide stage writes one file per slide, atomically, so a file that exists is a slide that is
done: the runner keeps this shard's slides, skips the done ones, runs the rest (in a process
pool when parallel) and records each outcome. A failure stops the stage with an error that names
``--skip-errors``; with it, the failures are listed once, at the end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, TypeVar

from bidistill._text import count
from bidistill.errors import BidistillError, ConfigError, SlideError

log = logging.getLogger(__name__)

Job = TypeVar("Job")

SKIP_ERRORS_HINT = (
    "pass --skip-errors to go on past slides that fail (they are listed at the end, and the "
    "slides done are kept)"
)


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: a slide belongs to shard ``crc32(slide id) mod count``.

    A slide's shard depends on its id alone (not on the other slides, nor on which are done), so
    no two shards write the same file, even array jobs started at different times.
    """

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ConfigError(f"shard {self.index}/{self.count}: expected 0 <= i < n")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"i/n"`` (0-based: ``0/2`` and ``1/2`` are the two halves)."""
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise ConfigError(
                f"--shard {text!r}: expected i/n with 0 <= i < n, e.g. --shard 0/4"
            ) from None
        return cls(index, count)

    @classmethod
    def from_env(cls) -> Shard | None:
        """The torchrun process's shard (``RANK`` of ``WORLD_SIZE``), or None outside torchrun."""
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return None
        return cls(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))

    def owns(self, slide_id: str) -> bool:
        return zlib.crc32(slide_id.encode("utf-8")) % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def resolve_shard(option: str | None) -> Shard:
    """``--shard`` when given, else torchrun's rank, else the whole cohort."""
    from_env = Shard.from_env()
    if option is None:
        return from_env or Shard()
    shard = Shard.parse(option)
    if from_env is not None and from_env.count > 1 and from_env != shard:
        raise ConfigError(
            f"--shard {option} under torchrun (rank {from_env.index} of {from_env.count}): "
            "give one of them; torchrun already gives each process its own slides"
        )
    return shard


@dataclass
class StageSummary:
    """What a per-slide stage (``tiling``, ``extraction``) did."""

    stage: str
    done: dict[str, int] = field(default_factory=dict)  # slide → its tiles or patches, done now
    skipped: list[str] = field(default_factory=list)  # done by an earlier run
    failed: dict[str, str] = field(default_factory=dict)  # slide → error message
    redone: dict[str, str] = field(default_factory=dict)  # slide → why its output was stale
    other_shards: int = 0  # slides left to the other shards
    shard: str | None = None  # ``i/n`` when sharded
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # stage-specific figures

    def counts(self) -> str:
        """What was done, as the stage's closing line begins (``tiled 3 slides (120 tiles), …``)."""
        verb, unit = ("tiled", "tile") if self.stage == "tiling" else ("extracted", "patch")
        done = f"{count(len(self.done), 'slide')} ({count(sum(self.done.values()), unit)})"
        return f"{verb} {done}, {len(self.skipped)} already done"

    @property
    def empty(self) -> list[str]:
        """Slides done now that gave no tile (worth a look at their QC image)."""
        return [s for s, n in self.done.items() if n == 0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "shard": self.shard,
            "done": self.done,
            "skipped": self.skipped,
            "failed": self.failed,
            "redone": self.redone,
            "other_shards": self.other_shards,
            "seconds": round(self.seconds, 2),
            **self.extra,
        }

    @classmethod
    def merged(cls, parts: Sequence[StageSummary]) -> StageSummary:
        """One summary of several shards' summaries (torchrun's rank 0 prints it)."""
        out = cls(stage=parts[0].stage, seconds=max(p.seconds for p in parts))
        for part in parts:
            out.done.update(part.done)
            out.skipped += part.skipped
            out.failed.update(part.failed)
            out.redone.update(part.redone)
            out.extra.update(part.extra)
        return out


class Recorder:
    """Records each slide's outcome; the first failure stops the stage unless ``skip_errors``.
    Failures are logged at INFO, so that no console handler prints them before the summary."""

    def __init__(self, summary: StageSummary, *, skip_errors: bool, hint: str = SKIP_ERRORS_HINT):
        self.summary = summary
        self.skip_errors = skip_errors
        self.hint = hint

    def success(self, slide_id: str, count: int) -> None:
        self.summary.done[slide_id] = int(count)

    def failure(self, slide_id: str, message: str) -> None:
        log.info("%s failed: %s", slide_id, message)
        if not self.skip_errors:
            raise SlideError(f"{message}; {self.hint}")
        self.summary.failed[slide_id] = message


def describe_failure(err: BaseException, where: str | Path) -> str:
    """One line for a failed slide: our errors as they are, others with their type and file."""
    if isinstance(err, BidistillError):
        return str(err)
    # Not one of our errors: a library's, or a bug. Keep the traceback in the log.
    log.info("%s failed", where, exc_info=err)
    return f"{where}: {type(err).__name__}: {err}"


def missing_slides(
    missing: dict[str, str], shard: Shard, *, skip_errors: bool, hint: str
) -> dict[str, str]:
    """This shard's slides whose file was not found (id → reason), to count as failed;
    ``SlideError`` ending with ``hint`` unless ``skip_errors``."""
    missing = {s: m for s, m in missing.items() if shard.owns(s)}
    if missing and not skip_errors:
        first = next(iter(missing.values()))
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise SlideError(f"{first}{more}; {hint}")
    return missing


def plan_slides(
    jobs: Sequence[Job],
    *,
    slide_id: Callable[[Job], str],
    is_done: Callable[[Job], bool],
    shard: Shard,
    summary: StageSummary,
) -> list[Job]:
    """The jobs of this shard that are not done yet (the done ones go to ``summary.skipped``)."""
    if shard.count > 1:
        summary.shard = str(shard)
    todo = []
    for job in jobs:
        if not shard.owns(slide_id(job)):
            summary.other_shards += 1
        elif is_done(job):
            summary.skipped.append(slide_id(job))
        else:
            todo.append(job)
    return todo


def run_slides(
    todo: Sequence[Job],
    work: Callable[[Job], tuple[str, int | None, str | None]],
    *,
    recorder: Recorder,
    workers: int = 1,
    progress: bool = True,
    description: str = "slides",
) -> None:
    """Run ``work`` on every job, in a pool of ``workers`` processes when above 1. ``work``
    (module-level: the pool pickles it) returns ``(slide id, count, error or None)`` instead of
    raising for a bad slide, so that the recorder decides whether the stage goes on."""
    start = time.perf_counter()
    with progress_bar(len(todo), progress, description) as advance:
        if workers <= 1 or len(todo) <= 1:
            for job in todo:
                _record(recorder, work(job))
                advance()
        else:
            _run_pool(todo, work, workers, recorder, advance)
    recorder.summary.seconds += time.perf_counter() - start


def _record(recorder: Recorder, outcome: tuple[str, int | None, str | None]) -> None:
    slide_id, count, error = outcome
    if error is not None:
        recorder.failure(slide_id, error)
    else:
        recorder.success(slide_id, count or 0)


def _run_pool(todo, work, workers: int, recorder: Recorder, advance) -> None:
    # spawn, not fork: OpenSlide and libvips keep native state that a fork would share.
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        pending: set[Future] = {pool.submit(work, job) for job in todo}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    _record(recorder, future.result())
                    advance()
        except BaseException:
            for future in pending:
                future.cancel()
            raise


@contextlib.contextmanager
def progress_bar(total: int, enabled: bool, description: str) -> Iterator[Callable[[], None]]:
    if not enabled or total == 0:
        yield lambda: None
        return
    from rich.progress import Progress

    with Progress() as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


def folder_size(path: Path) -> int:
    if not path.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
