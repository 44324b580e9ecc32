"""Synthetic cohorts that anyone can make offline: for tests, demos and benchmarks.

``features``: cohort table + ``.h5`` feature files with a planted signal. ``bcnb``: a folder in
the exact BCNB layout (clinical xlsx, split files, JPEG slides, tumour polygons). ``latent``:
latent-trait cohorts whose Bayes-optimal posterior is known exactly; ``suite``: the accuracy
suite's generators built from them.
"""

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
