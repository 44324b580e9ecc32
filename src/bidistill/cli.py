"""The `bidistill` command line: thin wrappers that parse, validate and call one stage each.

Heavy imports (torch, openslide, pandas) happen inside the commands so that `--help` stays fast.
Errors are handled once, at the top (``_HandledGroup``): our own errors (bad config, bad table,
bad file: ``BidistillError``) print as one line and exit 1; anything else is a bug, printed as a
short message that names the log file holding its traceback, and also exits 1. Commands
therefore just raise.
"""

from __future__ import annotations

import contextlib
import errno
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import NoReturn

import typer
import typer.core
from rich.console import Console

console = Console(stderr=True)


class _HandledGroup(typer.core.TyperGroup):
    """The root command group: turns every exception of a command into one clear message."""

    def invoke(self, ctx):
        from bidistill.errors import BidistillError

        try:
            return super().invoke(ctx)
        except BidistillError as err:
            _print_error(str(err))
        except KeyboardInterrupt:
            _print_error("interrupted; run the same command again to resume")
            raise typer.Exit(130) from None
        except Exception as err:
            if type(err).__module__.split(".")[0] in ("typer", "click"):
                raise  # exits, usage errors and --help: typer prints them itself
            log_path = _write_traceback(err)  # keep the traceback, but in a file
            _print_error(_describe_unexpected(err, log_path))
        raise typer.Exit(1)


# The machine's doing, not a bug: a full disk, a read-only or forbidden folder, no memory.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _describe_unexpected(err: Exception, log_path: Path) -> str:
    if isinstance(err, OSError) and err.errno in _ENVIRONMENT_ERRNOS:
        where = f"{err.filename}: " if err.filename else ""
        return (
            f"{where}{err.strerror}; free space or fix the folder's permissions, then run the "
            f"same command again to resume (details in {log_path})"
        )
    if isinstance(err, MemoryError):
        return (
            "out of memory; close other programs, or set training.in_memory: no, then run the "
            f"same command again to resume (details in {log_path})"
        )
    return (
        f"unexpected {type(err).__name__}: {err}. This is a bug in bidistill; the traceback is "
        f"in {log_path} (please attach it to a bug report)"
    )


def _print_error(message: str) -> None:
    from rich.text import Text

    console.print(Text.assemble(("error: ", "bold red"), message), highlight=False, soft_wrap=True)


def _write_traceback(err: BaseException) -> Path:
    """Where the traceback is: the stage's own log when the stage logged it there and said so
    (``err.log_path``), else a new file in the temporary folder, written here."""
    log_path = getattr(err, "log_path", None)
    if log_path is not None and Path(log_path).is_file():
        return Path(log_path)
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    fd, name = tempfile.mkstemp(prefix=f"bidistill-error-{stamp}-", suffix=".log")
    with open(fd, "w", encoding="utf-8") as log_file:
        log_file.write(f"bidistill {' '.join(sys.argv[1:])}\n{text}")
    return Path(name)


