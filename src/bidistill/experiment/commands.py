"""`bidistill run`, `train` and `evaluate`: the stages of ``experiment.stages``, called three ways.

Everything is checked before the run folder is made (a refused command leaves nothing behind);
then the folder is locked (``runs.lock``) while the stages run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path

import pandas as pd

from bidistill.config import ExperimentConfig, MethodConfig, load_config
from bidistill.errors import BidistillError, ConfigError
from bidistill.experiment.checks import (
    check_device,
    check_run_folder,
    check_stages,
    prepare_output_dir,
    record_config_origin,
)
from bidistill.experiment.stages import (
    STAGES,
    Experiment,
    Say,
    evaluate_stage,
    record_call,
    splits_stage,
    train_stage,
    write_resolved_config,
)
from bidistill.runs.lock import lock_run_dir
from bidistill.runs.rundir import MethodDir, RunDir

log = logging.getLogger(__name__)


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
    """Run every stage of the experiment that is not done yet, in ``out_dir`` (made, and
    locked while it runs). ``say``: where what the run decides goes (stages redone or kept and
    why), besides ``run.log``."""
    from bidistill.models.registry import check_method_configs
    from bidistill.training.distributed import launched_by_torchrun

    run = RunDir(out_dir)
    config = load_config(config_path)
    if launched_by_torchrun():  # every process would run every stage
        raise ConfigError(
            "`bidistill run` runs in one process; under torchrun, train with `bidistill train "
            f"{config_path} --out {run.path}`, then `bidistill run` alone evaluates and keeps it"
        )
    check_method_configs(config.methods, source=config_path)
    # Checked before the run directory exists, so that a refused run leaves nothing behind.
    check_run_folder(config, config_path, run)
    untrained = [m for m in config.methods if not run.joined(m.key).done]
    found = check_stages(
        config,
        run_dir=run.path if run.path.is_dir() else None,
        need_features=bool(untrained),
        in_memory=config.training.in_memory,
    )
    found.require("run", config_path)
    prepare_output_dir(run.path)
    tell = _teller(say)
    with lock_run_dir(run.path, command=f"run {config_path} --out {run.path}", say=tell):
        handler = _add_file_log(run.log)
        tracker, ok = None, False
        try:
            from bidistill.experiment.tracking import open_tracker

            tracker = open_tracker(config, run.path)
            exp = Experiment(
                config, run, tell, progress, store=found.store, after_method=tracker.sync
            )
            write_resolved_config(config, run)
            record_config_origin(run.path, config_path)
            log.info("run %s: config %s", run.path, config_path)
            for stage in STAGES:
                stage(exp)
            record_call(exp)
            tracker.sync()
            ok = True
        except BidistillError as err:  # bad input: the message says it all, no traceback
            log.error("run stopped: %s", err)
            raise
        except Exception as err:
            log.exception("run stopped")
            err.log_path = run.log  # the CLI's error handler points the user there
            raise
        finally:
            if tracker is not None:
                tracker.finish(ok=ok)
            logging.getLogger("bidistill").removeHandler(handler)
            handler.close()
    return RunResult(run.path, pd.read_csv(run.metrics), exp.trained, exp.tables is not None)


def train_methods(
    config: ExperimentConfig,
    out: str | Path,
    *,
    methods: list[str] | None = None,
    epochs: int | None = None,
    seed: int | None = None,
    fold: int = 0,
    say: Say = log.info,
    store=None,
) -> list[MethodDir]:
    """`bidistill train` (see docs/internal-interfaces.md); a method not in the config trains
    with its default options. ``store``: the feature store the checks opened."""
    from bidistill.cohort import Splits, load_cohort
    from bidistill.models import get_method_class
    from bidistill.training.distributed import barrier, launched_by_torchrun, process_group

    if epochs is not None:
        config.training.epochs = epochs
    if seed is not None:
        config.training.seed = seed
    configured = {m.key: m for m in config.methods}
    chosen = [configured.get(name, MethodConfig(name=name)) for name in methods or configured]
    for method_cfg in chosen:
        get_method_class(method_cfg.name)  # unknown names fail before any work
    check_device(config.training.device, "training.device")
    run = RunDir(out)
    if launched_by_torchrun() and not config.training.on_tiles:
        raise ConfigError(
            "torchrun runs end-to-end training (training.mode: end-to-end) over several "
            "processes; feature-mode training runs in one process: `bidistill train` alone"
        )
    with process_group(config.training.device) as processes:  # torchrun: one per GPU
        prepare_output_dir(run.path)
        lock = lock_run_dir(run.path, command=f"train --out {run.path}", say=say)
        with lock if processes.is_main else contextlib.nullcontext():
            main = processes.is_main
            exp = Experiment(config, run, say, store=store, is_main=main)
            exp.cohort = load_cohort(config.cohort)
            if exp.cohort.label_summary is not None and main:
                say(exp.cohort.label_summary.format())
            if main:
                splits_stage(exp)
            barrier(processes)
            if not main:
                exp.splits = Splits.load(run.splits)
            folds = len(exp.splits.folds)
            if fold >= folds:
                raise ConfigError(f"--fold {fold}: the splits have {folds} fold(s)")
            train_stage(exp, chosen, [fold])
            return [run.method(m.key, fold, folds) for m in chosen]


def evaluate_run_dir(run_dir: str | Path, *, say: Say = log.info):
    """`bidistill evaluate`: the evaluate stage, whatever its record says, recorded after it so
    that `run` and `compare` know it is current (without ``config.yaml``: evaluated alone)."""
    from bidistill.evaluation import evaluate_run

    run = RunDir(run_dir)
    if not run.path.is_dir():
        return evaluate_run(run.path)  # says there is nothing to evaluate
    with lock_run_dir(run.path, command=f"evaluate {run.path}", say=say):
        if not run.config.is_file():
            return evaluate_run(run.path)
        exp = Experiment(load_config(run.config), run, say)
        evaluate_stage(exp, force=True)
        return exp.tables


def _teller(say: Say | None) -> Say:
    """``say`` that also logs (so that ``run.log`` holds what the console showed)."""

    def tell(message: str) -> None:
        log.info("%s", message)
        if say is not None:
            say(message)

    return tell


def _add_file_log(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    package_log = logging.getLogger("bidistill")
    package_log.addHandler(handler)
    package_log.setLevel(min(package_log.level or logging.INFO, logging.INFO))
    return handler
