"""Fusion on a small cohort from pixels: is every multi-modal method, given all the clinical
data, at least as good as a slides-only model, and is BD's slides-only branch as good as
`wsi-only`? (issue 20: fusion never worse than its parts.)

The cohort is the slides demo's (`bidistill demo --from-slides`: synthetic BCNB-layout slides,
tiled, encoded by a random-init ResNet-18) with ``--patients`` patients (default 100: 60 train,
20 validation, 20 test). Its tiles and features are made once; then every method trains with
each training seed, with the demo's training settings and any ``--training KEY=VALUE`` on top,
in two single-threaded workers (the accuracy suite's worker). For each method: the test AUC
with every patient's clinical data (r = 0) and with none (r = 1), and the paired difference to
`wsi-only` over seeds (mean and 95% t-interval; the 20 test patients are fixed, so the interval
covers training seeds only).

Usage:
    python benchmarks/accuracy/small_cohort.py --seeds 5
    python benchmarks/accuracy/small_cohort.py --seeds 5 --training min_steps=1000
    python benchmarks/accuracy/small_cohort.py --seeds 5 --methods bd \
        --entry bd-reads:bd:clinical_start=reads

Writes ``benchmarks/results/small_cohort.json`` (or ``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import RESULTS, _key_values, run_tasks, t_interval, test_predictions  # noqa: E402

GENERATOR = "slides"  # the folder of the runs inside the workdir, as the suite's generators


def make_cohort(workdir: Path, patients: int) -> Path:
    """The slides demo's cohort, tiled and encoded (its run trains the demo's five methods at
    seed 0 on the way; a made cohort is reused)."""
    from bidistill.experiment.demo import run_slides_demo

    run_slides_demo(workdir / "demo", patients=patients, progress=False)
    return workdir / "demo" / "cohort" / "config.yaml"


def aucs(workdir: Path, labels: list[str], seeds: int) -> pd.DataFrame:
    from sklearn.metrics import roc_auc_score

    rows = []
    for seed in range(seeds):
        for label in labels:
            test = test_predictions(workdir, GENERATOR, label, seed)
            y = test["label"].to_numpy()
            for rate, column in ((0.0, "prob_present"), (1.0, "prob_absent")):
                auc = roc_auc_score(y, test[column])
                rows.append({"method": label, "seed": seed, "missing_rate": rate, "auc": auc})
    return pd.DataFrame(rows)


def table(frame: pd.DataFrame) -> str:
    auc = frame.pivot_table(index=["method", "seed"], columns="missing_rate", values="auc")
    wsi = auc.xs("wsi-only", level="method")
    lines = [
        "| method | AUC r=0 | AUC r=1 | r=0 − wsi-only [95% CI] | r=1 − wsi-only [95% CI] |",
        "|---|---|---|---|---|",
    ]
    for method in sorted(set(frame["method"])):
        own = auc.xs(method, level="method")
        cells = [f"{own[0.0].mean():.3f}", f"{own[1.0].mean():.3f}"]
        for rate in (0.0, 1.0):
            mean, low, high = t_interval((own[rate] - wsi[rate].loc[own.index]).to_numpy())
            cells.append(f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    from bidistill.models import list_methods

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--methods", default="", help="Comma-separated; default: every method.")
    parser.add_argument("--training", action="append", default=[], help="KEY=VALUE (YAML).")
    parser.add_argument(
        "--option", action="append", default=[], help="KEY=VALUE: every method's option."
    )
    parser.add_argument(
        "--entry",
        action="append",
        default=[],
        help="LABEL:NAME[:KEY=VALUE,...]: one more method entry with its own options (as the "
        "suite's), e.g. bd-reads:bd:clinical_start=reads.",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="Reused when given (cohort and runs).")
    parser.add_argument("--out", default=str(RESULTS / "small_cohort.json"))
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bidistill-small-cohort-"))
    config = make_cohort(workdir, args.patients)
    training, options = _key_values(args.training), _key_values(args.option)
    methods = args.methods.split(",") if args.methods else list_methods()
    entries = {m: (m, options) for m in [*methods, "wsi-only"]}
    for entry in args.entry:
        label, name, *rest = entry.split(":")
        entries[label] = (name, options | _key_values(rest[0].split(",") if rest else []))
    labels = list(entries)
    settings = sorted((training | options).items())
    runs = workdir / ("runs-" + ",".join(f"{k}={v}" for k, v in settings))
    os.environ["BIDISTILL_SUITE_WORKDIR"] = str(runs)
    tasks = [
        (GENERATOR, label, name, entry_options, seed, str(config), training)
        for label, (name, entry_options) in entries.items()
        for seed in range(args.seeds)
    ]
    run_tasks(tasks, args.workers)
    frame = aucs(runs, labels, args.seeds)
    text = (
        f"Small cohort from slides: {args.patients} patients, {args.seeds} training seeds, "
        f"training {training or 'as the demo'}, options {options or 'default'}; test AUC "
        "(mean over seeds)\n\n" + table(frame)
    )
    print("\n" + text)
    Path(args.out).write_text(
        frame.assign(training=str(training), options=str(options), patients=args.patients).to_json(
            orient="records"
        )
    )
    Path(args.out).with_suffix(".md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
