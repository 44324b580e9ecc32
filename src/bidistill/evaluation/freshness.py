"""Is a run's evaluation current? The ``evaluate`` stage's inputs in ``run.json``.

The evaluation consumes the run's evaluation settings, ``splits.json`` and every method's
``predictions.csv``; ``bidistill run`` records their digests when it evaluates, ``bidistill
evaluate`` does the same, and ``bidistill train`` (which rewrites a method's predictions) leaves
the record as it was, so that a retrained method makes the evaluation stale. Whatever shows a
run's ``metrics.csv`` (``bidistill compare``) asks ``evaluation_check`` first.
"""

from __future__ import annotations

from pathlib import Path

from bidistill.config import ExperimentConfig, load_config
from bidistill.runs.fingerprint import StageCheck, StageInputs, check_stage, record_stage
from bidistill.runs.inputs import file_digest

EVALUATION_OUTPUTS = ("metrics.csv", "report.html", "predictions.csv")


def evaluation_stage(root: Path, run_dir: Path) -> str:
    """The stage's name in ``root``'s ``run.json``: ``evaluate``, or e.g.
    ``train_missing/0.5/evaluate`` for a run folder inside another."""
    return "evaluate" if run_dir == root else f"{run_dir.relative_to(root).as_posix()}/evaluate"


def evaluation_inputs(run_dir: Path, config: ExperimentConfig) -> StageInputs:
    """What the evaluation of ``run_dir`` consumes, as ``check_stage`` compares it."""
    inputs = StageInputs()
    inputs.add(
        "config",
        {
            "name": config.name,
            "evaluation": config.evaluation.model_dump(mode="json"),
            "methods": [m.key for m in config.methods],
        },
        says="evaluation settings",
    )
    inputs.add("splits", file_digest(run_dir / "splits.json"), says="splits.json")
    inputs.add_items(
        "predictions",
        {m.key: file_digest(run_dir / m.key / "predictions.csv") for m in config.methods},
        says="predictions",
        unit="method(s)",
    )
    return inputs


def evaluation_outputs(run_dir: Path) -> list[Path]:
    return [run_dir / name for name in EVALUATION_OUTPUTS]


def evaluation_check(run_dir: Path) -> StageCheck | None:
    """Whether ``run_dir``'s evaluation matches its predictions and settings; None where the run
    keeps no record to tell (no ``config.yaml`` or no evaluation in ``run.json``)."""
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        return None
    config = load_config(config_path)
    check = check_stage(run_dir, "evaluate", evaluation_inputs(run_dir, config))
    return check if check.recorded else None


def record_evaluation(run_dir: Path, config: ExperimentConfig) -> None:
    """Record that ``run_dir`` was just evaluated with ``config`` (the caller holds its lock)."""
    record_stage(run_dir, "evaluate", evaluation_inputs(run_dir, config))
