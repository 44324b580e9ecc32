"""Nested, stratified, reproducible masks and the sweep built from the two prediction columns."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bidistill.evaluation.inputs import PredictionsError, read_method_predictions
from bidistill.evaluation.missing import nested_masks, sweep_split

from .synthetic import method_frame, write_run

RATES = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]


def _cohort(n: int = 157, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = [f"patient-{i}" for i in range(n)]
    labels = (rng.random(n) < 0.35).astype(int)
    available = rng.random(n) > 0.05
    return ids, labels, available


def test_masks_are_nested_stratified_and_keep_genuine_missing() -> None:
    ids, labels, available = _cohort()
    masks = nested_masks(ids, labels, available, RATES, seeds=range(10))
    assert masks.shape == (10, 6, 157)
    # Nested: missing at a rate => missing at every higher rate.
    assert np.all(masks[:, 1:] >= masks[:, :-1])
    # Genuinely missing patients are missing everywhere; nobody else at rate 0; all at rate 1.
    assert masks[:, :, ~available].all()
    assert not masks[:, 0, available].any()
    assert masks[:, -1].all()
    for label in (0, 1):
        stratum = labels == label
        for r, rate in enumerate(RATES):
            share = masks[:, r, stratum].sum(axis=1)
            expected = max(np.floor(rate * stratum.sum() + 0.5), (~available[stratum]).sum())
            assert np.all(share == expected)
    # Different seeds mask different patients.
    assert not np.array_equal(masks[0, 2], masks[1, 2])


def test_masks_are_reproducible_and_independent_of_row_order() -> None:
    ids, labels, available = _cohort()
    masks = nested_masks(ids, labels, available, RATES, seeds=[3, 4])
    again = nested_masks(ids, labels, available, RATES, seeds=[3, 4])
    np.testing.assert_array_equal(masks, again)
    order = np.random.default_rng(1).permutation(len(ids))
    shuffled = nested_masks(
        [ids[i] for i in order], labels[order], available[order], RATES, seeds=[3, 4]
    )
    np.testing.assert_array_equal(shuffled, masks[:, :, order])


def test_masks_pin_down_known_values() -> None:
    # Fixed expected masks: a change of the key function would silently change old runs.
    masks = nested_masks(list("abcdefgh"), np.zeros(8), np.ones(8, bool), [0.25, 0.5], [0, 1])
    expected = [
        [[0, 1, 0, 0, 0, 0, 0, 1], [0, 1, 1, 0, 1, 0, 0, 1]],
        [[1, 0, 1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 1, 0]],
    ]
    np.testing.assert_array_equal(masks, np.array(expected, dtype=bool))


def test_sweep_picks_present_or_absent_probability(tmp_path) -> None:
    write_run(tmp_path, methods=("bd", "wsi-only"))
    preds = {
        m: read_method_predictions(tmp_path / m / "predictions.csv") for m in ("bd", "wsi-only")
    }
    sweep = sweep_split(preds, split="test", fold=0, rates=RATES, seeds=range(3))
    bd = preds["bd"][preds["bd"].split == "test"].set_index("patient_id").loc[sweep.patient_ids]
    probs = sweep.probs["bd"]
    np.testing.assert_array_equal(
        probs[:, 0][:, bd.clinical_available.to_numpy()],
        np.broadcast_to(
            bd.prob_present.to_numpy()[bd.clinical_available.to_numpy()],
            (3, bd.clinical_available.sum()),
        ),
    )
    np.testing.assert_array_equal(
        probs[:, -1], np.broadcast_to(bd.prob_absent.to_numpy(), (3, len(bd)))
    )
    frame = sweep.to_frame()
    assert list(frame.columns) == [
        "patient",
        "method",
        "missing_rate",
        "mask_seed",
        "clinical_present",
        "label",
        "probability",
    ]
    assert len(frame) == 2 * 3 * 6 * len(sweep.patient_ids)
    row = frame[(frame.method == "bd") & (frame.missing_rate == 1.0)].iloc[0]
    assert not row.clinical_present
    assert row.probability == pytest.approx(bd.loc[row.patient, "prob_absent"])


def test_sweep_refuses_methods_with_other_patients(tmp_path) -> None:
    write_run(tmp_path, methods=("bd",))
    other = method_frame("wsi-only", seed=1)
    preds = {"bd": read_method_predictions(tmp_path / "bd" / "predictions.csv"), "wsi-only": other}
    with pytest.raises(PredictionsError, match="same splits.json"):
        sweep_split(preds, split="test", fold=0, rates=RATES, seeds=[0])


@pytest.mark.parametrize(
    ("column", "value", "expected"),
    [
        ("prob_present", 1.5, "a probability in \\[0, 1\\]"),
        ("split", "training", "one of train, val, test"),
        ("label", 2, "0 or 1"),
    ],
)
def test_bad_predictions_name_file_row_and_column(tmp_path, column, value, expected) -> None:
    frame = method_frame("bd")
    frame[column] = frame[column].astype(object)
    frame.loc[5, column] = value
    path = tmp_path / "predictions.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(PredictionsError, match=f"row 7, column '{column}': expected {expected}"):
        read_method_predictions(path)


def test_missing_column_is_named(tmp_path) -> None:
    path = tmp_path / "predictions.csv"
    method_frame("bd").drop(columns="prob_absent").to_csv(path, index=False)
    with pytest.raises(PredictionsError, match="prob_absent"):
        read_method_predictions(path)
    assert isinstance(pd.read_csv(path), pd.DataFrame)
