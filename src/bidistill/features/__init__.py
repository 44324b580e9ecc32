"""Patch features: the .h5 feature files and the store that serves them to training."""

from bidistill.features.store import (
    FeatureFile,
    FeatureStore,
    feature_dim,
    feature_path,
    read_feature_file,
    write_feature_file,
)

__all__ = [
    "FeatureFile",
    "FeatureStore",
    "feature_dim",
    "feature_path",
    "read_feature_file",
    "write_feature_file",
]
