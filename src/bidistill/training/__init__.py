"""Training: bag datasets over the feature files, the training loop, checkpoints."""

from bidistill.training.checkpoint import save_checkpoint
from bidistill.training.data import PatientBags, bag_loader, collate_bags, withhold_clinical
from bidistill.training.loop import fit, predict_loader, resolve_device
from bidistill.training.seeding import seed_everything
from bidistill.training.train import open_feature_store, train_method

__all__ = [
    "PatientBags",
    "bag_loader",
    "collate_bags",
    "fit",
    "open_feature_store",
    "predict_loader",
    "resolve_device",
    "save_checkpoint",
    "seed_everything",
    "train_method",
    "withhold_clinical",
]
