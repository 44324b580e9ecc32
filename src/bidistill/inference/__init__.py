"""Inference: trained methods applied to new patients (predictions, attention, heatmaps)."""

from bidistill.inference.feature_source import FeatureIdentityError, check_feature_identity
from bidistill.inference.load import decision_thresholds, load_run, load_trained
from bidistill.inference.new_slides import Tiles
from bidistill.inference.predict import BagPredictions, predict_bags
from bidistill.inference.results import PatientPrediction, SlideAttention
from bidistill.inference.trained_run import TrainedRun
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
    "Tiles",
    "TrainedRun",
    "check_feature_identity",
    "decision_thresholds",
    "encode_bag",
    "load_run",
    "load_trained",
    "predict_bag",
    "predict_bags",
]
