"""Inference: trained methods applied to new patients (predictions, attention, heatmaps)."""

from bidistill.inference.identity import FeatureIdentityError, check_feature_identity
from bidistill.inference.load import decision_thresholds, load_trained
from bidistill.inference.predict import BagPredictions, predict_bags
from bidistill.inference.results import PatientPrediction, SlideAttention
from bidistill.inference.run import TrainedRun, load_run
from bidistill.models.streaming import (
    DEFAULT_MEMORY_BUDGET,
    ArrayBag,
    BagTooLargeError,
    encode_bag,
    predict_bag,
)
from bidistill.training.data import FileBag

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "ArrayBag",
    "BagPredictions",
    "BagTooLargeError",
    "FeatureIdentityError",
    "FileBag",
    "PatientPrediction",
    "SlideAttention",
    "TrainedRun",
    "check_feature_identity",
    "decision_thresholds",
    "encode_bag",
    "load_run",
    "load_trained",
    "predict_bag",
    "predict_bags",
]
