"""Accuracy suite: every method on cohorts with a known Bayes limit (`make bench-accuracy`).

For each generator of ``bidistill.synthetic.suite.SUITE`` the cohort is made once (cached), then
every registered method and BD's published form (``bd-paper``) is trained with bidistill's
default options and training settings for each training seed, exactly as `bidistill run` would.
The test patients' predictions are swept over the share of patients without clinical data
(nested, label-stratified masks, as `bidistill evaluate` does), and the same masks are applied
to the exact Bayes posterior, which gives the best AUC any method could reach on those patients
at that rate (the "limit").

Reported per generator, method and missing rate: the AUC (mean over training seeds), its gap to
the limit, and the paired difference to BD (method - BD; mean and 95% t-interval over seeds: a
difference whose interval excludes 0 is significant over training seeds; the test patients are
fixed, so the interval does not cover test-set sampling). Then the issue-9 targets: BD's mean
over rates >= every baseline's on every generator; BD significantly above the fill-in and
WSI-only baselines where the slides carry part of the clinical signal; BD's WSI branch (r = 1)
>= ``wsi-only``; mean gap of BD to the limit <= 0.02 at r = 0 and <= 0.025 at r = 1.

Training runs go to ``--workdir`` (default: a temporary folder) in two worker processes with one
torch thread each (tiny models on a 2-core CPU: two single-threaded processes beat one
two-threaded one). A run folder that has its predictions is reused, so an interrupted suite
resumes when given the same ``--workdir``; delete the folder after changing code.

Usage:
    python benchmarks/accuracy/run.py                        # 6 generators x 13 methods x 5 seeds
    python benchmarks/accuracy/run.py --seeds 2 --generators sparse-partial,slides-blind
    python benchmarks/accuracy/run.py --methods bd,wsi-only --variant bd-paper

Writes ``benchmarks/results/accuracy.json`` and ``accuracy.md`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd

RESULTS = Path(__file__).resolve().parents[1] / "results"
RATES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
MASK_SEEDS = 10
# Baselines that fill the missing clinical data in, and the WSI-only model: the issue asks BD to
# beat them significantly where the slides carry part of the clinical signal.
FILL_IN_AND_WSI = ("fusion-zero", "fusion-mean", "wsi-only")
PARTIAL = ("sparse-partial", "diffuse-partial", "train-missing", "subtype-interaction")
TARGET_GAP = {0.0: 0.02, 1.0: 0.025}


def variants() -> dict[str, tuple[str, dict]]:
    """Extra method entries beside the registry's defaults: label -> (name, options)."""
    from bidistill.models.bd import PAPER_OPTIONS

    return {"bd-paper": ("bd", dict(PAPER_OPTIONS))}


# --- cohorts ------------------------------------------------------------------------------------


def suite_spec(name: str, scale: float):
    """The generator's spec, with ``scale`` times its patients (for smoke tests)."""
    from bidistill.synthetic.suite import CLASS_SUITE, SUITE

    spec = (SUITE | CLASS_SUITE)[name]
    if scale == 1:
        return spec
    return replace(
        spec,
        patients=max(int(spec.patients * scale), 40),
        test_patients=max(int(spec.test_patients * scale), 40),
    )


def cohort_dir(cache: Path, spec) -> Path:
    """The cached cohort of a spec, keyed by the spec and the generator's code."""
    from bidistill.synthetic import classes, latent

    module = classes if isinstance(spec, classes.ClassSpec) else latent
    code = Path(module.__file__).read_bytes()
    key = hashlib.sha256(repr(asdict(spec)).encode() + code).hexdigest()[:12]
    return cache / f"{spec.name}-{key}"


def make_cohorts(names: list[str], cache: Path, scale: float) -> dict[str, Path]:
    from bidistill.synthetic.classes import ClassSpec, make_class_cohort
    from bidistill.synthetic.latent import make_latent_cohort

    configs = {}
    for name in names:
        spec = suite_spec(name, scale)
        folder = cohort_dir(cache, spec)
        config = folder / "config.yaml"
        if not (folder / "bayes.csv").is_file():
            print(f"making cohort {name} in {folder} ...", flush=True)
            make = make_class_cohort if isinstance(spec, ClassSpec) else make_latent_cohort
            make(spec, folder, seed=0)
        configs[name] = config
    return configs


