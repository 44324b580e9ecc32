"""Synthetic cohorts that anyone can make offline: for tests, demos and benchmarks.

``features``: cohort table + ``.h5`` feature files with a planted signal. ``bcnb``: a folder in
the exact BCNB layout (clinical xlsx, split files, JPEG slides, tumour polygons).
"""

from bidistill.synthetic.bcnb import make_bcnb_folder
from bidistill.synthetic.features import SYNTHETIC_ENCODER, make_feature_cohort

__all__ = ["SYNTHETIC_ENCODER", "make_bcnb_folder", "make_feature_cohort"]
