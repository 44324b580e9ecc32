"""Training: bag datasets over the feature files, the training loop, checkpoints."""

from bidistill.training.checkpoint import CheckpointError, load_trained, save_checkpoint
from bidistill.training.data import FeatureStore, PatientBags, collate_bags, withhold_clinical
from bidistill.training.loop import fit, predict_loader, resolve_device
from bidistill.training.seeding import seed_everything
from bidistill.training.train import (
    BagPredictions,
    open_feature_store,
    predict_bags,
    train_method,
)

__all__ = [
    "BagPredictions",
    "CheckpointError",
    "FeatureStore",
    "PatientBags",
    "collate_bags",
    "fit",
    "load_trained",
    "open_feature_store",
    "predict_bags",
    "predict_loader",
    "resolve_device",
    "save_checkpoint",
    "seed_everything",
    "train_method",
    "withhold_clinical",
]
