"""Heatmap faithfulness of each candidate aggregator: the share of BD's top-10% tiles that are
planted key instances, per branch, on the heatmap test's cohort.

The cohort and training are those of ``tests/inference/test_heatmap.py``'s fixture (120
patients, 32-d features, 30-120 tiles per slide, seed 3; 12 epochs at lr 1e-3); only the
aggregator and the training seed change. For each test patient's slides that hold key
instances, the top 10% of tiles by the branch's heatmap score (what `bidistill heatmap` draws)
are checked against the planted key instances; chance is the slides' share of key instances.
The rule that picks the default aggregator (README, accuracy suite) admits a candidate whose
mean share is >= 75% in both branches.

Usage:
    python benchmarks/accuracy/faithfulness.py --aggregators abmil,abmil-sum --seeds 3

Writes ``benchmarks/results/faithfulness.json`` (or ``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

RESULTS = Path(__file__).resolve().parents[1] / "results"
BRANCHES = ("multi-modal", "single-modal")
THRESHOLD = 0.75


def make_cohort(root: Path) -> Path:
    from bidistill.synthetic.features import make_feature_cohort

    return make_feature_cohort(root / "cohort", patients=120, seed=3, dim=32, instances=(30, 120))


def train(
    config: Path, out: Path, aggregator: str, seed: int, training: dict, options: dict
) -> Path:
    from bidistill.experiment import run_experiment

    raw = yaml.safe_load(config.read_text())
    raw["methods"] = [{"name": "bd", **options, "aggregator": aggregator}]
    test_settings = {"epochs": 12, "patience": 12, "lr": 1e-3, "device": "cpu", "seed": seed}
    raw["training"].update(test_settings | training)
    raw["evaluation"].update(mask_seeds=2, bootstrap=0)
    variant = config.parent / f"{aggregator}-seed{seed}.yaml"  # its paths are relative
    variant.write_text(yaml.safe_dump(raw, sort_keys=False))
    run_dir = out / f"{aggregator}-seed{seed}"
    run_experiment(variant, run_dir, progress=False)
    return run_dir


def top_tile_shares(run_dir: Path, cohort: Path) -> dict[str, tuple[float, float]]:
    """Per branch: the mean share of key instances among the top 10% tiles, and chance."""
    import bidistill
    from bidistill.synthetic.features import hottest_tile_key_shares

    saved = pd.read_csv(run_dir / "bd" / "predictions.csv", dtype={"patient_id": str})
    test = saved.loc[saved["split"] == "test", "patient_id"].tolist()
    run = bidistill.load_run(run_dir)
    patients = run.attention(cohort / "features", cohort / "cohort.csv", patients=test)
    slides = [slide for patient in patients for slide in patient.slides]
    shares = {}
    for branch in BRANCHES:
        hits, chance = hottest_tile_key_shares(slides, cohort, f"attention_{branch}")
        shares[branch] = (float(np.mean(hits)), float(np.mean(chance)))
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--aggregators", default="abmil,abmil-sum,abmil-count,additive")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--training",
        action="append",
        default=[],
        help="KEY=VALUE (YAML value) over the test's training settings, e.g. min_steps=1000.",
    )
    parser.add_argument("--option", action="append", default=[], help="KEY=VALUE: BD's option.")
    parser.add_argument("--workdir", default=None, help="Folder for the runs (default: temp).")
    parser.add_argument("--out", default=str(RESULTS / "faithfulness.json"))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    training = dict(item.split("=", 1) for item in args.training)
    training = {key: yaml.safe_load(value) for key, value in training.items()}
    options = dict(item.split("=", 1) for item in args.option)
    options = {key: yaml.safe_load(value) for key, value in options.items()}
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bidistill-faithfulness-"))
    workdir.mkdir(parents=True, exist_ok=True)
    config = make_cohort(workdir)
    rows = []
    for aggregator in args.aggregators.split(","):
        for seed in range(args.seeds):
            run_dir = train(config, workdir, aggregator, seed, training, options)
            for branch, (share, chance) in top_tile_shares(run_dir, config.parent).items():
                rows.append(
                    {"aggregator": aggregator, "seed": seed, "branch": branch}
                    | {"share": share, "chance": chance}
                )
            print(f"{aggregator} seed {seed}: " + ", ".join(f"{r['share']:.3f}" for r in rows[-2:]))
    frame = pd.DataFrame(rows)
    table = frame.pivot_table(index="aggregator", columns="branch", values="share", aggfunc="mean")
    table = table.reindex(args.aggregators.split(","))
    chance = frame["chance"].mean()
    print(f"\nShare of BD's top-10% tiles that are planted key instances (mean over {args.seeds}")
    print(f"seeds; chance {chance:.3f}; faithful: >= {THRESHOLD} in both branches)\n")
    print("| aggregator | multi-modal | single-modal | faithful |\n|---|---|---|---|")
    for name, row in table.iterrows():
        ok = all(row[b] >= THRESHOLD for b in BRANCHES)
        shares = " | ".join(f"{row[b]:.3f}" for b in BRANCHES)
        print(f"| {name} | {shares} | {'yes' if ok else 'no'} |")
    Path(args.out).write_text(json.dumps({"rows": rows, "threshold": THRESHOLD}, indent=1))


if __name__ == "__main__":
    main()
