"""Heatmap faithfulness of each candidate aggregator: the share of BD's top-10% tiles that are
planted key instances, per branch, on the heatmap test's cohort.

The cohort and training are those of ``tests/inference/test_heatmap.py``'s fixture (120
patients, 32-d features, 30-120 tiles per slide, seed 3; 12 epochs at lr 1e-3); only the
aggregator and the training seed change. For each test patient's slides that hold key
instances, the top 10% of tiles by the branch's heatmap score (what `bidistill heatmap` draws)
are checked against the planted key instances; chance is the slides' share of key instances.
The rule that picks the default aggregator (README, accuracy suite) admits a candidate whose
mean share is >= 75% in both branches.

Beside the attention it scores each tile by what the branch's log-odds loses without it
(``bidistill heatmap --score leave-one-out``, ``bidistill.models.leave_one_out``): the tiles the
prediction rests on, whatever the aggregator's attention draws.
``ceiling``: the highest share any top 10% can reach (a slide with fewer key instances than a
tenth of its tiles cannot fill its top 10% with them).

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


def top_tile_shares(run_dir: Path, cohort: Path) -> dict[str, dict[str, float]]:
    """Per branch: the mean share of key instances among the top 10% tiles by attention
    (``share``) and by leave-one-out effect (``leave_one_out``; ``bidistill heatmap --score
    leave-one-out``), the ``ceiling`` and ``chance``."""
    import bidistill
    from bidistill.synthetic.features import hottest_tile_key_shares

    saved = pd.read_csv(run_dir / "bd" / "predictions.csv", dtype={"patient_id": str})
    test = saved.loc[saved["split"] == "test", "patient_id"].tolist()
    run = bidistill.load_run(run_dir)
    scored = {
        score: [
            slide
            for patient in run.attention(
                cohort / "features", cohort / "cohort.csv", patients=test, score=score
            )
            for slide in patient.slides
        ]
        for score in ("attention", "leave-one-out")
    }
    highest = ceiling(scored["attention"], cohort)
    shares = {}
    for branch in BRANCHES:
        hits, chance = hottest_tile_key_shares(scored["attention"], cohort, f"attention_{branch}")
        loo, _ = hottest_tile_key_shares(scored["leave-one-out"], cohort, f"effect_{branch}")
        shares[branch] = {
            "share": float(np.mean(hits)),
            "leave_one_out": float(np.mean(loo)),
            "ceiling": highest,
            "chance": float(np.mean(chance)),
        }
    return shares


def ceiling(slides, cohort: Path) -> float:
    """The highest mean share any top 10% can reach (``hottest_tile_key_shares``' slides)."""
    from bidistill.synthetic.features import KEY_INSTANCES, read_key_instances

    keys = [read_key_instances(cohort / KEY_INSTANCES, slide.slide_id) for slide in slides]
    return float(np.mean([min(1.0, k.sum() / max(1, len(k) // 10)) for k in keys if k.any()]))


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
            for branch, shares in top_tile_shares(run_dir, config.parent).items():
                rows.append({"aggregator": aggregator, "seed": seed, "branch": branch} | shares)
            print(
                f"{aggregator} seed {seed}: attention "
                + ", ".join(f"{r['share']:.3f}" for r in rows[-2:])
                + "; leave-one-out "
                + ", ".join(f"{r['leave_one_out']:.3f}" for r in rows[-2:])
            )
    print_table(pd.DataFrame(rows), args.aggregators.split(","), args.seeds)
    Path(args.out).write_text(json.dumps({"rows": rows, "threshold": THRESHOLD}, indent=1))


def print_table(frame: pd.DataFrame, aggregators: list[str], seeds: int) -> None:
    means = frame.pivot_table(
        index="aggregator", columns="branch", values=["share", "leave_one_out"], aggfunc="mean"
    ).reindex(aggregators)
    print(f"\nShare of BD's top-10% tiles that are planted key instances (mean over {seeds}")
    print(
        f"seeds; chance {frame['chance'].mean():.3f}, ceiling {frame['ceiling'].mean():.3f}; "
        f"faithful: the attention >= {THRESHOLD} in both branches)\n"
    )
    print("| aggregator | attention (multi / single) | leave-one-out (multi / single) | faithful |")
    print("|---|---|---|---|")
    for name, row in means.iterrows():
        ok = all(row["share", b] >= THRESHOLD for b in BRANCHES)
        attention = " / ".join(f"{row['share', b]:.3f}" for b in BRANCHES)
        loo = " / ".join(f"{row['leave_one_out', b]:.3f}" for b in BRANCHES)
        print(f"| {name} | {attention} | {loo} | {'yes' if ok else 'no'} |")


if __name__ == "__main__":
    main()
