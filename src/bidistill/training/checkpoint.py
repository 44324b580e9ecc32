"""Checkpoints: weights as safetensors beside a JSON of everything needed to rebuild the method.

``model.safetensors`` holds the state dict; ``model.json`` the method name, its validated
options, the data dimensions, the bidistill version, the training config and the patient ids of
each split; ``clinical_encoder.json`` the fitted ``ClinicalEncoder``. A checkpoint written by a
newer bidistill is refused: its options or layers may mean something this version does not know.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from bidistill import __version__
from bidistill._io import atomic_path, write_json
from bidistill.cohort import ClinicalEncoder
from bidistill.models import Method

WEIGHTS = "model.safetensors"
META = "model.json"
ENCODER = "clinical_encoder.json"
PREDICTIONS = "predictions.csv"  # written last: its presence means the method is trained


def save_checkpoint(
    method_dir: str | Path, method: Method, encoder: ClinicalEncoder, meta: dict[str, Any]
) -> None:
    """Write the weights, ``model.json`` and ``clinical_encoder.json`` into ``method_dir``.

    Side effects: creates the three files atomically.
    """
    method_dir = Path(method_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in method.state_dict().items()}
    with atomic_path(method_dir / WEIGHTS) as tmp:
        save_file(state, str(tmp))
    dims = method.dims
    write_json(
        method_dir / META,
        {
            "bidistill_version": __version__,
            "method": method.name,
            "options": method.options.model_dump(mode="json"),
            "dims": {
                "in_dim": dims.in_dim,
                "clinical_dim": dims.clinical_dim,
                "n_clinical_features": dims.n_clinical_features,
                "feature_slices": [list(s) for s in dims.feature_slices],
            },
            **meta,
        },
    )
    encoder.save(method_dir / ENCODER)
