"""An experiment's stages (``stages.STAGES``) and the commands that call them (``commands``:
`run`, `train`, `evaluate`), their checks, tracking and the demos."""

from bidistill.experiment.commands import (
    RunResult,
    evaluate_run_dir,
    run_experiment,
    train_methods,
)

__all__ = ["RunResult", "evaluate_run_dir", "run_experiment", "train_methods"]
