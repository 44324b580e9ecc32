"""Inference: trained methods applied to new patients (predictions, attention, heatmaps)."""

from bidistill.inference.chunked import (
    DEFAULT_MEMORY_BUDGET,
    ArrayBag,
    BagTooLargeError,
    FileBag,
    encode_bag,
    predict_bag,
)
from bidistill.inference.load import load_trained
from bidistill.inference.predict import BagPredictions, predict_bags

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "ArrayBag",
    "BagPredictions",
    "BagTooLargeError",
    "FileBag",
    "encode_bag",
    "load_trained",
    "predict_bag",
    "predict_bags",
]