# --- training (worker processes) ----------------------------------------------------------------

_LOADED: dict[str, tuple] = {}


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def train_task(task: tuple) -> tuple[str, str, int, float, float]:
    """Train one (generator, method label, seed) into ``workdir``; returns its wall and CPU
    time (the CPU time is what the run would take alone on a quiet machine)."""
    generator, label, name, options, seed, config_path, training = task
    from bidistill.cohort import load_cohort, resolve_splits
    from bidistill.config import MethodConfig, load_config
    from bidistill.runs.rundir import MethodDir
    from bidistill.training import open_feature_store, train_method

    if generator not in _LOADED:
        config = load_config(config_path)
        cohort = load_cohort(config.cohort)
        _LOADED[generator] = (config, cohort, open_feature_store(config, cohort))
    config, cohort, store = _LOADED[generator]
    config = config.model_copy(deep=True)
    for key, value in training.items():
        setattr(config.training, key, value)
    config.training.seed = seed
    config.training.device = "cpu"
    run_dir = Path(os.environ["BIDISTILL_SUITE_WORKDIR"]) / generator / f"seed{seed}"
    splits = resolve_splits(cohort, config.cohort.splits, run_dir / "splits.json")
    model_json = run_dir / label / "model.json"
    if (run_dir / label / "predictions.csv").is_file():  # reused: the time it took when trained
        import json

        seconds = json.loads(model_json.read_text())["train_seconds"]
        return generator, label, seed, seconds, seconds
    started, cpu = time.perf_counter(), time.process_time()
    method = MethodConfig(name=name, label=label if label != name else None, **options)
    out = MethodDir(run_dir / method.key)
    train_method(config, method, out, cohort=cohort, splits=splits, store=store, progress=False)
    return generator, label, seed, time.perf_counter() - started, time.process_time() - cpu


def run_tasks(tasks: list[tuple], workers: int) -> list[tuple]:
    done = []
    total = len(tasks)
    started = time.perf_counter()
    context = mp.get_context("spawn")
    with context.Pool(workers, initializer=_worker_init) as pool:
        for i, result in enumerate(pool.imap_unordered(train_task, tasks), start=1):
            done.append(result)
            generator, label, seed, seconds, cpu = result
            elapsed = time.perf_counter() - started
            print(
                f"[{i:3d}/{total}] {generator:20s} {label:14s} seed {seed}  {seconds:6.1f} s "
                f"(CPU {cpu:6.1f} s; elapsed {elapsed / 60:5.1f} min)",
                flush=True,
            )
    return done


# --- evaluation ---------------------------------------------------------------------------------


def test_predictions(workdir: Path, generator: str, label: str, seed: int) -> pd.DataFrame:
    path = workdir / generator / f"seed{seed}" / label / "predictions.csv"
    frame = pd.read_csv(path, dtype={"patient_id": str})
    return frame[frame["split"] == "test"].set_index("patient_id")


def sweep_aucs(bayes: pd.DataFrame, probs: dict[str, pd.DataFrame]) -> dict[str, np.ndarray]:
    """AUC per rate (mean over mask seeds) for the Bayes posterior and each prediction set;
    for a K-class cohort the macro one-vs-rest AUC.

    Args:
        bayes: test patients with ``label``, ``bayes_present``, ``bayes_absent`` (K classes:
            ``bayes_present_<k>``, ``bayes_absent_<k>``).
        probs: key -> frame indexed like ``bayes`` with ``prob_present``, ``prob_absent``
            (K classes: ``prob_present_<k>``, ``prob_absent_<k>``).

    Returns:
        key -> ``[R]`` AUCs; the Bayes limit under the key ``"limit"``.
    """
    from bidistill.evaluation.missing import nested_masks, pick
    from bidistill.scores import auc_or_nan

    ids = bayes.index.tolist()
    labels = bayes["label"].to_numpy()
    available = bayes["available"].to_numpy()
    masks = nested_masks(ids, labels, available, RATES, range(MASK_SEEDS))  # [S, R, n]
    pairs = {"limit": _passes(bayes, "bayes")}
    pairs |= {k: _passes(f.loc[ids], "prob") for k, f in probs.items()}
    out = {}
    for key, (present, absent) in pairs.items():
        scores = pick(masks, present, absent)  # [S, R, n] or [S, R, n, K]
        aucs = np.zeros(masks.shape[:2])
        for s in range(masks.shape[0]):
            for r in range(masks.shape[1]):
                aucs[s, r] = auc_or_nan(labels, scores[s, r])
        out[key] = aucs.mean(axis=0)
    return out


