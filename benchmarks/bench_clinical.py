"""Benchmark: a clinical-only run at BCNB size, with and without the small-model thread choice.

The cohort: a synthetic BCNB folder without slides (`bidistill synth bcnb`, 1058 patients, the
real layout and its five ALN clinical features), prepared with `bidistill bcnb prepare`, then
`bidistill run` with the logistic model of the BCNB paper (``clinical-linear``) and the clinical
MLP (``clinical-only``), the default schedule (40 epochs, patience 10) and the full evaluation
(6 rates x 10 mask seeds, 1000 bootstrap resamples).

Each run is timed twice: with the thread choice of `bidistill.training.threads` (small models
train on one CPU thread) and with torch's default thread count, which is what the code did
before. On an idle machine the two are close; when other processes load the cores, torch's
threads wait on each other at every step of these tiny models and an epoch takes seconds. Run it
on a loaded machine to see the difference, e.g. beside `make test`.

Usage:
    python benchmarks/bench_clinical.py            # about 1 minute on two idle cores
    python benchmarks/bench_clinical.py --repeats 3

Writes ``benchmarks/results/clinical.json`` (or ``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

RESULTS = Path(__file__).resolve().parent / "results" / "clinical.json"
PATIENTS = 1058
METHODS = ["clinical-linear", "clinical-only"]


def make_config(folder: Path) -> Path:
    from bidistill.cohort.bcnb import prepare_bcnb
    from bidistill.synthetic.bcnb import make_bcnb_folder

    root = make_bcnb_folder(folder / "BCNB", patients=PATIENTS, seed=0, slides=False)
    report = prepare_bcnb(root, folder / "prepared")
    raw = yaml.safe_load(report.config_path.read_text())
    raw["methods"] = METHODS
    report.config_path.write_text(yaml.safe_dump(raw))
    return report.config_path


@contextlib.contextmanager
def torch_default_threads():
    """Train as before the thread choice: torch's own thread count for every model."""
    import bidistill.training.train as train

    original = train.cpu_threads_for

    @contextlib.contextmanager
    def unchanged(*args, **kwargs):
        import torch

        yield torch.get_num_threads()

    train.cpu_threads_for = unchanged
    try:
        yield
    finally:
        train.cpu_threads_for = original


def timed_run(config: Path, run_dir: Path) -> dict:
    from bidistill.experiment import run_experiment

    start = time.perf_counter()
    run_experiment(config, run_dir, progress=False)
    row = {"run_seconds": round(time.perf_counter() - start, 2)}
    for method in METHODS:
        log = pd.read_csv(run_dir / method / "train_log.csv")
        seconds = float(log["seconds"].sum())
        row[f"{method}_epochs"] = len(log)
        row[f"{method}_s_per_epoch"] = round(seconds / len(log), 3)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=1, help="Runs per mode (default 1).")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    import torch

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-clinical-") as tmp:
        config = make_config(Path(tmp))
        for repeat in range(args.repeats):
            for mode in ("bidistill threads", "torch default threads"):
                context = torch_default_threads() if mode.startswith("torch") else None
                with context or contextlib.nullcontext():
                    row = timed_run(config, Path(tmp) / f"run-{mode[:5]}-{repeat}")
                rows.append({"mode": mode, "repeat": repeat, **row})
                print(
                    f"{mode:22s} run {row['run_seconds']:6.1f} s   clinical-linear "
                    f"{row['clinical-linear_s_per_epoch']:.3f} s/epoch   clinical-only "
                    f"{row['clinical-only_s_per_epoch']:.3f} s/epoch",
                    flush=True,
                )
    frame = pd.DataFrame(rows)
    summary = frame.groupby("mode", sort=False).median(numeric_only=True).drop(columns="repeat")
    print(
        f"\n{PATIENTS} patients, 5 clinical columns, {', '.join(METHODS)}; median of "
        f"{args.repeats} run(s); torch threads by default: {torch.get_num_threads()}"
    )
    print(summary.to_string())
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "python": sys.version.split()[0],
        },
        "cohort": {"patients": PATIENTS, "clinical_columns": 5, "methods": METHODS},
        "runs": rows,
        "summary": summary.reset_index().to_dict(orient="records"),
    }
    from bidistill._io import write_json

    write_json(Path(args.out), result)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
