"""The experiment's commands: tile, extract, encoders, train, run, evaluate, demo, compare."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console

from bidistill._cli_help import HelpCommand
from bidistill._text import count
from bidistill.cli.base import (
    app,
    console,
    default_run_dir,
    fail,
    free_run_dir,
    load_experiment,
    say,
    say_next,
    shell_arg,
    warnings_shown,
)
from bidistill.runs.rundir import RunDir

_SKIP_ERRORS_HELP = "Go on past slides that fail; list them at the end (exit status 1)."
_SHARD_HELP = (
    "Only shard i of n (0-based), e.g. 0/4 in a SLURM job array; under torchrun each process "
    "takes its rank's share by itself."
)


def _print_stage_summary(summary, outputs: str) -> None:
    """The closing lines of a per-slide stage: counts, each failure once, where the files are."""
    line = f"{summary.counts()}, {len(summary.failed)} failed"
    if summary.shard is not None:
        others = count(summary.other_shards, "slide")
        line += f" (shard {summary.shard}; {others} left to other shards)"
    console.print(f"{line}; {outputs}", highlight=False, soft_wrap=True)
    for slide_id, reason in summary.redone.items():
        note = f"  redone {slide_id}: {reason}"
        console.print(note, highlight=False, markup=False, soft_wrap=True)
    if summary.failed:
        console.print(f"[bold red]{count(len(summary.failed), 'slide')} failed:[/]")
        for slide_id, reason in summary.failed.items():
            console.print(f"  {slide_id}: {reason}", highlight=False, markup=False, soft_wrap=True)


def _print_next(summary, command: str) -> None:
    if summary.failed:
        say("fix the failed slides or remove them from the cohort table first")
    say_next(command)


def _check_stage(cfg, config: Path, stage: str, *, skip_errors: bool, shard) -> None:
    from bidistill.experiment.checks import check_stages

    check_stages(cfg, [stage], skip_errors=skip_errors, shard=shard).require(stage, config)


@app.command(cls=HelpCommand)
def tile(
    config: Path = typer.Argument(..., help="Experiment YAML (sections `slides` and `tiling`)."),
    skip_errors: bool = typer.Option(False, "--skip-errors", help=_SKIP_ERRORS_HELP),
    workers: int | None = typer.Option(
        None, "--workers", min=1, help="Slides tiled in parallel (default: tiling.workers)."
    ),
    shard: str | None = typer.Option(None, "--shard", help=_SHARD_HELP),
) -> None:
    """Tile every slide of the cohort: coords files (.h5), a QC image per slide and a cohort
    overview image.

    Slides already tiled are skipped, so a killed run resumes where it stopped.

    Example: bidistill tile experiment.yaml --workers 4 --skip-errors
    """
    from bidistill.slide_stages import resolve_shard
    from bidistill.slides.stage import tile_from_config

    cfg = load_experiment(config)
    shard_ = resolve_shard(shard)
    _check_stage(cfg, config, "tile", skip_errors=skip_errors, shard=shard_)
    summary = tile_from_config(cfg, workers=workers, skip_errors=skip_errors, shard=shard_)
    coords_dir = cfg.tiling.coords_dir
    _print_stage_summary(summary, f"coords in {coords_dir}, QC images in {coords_dir / 'qc'}")
    if cfg.tiling.qc:
        from bidistill.slides.qc import write_cohort_overview

        overview = write_cohort_overview(coords_dir)
        if overview is not None:
            say(f"cohort overview: {overview}")
    for slide_id in summary.empty:
        console.print(f"[yellow]warning:[/] {slide_id}: no tile kept; open its QC image")
    if summary.extra.get("cache_mb"):
        say(
            f"plain images (JPEG, PNG) converted once to tiled TIFFs: {summary.extra['cache_mb']:g}"
            f" MB in {summary.extra['cache_dir']} (`slides.cache_dir`); extraction reads them, "
            "so keep them until it is done",
        )
    if cfg.training.on_tiles:  # the methods read the tiles: nothing to extract
        run_dir = free_run_dir(config, cfg)
        _print_next(summary, f"bidistill run {shell_arg(config)} --out {shell_arg(run_dir)}")
    else:
        _print_next(summary, f"bidistill extract {shell_arg(config)}")
    if summary.failed:
        raise typer.Exit(code=1)


@app.command(cls=HelpCommand)
def extract(
    config: Path = typer.Argument(..., help="Experiment YAML (sections `slides`, `features`)."),
    skip_errors: bool = typer.Option(False, "--skip-errors", help=_SKIP_ERRORS_HELP),
    shard: str | None = typer.Option(None, "--shard", help=_SHARD_HELP),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bar."),
) -> None:
    """Encode the tiles of every tiled slide: one features .h5 per slide in `features.dir`.

    The encoder (`features.encoder`, see `bidistill encoders`) runs in bf16 on a GPU and fp32 on
    the CPU; slides already extracted are skipped, so a killed run resumes. Shards never write
    the same file: `--shard i/n` for job arrays, or one process per GPU with torchrun.

    Example: bidistill extract experiment.yaml
    (4 GPUs: torchrun --nproc_per_node=4 -m bidistill extract experiment.yaml)
    """
    from bidistill.features.extract import extract_from_config, gather_summaries
    from bidistill.slide_stages import Shard, resolve_shard

    cfg = load_experiment(config)
    rank = Shard.from_env()
    show = not no_progress and (rank is None or rank.index == 0)  # one bar, not one per rank
    shard_ = resolve_shard(shard)
    _check_stage(cfg, config, "extract", skip_errors=skip_errors, shard=shard_)
    summary = extract_from_config(cfg, shard=shard_, skip_errors=skip_errors, progress=show)
    merged = gather_summaries(summary)  # torchrun: every rank's summary, on rank 0
    if merged is not None:
        _print_stage_summary(merged, f"features in {cfg.features.dir}")
        if summary.extra.get("random_init"):
            console.print(
                "[bold red]warning:[/] RANDOM encoder weights (features.random_init): for tests "
                "and demos only",
                highlight=False,
            )
        run_dir = free_run_dir(config, cfg)
        _print_next(merged, f"bidistill run {shell_arg(config)} --out {shell_arg(run_dir)}")
    if summary.failed:
        raise typer.Exit(code=1)


@app.command(cls=HelpCommand)
def encoders() -> None:
    """List the registered patch encoders: dimension, input size, MPP, licence and gating.

    Any timm model works too (`timm:<name>`), and timm models on the Hugging Face Hub
    (`hf-hub:<org>/<repo>`). Gated models need their licence accepted on the Hub and HF_TOKEN set;
    offline, set `features.checkpoint` to a downloaded weights file.

    Example: bidistill encoders
    """
    from rich.table import Table

    from bidistill.features.encoders import list_encoders

    specs = list_encoders()
    table = Table(title="Patch encoders (features.encoder)", title_justify="left")
    # The name is what the user copies into the config, and D what the features will have:
    # those two never wrap nor get cut; the other columns give way on a narrow terminal.
    whole = {"name": max(len(s.name) for s in specs), "D": max(len(str(s.dim)) for s in specs)}
    for column in ("name", "D", "input", "MPP", "licence", "gated", "weights"):
        table.add_column(
            column,
            justify="right" if column in ("D", "MPP") else "left",
            min_width=whole.get(column),
            no_wrap=column in whole,
            overflow="fold",
        )
    for spec in specs:
        table.add_row(
            spec.name,
            str(spec.dim),
            spec.preprocess.describe() if spec.preprocess else "-",
            f"{spec.mpp:g}" if spec.mpp else "-",
            spec.licence,
            "yes" if spec.gated else "no",
            spec.hub,
        )
    Console().print(table)
    say(
        "also: timm:<name> (any timm model), hf-hub:<org>/<repo>, or a local model folder; "
        "set features.encoder in your config",
    )
    say_next("bidistill extract CONFIG")


@app.command(cls=HelpCommand)
def train(
    config: Path = typer.Argument(..., help="Experiment YAML."),
    out: Path = typer.Option(
        ...,
        "--out",
        metavar="DIR",
        help="Run folder: out/<method>/ (k-fold: out/folds/fold<k>/<method>/).",
    ),
    method: list[str] = typer.Option(
        None,
        "--method",
        "-m",
        metavar="NAME",
        help="Method to train (repeatable); default: the config's methods.",
    ),
    epochs: int | None = typer.Option(None, "--epochs", min=1, help="Override training.epochs."),
    seed: int | None = typer.Option(
        None, "--seed", min=0, max=2**32 - 1, help="Override training.seed."
    ),
    fold: int = typer.Option(0, "--fold", min=0, help="Fold to train (kfold splits)."),
) -> None:
    """Train methods on the cohort's feature files (methods trained on the same inputs are
    skipped), in the run folder's layout (`folds/fold<k>/<method>/` in a k-fold run).

    Example: bidistill train experiment.yaml --method bd --out runs/exp1
    """
    from bidistill.experiment import train_methods
    from bidistill.experiment.checks import check_stages

    cfg = load_experiment(config)
    checks = check_stages(cfg, ["train"], run_dir=out, in_memory=cfg.training.in_memory)
    checks.require("train", config)
    written = train_methods(
        cfg,
        out,
        methods=method or None,
        epochs=epochs,
        seed=seed,
        fold=fold,
        say=say,
        store=checks.store,
    )
    for method_dir in written:
        say(f"{method_dir.key}: {method_dir.path}")
    say_next(f"bidistill evaluate {shell_arg(out)}")


def _print_results(metrics, delong, run_dir: Path) -> None:
    """The results table, its legend and the headline (stdout), then where the report is."""
    from bidistill.evaluation.console import print_results

    reference = str(delong["reference"].iloc[0]) if len(delong) else _reference_of(run_dir)
    print_results(metrics, delong, reference=reference)
    run = RunDir(run_dir)
    say(f"report: {run.report}  (tables: {run.metrics})")


def _reference_of(run_dir: Path) -> str:
    from bidistill.config import EvaluationConfig

    config = RunDir(run_dir).config
    evaluation = load_experiment(config).evaluation if config.is_file() else EvaluationConfig()
    return evaluation.reference_method


@app.command(cls=HelpCommand)
def run(
    config: Path = typer.Argument(..., help="Experiment YAML."),
    out: Path | None = typer.Option(
        None,
        "--out",
        metavar="DIR",
        help="Run directory (created; reused to resume). Default: runs/<the config's name>.",
    ),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide progress bars."),
) -> None:
    """Run every stage not done yet: tile and extract (with a `slides` section), train each
    method, evaluate, report. Rerun to resume.

    Writes the run directory: config.yaml, splits.json, one folder per method, predictions.csv,
    metrics.csv, metrics_by_seed.csv, delong.csv, report.html, report.md and figures/. Nothing
    is written when the config or the files it names are not usable.

    Example: bidistill run experiment.yaml --out runs/exp1
    """
    import pandas as pd

    from bidistill.experiment import run_experiment

    out = out or default_run_dir(config)
    with warnings_shown():
        result = run_experiment(config, out, progress=not no_progress, say=say)
    _print_results(result.metrics, pd.read_csv(RunDir(out).delong), out)
    say_next(_predict_command(load_experiment(config), out))


def _predict_command(cfg, run_dir: Path) -> str:
    """`bidistill predict` as it runs on the training cohort itself: the command to adapt to
    new patients (their features folder and table)."""
    command = f"bidistill predict --run {shell_arg(_shown(run_dir))}"
    if cfg.training.on_tiles:  # the model reads tiles: the slides and their coords
        command += f" --slides {shell_arg(_shown(cfg.slides.dir))}"
        command += f" --tiles {shell_arg(_shown(cfg.tiling.coords_dir))}"
    elif cfg.cohort.slide_column:
        command += f" --features {shell_arg(_shown(cfg.features.dir))}"
    command += f" --clinical {shell_arg(_shown(cfg.cohort.table))}"
    return command + f" --out {shell_arg(_shown(run_dir / 'new_patients.csv'))}"


def _shown(path: Path | str) -> Path:
    """``path`` relative to the working folder when it lies inside it (as the user typed it)."""
    path = Path(path)
    try:
        return path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return path


@app.command(cls=HelpCommand)
def evaluate(
    run_dir: Path = typer.Argument(
        ..., metavar="RUN", help="Run directory with <method>/predictions.csv."
    ),
) -> None:
    """Recompute the missing-rate sweep, metrics, DeLong tests and report of a run directory.

    Reads each <method>/predictions.csv (nothing is trained) and the run's config.yaml.

    Example: bidistill evaluate runs/exp1
    """
    from bidistill.experiment import evaluate_run_dir

    tables = evaluate_run_dir(run_dir, say=say)
    _print_results(tables.metrics, tables.delong, run_dir)
    say_next(f"open {shell_arg(RunDir(run_dir).report)}")


@app.command(cls=HelpCommand)
def demo(
    out: Path = typer.Option(
        Path("demo_run"), "--out", metavar="DIR", help="Folder for the cohort and run."
    ),
    patients: int | None = typer.Option(
        None,
        "--patients",
        min=20,
        help="Synthetic patients (default 1058, the size of BCNB; 200 with --from-slides).",
    ),
    seed: int = typer.Option(
        0, "--seed", min=0, max=2**32 - 1, help="Seed of the synthetic cohort."
    ),
    from_slides: bool = typer.Option(
        False,
        "--from-slides",
        help="Start from synthetic slides in the BCNB layout: bcnb prepare, tile, extract (a "
        "small random-init encoder), train, report (a few minutes).",
    ),
) -> None:
    """Train BD and baselines on a synthetic cohort and write the report (about 30 s).

    The whole tool end to end on a laptop CPU: cohort in OUT/cohort, run in OUT/run. With
    --from-slides it starts from synthetic slides instead of features. Reruns resume.

    Example: bidistill demo --out demo_run
    """
    import pandas as pd

    from bidistill.experiment.demo import DEMO_PATIENTS, run_demo, run_slides_demo

    start = time.perf_counter()
    with warnings_shown():
        if from_slides:
            result = run_slides_demo(out, patients=patients or DEMO_PATIENTS, seed=seed, say=say)
        else:
            result = run_demo(out, patients=patients or 1058, seed=seed, say=say)
    run = RunDir(result.run_dir)
    _print_results(result.metrics, pd.read_csv(run.delong), run.path)
    say(f"done in {time.perf_counter() - start:.0f} s")
    say_next(f"open {shell_arg(run.report)}")


@app.command(cls=HelpCommand)
def compare(
    runs: list[Path] = typer.Argument(..., metavar="RUN", help="Run directories (two or more)."),
    out: Path = typer.Option(
        Path("comparison"), "--out", metavar="DIR", help="Folder for the table and the plot."
    ),
    method: list[str] = typer.Option(
        None, "--method", "-m", metavar="NAME", help="Compare only these methods (repeatable)."
    ),
    label: list[str] = typer.Option(
        None,
        "--label",
        metavar="TEXT",
        help="A name per run, in order (default: the folder names).",
    ),
) -> None:
    """Compare run directories: AUCs side by side, with paired tests where the patients match.

    For e.g. two encoders or two settings: AUC with its CI per run, method and missing rate, at
    the missing rates every run was evaluated at. Each method of each later run is tested
    against the same method of the first run, at every missing rate, with the same nested masks
    (DeLong, or a permutation test on small test sets; Holm-corrected per rate).

    A run whose predictions changed since its evaluation is refused until `bidistill evaluate
    RUN`. Writes compare.csv, compare_delong.csv and compare.png to --out.

    Example: bidistill compare runs/resnet runs/uni --out comparison
    """
    from bidistill.evaluation.compare import compare_runs
    from bidistill.evaluation.console import print_comparison

    if len(runs) < 2:
        fail("compare needs at least two run directories")
    if label and len(label) != len(runs):
        fail(f"--label given {len(label)} times for {len(runs)} runs: give one per run")
    result = compare_runs(runs, out, labels=label or None, methods=method or None)
    print_comparison(result)
    say(f"wrote {result.table_path}, {result.delong_path} and {result.figure_path}")
    say_next(f"open {shell_arg(result.figure_path)}")
