"""Feature identity at prediction time: refuse features of another kind than the run's.

A model trained on one encoder's features outputs numbers for another encoder's features too,
and they mean nothing. So before predicting, the attributes of each new feature file (encoder,
patch size, MPP) are compared with what the run was trained on:

1. ``model.json`` → ``features.identity`` where the run recorded one (every key listed there
   is compared, so a richer identity, e.g. a digest of the encoder's weights, is checked as soon
   as the run and the files record it);
2. else the attributes of the run's own training feature files (``features.dir``), when they
   can still be read;
3. else the encoder name of the run's config (``features.encoder``).

Only what both sides record is compared: CLAM's files carry no attributes and load as they are.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import h5py

from bidistill._io import h5_attrs
from bidistill.errors import FeatureFileError

IDENTITY_KEYS = ("encoder", "patch_size", "mpp")
RELATIVE_TOLERANCE = {"mpp": 0.02}  # MPPs from two scanners' metadata differ in the last digits


class FeatureIdentityError(FeatureFileError):
    """Features from another encoder, patch size or MPP than the run was trained on."""


def file_identity(path: str | Path) -> dict[str, Any]:
    """The identity attributes a feature file records (bidistill, CLAM or TRIDENT layout).

    TRIDENT keeps its attributes on the ``coords`` dataset and gives a target magnification
    instead of an MPP (10 / magnification µm/px, the usual convention).
    """
    path = Path(path)
    try:
        with h5py.File(path, "r") as h5:
            attrs: dict[str, Any] = {}
            for name in ("coords", "features"):
                if name in h5:
                    attrs.update(h5_attrs(h5[name]))
            attrs.update(h5_attrs(h5))  # the file's own attributes win
    except OSError as err:
        raise FeatureFileError(f"{path}: not a readable HDF5 file ({err})") from err
    if "mpp" not in attrs and _number(attrs.get("target_magnification")):
        attrs["mpp"] = 10.0 / float(attrs["target_magnification"])
    return {k: v for k, v in attrs.items() if v is not None and not _is_nan(v)}


def run_identity(meta: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """What a trained method's features were, and where that was read from.

    Args:
        meta: the method's ``model.json``.

    Returns:
        (identity: attribute → value, a description of its source for error messages).
    """
    recorded = meta.get("features") or {}
    identity = dict(recorded.get("identity") or {})
    if identity:
        return identity, "the run's model.json"
    training_dir = Path(recorded.get("dir") or "")
    training_file = next(iter(sorted(training_dir.glob("*.h5"))), None) if recorded else None
    if training_file is not None:
        try:
            found = file_identity(training_file)
        except FeatureFileError:
            found = {}
        identity = {k: found[k] for k in IDENTITY_KEYS if k in found}
        if identity:
            return identity, f"the run's training features ({training_file})"
    if recorded.get("encoder"):
        return {"encoder": recorded["encoder"]}, "the run's config (features.encoder)"
    return {}, "nothing recorded"


def identity_mismatches(expected: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """Each attribute both sides record and on which they differ, as 'key: found vs expected'.

    Compared: ``IDENTITY_KEYS`` plus every key of ``expected`` (a recorded identity may hold
    more, e.g. a weights digest). MPPs agree within 2%; everything else must be equal.
    """
    problems = []
    for key in dict.fromkeys([*IDENTITY_KEYS, *expected]):
        if key not in expected or key not in found:
            continue
        if not _same(key, expected[key], found[key]):
            problems.append(f"{key} {found[key]!r} (the run's: {expected[key]!r})")
    return problems


def check_feature_identity(
    path: str | Path, expected: dict[str, Any], source: str, *, dim: int | None = None
) -> None:
    """Refuse a feature file whose identity or dimension differs from the run's.

    Raises:
        FeatureIdentityError: names the file, each differing attribute and the run's value.
    """
    found = file_identity(path)
    problems = identity_mismatches(expected, found)
    if dim is not None:
        file_dim = _file_dim(Path(path))
        if file_dim != dim:
            problems.append(f"feature dimension {file_dim} (the run's: {dim})")
    if problems:
        raise FeatureIdentityError(
            f"{path}: features of another kind than the run was trained on: "
            f"{'; '.join(problems)} (from {source}). A model's output on other features means "
            "nothing: extract these slides with the run's encoder, patch size and MPP"
        )


def _file_dim(path: Path) -> int:
    with h5py.File(path, "r") as h5:
        return int(h5["features"].shape[-1])


def _same(key: str, expected: Any, found: Any) -> bool:
    if _number(expected) and _number(found):
        tolerance = RELATIVE_TOLERANCE.get(key, 0.0)
        return math.isclose(float(expected), float(found), rel_tol=tolerance, abs_tol=1e-9)
    return str(expected).strip() == str(found).strip()


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not _is_nan(value)


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)
