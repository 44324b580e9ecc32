"""What CLAM and TRIDENT read and write: their encoder names and their coordinate attributes.

TRIDENT's names (``trident/patch_encoder_models/load.py``) of our registry's encoders are read
as the registry's, so TRIDENT's UNI features and ``features.encoder: uni`` are one thing at every
stage. Every coords and feature file bidistill writes carries the ``coords`` dataset attributes
that CLAM (``Whole_Slide_Bag_FP``) and TRIDENT (``trident/IO.py``) read, so they read it as theirs.
"""

from __future__ import annotations

import math
from typing import Any

# TRIDENT's encoder name → our registry's name, for the encoders both know (same weights and
# the same embedding). TRIDENT's ``resnet50`` is CLAM's truncated ResNet-50 (layer 3, pooled).
TRIDENT_ENCODERS = {
    "resnet50": "resnet50-trunc",
    "uni_v1": "uni",
    "uni_v2": "uni2-h",
    "virchow2": "virchow2",
    "hoptimus0": "h-optimus-0",
    "hoptimus1": "h-optimus-1",
    "gigapath": "prov-gigapath",
    "phikon_v2": "phikon-v2",
}

# TRIDENT's save_h5 writes an encoder without a name as the string 'None'.
_NO_NAME = ("", "none")


def canonical_encoder(name: Any) -> str | None:
    """An encoder name as the registry spells it (TRIDENT's names mapped), else as given; None
    for an absent name (None, empty, TRIDENT's ``'None'``)."""
    if name is None:
        return None
    text = (name.decode() if isinstance(name, bytes) else str(name)).strip()
    if text.lower() in _NO_NAME:
        return None
    return TRIDENT_ENCODERS.get(text.lower(), text)


def magnification(mpp: float | None) -> float | None:
    """The objective magnification of an MPP, as TRIDENT converts them: 10 / MPP (0.5 µm/px is
    20x). None when the MPP is unknown."""
    if mpp is None or math.isnan(float(mpp)) or float(mpp) <= 0:
        return None
    return round(10.0 / float(mpp), 4)


def coords_dataset_attrs(
    *,
    name: str,
    patch_size: int,
    level: int,
    mpp: float | None = None,
    patch_size_level0: int | None = None,
    slide_mpp: float | None = None,
    overlap: int | None = None,
    width: int | None = None,
    height: int | None = None,
) -> dict[str, Any]:
    """The attributes CLAM's and TRIDENT's coordinate readers take from the ``coords`` dataset;
    only what is known is written (a slide without an MPP has no magnification).

    ``patch_size`` is the tile side at the tiling MPP (TRIDENT's meaning; CLAM reads it at
    ``patch_level``, the same region when that level is at the tiling MPP).
    """
    attrs: dict[str, Any] = {"name": name, "patch_size": int(patch_size), "patch_level": int(level)}
    optional = {
        "patch_size_level0": patch_size_level0,
        "target_magnification": magnification(mpp),
        "level0_magnification": magnification(slide_mpp),
        "overlap": overlap,
        "level0_width": width,
        "level0_height": height,
    }
    for key, value in optional.items():
        if value is not None:
            attrs[key] = value if isinstance(value, float) else int(value)
    return attrs
