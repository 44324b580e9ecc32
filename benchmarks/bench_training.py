"""Benchmark: training time and test AUC of every method on a BCNB-sized synthetic cohort.

The cohort (`bidistill synth features`): 1058 patients, 1024-d features, 50-300 instances per
slide (about 10% of patients have two slides), the table's 60/20/20 split. Every registered
method, plus ``bd`` with ``prompt: wsi``, is trained with the synthetic config's schedule
(20 epochs, early-stopping patience 6) for each training seed; the test AUC is measured with the
clinical data as in the table ("present") and with it withheld from every patient ("absent").

Targets (on a 2-core CPU): training any one method takes at most 2 minutes, and ``bd`` at most
2.5x ``wsi-only`` per epoch (seed 0 times; totals are printed too, but they also compare where
early stopping ended each method). Expected quality: ``bd`` absent >= ``wsi-only`` - 0.01; ``bd``
present >= the fusion models - 0.01; ``bd`` beats ``fusion-zero`` and ``fusion-mean`` absent.
Failed expectations are printed (and kept in the JSON), not hidden; the exit code is non-zero
only when the timing targets fail. The machine may be shared: times are then pessimistic.

Usage:
    python benchmarks/bench_training.py                      # 3 seeds, about 30-40 min
    python benchmarks/bench_training.py --seeds 1 --methods bd,wsi-only,fusion-mean

Writes ``benchmarks/results/training.json`` (or ``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

RESULTS = Path(__file__).resolve().parent / "results" / "training.json"
PATIENTS, DIM, INSTANCES = 1058, 1024, (50, 300)
MAX_SECONDS = 120.0
MAX_BD_RATIO = 2.5
# Table label → (registry name, options).
VARIANTS = {"bd (prompt: wsi)": ("bd", {"prompt": "wsi"})}
FUSION = ("fusion-zero", "fusion-mean", "moddrop", "switch")


def make_cohort(cache: Path) -> Path:
    from bidistill.synthetic.features import make_feature_cohort

    config = cache / "config.yaml"
    if not config.is_file():
        print(f"writing the synthetic cohort to {cache} ...", flush=True)
        make_feature_cohort(
            cache, patients=PATIENTS, seed=0, dim=DIM, instances=INSTANCES, progress=True
        )
    return config


def run(args: argparse.Namespace) -> dict:
    import torch

    from bidistill.cohort import load_cohort, resolve_splits
    from bidistill.config import MethodConfig, load_config
    from bidistill.models import list_methods
    from bidistill.runs.rundir import MethodDir
    from bidistill.training import open_feature_store, train_method

    torch.set_num_threads(args.threads)
    config = load_config(make_cohort(Path(args.cache)))
    cohort = load_cohort(config.cohort)
    started = time.perf_counter()
    store = open_feature_store(config, cohort)
    print(
        f"features: {len(store.slide_ids)} slides, D={store.dim}, in memory "
        f"{store.in_memory}, loaded in {time.perf_counter() - started:.1f} s",
        flush=True,
    )
    labels = {name: (name, {}) for name in list_methods()} | VARIANTS
    if args.methods:
        labels = {k: v for k, v in labels.items() if v[0] in args.methods.split(",")}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        for seed in range(args.seeds):
            config.training.seed = seed
            for label, (name, options) in labels.items():
                run_dir = Path(tmp) / f"seed{seed}" / label.replace(" ", "_").replace(":", "")
                splits = resolve_splits(cohort, config.cohort.splits, run_dir / "splits.json")
                t0 = time.perf_counter()
                method_cfg = MethodConfig(name=name, **options)
                method_dir = run_dir / method_cfg.key
                train_method(
                    config,
                    method_cfg,
                    MethodDir(method_dir),
                    cohort=cohort,
                    splits=splits,
                    store=store,
                    progress=False,
                )
                seconds = time.perf_counter() - t0
                row = {
                    "method": label,
                    "seed": seed,
                    "seconds": round(seconds, 1),
                    **_test_aucs(method_dir / "predictions.csv"),
                    "epochs": len(pd.read_csv(method_dir / "train_log.csv")),
                }
                row["s_per_epoch"] = round(seconds / row["epochs"], 2)
                rows.append(row)
                print(
                    f"seed {seed} {label:18s} {seconds:6.1f} s  {row['epochs']:2d} epochs  "
                    f"test AUC present {row['auc_present']:.3f}  absent "
                    f"{row['auc_absent']:.3f}",
                    flush=True,
                )
    return summarise(pd.DataFrame(rows), args)


def _test_aucs(predictions_csv: Path) -> dict:
    predictions = pd.read_csv(predictions_csv)
    test = predictions[predictions["split"] == "test"]
    return {
        f"auc_{c}": float(roc_auc_score(test["label"], test[f"prob_{c}"]))
        for c in ("present", "absent")
    }


def summarise(frame: pd.DataFrame, args: argparse.Namespace) -> dict:
    table = frame.groupby("method", sort=False).agg(
        seconds_seed0=("seconds", "first"),
        s_per_epoch=("s_per_epoch", "first"),
        epochs=("epochs", "mean"),
        auc_present=("auc_present", "mean"),
        auc_present_sd=("auc_present", "std"),
        auc_absent=("auc_absent", "mean"),
        auc_absent_sd=("auc_absent", "std"),
    )
    print(f"\n{len(frame['seed'].unique())} seed(s); test AUC mean ± sd over seeds")
    print(
        f"{'method':18s} {'train s':>8s} {'s/epoch':>8s} {'epochs':>6s} {'AUC present':>14s} "
        f"{'AUC absent':>14s}"
    )
    for method, r in table.iterrows():
        print(
            f"{method:18s} {r.seconds_seed0:8.1f} {r.s_per_epoch:8.2f} {r.epochs:6.1f} "
            f"{r.auc_present:7.3f} ± {_sd(r.auc_present_sd)} "
            f"{r.auc_absent:7.3f} ± {_sd(r.auc_absent_sd)}"
        )
    checks = _checks(table)
    print()
    for check in checks:
        print(f"{'PASS' if check['passed'] else 'FAIL'}  {check['name']}: {check['measured']}")
    return {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "python": sys.version.split()[0],
        },
        "cohort": {"patients": PATIENTS, "dim": DIM, "instances": list(INSTANCES)},
        "seeds": int(frame["seed"].nunique()),
        "runs": frame.to_dict(orient="records"),
        "summary": table.reset_index().replace({np.nan: None}).to_dict(orient="records"),
        "checks": checks,
    }


def _sd(value: float) -> str:
    return f"{value:.3f}" if np.isfinite(value) else "  -  "


def _checks(table: pd.DataFrame) -> list[dict]:
    checks = []

    def add(name: str, passed: bool, measured: str, kind: str) -> None:
        checks.append({"name": name, "passed": bool(passed), "measured": measured, "kind": kind})

    slowest = table["seconds_seed0"].idxmax()
    add(
        f"every method trains in <= {MAX_SECONDS:.0f} s",
        table["seconds_seed0"].max() <= MAX_SECONDS,
        f"slowest {slowest} {table.loc[slowest, 'seconds_seed0']:.1f} s",
        "timing",
    )
    if {"bd", "wsi-only"} <= set(table.index):
        # Per epoch: early stopping ends the methods after different numbers of epochs, so the
        # total times compare the stopping points as much as the cost of the methods.
        ratio = table.loc["bd", "s_per_epoch"] / table.loc["wsi-only", "s_per_epoch"]
        total = table.loc["bd", "seconds_seed0"] / table.loc["wsi-only", "seconds_seed0"]
        add(
            f"bd time per epoch <= {MAX_BD_RATIO}x wsi-only",
            ratio <= MAX_BD_RATIO,
            f"{ratio:.2f}x per epoch ({total:.2f}x in total)",
            "timing",
        )
        bd, wsi = table.loc["bd"], table.loc["wsi-only"]
        add(
            "bd absent >= wsi-only absent - 0.01",
            bd.auc_absent >= wsi.auc_absent - 0.01,
            f"{bd.auc_absent:.3f} vs {wsi.auc_absent:.3f}",
            "quality",
        )
    if "bd" in table.index:
        bd = table.loc["bd"]
        for other in FUSION:
            if other in table.index:
                add(
                    f"bd present >= {other} present - 0.01",
                    bd.auc_present >= table.loc[other, "auc_present"] - 0.01,
                    f"{bd.auc_present:.3f} vs {table.loc[other, 'auc_present']:.3f}",
                    "quality",
                )
        for other in ("fusion-zero", "fusion-mean"):
            if other in table.index:
                add(
                    f"bd absent > {other} absent",
                    bd.auc_absent > table.loc[other, "auc_absent"],
                    f"{bd.auc_absent:.3f} vs {table.loc[other, 'auc_absent']:.3f}",
                    "quality",
                )
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="Training seeds (default 3).")
    parser.add_argument("--methods", default="", help="Comma-separated registry names.")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument(
        "--cache",
        default=str(Path(tempfile.gettempdir()) / "bidistill-bench" / f"features-{PATIENTS}x{DIM}"),
        help="Folder for the synthetic cohort (made once, then reused).",
    )
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    result = run(args)
    out = Path(args.out)
    from bidistill._io import write_json

    write_json(out, result)
    print(f"\nwrote {out}")
    timing_failed = [c for c in result["checks"] if c["kind"] == "timing" and not c["passed"]]
    return 1 if timing_failed else 0


if __name__ == "__main__":
    sys.exit(main())
