"""The run folder: its files and layout (``rundir``), one run at a time (a lock), what each
stage consumed (fingerprints in ``run.json``)."""

from bidistill.runs.fingerprint import (
    StageCheck,
    StageInputs,
    check_stage,
    forget_stage,
    record_stage,
)
from bidistill.runs.lock import RunDirBusyError, lock_run_dir

__all__ = [
    "RunDirBusyError",
    "StageCheck",
    "StageInputs",
    "check_stage",
    "forget_stage",
    "lock_run_dir",
    "record_stage",
]
