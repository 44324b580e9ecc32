"""From pixels to features: the tile and extract stages as `bidistill run` drives them, and the
demo that starts from slides.

``prepare_features`` is the first step of a run: when the config has a ``slides`` section and some
slide has no feature file yet, it tiles the slides not tiled and extracts the features not
extracted (each stage skips what is done), then checks that the features are of the kind the
config names and the run directory was trained on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from bidistill._text import count
from bidistill.config import ExperimentConfig
from bidistill.features.identity import FeatureIdentity
from bidistill.features.store import feature_path
from bidistill.preflight import check_cohort_features
from bidistill.runner import StageSummary

log = logging.getLogger(__name__)

RUN_HINT = (
    "`bidistill tile CONFIG --skip-errors` and `bidistill extract CONFIG --skip-errors` go on past "
    "failing slides; then remove those slides from the cohort table"
)
RANDOM_FEATURES_WARNING = (
    "the features come from a RANDOMLY INITIALISED encoder (features.random_init): they carry "
    "no pretrained knowledge, so these results say nothing about real performance"
)


@dataclass
class PreparedFeatures:
    """What ``prepare_features`` did: the stages' summaries (None when skipped) and the
    identity of the cohort's features."""

    tiling: StageSummary | None
    extraction: StageSummary | None
    identity: FeatureIdentity | None


def prepare_features(
    config: ExperimentConfig,
    run_dir: str | Path | None = None,
    *,
    progress: bool = True,
    slide_ids: list[str] | None = None,
) -> PreparedFeatures:
    """Tile and extract what is missing, then check the features against the config and the run.

    Args:
        config: the experiment.
        run_dir: the run directory; methods trained there recorded the identity of their features
            (``model.json``), and features of another kind are refused.
        progress: show progress bars and the stages' one-line summaries.
        slide_ids: the cohort's slides, when the caller has loaded the cohort already.

    Raises:
        SlideError: a slide cannot be tiled or encoded (the message says how to go on past it).
        FeatureFileError: feature files of another encoder, patch size or MPP than the config or
            the trained methods.
    """
    slide_ids = _cohort_slide_ids(config) if slide_ids is None else slide_ids
    if not slide_ids:
        return PreparedFeatures(None, None, None)
    if config.training.mode == "end-to-end":  # the methods read tiles, not features (issue 13)
        return _prepare_tiles(config, progress=progress)
    if config.features.random_init:
        log.warning("%s", RANDOM_FEATURES_WARNING)  # the CLI shows it once, as `warning:`
    from bidistill.features.extract import extract_from_config, out_of_date_slides
    from bidistill.slides.run import tile_from_config

    missing = [s for s in slide_ids if not feature_path(config.features.dir, s).is_file()]
    missing += out_of_date_slides(config)  # a slide replaced under the same id is redone
    tiling = extraction = None
    if missing and config.slides is not None:
        log.info("%d of %d slides lack current features", len(missing), len(slide_ids))
        tiling = tile_from_config(config, progress=progress, hint=RUN_HINT)
        _say(_one_line(tiling, "tiled", "tile"), progress)
        extraction = extract_from_config(config, progress=progress, hint=RUN_HINT)
        _say(_one_line(extraction, "extracted", "patch"), progress)
    elif not missing:
        log.info("features: all %d slides done, tiling and extraction skipped", len(slide_ids))
    identity = check_cohort_features(config, slide_ids, Path(run_dir) if run_dir else None)
    return PreparedFeatures(tiling, extraction, identity)


def _prepare_tiles(config: ExperimentConfig, *, progress: bool) -> PreparedFeatures:
    """End-to-end mode: tile what is not tiled; the encoder trains inside the methods."""
    from bidistill.slides.run import tile_from_config

    if config.features.random_init:
        log.warning("%s", RANDOM_FEATURES_WARNING)  # the CLI shows it once, as `warning:`
    tiling = tile_from_config(config, progress=progress, hint=RUN_HINT)
    _say(_one_line(tiling, "tiled", "tile"), progress)
    return PreparedFeatures(tiling, None, None)


def _cohort_slide_ids(config: ExperimentConfig) -> list[str]:
    if config.cohort.slide_column is None:
        return []  # clinical-only work
    from bidistill.cohort import load_cohort

    slides = load_cohort(config.cohort).slides
    return [] if slides is None or len(slides) == 0 else [str(s) for s in slides["slide_id"]]


def _one_line(summary: StageSummary, verb: str, unit: str) -> str:
    line = (
        f"{summary.stage}: {verb} {count(len(summary.done), 'slide')} "
        f"({count(sum(summary.done.values()), unit)}), {len(summary.skipped)} already done"
    )
    if summary.redone:
        line += f", {len(summary.redone)} redone ({'; '.join(summary.redone.values())})"
    if summary.failed:
        line += f", {len(summary.failed)} failed: {', '.join(summary.failed)}"
    return line


def _say(message: str, enabled: bool) -> None:
    if enabled:
        from rich.console import Console

        Console(stderr=True).print(message, highlight=False, soft_wrap=True)


# --- the demo from pixels -----------------------------------------------------------------------

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
    """The whole tool from pixels on a laptop CPU, in a few minutes.

    Synthetic slides in the exact BCNB layout (``out_dir/BCNB``) → ``bcnb prepare``
    (``out_dir/cohort``) → tile → extract with a small randomly initialised encoder → train BD and
    baselines → evaluate and report (``out_dir/run``). The report and the console say loudly that
    the features are random. Every step resumes. The slides' signal is noisy
    (``DEMO_SLIDE_NOISE``) and the training batch small (``DEMO_TRAINING``, not the library
    defaults), so that the methods train and none separates the classes perfectly.

    Returns:
        the pipeline's ``RunResult``.
    """
    import yaml

    from bidistill._io import write_text
    from bidistill.cohort.bcnb import prepare_bcnb
    from bidistill.pipeline import DEMO_METHODS, run_experiment
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
