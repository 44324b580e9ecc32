"""Is a run's evaluation current? The ``evaluate`` stage's inputs as the run records them, so
that a retrained method makes the evaluation stale.
"""

from __future__ import annotations

from pathlib import Path

from bidistill.config import ExperimentConfig, load_config
from bidistill.runs.fingerprint import StageCheck, StageInputs, check_stage
from bidistill.runs.inputs import file_digest
from bidistill.runs.rundir import RunDir


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
    run = RunDir(run_dir)
    inputs.add("splits", file_digest(run.splits), says=run.splits.name)
    inputs.add_items(
        "predictions",
        {m.key: file_digest(run.joined(m.key).predictions) for m in config.methods},
        says="predictions",
        unit="method(s)",
    )
    return inputs


def evaluation_outputs(run_dir: Path) -> list[Path]:
    run = RunDir(run_dir)
    return [run.metrics, run.report, run.predictions]


def evaluation_check(run_dir: Path) -> StageCheck | None:
    """Whether ``run_dir``'s evaluation matches its predictions and settings; None where the run
    keeps no record to tell (no ``config.yaml`` or no evaluation in ``run.json``)."""
    config_path = RunDir(run_dir).config
    if not config_path.is_file():
        return None
    config = load_config(config_path)
    check = check_stage(run_dir, "evaluate", evaluation_inputs(run_dir, config))
    return check if check.recorded else None
