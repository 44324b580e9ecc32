"""Atomic file writing: every output is written to a temporary name in the *target* folder and
renamed into place when complete, so a killed process never leaves a half file that a rerun
would mistake for finished work.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bidistill.errors import BidistillError

# The disk (or a quota, or the process's file size limit) cannot take the file.
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class DiskFullError(BidistillError, OSError):
    """A file that does not fit on its disk; the message names it and says how to go on."""


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` when the block ends
    (on an exception ``target`` is left as it was). A full disk is a ``DiskFullError`` that
    names ``target``, not the temporary name."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.name}.", suffix=".tmp" + target.suffix
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes the file private (0600); give it the mode an ordinary open() would.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, target)
    except OSError as err:
        if err.errno not in _FULL_ERRNOS or isinstance(err, DiskFullError):
            raise
        raise DiskFullError(
            f"{target}: cannot write it ({err.strerror}); free space on that disk, then run the "
            "same command again: it resumes with the files already written"
        ) from err
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_h5(target: str | Path) -> Iterator[Any]:
    """Yield a new ``h5py.File`` that becomes ``target`` when the block ends (atomically).

    The HDF5 file is built in memory and written to disk by Python: a disk that fills up then
    fails one ``write`` with a clean error, where HDF5 writing it itself would leave its library
    with a file it can neither flush nor close (tracebacks at exit, then a segfault).
    """
    import h5py

    target = Path(target)
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as h5:
        yield h5
    with atomic_path(target) as tmp, open(tmp, "wb") as out:
        out.write(buffer.getbuffer())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: str | Path, data: Any) -> None:
    write_text(target, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_csv(target: str | Path, frame: Any, **to_csv_kwargs: Any) -> None:
    """Write a pandas DataFrame atomically (``index=False`` unless told otherwise)."""
    to_csv_kwargs.setdefault("index", False)
    with atomic_path(target) as tmp:
        frame.to_csv(tmp, **to_csv_kwargs)


def h5_attrs(h5: Any) -> dict[str, Any]:
    """An HDF5 object's attributes as plain Python values (str, int, float)."""
    return {key: _plain(value) for key, value in h5.attrs.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy scalar
        return value.item()
    return value


# The name ``atomic_path`` gives a file being written: ``.<target name>.<8 random>.tmp<suffix>``.
_TEMP_NAME = re.compile(r"\.(?P<target>.+)\.[A-Za-z0-9_]{8}\.tmp(\.[^.]+)?")


def is_temp_file(path: str | Path) -> bool:
    """Whether ``path`` is a file that ``atomic_path`` was writing: never data (a process
    killed while writing leaves one, whole or partial), so every folder listing skips it."""
    return _TEMP_NAME.fullmatch(Path(path).name) is not None


def remove_temp_files(target: str | Path) -> list[Path]:
    """Remove what killed writes of ``target`` left beside it; returns the files removed.

    Only for a target that no other process writes now (e.g. inside a locked run folder).
    """
    target = Path(target)
    removed = []
    for path in target.parent.iterdir() if target.parent.is_dir() else ():
        match = _TEMP_NAME.fullmatch(path.name)
        if match and match["target"] == target.name and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
