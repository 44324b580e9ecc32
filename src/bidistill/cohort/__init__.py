"""Cohort tables, clinical encoding and splits (no torch here)."""

from bidistill.cohort.encoder import ClinicalEncoder, EncodedClinical
from bidistill.cohort.guard import check_separating_features
from bidistill.cohort.splits import Fold, Splits, make_splits, resolve_splits
from bidistill.cohort.table import Cohort, load_cohort

__all__ = [
    "ClinicalEncoder",
    "Cohort",
    "EncodedClinical",
    "Fold",
    "Splits",
    "check_separating_features",
    "load_cohort",
    "make_splits",
    "resolve_splits",
]
