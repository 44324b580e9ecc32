"""What a coords file records of the slide it was tiled from, to tell when the slide changed.

A slide id names a file, not its pixels: a new batch of slides may reuse the ids of an earlier
one. The signature (resolved path, size, modification time) is cheap to take and changes when
the file is replaced or edited. A patch folder's size is the total of its patch files, its time
the newest of them and of the folder (adding, removing or renaming a patch changes the folder's
time), and ``slide_digest`` is a digest of its sorted file names and sizes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def slide_signature(path: Path) -> dict[str, object]:
    """``slide_path`` (str of the resolved path), ``slide_size`` (bytes), ``slide_mtime_ns``;
    for a patch folder also ``slide_digest`` (its file names and sizes)."""
    path = Path(path).resolve()
    if not path.is_dir():
        stat = path.stat()
        return {
            "slide_path": str(path),
            "slide_size": stat.st_size,
            "slide_mtime_ns": stat.st_mtime_ns,
        }
    files = sorted(p for p in path.iterdir() if p.is_file())
    stats = [p.stat() for p in files]
    digest = hashlib.sha256()
    for file, stat in zip(files, stats):
        digest.update(f"{file.name}\t{stat.st_size}\n".encode())
    return {
        "slide_path": str(path),
        "slide_size": sum(s.st_size for s in stats),
        "slide_mtime_ns": max([path.stat().st_mtime_ns, *(s.st_mtime_ns for s in stats)]),
        "slide_digest": digest.hexdigest()[:16],
    }
