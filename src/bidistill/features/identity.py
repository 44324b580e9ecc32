"""Feature identity: what made a set of feature files (encoder, weights digest, random init,
patch size, MPP), read from whatever attributes a file has: ours, TRIDENT's, STAMP's
(``extractor``) or none (CLAM's; the config then fills in). Two files that both know a field and
disagree on it never mix: features of two encoders in one bag would train a model on noise
without any error. ``read_identity`` is the one reader every stage calls.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py

from bidistill._io import h5_attrs
from bidistill.errors import FeatureFileError
from bidistill.features.interop import canonical_encoder

if TYPE_CHECKING:
    from bidistill.config import ExperimentConfig

# Relative tolerance on MPPs: files that store 0.5 and 0.4999 come from the same setting.
MPP_TOLERANCE = 0.02


@dataclass(frozen=True)
class FeatureIdentity:
    """What produced a set of features; None means "not known" (never "disagrees")."""

    encoder: str | None = None
    weights_sha256: str | None = None
    random_init: bool | None = None
    patch_size: int | None = None
    mpp: float | None = None

    def __post_init__(self) -> None:
        # Every identity names its encoder as the registry does (TRIDENT's ``uni_v1`` is our
        # ``uni``), whatever it was read from: files, a config or an older run's model.json.
        object.__setattr__(self, "encoder", canonical_encoder(self.encoder))

    @classmethod
    def from_attrs(cls, merged: dict[str, Any]) -> FeatureIdentity:
        """The identity stated by a file's attributes as ``read_attrs`` merges them (ours,
        TRIDENT's, STAMP's or none)."""
        random_init = merged.get("random_init")
        patch_size = _number(merged.get("patch_size"))
        return cls(
            encoder=merged.get("encoder", merged.get("extractor")),
            weights_sha256=merged.get("encoder_weights_sha256") or None,
            random_init=bool(random_init) if random_init is not None else None,
            patch_size=int(patch_size) if patch_size is not None else None,
            mpp=_number(merged.get("mpp")),
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureIdentity:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def filled_from(self, fallback: FeatureIdentity) -> FeatureIdentity:
        """This identity with the fields it does not know taken from ``fallback``."""
        unknown = [f.name for f in fields(self) if getattr(self, f.name) is None]
        return replace(self, **{name: getattr(fallback, name) for name in unknown})

    def disagreements(self, other: FeatureIdentity) -> dict[str, tuple[Any, Any]]:
        """Fields known on both sides that differ: name → (this value, other value)."""
        out = {}
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine is None or theirs is None:
                continue
            if f.name == "mpp":
                if abs(mine - theirs) > MPP_TOLERANCE * max(abs(mine), abs(theirs)):
                    out[f.name] = (mine, theirs)
            elif mine != theirs:
                out[f.name] = (mine, theirs)
        return out


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, (str, bytes)):
        return None
    value = float(value)
    return None if math.isnan(value) else value


def config_identity(config: ExperimentConfig) -> FeatureIdentity:
    """What a config says about its features: the encoder and whether it is random. (Its tiling
    section is not evidence: features made elsewhere ignore it.)"""
    return FeatureIdentity(encoder=config.features.encoder, random_init=config.features.random_init)


def read_attrs(path: str | Path) -> dict[str, Any]:
    """A feature file's attributes, merged: the ``coords`` dataset's, then the ``features``
    dataset's, then the file's own (each wins over the ones before). TRIDENT's
    ``target_magnification`` gives ``mpp`` (10 / magnification: 20x is 0.5 µm/px) when the file
    states no MPP. Unknown values (NaN, TRIDENT's ``'None'``) are left out."""
    try:
        with h5py.File(path, "r") as h5:
            merged: dict[str, Any] = {}
            for name in ("coords", "features"):
                if name in h5:
                    merged.update(h5_attrs(h5[name]))
            merged.update(h5_attrs(h5))
    except OSError as err:
        raise FeatureFileError(f"{path}: not a readable HDF5 file ({err})") from err
    if _number(merged.get("mpp")) is None and _number(merged.get("target_magnification")):
        merged["mpp"] = 10.0 / float(merged["target_magnification"])
    return {k: v for k, v in merged.items() if not _unknown(v)}


def _unknown(value: Any) -> bool:
    if isinstance(value, float):
        return math.isnan(value)
    return value is None or (isinstance(value, str) and value.strip() in ("", "None"))


def read_identity(path: str | Path) -> FeatureIdentity:
    """The identity stated by one feature file's attributes (the one reader for every stage)."""
    return FeatureIdentity.from_attrs(read_attrs(path))


def _value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def common_identity(paths: Iterable[str | Path]) -> FeatureIdentity:
    """The identity shared by every file (every field some file states), or a
    ``FeatureFileError`` naming two files that disagree on a field both state."""
    known: dict[str, tuple[Any, Path]] = {}  # field → (value, first file that stated it)
    for path in paths:
        path = Path(path)
        identity = read_identity(path)
        for name, value in identity.to_dict().items():
            if value is None:
                continue
            if name not in known:
                known[name] = (value, path)
                continue
            first_value, first_path = known[name]
            probe = FeatureIdentity(**{name: first_value}).disagreements(
                FeatureIdentity(**{name: value})
            )
            if probe:
                raise FeatureFileError(
                    f"feature files made differently: {first_path} has "
                    f"{name}={_value(first_value)} but {path} has {name}={_value(value)}; "
                    "every slide of a cohort must be extracted with the same encoder, patch size "
                    "and MPP (extract them again into one folder with `bidistill extract`)"
                )
    return FeatureIdentity(**{name: value for name, (value, _) in known.items()})


def check_matches(
    actual: FeatureIdentity, expected: FeatureIdentity, *, actual_where: str, expected_where: str
) -> None:
    """Refuse features whose identity disagrees with what is expected (a config, a trained run),
    naming both sources and every field that differs."""
    diff = actual.disagreements(expected)
    if diff:
        details = "; ".join(
            f"{name} {_value(got)} in {actual_where}, {_value(want)} in {expected_where}"
            for name, (got, want) in diff.items()
        )
        raise FeatureFileError(
            f"features of another kind: {details}. Features of different encoders, patch sizes "
            "or MPPs never mix; extract into a new `features.dir`, or use a new run folder"
        )
