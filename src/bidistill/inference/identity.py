"""Feature identity at prediction time: refuse features of another kind than the run's.

A model trained on one encoder's features outputs numbers for another encoder's features too,
and they mean nothing. So before predicting, the identity of each new feature file (read by
``features.identity.read_identity``, the reader training used) is compared with what the run was
trained on:

1. ``model.json`` → ``features.identity`` where the run recorded one;
2. else the identity of the run's own training feature files (``features.dir``), when they can
   still be read;
3. else the encoder name of the run's config (``features.encoder``).

Only what both sides record is compared (``FeatureIdentity.disagreements``): CLAM's files carry
no attributes and load as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py

from bidistill.errors import FeatureFileError
from bidistill.features.identity import FeatureIdentity, read_identity


class FeatureIdentityError(FeatureFileError):
    """Features from another encoder, patch size or MPP than the run was trained on."""


def run_identity(meta: dict[str, Any]) -> tuple[FeatureIdentity, str]:
    """What a trained method's features were, and where that was read from.

    Args:
        meta: the method's ``model.json``.

    Returns:
        (the identity, a description of its source for error messages).
    """
    recorded = meta.get("features") or {}
    identity = FeatureIdentity.from_dict(recorded.get("identity") or {})
    if identity != FeatureIdentity():
        return identity, "the run's model.json"
    training_dir = Path(recorded.get("dir") or "")
    training_file = next(iter(sorted(training_dir.glob("*.h5"))), None) if recorded else None
    if training_file is not None:
        try:
            identity = read_identity(training_file)
        except FeatureFileError:
            identity = FeatureIdentity()
        if identity != FeatureIdentity():
            return identity, f"the run's training features ({training_file})"
    if recorded.get("encoder"):
        return FeatureIdentity(encoder=recorded["encoder"]), "the run's config (features.encoder)"
    return FeatureIdentity(), "nothing recorded"


def check_feature_identity(
    path: str | Path, expected: FeatureIdentity, source: str, *, dim: int | None = None
) -> None:
    """Refuse a feature file whose identity or dimension differs from the run's.

    Raises:
        FeatureIdentityError: names the file, each differing attribute and the run's value.
    """
    problems = [
        f"{name} {found!r} (the run's: {want!r})"
        for name, (found, want) in read_identity(path).disagreements(expected).items()
    ]
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
