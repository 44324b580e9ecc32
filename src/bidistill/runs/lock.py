"""One command per run directory: an OS file lock (``filelock``) held while it writes there.

The operating system releases the lock when the process ends in any way, ``kill -9`` included.
A holder file beside it names the holder for a second command; a holder file whose lock is free
is what a killed run leaves behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout

from bidistill._io import write_json
from bidistill.errors import BidistillError, ConfigError
from bidistill.runs.rundir import RunDir

log = logging.getLogger(__name__)


class RunDirBusyError(BidistillError):
    """Another bidistill process holds the run directory."""


@contextlib.contextmanager
def lock_run_dir(
    run_dir: str | Path, *, command: str, say: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Hold the existing folder ``run_dir`` for the block; ``RunDirBusyError`` when another
    process holds it. ``command`` is shown to a second one; ``say`` reports a recovered lock."""
    run_dir = Path(run_dir)
    holder_path = RunDir(run_dir).lock_holder
    lock = FileLock(str(RunDir(run_dir).lock), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunDirBusyError(_busy_message(run_dir, _read_holder(holder_path))) from None
    except OSError as err:
        raise ConfigError(
            f"{run_dir}: cannot lock the run folder ({err.strerror or err}); is it writable?"
        ) from None
    try:
        stale = _read_holder(holder_path)
        if stale:
            (say or log.info)(
                f"{run_dir}: recovered the lock of an earlier run that stopped without releasing "
                f"it (PID {stale.get('pid')}, `{stale.get('command')}`, started "
                f"{stale.get('started')})"
            )
        write_json(holder_path, _holder(command))
        yield
    finally:
        with contextlib.suppress(OSError):
            holder_path.unlink()
        lock.release()


def _holder(command: str) -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": f"bidistill {command}",
        "argv": sys.argv,
        "started": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
        "started_unix": time.time(),
    }


def _read_holder(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _busy_message(run_dir: Path, holder: dict | None) -> str:
    if not holder:
        who = "another bidistill process (it has not yet said which)"
    else:
        who = (
            f"another bidistill run: PID {holder.get('pid')} on {holder.get('host')}, "
            f"`{holder.get('command')}`, started {holder.get('started')}"
        )
    return (
        f"{run_dir} is in use by {who}; wait for it to finish, or give this run another --out "
        "folder"
    )
