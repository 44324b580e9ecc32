"""Inference: trained methods applied to new patients (predictions, attention)."""

from bidistill.inference.load import load_trained
from bidistill.inference.predict import BagPredictions, predict_bags

__all__ = ["BagPredictions", "load_trained", "predict_bags"]
