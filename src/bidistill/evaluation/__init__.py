"""Missing-modality evaluation: nested masks, statistics with CIs, DeLong, figures, report."""

from bidistill.evaluation.evaluate import evaluate_run
from bidistill.evaluation.inputs import PredictionsError, read_method_predictions
from bidistill.evaluation.missing import SplitSweep, nested_masks, sweep_split
from bidistill.evaluation.summary import EvaluationTables, summarize

__all__ = [
    "EvaluationTables",
    "PredictionsError",
    "SplitSweep",
    "evaluate_run",
    "nested_masks",
    "read_method_predictions",
    "summarize",
    "sweep_split",
]
