"""Training: one trainer over bag sources (feature rows or tiles), its loop, its data."""

from bidistill.training.data import PatientBags, bag_loader, collate_bags, withhold_clinical
from bidistill.training.feature_source import open_feature_store, predict_loader
from bidistill.training.loop import fit
from bidistill.training.seeding import seed_everything
from bidistill.training.train import MethodFiles, train_method

__all__ = [
    "MethodFiles",
    "PatientBags",
    "bag_loader",
    "collate_bags",
    "fit",
    "open_feature_store",
    "predict_loader",
    "seed_everything",
    "train_method",
    "withhold_clinical",
]
