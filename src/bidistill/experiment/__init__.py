"""An experiment's stages and the commands that call them (`run`, `train`, `evaluate`, `demo`).

- ``stages``: the stages in order (``STAGES``), one entry function each, over an ``Experiment``;
- ``run``: ``run_experiment`` (every stage), ``train_methods``, ``evaluate_run_dir``;
- ``checks``: the checks before any work (per stage, and the run folder's own);
- ``tracking``: optional MLflow logging of a run;
- ``demo``: the synthetic demos.
"""

from bidistill.experiment.run import RunResult, evaluate_run_dir, run_experiment, train_methods

__all__ = ["RunResult", "evaluate_run_dir", "run_experiment", "train_methods"]
