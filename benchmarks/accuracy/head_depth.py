"""Does a layer between the pooled embedding and the head matter? (README, "Three classes").

ShaSpec is far closer to the limit than every other method on the three-class cohort, at r = 1
too, where it reads the slides alone. Its auxiliary losses can be switched off with its options;
what remains is its depth after the pooling (a shared and a fusion layer before the head). This
script isolates that: it trains ``wsi-only`` and ``wsi-deep``, the same model with one more
ReLU layer between the aggregator and the head (registered here; not a method of the tool), on
the suite's cohorts with the suite's training, and prints each one's gap to the WSI-only limit
(the Bayes limit at r = 1, where neither model can use clinical data).

Usage:
    python benchmarks/accuracy/head_depth.py --generators three-class --seeds 3
    python benchmarks/accuracy/head_depth.py --seeds 3     # also the six binary cohorts

Runs go to ``--workdir`` in the suite's layout (a run with predictions is reused, so a suite
workdir that already holds ``wsi-only`` reuses it). Writes ``--out`` (JSON) and the table
beside it (.md), and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as suite  # noqa: E402  (the suite's cohorts, training and evaluation)

from bidistill.models.base import Method  # noqa: E402
from bidistill.models.blocks import WSIClassifier, mlp  # noqa: E402
from bidistill.models.registry import register_method  # noqa: E402
from bidistill.models.unimodal import WSIOnly  # noqa: E402

LABELS = ("wsi-only", "wsi-deep")


# Module level: the suite's spawned workers import this script as their main module, and so
# register the model too.
@register_method("wsi-deep")
class WSIDeep(WSIOnly):
    """``wsi-only`` with one more ReLU layer between the pooled embedding and the head."""

    def __init__(self, dims, options):
        Method.__init__(self, dims, options)
        o = options
        aggregator = self.make_aggregator()
        d = aggregator.out_dim
        # Built as wsi-only's classifier, then its head replaced: every part before the head
        # starts from the same random draws as wsi-only's, so only the depth differs.
        self.model = WSIClassifier(
            aggregator, o.clinical_hidden, o.dropout, n_classes=self.n_classes
        )
        self.model.head = nn.Sequential(
            nn.Linear(d, d), nn.ReLU(), mlp(d, o.clinical_hidden, self.n_classes, o.dropout)
        )


def main() -> int:
    from bidistill.synthetic.suite import CLASS_SUITE, SUITE

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--generators", default="", help="Default: all seven.")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "bidistill-accuracy"))
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--training", nargs="*", default=[], help="KEY=VALUE (smoke tests).")
    parser.add_argument("--out", default=str(suite.RESULTS / "head-depth.json"))
    args = parser.parse_args()

    generators = args.generators.split(",") if args.generators else list(SUITE | CLASS_SUITE)
    configs = suite.make_cohorts(generators, Path(args.cache), args.scale)
    os.environ["BIDISTILL_SUITE_WORKDIR"] = str(Path(args.workdir))
    training = suite._key_values(args.training)
    tasks = [
        (g, label, label, {}, seed, str(configs[g]), training)
        for g in generators
        for label in LABELS
        for seed in range(args.seeds)
    ]
    suite.run_tasks(tasks, args.workers)
    runs = suite.collect(Path(args.workdir), configs, list(LABELS), args.seeds)
    alone = runs[runs["missing_rate"] == 1.0].copy()  # the WSI-only limit
    alone["gap"] = alone["limit"] - alone["auc"]
    table = alone.groupby(["generator", "method"])[["auc", "limit", "gap"]].mean().reset_index()
    lines = [
        "| generator | WSI-only limit | wsi-only AUC (gap) | wsi-deep AUC (gap) |",
        "|---|---|---|---|",
    ]
    for generator, rows in table.groupby("generator", sort=False):
        by = rows.set_index("method")
        cells = [f"{by.auc[m]:.3f} ({by.gap[m]:.3f})" for m in LABELS]
        lines.append(f"| {generator} | {by.limit.iloc[0]:.3f} | " + " | ".join(cells) + " |")
    markdown = f"Mean of {args.seeds} training seeds, without clinical data.\n\n" + "\n".join(lines)
    print("\n" + markdown)
    Path(args.out).write_text(
        json.dumps({"seeds": args.seeds, "per_seed": alone.to_dict(orient="records")}, indent=1)
    )
    Path(args.out).with_suffix(".md").write_text(markdown + "\n")
    print(f"\nwrote {args.out} and its .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
