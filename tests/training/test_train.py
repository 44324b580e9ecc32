"""Training every method end to end on real files, and the run-folder contract."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from bidistill.cohort import load_cohort, resolve_splits
from bidistill.config import MethodConfig
from bidistill.models import get_method_class, list_methods

from .conftest import fast_config, train_method

PREDICTION_COLUMNS = [
    "patient_id",
    "split",
    "fold",
    "label",
    "clinical_available",
    "prob_present",
    "prob_absent",
]
CLINICAL_ONLY = {"clinical-only", "clinical-linear"}


@pytest.mark.slow
@pytest.mark.parametrize("name", list_methods())
def test_each_method_learns_with_named_finite_losses(trained_run, name):
    method_dir = trained_run / name
    for file in (
        "model.safetensors",
        "model.json",
        "clinical_encoder.json",
        "train_log.csv",
        "predictions.csv",
    ):
        assert (method_dir / file).is_file(), file
    log = pd.read_csv(method_dir / "train_log.csv")
    loss_columns = [c for c in log.columns if c.startswith("loss_")]
    assert "loss_total" in loss_columns and len(loss_columns) >= 2
    assert np.isfinite(log[loss_columns].to_numpy(float)[~log[loss_columns].isna()]).all()
    assert {"stage", "epoch", "val_auc_present", "val_auc_absent", "val_score"} <= set(log)
    # It learns: the validation AUC it is selected on is clearly above chance.
    assert log["val_score"].max() >= 0.65, log[["stage", "epoch", "val_score"]]
    # The saved model holds each part's best epoch of the last stage: its predictions give the
    # validation AUCs logged at that epoch.
    assert log["epoch"].min() == 1  # epochs count from 1
    predictions = pd.read_csv(method_dir / "predictions.csv")
    val = predictions[predictions["split"] == "val"]
    with_clinical = val[val["clinical_available"]]
    aucs = {
        "val_auc_present": roc_auc_score(val["label"], val["prob_present"]),
        "val_auc_absent": roc_auc_score(val["label"], val["prob_absent"]),
        "val_auc_with_clinical": roc_auc_score(
            with_clinical["label"], with_clinical["prob_present"]
        ),
    }
    columns = {
        "present": ["val_auc_with_clinical"],
        "absent": ["val_auc_absent"],
        "routed": ["val_auc_present", "val_auc_absent"],
    }
    stage = json.loads((method_dir / "model.json").read_text())["selection"][-1]
    last = log[log["stage"] == stage["stage"]].set_index("epoch")
    assert len(last) == stage["epochs_run"]
    for part in stage["parts"]:
        row = last.loc[part["best_epoch"]]
        for column in columns[part["select"]]:
            assert aucs[column] == pytest.approx(row[column], abs=1e-6), (part, column)


@pytest.mark.slow
@pytest.mark.parametrize("name", list_methods())
def test_predictions_cover_every_patient_present_and_absent(trained_run, tiny_cohort, name):
    predictions = pd.read_csv(trained_run / name / "predictions.csv", dtype={"patient_id": str})
    assert list(predictions.columns) == PREDICTION_COLUMNS
    cohort = load_cohort(fast_config(tiny_cohort).cohort)
    assert sorted(predictions["patient_id"]) == sorted(cohort.patients.index)
    assert set(predictions["split"]) == {"train", "val", "test"}
    labels = cohort.labels.loc[predictions["patient_id"]].to_numpy()
    assert np.array_equal(predictions["label"].to_numpy(), labels)
    assert predictions[["prob_present", "prob_absent"]].apply(lambda c: c.between(0, 1)).all().all()
    no_clinical = ~predictions["clinical_available"]
    assert no_clinical.any()  # the synthetic cohort has patients without clinical data
    # Withholding data the patient does not have changes nothing.
    np.testing.assert_allclose(
        predictions.loc[no_clinical, "prob_present"],
        predictions.loc[no_clinical, "prob_absent"],
        atol=1e-6,
    )
    if name == "wsi-only":
        np.testing.assert_allclose(predictions["prob_present"], predictions["prob_absent"])
    elif name in CLINICAL_ONLY:
        assert np.ptp(predictions["prob_absent"]) < 1e-6  # the all-missing row, for everyone
    meta = json.loads((trained_run / name / "model.json").read_text())
    assert meta["method"] == name
    assert set(meta["patients"]) == {"train", "val", "test"}
    assert [s["select"] for s in meta["selection"]] == [
        s.select for s in get_method_class(name)(*_dims_and_options(meta, name)).stages()
    ]


def _dims_and_options(meta, name):
    from bidistill.models.base import MethodDims

    dims = meta["dims"]
    dims = MethodDims(
        dims["in_dim"],
        dims["clinical_dim"],
        dims["n_clinical_features"],
        tuple(tuple(s) for s in dims["feature_slices"]),
    )
    return dims, get_method_class(name).Options.model_validate(meta["options"])


@pytest.mark.slow
def test_same_seed_same_predictions(tiny_cohort, tmp_path):
    config = fast_config(tiny_cohort, epochs=3)
    cohort = load_cohort(config.cohort)
    splits = resolve_splits(cohort, config.cohort.splits, tmp_path / "splits.json")
    bd = MethodConfig(name="bd", feature_dropout=0.2, warmup_epochs=1)
    runs = []
    for i in range(2):
        method_dir = train_method(
            config, bd, tmp_path / f"run{i}", cohort=cohort, splits=splits, progress=False
        )
        runs.append(pd.read_csv(method_dir / "predictions.csv"))
    pd.testing.assert_frame_equal(runs[0], runs[1])
    config.training.seed = 1
    other = train_method(
        config, bd, tmp_path / "seed1", cohort=cohort, splits=splits, progress=False
    )
    assert not np.allclose(
        pd.read_csv(other / "predictions.csv")["prob_present"], runs[0]["prob_present"]
    )


@pytest.mark.slow
def test_data_loader_workers_give_the_same_predictions(tiny_cohort, tmp_path):
    results = []
    for workers in (0, 2):
        config = fast_config(tiny_cohort, epochs=2, num_workers=workers, in_memory="no")
        cohort = load_cohort(config.cohort)
        splits = resolve_splits(cohort, config.cohort.splits, tmp_path / "splits.json")
        method_dir = train_method(
            config,
            MethodConfig(name="moddrop"),
            tmp_path / f"w{workers}",
            cohort=cohort,
            splits=splits,
            progress=False,
        )
        results.append(pd.read_csv(method_dir / "predictions.csv"))
    pd.testing.assert_frame_equal(results[0], results[1])


def test_labelled_variants_of_one_method_train_side_by_side(tiny_cohort, tmp_path):
    """Two `bd` entries with their own labels: each gets its folder and its own options."""
    import json

    from bidistill.cohort import load_cohort, resolve_splits
    from bidistill.config import MethodConfig
    from bidistill.training import open_feature_store

    from .conftest import fast_config, train_method

    config = fast_config(tiny_cohort, epochs=1)
    cohort = load_cohort(config.cohort)
    splits = resolve_splits(cohort, config.cohort.splits, tmp_path / "splits.json")
    store = open_feature_store(config, cohort)
    variants = [
        MethodConfig(name="bd", label="bd-learned"),
        MethodConfig(name="bd", label="bd-wsi", prompt="wsi"),
    ]
    for variant in variants:
        train_method(
            config, variant, tmp_path, cohort=cohort, splits=splits, store=store, progress=False
        )
    for variant in variants:
        meta = json.loads((tmp_path / variant.label / "model.json").read_text())
        assert meta["method"] == "bd"
        assert meta["options"]["prompt"] == ("wsi" if variant.label == "bd-wsi" else "learned")
    assert not (tmp_path / "bd").exists()


def test_training_patients_are_predicted_on_whole_bags(tiny_cohort, tmp_path):
    """max_instances caps bags while training only: saved train predictions use whole bags."""
    import numpy as np
    import pandas as pd

    from bidistill.cohort import load_cohort, resolve_splits
    from bidistill.config import MethodConfig
    from bidistill.inference import load_trained, predict_bags
    from bidistill.training import open_feature_store

    from .conftest import fast_config, train_method

    config = fast_config(tiny_cohort, epochs=1, max_instances=4)
    cohort = load_cohort(config.cohort)
    splits = resolve_splits(cohort, config.cohort.splits, tmp_path / "splits.json")
    store = open_feature_store(config, cohort)
    method_dir = train_method(
        config,
        MethodConfig(name="wsi-only"),
        tmp_path,
        cohort=cohort,
        splits=splits,
        store=store,
        progress=False,
    )
    saved = pd.read_csv(method_dir / "predictions.csv", dtype={"patient_id": str})
    train = saved[saved["split"] == "train"].head(8)
    method, encoder, _ = load_trained(method_dir)
    bags = [
        np.concatenate([store.get(s) for s in cohort.slides_of(p)]) for p in train["patient_id"]
    ]
    rows = cohort.subset(train["patient_id"].tolist())[cohort.feature_names]
    whole = predict_bags(method, bags, encoder.transform(rows))
    # The predictions table is made by the same predictor: equal to the float32 written.
    np.testing.assert_array_equal(whole.probabilities, train["prob_present"].astype(np.float32))


@pytest.mark.parametrize("name", ["bd", "switch", "wsi-only"])
def test_the_report_shows_the_epochs_the_trainer_kept(trained_run, name):
    """The kept epochs come from model.json (per part, warm-up epochs excluded), not from the
    best score in the log: BD's branches each keep their own epoch."""
    from bidistill.evaluation.run_info import best_epochs, method_infos

    meta = json.loads((trained_run / name / "model.json").read_text())
    log = pd.read_csv(trained_run / name / "train_log.csv")
    kept = best_epochs(log, meta["selection"])
    parts = [p for stage in meta["selection"] for p in stage["parts"]]
    assert len(kept) == len(parts)
    warmup = meta["training"]["lr_warmup_epochs"]
    for row, part in zip(kept, parts):
        assert log["epoch"][row - 1] == part["best_epoch"]
        score = log.get(f"val_score_{part['part']}", log["val_score"])[row - 1]
        assert score == pytest.approx(part["val_score"])
        if log["epoch"].max() > warmup:
            assert part["best_epoch"] > warmup
    (info,) = method_infos(trained_run, [name], None)
    assert info.best_epochs == kept


