"""Synthetic cohorts that anyone can make offline: for tests, demos and benchmarks."""

from bidistill.synthetic.bcnb import make_bcnb_folder
from bidistill.synthetic.features import SYNTHETIC_ENCODER, make_feature_cohort
from bidistill.synthetic.latent import LatentSpec, draw_latent_cohort, make_latent_cohort
from bidistill.synthetic.suite import SUITE

__all__ = [
    "SUITE",
    "SYNTHETIC_ENCODER",
    "LatentSpec",
    "draw_latent_cohort",
    "make_bcnb_folder",
    "make_feature_cohort",
    "make_latent_cohort",
]
