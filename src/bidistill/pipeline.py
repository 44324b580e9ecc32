"""``bidistill run``: every stage of an experiment that is not done yet, in order.

resolve config -> checks -> load cohort -> ``splits.json`` -> train each method -> evaluate.

Before any work, and before the run folder is made: the config, the methods, the checks of every
stage the run goes through (``bidistill.preflight``: cohort table, slides, feature files, devices)
and the run folder (made by this config file, with the same settings) are checked; then the
output folder is made and locked (``bidistill.runs.lock``: a second run on it is refused), the
label table is shown, and the splits are checked for both classes. Each stage records in
``run.json`` what it consumed (``bidistill.runs.fingerprint``): the cohort rows, splits and
feature files a method was trained on, the predictions and settings the evaluation used. A
rerun redoes exactly the stages whose inputs changed, says why on the console, and keeps the
others, so an interrupted run continues where it stopped and adding a method trains only that
method. A trained method's ``predictions.csv`` is written last and its record after it, so a
stage that stopped half-way is never taken for done.

k-fold mode trains each fold into ``folds/fold<i>/<method>/`` and then joins the folds'
predictions into ``<method>/predictions.csv`` (with its ``fold`` column).

The optional train-time missingness grid (``evaluation.train_missing_rates``) trains every method
again with that share of the training patients stripped of all clinical data (nested, stratified
masks as at test time, mask seed 0), in ``train_missing/<rate>/``, evaluates each over the same
test rates, and writes ``train_missing.csv`` (one row per training rate, method and test rate).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bidistill._io import write_csv, write_json, write_text
from bidistill.config import ExperimentConfig, dump_config, load_config
from bidistill.errors import BidistillError, ConfigError
from bidistill.runs.fingerprint import (
    StageInputs,
    check_stage,
    forget_stage,
    read_run_info,
    record_stage,
    write_run_info,
)
from bidistill.runs.inputs import (
    FeatureIdentities,
    config_sections,
    method_inputs,
)
from bidistill.runs.lock import lock_run_dir
from bidistill.runs.preflight import (
    check_config_origin,
    check_trainable_cohort,
    prepare_output_dir,
    record_config_origin,
)

log = logging.getLogger(__name__)

# Sections that decide what a trained method is; a run directory refuses a config that changes
# them (methods may be added and evaluation settings changed: that only adds or redoes work).
FIXED_SECTIONS = ("cohort", "slides", "tiling", "features", "training")

Say = Callable[[str], None]


@dataclasses.dataclass
class RunResult:
    run_dir: Path
    metrics: pd.DataFrame
    trained: list[str]  # methods trained by this call (the others were done already)
    evaluated: bool  # False when the evaluation was up to date


def run_experiment(
    config_path: str | Path,
    out_dir: str | Path,
    *,
    progress: bool = True,
    say: Say | None = None,
) -> RunResult:
    """Run every stage of the experiment that is not done yet.

    Args:
        config_path: the experiment YAML.
        out_dir: the run directory (created when missing).
        progress: show progress bars while training.
        say: where to write what the run decides (label table, stages redone or kept and why);
            everything said also goes to ``run.log``. Default: the log only.

    Side effects: writes the run directory of DESIGN.md (``config.yaml``, ``splits.json``,
    ``cohort.json``, one folder per method, the evaluation files, ``run.log``, ``run.json``);
    holds ``run.lock`` while it runs.

    Raises:
        ConfigError: bad config or device, an unusable ``out_dir``, or ``out_dir`` holds a run
            of a config with other cohort, features or training settings.
        RunDirBusyError: another process is running in ``out_dir``.
        CohortError, FeatureFileError, PredictionsError: bad input files.
    """
    out_dir = Path(out_dir)
    config = load_config(config_path)
    from bidistill.training.distributed import launched_by_torchrun

    if launched_by_torchrun():  # every process would run every stage (issue 13)
        raise ConfigError(
            "`bidistill run` runs in one process; under torchrun, train with `bidistill train "
            f"{config_path} --out {out_dir}`, then `bidistill run` alone evaluates and keeps it"
        )
    from bidistill.models.registry import check_method_configs

    check_method_configs(config.methods, source=config_path)
    # Checked before the run directory exists, so that a refused run leaves nothing behind.
    checks = check_before_run(config, config_path, out_dir)
    prepare_output_dir(out_dir)
    tell = _teller(say)
    with lock_run_dir(out_dir, command=f"run {config_path} --out {out_dir}", say=tell):
        handler = _add_file_log(out_dir / "run.log")
        tracker = None
        try:
            from bidistill.tracking import open_tracker

            tracker = open_tracker(config, out_dir)
            result = _run(
                config,
                config_path,
                out_dir,
                progress=progress,
                say=tell,
                tracker=tracker,
                store=checks.store,
            )
            tracker.finish(ok=True)
            return result
        except BidistillError as err:  # bad input: the message says it all, no traceback
            log.error("run stopped: %s", err)
            if tracker is not None:
                tracker.finish(ok=False)
            raise
        except Exception as err:
            log.exception("run stopped")
            if tracker is not None:
                tracker.finish(ok=False)
            err.log_path = out_dir / "run.log"  # the CLI's error handler points the user there
            raise
        finally:
            logging.getLogger("bidistill").removeHandler(handler)
            handler.close()


def _teller(say: Say | None) -> Say:
    """``say`` that also logs (so that ``run.log`` holds what the console showed)."""

    def tell(message: str) -> None:
        log.info("%s", message)
        if say is not None:
            say(message)

    return tell


def _run(
    config: ExperimentConfig,
    config_path: str | Path,
    out_dir: Path,
    *,
    progress: bool,
    say: Say,
    tracker,
    store=None,
) -> RunResult:
    started = time.time()
    _write_resolved_config(config, out_dir)
    record_config_origin(out_dir, config_path)
    log.info("run %s: config %s", out_dir, config_path)
    from bidistill.cohort import load_cohort

    say(f"loading the cohort table {config.cohort.table}")
    cohort = load_cohort(config.cohort)
    if cohort.label_summary is not None:
        say(cohort.label_summary.format())
    from bidistill.pixels import prepare_features

    slide_ids = [] if cohort.slides is None else [str(s) for s in cohort.slides["slide_id"]]
    prepare_features(config, out_dir, progress=progress, slide_ids=slide_ids)
    splits = _resolve_splits(out_dir, config, cohort, say)
    check_trainable_cohort(cohort, splits)
    _write_cohort_summary(out_dir, config, cohort)
    trainer = _Trainer(
        config, cohort, root=out_dir, progress=progress, say=say, after_method=tracker.sync
    )
    trainer.use_store(store)
    trained = trainer.train_all(out_dir, splits)
    evaluated = _evaluate_if_stale(out_dir, out_dir, config, say, started=started)
    if config.evaluation.train_missing_rates:
        trained += _train_missing_grid(out_dir, config, cohort, splits, trainer, say)
    metrics = pd.read_csv(out_dir / "metrics.csv")
    _write_run_info(out_dir, started, trained)
    tracker.sync()
    return RunResult(run_dir=out_dir, metrics=metrics, trained=trained, evaluated=evaluated)


def check_before_run(config: ExperimentConfig, config_path: str | Path, out_dir: Path):
    """Run the checks of every stage that the run goes through (``bidistill.preflight``) and
    of the run folder; returns the checks (with the feature store they opened, if any).

    Raises:
        ConfigError: one line naming every problem (file, row or column) that would stop it.
    """
    from bidistill.preflight import check_stages

    check_config_origin(out_dir, config_path)
    _check_run_folder(config, out_dir)
    untrained = [m for m in config.methods if not (out_dir / m.key / "predictions.csv").is_file()]
    checks = check_stages(
        config,
        run_dir=out_dir if out_dir.is_dir() else None,
        need_features=bool(untrained),
        in_memory=config.training.in_memory,
    )
    checks.require("run", config_path)
    return checks


def _add_file_log(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    package_log = logging.getLogger("bidistill")
    package_log.addHandler(handler)
    package_log.setLevel(min(package_log.level or logging.INFO, logging.INFO))
    return handler


def _check_run_folder(config: ExperimentConfig, out_dir: Path) -> None:
    """Refuse a run folder that holds a run of other cohort, features or training settings,
    or of other options of a method trained there."""
    target = out_dir / "config.yaml"
    if not target.is_file():
        return
    previous = load_config(target)
    changed = [s for s in FIXED_SECTIONS if _section(previous, s) != _section(config, s)]
    if changed:
        raise ConfigError(
            f"{out_dir} holds a run made with other {', '.join(changed)} settings "
            f"(see {target}); use a new --out folder, or delete the folder to start over"
        )
    _check_method_options(previous, config, out_dir)


def _write_resolved_config(config: ExperimentConfig, out_dir: Path) -> None:
    target = out_dir / "config.yaml"
    text = dump_config(config)
    if target.is_file() and target.read_text(encoding="utf-8") == text:
        return
    write_text(target, text)


def _check_method_options(previous: ExperimentConfig, config: ExperimentConfig, out_dir: Path):
    """Refuse a method entry whose options changed while its folder exists: the trained folder
    would otherwise be reported under the new options."""
    before = {m.key: m.model_dump(mode="json") for m in previous.methods}
    for method in config.methods:
        old = before.get(method.key)
        if old is None or old == method.model_dump(mode="json"):
            continue
        folders = [out_dir / method.key, *out_dir.glob(f"folds/*/{method.key}")]
        folders += out_dir.glob(f"train_missing/*/{method.key}")
        if any(f.exists() for f in folders):
            raise ConfigError(
                f"{out_dir}: method '{method.key}' was trained with other options "
                f"({old}); give the new entry its own `label`, or delete {out_dir / method.key} "
                "to train it again"
            )


def _section(config: ExperimentConfig, name: str) -> Any:
    # Paths left out: a moved project folder is the same experiment; its files are
    # fingerprinted by content, so what changed with the move is still found.
    return config_sections(config, [name])[name]


def _resolve_splits(out_dir: Path, config: ExperimentConfig, cohort, say: Say):
    """``splits.json``, made again only when the patients or the split settings changed (a
    changed label keeps the splits: they are the run's record of who is tested)."""
    from bidistill.cohort import Splits, make_splits, resolve_splits
    from bidistill.cohort.splits import check_splits

    path = out_dir / "splits.json"
    split_cfg = config.cohort.splits
    table_split = cohort.patients["split"].where(cohort.patients["split"].notna(), None)
    inputs = StageInputs()
    inputs.add("config", split_cfg.model_dump(mode="json"), says="cohort.splits settings")
    inputs.add_items(
        "patients", table_split.to_dict(), says="the cohort's patients", unit="patient(s)"
    )
    check = check_stage(out_dir, "splits", inputs, [path])
    if check:
        splits = Splits.load(path)
        check_splits(splits, cohort)
    elif not check.recorded:  # made before records existed, or by `bidistill train`: reuse
        splits = resolve_splits(cohort, split_cfg, path)
    else:
        say(f"splits: made again: {check.reason}")
        splits = make_splits(cohort, split_cfg)
        splits.save(path)
    if not check:
        record_stage(out_dir, "splits", inputs)
    return splits


def _write_cohort_summary(out_dir: Path, config: ExperimentConfig, cohort) -> None:
    """``cohort.json``: what the report says about the cohort beyond the per-split counts."""
    from bidistill.features.identity import read_identity
    from bidistill.features.store import feature_dim, feature_path
    from bidistill.pixels import RANDOM_FEATURES_WARNING

    clinical = cohort.clinical_frame
    summary: dict[str, Any] = {
        "patients": int(len(cohort.patients)),
        "slides": int(len(cohort.slides)),
        "clinical_missing": {c: float(clinical[c].isna().mean()) for c in clinical.columns},
        "feature encoder": config.features.encoder,
    }
    random_init = config.features.random_init
    if len(cohort.slides):
        first = feature_path(config.features.dir, str(cohort.slides["slide_id"].iloc[0]))
        if first.is_file():
            summary["feature dimension"] = feature_dim(first)
            # The files' own record of their encoder is the truth the report's banner reads
            # (synthetic features, random-init encoders); the config only names what it expects.
            identity = read_identity(first)  # attributes only: the features may be huge
            if identity.encoder:
                summary["feature encoder"] = identity.encoder
            random_init = random_init or bool(identity.random_init)
    if random_init:  # the report shows this as a banner
        summary["warning"] = RANDOM_FEATURES_WARNING
    write_json(out_dir / "cohort.json", summary)


class _Trainer:
    """Trains the methods whose inputs changed, opening the feature files once, when needed."""

    def __init__(
        self,
        config: ExperimentConfig,
        cohort,
        *,
        root: Path,
        progress: bool,
        say: Say,
        after_method=None,
    ) -> None:
        self.config, self.cohort, self.root = config, cohort, root
        self.progress, self.say = progress, say
        self.after_method = after_method  # called after each method of the main run trains
        self.features = FeatureIdentities(config.features.dir)
        self._store = None
        self.seconds: dict[str, float] = {}

    def use_store(self, store) -> None:
        """Train on a store opened already (by the checks before the run), not a second one."""
        self._store = store

    def store(self):
        if self.config.training.mode == "end-to-end":
            return None  # bags of tiles, read by the trainer (issue 13)
        if self._store is None:
            from bidistill.training import open_feature_store

            # Opening checks every feature file (features/hygiene.py): before any training.
            self._store = open_feature_store(self.config, self.cohort, progress=self.progress)
        return self._store

    def train_all(self, run_dir: Path, splits, cohort=None) -> list[str]:
        """Train every configured method not current in ``run_dir``; returns those trained."""
        cohort = cohort if cohort is not None else self.cohort
        trained, current = [], []
        for method_cfg in self.config.methods:
            if self._train_method(method_cfg, run_dir, splits, cohort):
                trained.append(method_cfg.key)
                if self.after_method is not None and run_dir == self.root:
                    self.after_method()
            else:
                current.append(method_cfg.key)
        if current:
            where = self._stage(run_dir) or "this run"
            self.say(f"up to date in {where}, kept: {', '.join(current)}")
        return trained

    def _train_method(self, method_cfg, run_dir: Path, splits, cohort) -> bool:
        if len(splits.folds) == 1:
            return self._train_fold(method_cfg, run_dir, splits, cohort, 0)
        trained = [
            self._train_fold(method_cfg, run_dir / "folds" / f"fold{k}", splits, cohort, k)
            for k in range(len(splits.folds))
        ]
        joined = run_dir / method_cfg.key / "predictions.csv"
        if any(trained) or not joined.is_file():
            frames = [
                pd.read_csv(
                    run_dir / "folds" / f"fold{k}" / method_cfg.key / "predictions.csv",
                    dtype={"patient_id": str},
                )
                for k in range(len(splits.folds))
            ]
            write_csv(joined, pd.concat(frames, ignore_index=True))
        return any(trained)

    def _train_fold(self, method_cfg, fold_dir: Path, splits, cohort, fold: int) -> bool:
        """Train one method on one fold unless its record matches its inputs."""
        from bidistill.runs.rundir import MethodDir
        from bidistill.training import train_method

        method_dir = fold_dir / method_cfg.key
        stage = self._stage(method_dir)
        chosen = splits.folds[fold]
        split_ids = {"train": chosen.train, "val": chosen.val, "test": splits.test}
        inputs = method_inputs(self.config, method_cfg, cohort, split_ids, self.features)
        predictions = method_dir / "predictions.csv"
        check = check_stage(self.root, stage, inputs, [predictions])
        if check:
            return False
        self.say(f"{stage}: training" + (f" again: {check.reason}" if check.recorded else ""))
        forget_stage(self.root, stage)
        predictions.unlink(missing_ok=True)  # stale: the method is not done until retrained
        start = time.perf_counter()
        train_method(
            self.config,
            method_cfg,
            MethodDir(method_dir, fold),
            cohort=cohort,
            splits=splits,
            fold=fold,
            store=self.store(),
            progress=self.progress,
        )
        self.seconds[stage] = time.perf_counter() - start
        record_stage(self.root, stage, inputs)
        return True

    def _stage(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix() if path != self.root else ""


def _evaluate_if_stale(
    root: Path, run_dir: Path, config: ExperimentConfig, say: Say, *, started: float | None = None
) -> bool:
    """Evaluate ``run_dir`` unless its record matches the predictions and settings; returns
    whether it evaluated."""
    from bidistill.evaluation import evaluate_run
    from bidistill.evaluation.freshness import (
        evaluation_inputs,
        evaluation_outputs,
        evaluation_stage,
    )

    stage = evaluation_stage(root, run_dir)
    inputs = evaluation_inputs(run_dir, config)
    check = check_stage(root, stage, inputs, evaluation_outputs(run_dir))
    if check:
        say(f"{stage}: up to date")
        return False
    say(f"{stage}: evaluating" + (f" again: {check.reason}" if check.recorded else ""))
    forget_stage(root, stage)
    log.info("evaluating %d methods", len(config.methods))
    provenance = None
    if started is not None:
        provenance = {
            "run started": datetime.fromtimestamp(started, timezone.utc).isoformat(
                timespec="seconds"
            ),
            "run time until evaluation (s)": round(time.time() - started, 1),
        }
    evaluate_run(run_dir, config=config, provenance=provenance)
    record_stage(root, stage, inputs)
    return True


def _write_run_info(out_dir: Path, started: float, trained: list[str]) -> None:
    info = read_run_info(out_dir)
    info.setdefault("calls", []).append(
        {
            "started": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.time() - started, 1),
            "trained": trained,
        }
    )
    write_run_info(out_dir, info)


# --- train-time missingness grid ----------------------------------------------------------------


def _train_missing_grid(
    out_dir: Path, config: ExperimentConfig, cohort, splits, trainer: _Trainer, say: Say
) -> list[str]:
    if len(splits.folds) > 1:
        raise ConfigError(
            "evaluation.train_missing_rates needs a holdout split (cohort.splits.mode other "
            "than kfold): in k-fold mode a training patient of one fold is a validation "
            "patient of another"
        )
    trained, rows = [], []
    for rate in config.evaluation.train_missing_rates:
        sub_dir = out_dir / "train_missing" / f"{rate:g}"
        sub_dir.mkdir(parents=True, exist_ok=True)
        text = dump_config(config)
        sub_config = sub_dir / "config.yaml"
        if not sub_config.is_file() or sub_config.read_text(encoding="utf-8") != text:
            write_text(sub_config, text)
        splits.save(sub_dir / "splits.json")  # the same bytes when unchanged
        stripped = strip_training_clinical(cohort, splits, rate)
        done = trainer.train_all(sub_dir, splits, cohort=stripped)
        trained += [f"train_missing/{rate:g}/{m}" for m in done]
        _evaluate_if_stale(out_dir, sub_dir, config, say)
        metrics = pd.read_csv(sub_dir / "metrics.csv")
        rows.append(metrics.assign(train_missing_rate=rate))
    table = pd.concat(rows, ignore_index=True)
    first = ["train_missing_rate", "method", "missing_rate"]
    write_csv(out_dir / "train_missing.csv", table[first + [c for c in table if c not in first]])
    return trained


def strip_training_clinical(cohort, splits, rate: float):
    """A copy of ``cohort`` in which a share ``rate`` of each fold's training patients has no
    clinical data (nested, label-stratified masks, mask seed 0; val and test untouched)."""
    from bidistill.evaluation.missing import nested_masks

    patients = cohort.patients.copy()
    features = cohort.feature_names
    for fold in splits.folds:
        ids = [str(p) for p in fold.train]
        rows = patients.loc[ids]
        available = rows[features].notna().any(axis=1).to_numpy()
        mask = nested_masks(ids, rows["label"].to_numpy(), available, [rate], [0])[0, 0]
        patients.loc[np.asarray(ids)[mask], features] = np.nan
    return dataclasses.replace(cohort, patients=patients)


# --- demo ---------------------------------------------------------------------------------------

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
    Both steps resume.
    """
    import yaml

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