@pytest.mark.slow
def test_bd_with_a_slide_head_trains_saves_and_loads_back(tiny_cohort, tmp_path):
    """`lambda_slide` through the real training loop: its term is logged and positive every
    epoch, the head is saved in M's part, and the run loads back with it (strict weights)."""
    from bidistill.inference.load import load_trained

    config = fast_config(tiny_cohort)
    cohort = load_cohort(config.cohort)
    splits = resolve_splits(cohort, config.cohort.splits, tmp_path / "splits.json")
    method_cfg = MethodConfig(name="bd", label="bd-slide", lambda_slide=1.0)
    method_dir = train_method(config, method_cfg, tmp_path, cohort=cohort, splits=splits)
    log = pd.read_csv(method_dir / "train_log.csv")
    assert np.isfinite(log["loss_ce_slide"]).all() and log["loss_ce_slide"].gt(0).all()
    method, _, _ = load_trained(method_dir)
    assert method.options.lambda_slide == 1.0 and hasattr(method, "slide_head")
    predictions = pd.read_csv(method_dir / "predictions.csv")
    assert predictions["prob_present"].between(0, 1).all()


@pytest.mark.slow
def test_a_slides_start_trains_the_slide_read_first(tiny_cohort, tmp_path):
    """`clinical_start: slides` through the real training loop (BD: its own stage has two
    parts): a stage `slides` first, whose read ignores the clinical data (the validation AUC
    with it given equals the one without), then BD's joint stage, which starts from the slide
    read; model.json keeps both selections, and a second run gives the same numbers."""
    config = fast_config(tiny_cohort, epochs=4, patience=4)
    cohort = load_cohort(config.cohort)
    splits = resolve_splits(cohort, config.cohort.splits, tmp_path / "splits.json")
    method_cfg = MethodConfig(name="bd", clinical_start="slides")
    first = train_method(config, method_cfg, tmp_path / "first", cohort=cohort, splits=splits)
    log = pd.read_csv(first / "train_log.csv")
    assert log["stage"].tolist() == ["slides"] * 4 + ["joint"] * 5
    assert log["epoch"].tolist() == [1, 2, 3, 4, 0, 1, 2, 3, 4]
    read, joint = log[log["stage"] == "slides"], log[log["stage"] == "joint"]
    np.testing.assert_allclose(read["val_auc_present"], read["val_auc_absent"])
    assert read["loss_ce_slides"].gt(0).all() and joint["loss_kl"].notna().sum() == 4
    selection = json.loads((first / "model.json").read_text())["selection"]
    assert [s["stage"] for s in selection] == ["slides", "joint"]
    assert [p["part"] for p in selection[1]["parts"]] == ["multi", "single"]
    best = selection[0]["parts"][0]
    kept = read.iloc[best["best_epoch"] - 1]
    assert best["val_score"] == kept["val_auc_absent"]
    # The joint stage's epoch 0 (validated before any step) is the selected slide read: M
    # predicts each patient with clinical data as the read did.
    start = joint.iloc[0]
    assert start["epoch"] == 0 and np.isnan(start["loss_total"])
    assert start["val_auc_with_clinical"] == kept["val_auc_with_clinical"]

    again = train_method(config, method_cfg, tmp_path / "again", cohort=cohort, splits=splits)
    timing = ["seconds"]
    pd.testing.assert_frame_equal(
        pd.read_csv(again / "train_log.csv").drop(columns=timing), log.drop(columns=timing)
    )
    pd.testing.assert_frame_equal(
        pd.read_csv(again / "predictions.csv"), pd.read_csv(first / "predictions.csv")
    )