app = typer.Typer(
    cls=_HandledGroup,
    name="bidistill",
    help="Whole-slide image + clinical models that keep working when clinical data is missing.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
synth_app = typer.Typer(help="Make synthetic cohorts for tests, demos and benchmarks.")
bcnb_app = typer.Typer(help="The BCNB breast-cancer cohort (axillary lymph node metastasis).")
app.add_typer(synth_app, name="synth")
app.add_typer(bcnb_app, name="bcnb")


def _say(message: str) -> None:
    """What a stage decided (label table, stages kept or redone), as it decides it."""
    console.print(message, markup=False, highlight=False, soft_wrap=True)


def _fail(message: str) -> NoReturn:
    """Stop a command with one error line (for checks made in the CLI itself)."""
    _print_error(message)
    raise typer.Exit(code=1)


def _load(config_path: Path):
    from bidistill.config import load_config

    return load_config(config_path)


# --- init / config ------------------------------------------------------------------------------


@app.command()
def init(
    bcnb: bool = typer.Option(False, "--bcnb", help="Template for the BCNB ALN task."),
    output: Path = typer.Option(Path("bidistill.yaml"), "-o", "--output", help="File to write."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Write a commented experiment config template that validates as written.

    Example: bidistill init -o experiment.yaml
    """
    from bidistill.templates import template_text

    if output.exists() and not force:
        _fail(f"{output} exists; pass --force to overwrite it")
    from bidistill._io import write_text

    write_text(output, template_text(bcnb=bcnb))
    console.print(f"wrote {output}: edit the paths and columns, then `bidistill run {output}`")


@app.command("config")
def show_config(config: Path = typer.Argument(..., help="Experiment YAML.")) -> None:
    """Validate a config and print it with every default filled in and paths resolved.

    Example: bidistill config experiment.yaml
    """
    from bidistill.config import dump_config
    from bidistill.models.registry import check_method_configs

    loaded = _load(config)
    check_method_configs(loaded.methods, source=config)
    typer.echo(dump_config(loaded))


# --- synthetic cohorts --------------------------------------------------------------------------


@synth_app.command("features")
def synth_features(
    out: Path = typer.Option(..., "--out", help="Folder to write the cohort into."),
    patients: int = typer.Option(200, "--patients", min=20, help="Number of patients."),
    seed: int = typer.Option(
        0, "--seed", min=0, max=2**32 - 1, help="Random seed: same seed, same bytes."
    ),
    dim: int = typer.Option(64, "--dim", min=2, help="Feature dimension D."),
    min_instances: int = typer.Option(50, "--min-instances", min=1),
    max_instances: int = typer.Option(300, "--max-instances", min=1),
    no_split: bool = typer.Option(False, "--no-split", help="Leave out the split column."),
) -> None:
    """Make a synthetic cohort: table, .h5 features with a planted signal, and a config.

    Example: bidistill synth features --out synth --patients 300 --seed 0
    """
    from bidistill.synthetic.features import make_feature_cohort

    if max_instances < min_instances:
        _fail("--max-instances must be at least --min-instances")
    config = make_feature_cohort(
        out,
        patients=patients,
        seed=seed,
        dim=dim,
        instances=(min_instances, max_instances),
        with_split=not no_split,
        progress=True,
    )
    console.print(f"wrote a synthetic cohort of {patients} patients to {out}; config: {config}")


# --- tile ---------------------------------------------------------------------------------------


@app.command()
def tile(
    config: Path = typer.Argument(..., help="Experiment YAML (sections `slides` and `tiling`)."),
    skip_errors: bool = typer.Option(
        False, "--skip-errors", help="Go on past slides that fail; summarise them at the end."
    ),
    workers: int | None = typer.Option(
        None, "--workers", min=1, help="Slides tiled in parallel (default: tiling.workers)."
    ),
) -> None:
    """Tile every slide of the cohort: coords files (.h5) and a QC image per slide.

    Slides already tiled are skipped, so a killed run resumes where it stopped.

    Example: bidistill tile experiment.yaml --workers 4 --skip-errors
    """
    from bidistill.slides.run import tile_from_config

    cfg = _load(config)
    summary = tile_from_config(cfg, workers=workers, skip_errors=skip_errors)
    coords_dir = cfg.tiling.coords_dir
    console.print(
        f"tiled {len(summary.tiled)} slides ({sum(summary.tiled.values())} tiles), "
        f"{len(summary.skipped)} already done, {len(summary.failed)} failed; "
        f"coords in {coords_dir}, QC images in {coords_dir / 'qc'}",
        highlight=False,
        soft_wrap=True,
    )
    for slide_id in summary.empty:
        console.print(f"[yellow]warning:[/] {slide_id}: no tile kept; open its QC image")
    if summary.failed:
        console.print(f"[bold red]{len(summary.failed)} slides failed:[/]")
        for slide_id, reason in summary.failed.items():
            console.print(f"  {slide_id}: {reason}", highlight=False, markup=False, soft_wrap=True)
        if not summary.tiled and not summary.skipped:
            raise typer.Exit(code=1)


# --- BCNB ---------------------------------------------------------------------------------------


@bcnb_app.command("prepare")
def bcnb_prepare(
    root: Path = typer.Option(..., "--root", help="The BCNB download (holds the clinical xlsx)."),
    out: Path = typer.Option(..., "--out", help="Folder for cohort.csv and config.yaml."),
    task: str = typer.Option(
        "aln", "--task", help="aln | aln-n0-vs-1-2 | aln-n0-vs-gt2 | er | pr | her2."
    ),
    features: str = typer.Option(
        "balnmp5", "--features", help="balnmp5 (age, size, ER, PR, HER2) | all (no leakage)."
    ),
) -> None:
    """Turn the BCNB download into a cohort table and a ready experiment config.

    Works without WSIs/ (clinical-only). Prints what it found: patients, slides, annotations,
    label balance per split and missing values per column.

    Example: bidistill bcnb prepare --root BCNB --out bcnb-aln --task aln --features balnmp5
    """
    from bidistill.cohort.bcnb import prepare_bcnb

    report = prepare_bcnb(root, out, task=task, feature_set=features)
    typer.echo(report.format())
    typer.echo(f"next: bidistill run {report.config_path} --out {out / 'run'}")


@synth_app.command("bcnb")
def synth_bcnb(
    out: Path = typer.Option(..., "--out", help="Folder to write the BCNB-layout cohort into."),
    patients: int = typer.Option(30, "--patients", min=10, help="Number of patients (slides)."),
    seed: int = typer.Option(
        0, "--seed", min=0, max=2**32 - 1, help="Random seed: same seed, same bytes."
    ),
    slide_width: int = typer.Option(2048, "--slide-width", min=512, help="Slide width in px."),
    slide_height: int = typer.Option(1536, "--slide-height", min=512, help="Slide height in px."),
    signal: float = typer.Option(
        1.0, "--signal", min=0.0, help="Strength of the ALN signal in the tumour pixels."
    ),
) -> None:
    """Make a synthetic cohort in the exact BCNB layout (xlsx, split files, JPEG slides, JSON
    tumour polygons) whose ALN status shows in the tumour nuclei.

    Example: bidistill synth bcnb --out synth-bcnb --patients 30 --seed 0
    """
    from bidistill.synthetic.bcnb import make_bcnb_folder

    make_bcnb_folder(
        out,
        patients=patients,
        seed=seed,
        slide_size=(slide_width, slide_height),
        signal=signal,
        progress=True,
    )
    size_mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6
    console.print(
        f"wrote a synthetic BCNB folder of {patients} patients to {out} ({size_mb:.1f} MB); "
        f"next: bidistill bcnb prepare --root {out} --out {out}-cohort",
        highlight=False,
    )


@app.command()
def train(
    config: Path = typer.Argument(..., help="Experiment YAML."),
    out: Path = typer.Option(..., "--out", help="Run folder; each method writes out/<method>/."),
    method: list[str] = typer.Option(
        None, "--method", "-m", help="Method to train (repeatable); default: the config's methods."
    ),
    epochs: int | None = typer.Option(None, "--epochs", min=1, help="Override training.epochs."),
    seed: int | None = typer.Option(
        None, "--seed", min=0, max=2**32 - 1, help="Override training.seed."
    ),
    fold: int = typer.Option(0, "--fold", min=0, help="Fold to train (kfold splits)."),
) -> None:
    """Train methods on the cohort's feature files (finished methods are skipped).

    A method whose predictions.csv exists is done; delete its folder to retrain it.

    Example: bidistill train experiment.yaml --method bd --out runs/exp1
    """
    from bidistill.training.cli_train import train_from_config

    written = train_from_config(
        _load(config), out, methods=method or None, epochs=epochs, seed=seed, fold=fold, say=_say
    )
    for path in written:
        console.print(f"{path.name}: {path}", highlight=False)


# --- run / evaluate / demo ----------------------------------------------------------------------


def _print_auc_table(metrics, title: str) -> None:
    """AUC per method (rows) and test missing rate (columns); the best per rate marked *."""
    from rich.table import Table

    rates = sorted(metrics["missing_rate"].unique())
    best = metrics.groupby("missing_rate")["auc"].max()
    table = Table(title=title, title_justify="left")
    table.add_column("method")
    for rate in rates:
        table.add_column(f"r={rate:g}", justify="right")
    for method, rows in metrics.groupby("method", sort=False):
        by_rate = rows.set_index("missing_rate")["auc"]
        cells = [
            f"[bold]{by_rate[r]:.3f}*[/]" if by_rate[r] >= best[r] - 1e-12 else f"{by_rate[r]:.3f}"
            for r in rates
        ]
        table.add_row(method, *cells)
    Console().print(table)
    console.print("* best at that rate", highlight=False)


def _print_run_summary(metrics, run_dir: Path) -> None:
    _print_auc_table(metrics, "AUC by test missing rate (mean over mask seeds)")
    console.print(f"report: {run_dir / 'report.html'}", highlight=False)


@app.command()
def run(
    config: Path = typer.Argument(..., help="Experiment YAML."),
    out: Path = typer.Option(..., "--out", help="Run directory (created; reused to resume)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide progress bars."),
) -> None:
    """Run every stage not done yet: train each method, evaluate, report. Rerun to resume.

    Writes the run directory: config.yaml, splits.json, one folder per method, predictions.csv,
    metrics.csv, metrics_by_seed.csv, delong.csv, report.html, report.md and figures/.

    Example: bidistill run experiment.yaml --out runs/exp1
    """
    from bidistill.pipeline import run_experiment

    result = run_experiment(config, out, progress=not no_progress, say=_say)
    _print_run_summary(result.metrics, out)


@app.command()
def evaluate(
    run_dir: Path = typer.Argument(..., help="Run directory with <method>/predictions.csv."),
) -> None:
    """Recompute the missing-rate sweep, metrics, DeLong tests and report of a run directory.

    Reads each <method>/predictions.csv (nothing is trained) and the run's config.yaml.

    Example: bidistill evaluate runs/exp1
    """
    import contextlib

    from bidistill.evaluation import evaluate_run
    from bidistill.runs import lock_run_dir

    held = (
        lock_run_dir(run_dir, command=f"evaluate {run_dir}", say=_say)
        if run_dir.is_dir()
        else contextlib.nullcontext()  # evaluate_run says there is nothing to evaluate
    )
    with held:
        tables = evaluate_run(run_dir)
    _print_run_summary(tables.metrics, run_dir)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_run"), "--out", help="Folder for the cohort and run."),
    patients: int = typer.Option(
        1058, "--patients", min=40, help="Synthetic patients (1058: the size of BCNB)."
    ),
    seed: int = typer.Option(
        0, "--seed", min=0, max=2**32 - 1, help="Seed of the synthetic cohort."
    ),
) -> None:
    """Train BD and baselines on a synthetic cohort and write the report (about 30 s).

    The whole tool end to end on a laptop CPU: cohort in OUT/cohort, run in OUT/run. Reruns
    resume.

    Example: bidistill demo --out demo_run
    """
    import time

    from bidistill.pipeline import run_demo

    start = time.perf_counter()
    result = run_demo(out, patients=patients, seed=seed, say=_say)
    _print_auc_table(result.metrics, "Demo: AUC by share of test patients without clinical data")
    console.print(
        f"done in {time.perf_counter() - start:.0f} s. Report: {result.run_dir / 'report.html'}"
        f"  (tables: {result.run_dir / 'metrics.csv'})",
        highlight=False,
    )


# --- predict / heatmap --------------------------------------------------------------------------

_RUN_HELP = "Run directory (what `bidistill run` wrote)."
_FEATURES_HELP = "Folder of <slide_id>.h5 feature files, or single files (repeatable)."
_CLINICAL_HELP = (
    "Table of the patients (the training table's columns; labels not needed). Without it, "
    "each feature file is one patient without clinical data."
)
_METHOD_HELP = "Method folder of the run (default: the reference method, bd)."
_CONFIG_HELP = "The run's experiment YAML, for a run made by `bidistill train` (no config.yaml)."
_BUDGET_HELP = "MiB for one bag's features and activations; larger bags are read in chunks."


@contextlib.contextmanager
def _warnings_as_lines():
    """Print the stage's warnings (unseen categories, absent columns) as `warning:` lines."""
    import logging
    import warnings

    from rich.text import Text

    class _Lines(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            _print_warning(record.getMessage())

    def _print_warning(message: str) -> None:
        console.print(Text.assemble(("warning: ", "yellow"), message), soft_wrap=True)

    handler = _Lines(logging.WARNING)
    package_log = logging.getLogger("bidistill")
    package_log.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        for message in dict.fromkeys(str(w.message) for w in caught):
            _print_warning(message)
    finally:
        package_log.removeHandler(handler)


def _load_run(run_dir: Path, method: str | None, config: Path | None, device: str):
    from bidistill.inference.run import load_run

    return load_run(run_dir, method, config=config, device=device)


@app.command()
def predict(
    run_dir: Path = typer.Option(..., "--run", help=_RUN_HELP),
    out: Path = typer.Option(..., "--out", help="CSV to write, one row per patient."),
    features: list[Path] = typer.Option(
        None, "--features", help=_FEATURES_HELP + " Not needed by clinical-only methods."
    ),
    clinical: Path | None = typer.Option(None, "--clinical", help=_CLINICAL_HELP),
    method: str | None = typer.Option(None, "--method", "-m", help=_METHOD_HELP),
    patient: list[str] = typer.Option(None, "--patient", help="Only this patient (repeatable)."),
    config: Path | None = typer.Option(None, "--config", help=_CONFIG_HELP),
    memory_budget: float = typer.Option(512, "--memory-budget", min=4, help=_BUDGET_HELP),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, mps."),
) -> None:
    """Predict new patients with a trained run, with or without their clinical data.

    Writes one row per patient: probability, decision at the run's validation threshold, the
    branch that predicted (BD: multi-modal with clinical data, single-modal without) and the
    clinical values that were missing. Features must come from the run's encoder, patch size
    and MPP.

    Example: bidistill predict --run runs/exp1 --features new/h5 --clinical new.csv --out pred.csv
    """
    from bidistill._io import write_csv

    with _warnings_as_lines():
        trained = _load_run(run_dir, method, config, device)
        table = trained.predict(
            features or None,
            clinical,
            patients=patient or None,
            memory_budget=int(memory_budget * 2**20),
            progress=True,
        )
    write_csv(out, table)
    positive = trained.config.cohort.label.positive[0]
    branches = ", ".join(f"{b} {n}" for b, n in table["branch"].value_counts().items())
    console.print(
        f"predicted {len(table)} patients with {trained.method}: {int(table['decision'].sum())} "
        f"{positive} at the run's validation thresholds (branches: {branches}); wrote {out}",
        highlight=False,
        soft_wrap=True,
    )
    if features:
        features_args = " ".join(f"--features {f}" for f in features)
        console.print(
            f"next: bidistill heatmap --run {run_dir} {features_args} "
            f"--out {out.parent / 'heatmaps'}",
            highlight=False,
            soft_wrap=True,
        )
    else:
        console.print(f"next: open {out}", highlight=False, soft_wrap=True)


@app.command()
def heatmap(
    run_dir: Path = typer.Option(..., "--run", help=_RUN_HELP),
    features: list[Path] = typer.Option(..., "--features", help=_FEATURES_HELP),
    out: Path = typer.Option(..., "--out", help="Folder for the maps and exports."),
    slides: list[Path] = typer.Option(
        None,
        "--slides",
        help="Slide files, patch folders or folders of slides (repeatable); slides not found "
        "are drawn on a blank canvas.",
    ),
    clinical: Path | None = typer.Option(None, "--clinical", help=_CLINICAL_HELP),
    patient: list[str] = typer.Option(None, "--patient", help="Only this patient (repeatable)."),
    method: str | None = typer.Option(None, "--method", "-m", help=_METHOD_HELP),
    top_k: int = typer.Option(8, "--top-k", min=1, help="Tiles per row of the montage."),
    config: Path | None = typer.Option(None, "--config", help=_CONFIG_HELP),
    memory_budget: float = typer.Option(512, "--memory-budget", min=4, help=_BUDGET_HELP),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, mps."),
) -> None:
    """Attention heatmaps (both branches for bd), top/bottom tile montages, and the tiles and
    tissue contours as GeoJSON for QuPath.

    Per slide: <slide>.heatmap.png, <slide>.montage.png, <slide>.tiles.csv,
    <slide>.tiles.geojson and <slide>.tissue.geojson; plus predictions.csv.

    Example: bidistill heatmap --run runs/exp1 --features new/h5 --slides new/wsi --out maps
    """
    from bidistill.inference.maps import write_attention_maps

    with _warnings_as_lines():
        trained = _load_run(run_dir, method, config, device)
        summary = write_attention_maps(
            trained,
            features,
            out,
            clinical=clinical,
            slides=slides or (),
            patients=patient or None,
            top_k=top_k,
            memory_budget=int(memory_budget * 2**20),
            progress=True,
        )
    n_files = sum(len(f) for f in summary.files.values())
    console.print(
        f"wrote {n_files} files for {len(summary.files)} slides of {len(summary.predictions)} "
        f"patients to {out}",
        highlight=False,
        soft_wrap=True,
    )
    if summary.without_image:
        console.print(
            f"{len(summary.without_image)} slides without an image (give --slides): drawn on a "
            "blank canvas, no montage or tissue contours",
            highlight=False,
            soft_wrap=True,
        )
    first = next(iter(summary.files), None)
    if first is not None:
        console.print(
            f"next: open {out / (first + '.heatmap.png')}; in QuPath, File > Import objects "
            f"{out / (first + '.tiles.geojson')} over the slide",
            highlight=False,
            soft_wrap=True,
        )
