"""Benchmark: small steps that run many times per cohort and must stay fast.

- the tissue mask of a 2048 x 1536 slide thumbnail (tiling runs it once per slide): target < 1 s;
- the bootstrap of a whole missing-rate sweep (10 methods x 6 rates, 210 test patients,
  1,000 resamples; the evaluation runs it once per run): target < 10 s.

Usage: python benchmarks/bench_steps.py [--out FILE]
Writes ``benchmarks/results/steps.json`` (or ``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "steps.json"


def seconds(work, repeats: int = 3) -> float:
    work()  # warm-up: imports, page faults
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.slides.helpers import tissue_image

    from bidistill.evaluation import metrics
    from bidistill.slides.masks import tissue_mask

    rgb, _ = tissue_image(1536, 2048, seed=7)
    kernels = np.random.default_rng(6).random((60, 90, 120))
    rows = [
        ("tissue mask, 2048 x 1536 thumbnail", seconds(lambda: tissue_mask(rgb)), 1.0),
        (
            "bootstrap of a sweep (60 x 90 x 120, 1,000 resamples)",
            seconds(lambda: metrics.bootstrap_auc(kernels, n_boot=1000), repeats=1),
            10.0,
        ),
    ]
    print(f"{'step':<56} {'seconds':>8} {'target':>8}  met")
    for name, took, target in rows:
        print(f"{name:<56} {took:8.3f} {target:8.1f}  {'yes' if took < target else 'NO'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "load_average": os.getloadavg()[0],
        "steps": [{"step": n, "seconds": t, "target_seconds": g, "met": t < g} for n, t, g in rows],
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