@pytest.mark.slow
def test_a_reads_start_trains_the_clinical_read_second(tiny_cohort, tmp_path):
    """`clinical_start: reads` through the real training loop: the slides stage, then a stage
    `clinical` on the clinical data alone (without it every patient gets the same prediction),
    which trains the fused model's clinical encoder and nothing of its slide read; the fused
    stage starts from the slide read (epoch 0 as with `slides`), and a rerun gives the same
    numbers."""
    config = fast_config(tiny_cohort, epochs=3, patience=3)
    cohort = load_cohort(config.cohort)
    splits = resolve_splits(cohort, config.cohort.splits, tmp_path / "splits.json")
    slides_dir = train_method(
        config,
        MethodConfig(name="fusion-mean", clinical_start="slides"),
        tmp_path / "slides",
        cohort=cohort,
        splits=splits,
    )
    method_cfg = MethodConfig(name="fusion-mean", clinical_start="reads")
    first = train_method(config, method_cfg, tmp_path / "first", cohort=cohort, splits=splits)
    log = pd.read_csv(first / "train_log.csv")
    assert log["stage"].tolist() == ["slides"] * 3 + ["clinical"] * 3 + ["main"] * 4
    clinical = log[log["stage"] == "clinical"]
    assert clinical["loss_ce_clinical"].gt(0).all()
    assert (clinical["val_auc_absent"] == 0.5).all()
    # The same slides stage as `slides` (the clinical read is built after the method), and the
    # fused stage's epoch 0 is that read again: the clinical stage left it alone.
    before = pd.read_csv(slides_dir / "train_log.csv")
    timing = ["seconds"]
    pd.testing.assert_frame_equal(
        log[log["stage"] == "slides"].drop(columns=timing).dropna(axis=1, how="all"),
        before[before["stage"] == "slides"].drop(columns=timing).dropna(axis=1, how="all"),
    )
    start = log[log["stage"] == "main"].iloc[0]
    start_before = before[before["stage"] == "main"].iloc[0]
    assert start["epoch"] == 0
    assert start["val_auc_with_clinical"] == start_before["val_auc_with_clinical"]

    again = train_method(config, method_cfg, tmp_path / "again", cohort=cohort, splits=splits)
    pd.testing.assert_frame_equal(
        pd.read_csv(again / "train_log.csv").drop(columns=timing), log.drop(columns=timing)
    )


@pytest.mark.slow
def test_a_fused_stage_that_never_beats_the_slide_read_keeps_it(tiny_cohort, tmp_path):
    """The fused stage after the slides stage counts its start (the selected slide read, its
    clinical columns silent) as epoch 0: where no fused epoch beats it on the validation
    patients, it is what the method keeps, so the clinical data changes no prediction. A
    learning rate too small to move anything makes every fused epoch equal to the start."""
    config = fast_config(tiny_cohort, epochs=3, patience=3, lr=1e-12)
    cohort = load_cohort(config.cohort)
    splits = resolve_splits(cohort, config.cohort.splits, tmp_path / "splits.json")
    method_cfg = MethodConfig(name="fusion-mean", clinical_start="slides")
    method_dir = train_method(config, method_cfg, tmp_path, cohort=cohort, splits=splits)
    selection = json.loads((method_dir / "model.json").read_text())["selection"]
    assert [(s["stage"], s["parts"][0]["best_epoch"]) for s in selection][1] == ("main", 0)
    predictions = pd.read_csv(method_dir / "predictions.csv")
    np.testing.assert_allclose(predictions["prob_present"], predictions["prob_absent"], atol=1e-6)