def _passes(frame: pd.DataFrame, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """(present, absent) scores of ``frame``: ``[n]`` from ``<prefix>_present``, or ``[n, K]``
    from ``<prefix>_present_<k>``."""
    if f"{prefix}_present" in frame:
        return tuple(frame[f"{prefix}_{p}"].to_numpy() for p in ("present", "absent"))
    k = sum(c.startswith(f"{prefix}_present_") for c in frame.columns)
    return tuple(
        frame[[f"{prefix}_{p}_{i}" for i in range(k)]].to_numpy() for p in ("present", "absent")
    )


def collect(workdir: Path, configs: dict[str, Path], labels: list[str], seeds: int) -> pd.DataFrame:
    """One row per (generator, method, seed, rate): AUC and the limit at that rate."""
    rows = []
    for generator, config in configs.items():
        bayes = pd.read_csv(config.parent / "bayes.csv", dtype={"patient_id": str})
        bayes = bayes.set_index("patient_id")
        first = test_predictions(workdir, generator, labels[0], 0)
        bayes["available"] = first.loc[bayes.index, "clinical_available"].astype(bool)
        for seed in range(seeds):
            probs = {label: test_predictions(workdir, generator, label, seed) for label in labels}
            aucs = sweep_aucs(bayes, probs)
            for label in labels:
                for r, rate in enumerate(RATES):
                    rows.append(
                        {
                            "generator": generator,
                            "method": label,
                            "seed": seed,
                            "missing_rate": rate,
                            "auc": aucs[label][r],
                            "limit": aucs["limit"][r],
                        }
                    )
    return pd.DataFrame(rows)


def t_interval(values: np.ndarray) -> tuple[float, float, float]:
    from scipy import stats

    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return mean, mean - half, mean + half


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (generator, method, rate) and per (generator, method) over rates ("mean")."""
    over_rates = runs.groupby(["generator", "method", "seed"], as_index=False)[["auc", "limit"]]
    mean_rows = over_rates.mean().assign(missing_rate="mean")
    runs = pd.concat([runs.assign(missing_rate=runs["missing_rate"].map(str)), mean_rows])
    reference = "bd" if "bd" in set(runs["method"]) else runs["method"].iloc[0]
    bd = runs[runs["method"] == reference].set_index(["generator", "missing_rate", "seed"])["auc"]
    rows = []
    for (generator, method, rate), group in runs.groupby(
        ["generator", "method", "missing_rate"], sort=False
    ):
        diff = (
            group["auc"].to_numpy()
            - bd.loc[[(generator, rate, s) for s in group["seed"]]].to_numpy()
        )
        mean_diff, low, high = t_interval(diff)
        rows.append(
            {
                "generator": generator,
                "method": method,
                "missing_rate": rate,
                "auc": group["auc"].mean(),
                "auc_sd": group["auc"].std(ddof=1) if len(group) > 1 else float("nan"),
                "limit": group["limit"].mean(),
                "gap": (group["limit"] - group["auc"]).mean(),
                "diff_to_bd": mean_diff,
                "diff_ci_low": low,
                "diff_ci_high": high,
                "seeds": len(group),
            }
        )
    return pd.DataFrame(rows)


def checks(summary: pd.DataFrame) -> list[dict]:
    """The issue-9 targets, each with what was measured."""
    out = []

    def add(name: str, passed: bool, measured: str) -> None:
        out.append({"name": name, "passed": bool(passed), "measured": measured})

    mean = summary[summary["missing_rate"] == "mean"].set_index(["generator", "method"])
    generators = list(dict.fromkeys(summary["generator"]))
    if "bd" not in set(summary["method"]):
        return out
    for generator in generators:
        rows = mean.loc[generator]
        bd = rows.loc["bd", "auc"]
        # Baselines only: BD's own variants (bd-paper, --entry bd-...) are not competitors.
        others = rows[~rows.index.str.startswith("bd")]
        if others.empty:
            continue
        best = others["auc"].idxmax()
        add(
            f"{generator}: bd mean AUC over rates >= every baseline",
            bd >= others["auc"].max() - 1e-12,
            f"bd {bd:.4f}, best other {best} {others.loc[best, 'auc']:.4f}",
        )
        if generator in PARTIAL:
            for other in FILL_IN_AND_WSI:
                if other in others.index:
                    r = others.loc[other]
                    add(
                        f"{generator}: bd significantly above {other} (mean over rates)",
                        r["diff_ci_high"] < 0,
                        f"{other} - bd = {r['diff_to_bd']:+.4f} "
                        f"[{r['diff_ci_low']:+.4f}, {r['diff_ci_high']:+.4f}]",
                    )
        at_one = summary[(summary["generator"] == generator) & (summary["missing_rate"] == "1.0")]
        at_one = at_one.set_index("method")["auc"]
        if "wsi-only" in at_one.index:
            add(
                f"{generator}: bd WSI branch (r=1) >= wsi-only",
                at_one["bd"] >= at_one["wsi-only"] - 1e-12,
                f"bd {at_one['bd']:.4f}, wsi-only {at_one['wsi-only']:.4f}",
            )
    for rate, target in TARGET_GAP.items():
        rows = summary[(summary["method"] == "bd") & (summary["missing_rate"] == str(rate))]
        gap = rows["gap"].mean()
        add(f"bd mean gap to the limit at r={rate:g} <= {target}", gap <= target, f"{gap:.4f}")
    return out


# --- output -------------------------------------------------------------------------------------


def markdown(summary: pd.DataFrame, checks_: list[dict], meta: dict) -> str:
    """The README table (mean over rates, r=0 and r=1 per method) and the full table."""
    lines = [
        f"Accuracy suite: {meta['seeds']} training seeds, {len(RATES)} missing rates x "
        f"{MASK_SEEDS} mask seeds, {meta['minutes']:.1f} min on {meta['cpus']} CPUs "
        f"({meta['training_cpu_minutes']:.0f} CPU-minutes of training; a reused run counts "
        "the time it took when trained).",
        "",
        "Gap to the Bayes limit (limit - AUC; lower is better), mean over training seeds. "
        "`mean`: mean over the missing rates 0, 0.2, ..., 1.",
        "",
    ]
    pivot = summary.pivot_table(
        index="method", columns=["generator", "missing_rate"], values="gap", sort=False
    )
    generators = list(dict.fromkeys(summary["generator"]))
    header = "| method | " + " | ".join(f"{g} (mean / r=0 / r=1)" for g in generators) + " |"
    lines += [header, "|---|" + "---|" * len(generators)]
    first = summary["method"].iloc[0]
    limits = summary[summary["method"] == first].set_index(["generator", "missing_rate"])["limit"]
    cells = [
        f"{limits[(g, 'mean')]:.3f} / {limits[(g, '0.0')]:.3f} / {limits[(g, '1.0')]:.3f}"
        for g in generators
    ]
    lines.append("| *Bayes limit (AUC)* | " + " | ".join(cells) + " |")
    for method in pivot.index:
        cells = [
            f"{pivot.loc[method, (g, 'mean')]:.3f} / {pivot.loc[method, (g, '0.0')]:.3f} / "
            f"{pivot.loc[method, (g, '1.0')]:.3f}"
            for g in generators
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Targets:", ""]
    lines += [
        f"- {'PASS' if c['passed'] else 'FAIL'} {c['name']}: {c['measured']}" for c in checks_
    ]
    lines += [
        "",
        "Full table: AUC, gap to the limit, and method - bd with its 95% t-interval over seeds.",
        "",
        "| generator | method | r | AUC | limit | gap | - bd [95% CI] |",
        "|---|---|---|---|---|---|---|",
    ]
    for _, r in summary.iterrows():
        diff = (
            "0"
            if r["method"] == "bd"
            else f"{r['diff_to_bd']:+.4f} [{r['diff_ci_low']:+.4f}, {r['diff_ci_high']:+.4f}]"
        )
        lines.append(
            f"| {r['generator']} | {r['method']} | {r['missing_rate']} | {r['auc']:.4f} | "
            f"{r['limit']:.4f} | {r['gap']:.4f} | {diff} |"
        )
    return "\n".join(lines) + "\n"


def _key_values(pairs: list[str]) -> dict:
    import yaml

    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        out[key] = yaml.safe_load(value)
    return out


def main() -> int:
    from bidistill.models import list_methods
    from bidistill.synthetic.suite import CLASS_SUITE, SUITE

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="Training seeds (default 5).")
    parser.add_argument(
        "--generators",
        default="",
        help=f"Comma-separated; default: the binary ones. Also: {', '.join(CLASS_SUITE)}.",
    )
    parser.add_argument("--methods", default="", help="Comma-separated registry names.")
    parser.add_argument("--variant", default=None, help="Comma-separated extra labels (bd-paper).")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--scale", type=float, default=1.0, help="Patients x this (smoke tests; default 1)."
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        help="KEY=VALUE given to every method (explorations, e.g. aggregator=mean); repeatable.",
    )
    parser.add_argument(
        "--entry",
        action="append",
        default=[],
        help="LABEL:NAME[:KEY=VALUE,...] an extra method entry, e.g. bd-t2:bd:temperature=2.",
    )
    parser.add_argument(
        "--training",
        action="append",
        default=[],
        help="KEY=VALUE training setting for every run (e.g. lr=1e-3); repeatable.",
    )
    parser.add_argument(
        "--cache",
        default=str(Path(tempfile.gettempdir()) / "bidistill-bench" / "accuracy-cohorts"),
        help="Folder for the cohorts (made once, then reused).",
    )
    parser.add_argument("--workdir", default=None, help="Folder for the training runs.")
    parser.add_argument("--out", default=str(RESULTS / "accuracy.json"))
    args = parser.parse_args()

    generators = args.generators.split(",") if args.generators else list(SUITE)
    methods = args.methods.split(",") if args.methods else list_methods()
    common = _key_values(args.option)
    training = _key_values(args.training)
    entries = {m: (m, dict(common)) for m in methods}
    extra = variants()
    chosen = args.variant.split(",") if args.variant is not None else list(extra)
    entries |= {label: (extra[label][0], common | extra[label][1]) for label in chosen if label}
    for entry in args.entry:
        label, name, *rest = entry.split(":")
        entries[label] = (name, common | _key_values(rest[0].split(",") if rest else []))
    started = time.perf_counter()
    configs = make_cohorts(generators, Path(args.cache), args.scale)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bidistill-accuracy-"))
    os.environ["BIDISTILL_SUITE_WORKDIR"] = str(workdir)
    # Longest first: the big cohorts and the two-branch methods, so that both workers end together.
    specs = SUITE | CLASS_SUITE
    size = {g: specs[g].patients * sum(specs[g].instances) for g in generators}  # ~ cost
    tasks = [
        (g, label, name, options, seed, str(configs[g]), training)
        for g in generators
        for label, (name, options) in entries.items()
        for seed in range(args.seeds)
    ]
    tasks.sort(key=lambda t: -size[t[0]] * (2 if t[2] in ("bd", "kd", "switch") else 1))
    print(f"{len(tasks)} training runs in {workdir} with {args.workers} workers", flush=True)
    timings = run_tasks(tasks, args.workers)
    runs = collect(workdir, configs, list(entries), args.seeds)
    summary = summarise(runs)
    results = checks(summary)
    minutes = (time.perf_counter() - started) / 60
    meta = {
        "seeds": args.seeds,
        "minutes": minutes,
        # Training CPU time over the workers: the suite's time on a quiet machine is about this
        # divided by the workers, plus making the cohorts once.
        "training_cpu_minutes": sum(t[4] for t in timings) / 60,
        "training": training,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "generators": {g: asdict(suite_spec(g, args.scale)) for g in generators},
        "methods": {label: {"name": n, "options": o} for label, (n, o) in entries.items()},
    }
    text = markdown(summary, results, meta)
    print("\n" + text)
    out = Path(args.out)
    from bidistill._io import write_json, write_text

    write_json(
        out,
        {
            "meta": meta,
            "timings": [
                {"generator": g, "method": m, "seed": s, "seconds": round(t, 1), "cpu": round(c, 1)}
                for g, m, s, t, c in timings
            ],
            "runs": runs.to_dict(orient="records"),
            "summary": summary.replace({np.nan: None}).to_dict(orient="records"),
            "checks": results,
        },
    )
    write_text(out.with_suffix(".md"), text)
    print(f"wrote {out} and {out.with_suffix('.md')} ({minutes:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
