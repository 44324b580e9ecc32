"""`bidistill demo`: a synthetic cohort and its whole run, from features or from slides; both
resume (the cohort is made once, the run keeps every stage that is done)."""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from bidistill._io import write_text
from bidistill.experiment.commands import RunResult, run_experiment
from bidistill.experiment.stages import Say

log = logging.getLogger(__name__)

DEMO_METHODS = ["bd", "wsi-only", "clinical-only", "fusion-mean", "moddrop"]


def run_demo(
    out_dir: str | Path,
    *,
    patients: int = 1058,
    seed: int = 0,
    progress: bool = True,
    say: Say | None = None,
) -> RunResult:
    """A synthetic feature cohort in ``out_dir/cohort`` and its full run in ``out_dir/run``.

    The cohort has as many patients as BCNB by default but small bags (64-dimensional features,
    30-120 instances per bag), so that training BD and four baselines and the full evaluation
    (6 rates x 10 mask seeds, 1000 bootstrap resamples) take under a minute on two CPU cores.
    """
    from bidistill.synthetic.features import make_feature_cohort

    out_dir = Path(out_dir)
    config_path = out_dir / "cohort" / "config.yaml"
    if not config_path.is_file():
        log.info("making a synthetic cohort of %d patients in %s", patients, config_path.parent)
        make_feature_cohort(
            config_path.parent,
            patients=patients,
            seed=seed,
            dim=64,
            instances=(30, 120),
            progress=progress,
        )
        raw = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        raw["name"] = "demo"
        raw["methods"] = DEMO_METHODS
        write_text(
            config_path,
            "# `bidistill demo` config: a synthetic cohort, BD and baselines."
            "\n" + yaml.safe_dump(raw, sort_keys=False),
        )
    return run_experiment(config_path, out_dir / "run", progress=progress, say=say)


DEMO_ENCODER = "timm:resnet18"  # small enough for a laptop CPU; random weights (no download)
DEMO_PATIENTS = 200  # 120 training patients: 15 optimiser steps an epoch at DEMO_TRAINING's batch
# Patient-level noise on the slides' planted signal, set (before any run, not by results) so that
# an oracle reading the planted strength exactly has AUC ~0.85 (``signal_oracle_auc``): a
# learned WSI-only model stays below that, as on real slides, instead of at 1.000.
DEMO_SLIDE_NOISE = 0.48
# The demo's training differs from the library defaults (batch size 16) in its batch size: small
# cohorts need small batches for enough optimiser steps an epoch; the config file says so too.
DEMO_TRAINING = {"epochs": 40, "patience": 10, "batch_size": 8, "seed": 0}


def run_slides_demo(
    out_dir: str | Path,
    *,
    patients: int = DEMO_PATIENTS,
    seed: int = 0,
    progress: bool = True,
    say=None,
):
    """The whole tool from pixels on a laptop CPU, in a few minutes: synthetic slides in the
    BCNB layout (``out_dir/BCNB``), ``bcnb prepare`` (``out_dir/cohort``), then the run
    (``out_dir/run``) with a small random-init encoder, which the report says loudly."""
    from bidistill.cohort.bcnb import prepare_bcnb
    from bidistill.synthetic.bcnb import make_bcnb_folder

    out_dir = Path(out_dir)
    root, cohort_dir = out_dir / "BCNB", out_dir / "cohort"
    if not (root / "patient-clinical-data.xlsx").is_file():
        log.info("making %d synthetic BCNB slides in %s", patients, root)
        make_bcnb_folder(
            root,
            patients=patients,
            seed=seed,
            signal_noise=DEMO_SLIDE_NOISE,
            progress=progress,
        )
    config_path = cohort_dir / "config.yaml"
    if not config_path.is_file():
        report = prepare_bcnb(root, cohort_dir)
        raw = yaml.safe_load(report.config_path.read_text(encoding="utf-8"))
        raw["name"] = "demo-from-slides"
        raw["tiling"] = {"patch_size": 224, "mpp": 0.5}
        raw["features"] = {
            "encoder": DEMO_ENCODER,
            "random_init": True,  # nothing to download; the report says the features are random
            "batch_size": 32,
            "num_workers": 1,
        }
        raw["methods"] = DEMO_METHODS
        raw["training"] = dict(DEMO_TRAINING)
        write_text(
            config_path,
            "# `bidistill demo --from-slides`: synthetic BCNB-layout slides, a random-init "
            f"encoder.\n# training.batch_size is {DEMO_TRAINING['batch_size']} here (library "
            "default 16): small cohorts need small batches for enough optimiser steps an epoch "
            f"(15 with {DEMO_PATIENTS} patients).\n"
            + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True),
        )
    if say is not None:
        say(
            f"demo settings (the demo's own, not the library defaults): {config_path} "
            f"(training.batch_size {DEMO_TRAINING['batch_size']}; slides with patient-level "
            f"noise {DEMO_SLIDE_NOISE} on their signal)"
        )
    return run_experiment(config_path, out_dir / "run", progress=progress, say=say)
