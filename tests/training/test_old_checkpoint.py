"""A checkpoint written by an earlier bidistill still loads and predicts what it predicted then."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from bidistill.inference import load_trained, predict_bags

FROZEN = Path(__file__).resolve().parents[1] / "data" / "checkpoint-0.1.0"


def test_bidistill_0_1_0_checkpoint_gives_its_saved_predictions():
    method, encoder, meta = load_trained(FROZEN)
    assert meta["method"] == "bd" and meta["bidistill_version"] == "0.1.0"
    expected = pd.read_csv(FROZEN / "expected.csv", dtype={"patient_id": str})
    ids = expected["patient_id"].tolist()
    with np.load(FROZEN / "bags.npz") as archive:
        bags = [archive[p] for p in ids]
    clinical = pd.read_csv(FROZEN / "clinical.csv", index_col=0).loc[ids]

    present = predict_bags(method, bags, encoder.transform(clinical))
    absent = predict_bags(method, bags, encoder.missing_row(len(ids)))
    np.testing.assert_allclose(present.probabilities, expected["prob_present"], atol=1e-5)
    np.testing.assert_allclose(absent.probabilities, expected["prob_absent"], atol=1e-5)
    # the patient without clinical data is routed to the WSI-only branch either way
    no_clinical = ~encoder.transform(clinical).present
    assert no_clinical.sum() == 1
    np.testing.assert_allclose(
        present.probabilities[no_clinical], absent.probabilities[no_clinical], atol=1e-6
    )
