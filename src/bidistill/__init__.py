"""bidistill: whole-slide image + clinical models that keep working when clinical data is missing.

``bidistill.load_run(run_dir)`` loads a trained run for prediction (see
``bidistill.inference.trained_run``); importing the package itself loads nothing heavy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from bidistill.inference.trained_run import TrainedRun


def load_run(run_dir, method: str | None = None, **kwargs) -> TrainedRun:
    """Load a trained method of a run directory: ``.predict(...)`` and ``.attention(...)``.

    See ``bidistill.inference.load.load_run`` for the arguments.
    """
    from bidistill.inference.load import load_run as _load_run

    return _load_run(run_dir, method, **kwargs)


__all__ = ["__version__", "load_run"]
