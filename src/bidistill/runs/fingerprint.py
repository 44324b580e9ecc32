"""Run fingerprints: what each stage of a run consumed, recorded in ``run.json`` (its shape is in
docs/internal-interfaces.md). The caller holds the run directory's lock (``runs.lock``).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bidistill._io import write_json
from bidistill.runs.rundir import RunDir

# Items named in a "what changed" message before "…".
_SHOWN = 5


def digest(value: Any) -> str:
    """A short, stable digest of a JSON-able value (dict keys sorted; NaN written as null)."""
    text = json.dumps(_plain(value), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy scalar
        return _plain(value.item())
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


@dataclass
class StageInputs:
    """What a stage consumes: input name → digest, and for collections, item → digest."""

    digests: dict[str, str] = field(default_factory=dict)
    items: dict[str, dict[str, str]] = field(default_factory=dict)
    # How each input is named in messages, e.g. "cohort rows" with items counted in "patients".
    words: dict[str, tuple[str, str]] = field(default_factory=dict)

    def add(self, name: str, value: Any, *, says: str | None = None) -> StageInputs:
        self.digests[name] = digest(value)
        self.words[name] = (says or name, "")
        return self

    def add_items(
        self, name: str, items: dict[str, Any], *, says: str | None = None, unit: str = "items"
    ) -> StageInputs:
        """A collection whose changed members a rerun names."""
        per_item = {str(k): digest(v) for k, v in items.items()}
        self.items[name] = per_item
        self.digests[name] = digest(per_item)
        self.words[name] = (says or name, unit)
        return self


@dataclass
class StageCheck:
    """Whether a stage's outputs are current; ``reason`` says why not, for the console."""

    current: bool
    reason: str
    recorded: bool = True  # False: the run directory has no record of this stage

    def __bool__(self) -> bool:
        return self.current


def read_run_info(run_dir: str | Path) -> dict[str, Any]:
    path = RunDir(run_dir).run_info
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # missing, or damaged: that only costs recomputing every stage
    return info if isinstance(info, dict) else {}


def write_run_info(run_dir: str | Path, info: dict[str, Any]) -> None:
    used = {d for s in info.get("stages", {}).values() for d in s.get("inputs", {}).values()}
    info["items"] = {d: table for d, table in info.get("items", {}).items() if d in used}
    write_json(RunDir(run_dir).run_info, info)


def check_stage(
    run_dir: str | Path, stage: str, inputs: StageInputs, outputs: list[Path] | tuple = ()
) -> StageCheck:
    """Is ``stage`` done with exactly these inputs, and do its ``outputs`` exist?"""
    info = read_run_info(run_dir)
    record = info.get("stages", {}).get(stage)
    missing = [p for p in outputs if not Path(p).exists()]
    if record is None:
        if not missing and outputs:
            reason = "its outputs exist, but no record says what they were made from"
            return StageCheck(False, reason, recorded=False)
        return StageCheck(False, "not done yet", recorded=False)
    if missing:
        return StageCheck(False, f"{Path(missing[0]).name} is missing")
    before = record.get("inputs", {})
    changes = [
        _describe_change(name, before.get(name), inputs, info.get("items", {}))
        for name in inputs.digests
        if before.get(name) != inputs.digests[name]
    ]
    changes += [f"{name} no longer used" for name in before if name not in inputs.digests]
    if changes:
        return StageCheck(False, "; ".join(changes))
    return StageCheck(True, f"up to date (finished {record.get('finished', '?')})")


def _describe_change(
    name: str, old_digest: str | None, inputs: StageInputs, items: dict[str, dict[str, str]]
) -> str:
    says, unit = inputs.words.get(name, (name, ""))
    old, new = items.get(old_digest or ""), inputs.items.get(name)
    if old_digest is None or old is None or new is None:
        return f"{says} changed"
    changed = sorted(k for k in new.keys() & old.keys() if new[k] != old[k])
    added = sorted(new.keys() - old.keys())
    removed = sorted(old.keys() - new.keys())
    parts = [
        f"{what} {len(keys)} {unit} ({_names(keys)})"
        for what, keys in (("changed for", changed), ("added", added), ("removed", removed))
        if keys
    ]
    return f"{says}: " + ", ".join(parts)


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (", …" if len(keys) > _SHOWN else "")


def record_stage(run_dir: str | Path, stage: str, inputs: StageInputs, **extra: Any) -> None:
    """Record that ``stage`` finished with ``inputs`` (call it after its outputs are written)."""
    info = read_run_info(run_dir)
    info.setdefault("stages", {})[stage] = {
        "inputs": dict(inputs.digests),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
    table = info.setdefault("items", {})
    for name, per_item in inputs.items.items():
        table[inputs.digests[name]] = per_item
    write_run_info(run_dir, info)


def forget_stage(run_dir: str | Path, stage: str) -> None:
    """Drop ``stage``'s record before it starts over: a crash then leaves it undone."""
    info = read_run_info(run_dir)
    if info.get("stages", {}).pop(stage, None) is not None:
        write_run_info(run_dir, info)
