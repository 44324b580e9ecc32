"""A slide's signature: which file a tiling or a feature file was made from (a rescan changes
its size or time; only the file's name is compared, so a project folder that moves keeps its
tiles and features).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from bidistill._io import h5_attrs

SIGNATURE_KEYS = ("slide_path", "slide_size", "slide_mtime_ns")


def slide_signature(path: Path) -> dict[str, object]:
    """``slide_path`` (resolved), ``slide_size`` (bytes) and ``slide_mtime_ns`` of a slide file
    or patch folder (``OSError`` when it cannot be read)."""
    path = Path(path).resolve()
    stat = path.stat()
    size, mtime = stat.st_size, stat.st_mtime_ns
    if path.is_dir():
        files = [p.stat() for p in path.iterdir() if p.is_file()]
        size = sum(s.st_size for s in files)
        mtime = max([mtime, *(s.st_mtime_ns for s in files)])
    return {"slide_path": str(path), "slide_size": int(size), "slide_mtime_ns": int(mtime)}


def signature_change(recorded: Mapping[str, object], current: Mapping[str, object]) -> str | None:
    """What differs between a recorded signature and the current one: file name, size, time
    (None: the same slide, or nothing recorded to compare with)."""
    if any(key not in recorded for key in SIGNATURE_KEYS):
        return None  # written before signatures were recorded, or by another tool
    changes = []
    if Path(str(recorded["slide_path"])).name != Path(str(current["slide_path"])).name:
        changes.append(f"file {Path(str(recorded['slide_path'])).name} → ")
        changes[-1] += Path(str(current["slide_path"])).name
    if int(recorded["slide_size"]) != int(current["slide_size"]):  # type: ignore[arg-type]
        changes.append(f"size {recorded['slide_size']} → {current['slide_size']} bytes")
    if int(recorded["slide_mtime_ns"]) != int(current["slide_mtime_ns"]):  # type: ignore[arg-type]
        changes.append("modified since")
    return ", ".join(changes) or None


def recorded_signature(h5_path: Path) -> dict[str, object]:
    """The slide signature an .h5 file (coords or features) recorded in its attributes; empty
    when it recorded none or cannot be read (its reader reports that)."""
    import h5py

    try:
        with h5py.File(h5_path, "r") as h5:
            attrs = h5_attrs(h5)
    except OSError:
        return {}
    return {k: attrs[k] for k in SIGNATURE_KEYS if k in attrs}


def change_since(h5_path: Path, slide_path: Path) -> str | None:
    """How the slide differs from the one ``h5_path`` was made from (None: the same, or not
    recorded, or the slide cannot be read now: its reader reports that)."""
    try:
        current = slide_signature(slide_path)
    except OSError:
        return None
    return signature_change(recorded_signature(h5_path), current)
