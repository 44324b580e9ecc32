"""An end-to-end run stopped after epoch k resumes at epoch k + 1, with its optimiser and schedule.

Deterministic training from scratch reaches the weights of an uninterrupted run too, so equal
weights alone cannot tell a resume from a restart: these tests also count the epochs the rerun
trains (through the progress line's ``EpochBar.start_epoch``, which every epoch calls) and
compare the learning rate and losses of every epoch with the uninterrupted run's.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from bidistill.cohort import load_cohort, resolve_splits
from bidistill.config import load_config
from bidistill.runs.rundir import RunDir
from bidistill.slides.stage import tile_from_config
from bidistill.synthetic.patches import make_patch_cohort
from bidistill.training import train_method
from bidistill.training.progress import EpochBar

pytestmark = pytest.mark.slow

EPOCHS = 4
STOPPED_AFTER = 2  # epochs done when the first run is stopped


@pytest.fixture(scope="module")
def cohort_config(tmp_path_factory) -> Path:
    """20 patients of 32 px patches, tiled; BD end to end with SGD + momentum and a cosine
    schedule, so that both the optimiser's state and the schedule's position matter."""
    path = make_patch_cohort(tmp_path_factory.mktemp("resume") / "cohort", patients=20, seed=1)
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    raw["methods"] = [{"name": "bd", "lambda_kd": 0.5, "temperature": 1.2}]
    raw["training"].update({"epochs": EPOCHS, "patience": EPOCHS + 1, "lr": 0.05})
    raw["training"]["end_to_end"].update(
        {"optimizer": "sgd", "momentum": 0.9, "scheduler": "cosine"}
    )
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    tile_from_config(load_config(path), progress=False)
    return path


def train_bd(config_path: Path, run: Path) -> Path:
    """Train the config's one method (BD, end to end) into ``run``; returns the method's folder.

    The only place that calls the trainer: adapt it when ``train_method``'s signature changes.
    """
    config = load_config(config_path)
    assert config.training.mode == "end-to-end"
    cohort = load_cohort(config.cohort)
    splits = resolve_splits(cohort, config.cohort.splits, run / "splits.json")
    (method_cfg,) = config.methods
    out = RunDir(run).method(method_cfg.key)
    train_method(config, method_cfg, out, cohort=cohort, splits=splits, progress=False)
    return out.path


def epochs_started(monkeypatch, *, stop_at: int | None = None) -> list[int]:
    """Record the epoch number of every ``EpochBar.start_epoch`` call; with ``stop_at``, raise
    KeyboardInterrupt (as Ctrl-C would) when that epoch is about to start."""
    started: list[int] = []
    original = EpochBar.start_epoch

    def start_epoch(self, epoch: int, *args, **kwargs) -> None:
        if epoch == stop_at:
            raise KeyboardInterrupt
        started.append(epoch)
        original(self, epoch, *args, **kwargs)

    monkeypatch.setattr(EpochBar, "start_epoch", start_epoch)
    return started


@pytest.fixture(scope="module")
def uninterrupted(cohort_config, tmp_path_factory) -> Path:
    with pytest.MonkeyPatch.context() as monkeypatch:
        started = epochs_started(monkeypatch)
        method_dir = train_bd(cohort_config, tmp_path_factory.mktemp("uninterrupted"))
    assert started == list(range(1, EPOCHS + 1))
    return method_dir


@pytest.fixture(scope="module")
def resumed(cohort_config, tmp_path_factory) -> tuple[Path, list[int]]:
    """A run stopped as epoch STOPPED_AFTER + 1 starts, then run again; (its folder, the epochs
    the second run started)."""
    run = tmp_path_factory.mktemp("stopped")
    with pytest.MonkeyPatch.context() as monkeypatch:
        first = epochs_started(monkeypatch, stop_at=STOPPED_AFTER + 1)
        with pytest.raises(KeyboardInterrupt):
            train_bd(cohort_config, run)
    assert first == list(range(1, STOPPED_AFTER + 1))
    method_dir = run / "bd"
    assert (method_dir / "training_state.pt").is_file()
    assert not (method_dir / "predictions.csv").exists()
    with pytest.MonkeyPatch.context() as monkeypatch:
        second = epochs_started(monkeypatch)
        assert train_bd(cohort_config, run) == method_dir
    return method_dir, second


def test_a_resumed_run_trains_only_the_remaining_epochs(resumed):
    method_dir, started = resumed
    assert started == list(range(STOPPED_AFTER + 1, EPOCHS + 1))
    log = pd.read_csv(method_dir / "train_log.csv")
    assert log["epoch"].tolist() == list(range(1, EPOCHS + 1))  # each epoch once, in order
    assert not (method_dir / "training_state.pt").exists()  # removed once done
    assert (method_dir / "predictions.csv").is_file()


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(resumed, uninterrupted):
    method_dir, _ = resumed
    expected, got = (
        load_file(str(uninterrupted / "model.safetensors")),
        load_file(str(method_dir / "model.safetensors")),
    )
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    pd.testing.assert_frame_equal(
        pd.read_csv(method_dir / "predictions.csv"), pd.read_csv(uninterrupted / "predictions.csv")
    )


def test_a_resumed_run_continues_the_schedule_and_the_optimiser(resumed, uninterrupted):
    method_dir, _ = resumed
    log = pd.read_csv(method_dir / "train_log.csv")
    reference = pd.read_csv(uninterrupted / "train_log.csv")
    # The cosine schedule moves every epoch: a schedule restarted at the resume would repeat
    # the first epochs' learning rates.
    assert reference["lr"].nunique() == EPOCHS
    pd.testing.assert_series_equal(log["lr"], reference["lr"])
    # The losses of the epochs after the resume come from the restored momentum buffers too
    # (a fresh SGD optimiser takes other steps from the same weights).
    losses = [c for c in reference.columns if c.startswith("loss_")]
    pd.testing.assert_frame_equal(log[losses], reference[losses])


@pytest.mark.parametrize(
    ("start", "stop_at", "redone"),
    [
        ("slides", ("bd/joint", 2), [("bd/joint", 2)]),
        ("reads", ("bd/clinical", 2), [("bd/clinical", 2), ("bd/joint", 1), ("bd/joint", 2)]),
    ],
)
def test_a_run_stopped_after_the_slides_stage_resumes_in_the_next(
    cohort_config, tmp_path, start, stop_at, redone
):
    """``clinical_start: slides`` adds a stage before BD's joint one (``reads`` two): a run
    stopped in a later stage's second epoch trains from that epoch on and no earlier epoch
    again, and ends with the weights of an uninterrupted run."""
    raw = yaml.safe_load(cohort_config.read_text(encoding="utf-8"))
    raw["methods"][0]["clinical_start"] = start
    raw["training"]["epochs"] = 2
    config = cohort_config.with_name(f"{start}-start.yaml")  # beside its cohort table
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    reads = ["slides", "clinical"] if start == "reads" else ["slides"]
    started: list[tuple[str, int]] = []
    stop = None
    original = EpochBar.start_epoch

    def start_epoch(self, epoch: int, *args, **kwargs) -> None:
        if (self.label, epoch) == stop:
            raise KeyboardInterrupt
        started.append((self.label, epoch))
        original(self, epoch, *args, **kwargs)

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(EpochBar, "start_epoch", start_epoch)
        whole = train_bd(config, tmp_path / "whole")
        assert started == [(f"bd/{stage}", e) for stage in [*reads, "joint"] for e in (1, 2)]
        started.clear()
        stop = stop_at
        with pytest.raises(KeyboardInterrupt):
            train_bd(config, tmp_path / "stopped")
        stop = None
        started.clear()
        resumed = train_bd(config, tmp_path / "stopped")
    assert started == redone
    expected = load_file(str(whole / "model.safetensors"))
    got = load_file(str(resumed / "model.safetensors"))
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []
    log = pd.read_csv(resumed / "train_log.csv")
    expected_stages = [stage for stage in reads for _ in (1, 2)] + ["joint"] * 3
    assert log["stage"].tolist() == expected_stages  # joint 0: the start
