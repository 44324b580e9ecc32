"""The `bidistill` command line: thin wrappers that parse, validate and call one stage each.

Heavy imports (torch, openslide, pandas) happen inside the commands so that `--help` stays fast.
Errors are handled once, at the top (``_HandledGroup``): our own errors (bad config, bad table,
bad file: ``BidistillError``) print as one line and exit 1; anything else is a bug, printed as a
short message that names the log file holding its traceback, and also exits 1. Commands
therefore just raise.
"""

from __future__ import annotations

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
            log_path = _write_traceback(err)  # a bug: keep the traceback, but in a file
            _print_error(
                f"unexpected {type(err).__name__}: {err}. This is a bug in bidistill; the "
                f"traceback is in {log_path} (please attach it to a bug report)"
            )
        raise typer.Exit(1)


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
    seed: int = typer.Option(0, "--seed", help="Random seed: same seed, same bytes."),
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


# --- tile / extract / encoders (the per-slide stages) -------------------------------------------

_SKIP_ERRORS_HELP = "Go on past slides that fail; list them at the end (exit status 1)."
_SHARD_HELP = (
    "Only shard i of n (0-based), e.g. 0/4 in a SLURM job array; under torchrun each process "
    "takes its rank's share by itself."
)


def _print_stage_summary(summary, *, verb: str, unit: str, outputs: str) -> None:
    """The closing lines of a per-slide stage: counts, each failure once, where the files are."""
    line = (
        f"{verb} {len(summary.done)} slides ({sum(summary.done.values())} {unit}), "
        f"{len(summary.skipped)} already done, {len(summary.failed)} failed"
    )
    if summary.shard is not None:
        line += f" (shard {summary.shard}; {summary.other_shards} slides left to other shards)"
    console.print(f"{line}; {outputs}", highlight=False, soft_wrap=True)
    if summary.failed:
        console.print(f"[bold red]{len(summary.failed)} slides failed:[/]")
        for slide_id, reason in summary.failed.items():
            console.print(f"  {slide_id}: {reason}", highlight=False, markup=False, soft_wrap=True)


def _print_next(summary, command: str) -> None:
    if summary.failed:
        command = f"fix the failed slides or remove them from the cohort table; then {command}"
    console.print(f"next: {command}", highlight=False, soft_wrap=True)


def _exit_if_failed(summary) -> None:
    if summary.failed:
        raise typer.Exit(code=1)


@app.command()
def tile(
    config: Path = typer.Argument(..., help="Experiment YAML (sections `slides` and `tiling`)."),
    skip_errors: bool = typer.Option(False, "--skip-errors", help=_SKIP_ERRORS_HELP),
    workers: int | None = typer.Option(
        None, "--workers", min=1, help="Slides tiled in parallel (default: tiling.workers)."
    ),
    shard: str | None = typer.Option(None, "--shard", help=_SHARD_HELP),
) -> None:
    """Tile every slide of the cohort: coords files (.h5) and a QC image per slide.

    Slides already tiled are skipped, so a killed run resumes where it stopped.

    Example: bidistill tile experiment.yaml --workers 4 --skip-errors
    """
    from bidistill.runner import resolve_shard
    from bidistill.slides.run import tile_from_config

    cfg = _load(config)
    summary = tile_from_config(
        cfg, workers=workers, skip_errors=skip_errors, shard=resolve_shard(shard)
    )
    coords_dir = cfg.tiling.coords_dir
    _print_stage_summary(
        summary,
        verb="tiled",
        unit="tiles",
        outputs=f"coords in {coords_dir}, QC images in {coords_dir / 'qc'}",
    )
    for slide_id in summary.empty:
        console.print(f"[yellow]warning:[/] {slide_id}: no tile kept; open its QC image")
    if summary.extra.get("cache_mb"):
        console.print(
            f"plain images (JPEG, PNG) converted once to tiled TIFFs: {summary.extra['cache_mb']:g}"
            f" MB in {summary.extra['cache_dir']} (`slides.cache_dir`); extraction reads them, "
            "so keep them until it is done",
            highlight=False,
            soft_wrap=True,
        )
    _print_next(summary, f"bidistill extract {config}")
    _exit_if_failed(summary)


@app.command()
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
    from bidistill.runner import Shard, resolve_shard

    cfg = _load(config)
    rank = Shard.from_env()
    show = not no_progress and (rank is None or rank.index == 0)  # one bar, not one per rank
    summary = extract_from_config(
        cfg, shard=resolve_shard(shard), skip_errors=skip_errors, progress=show
    )
    merged = gather_summaries(summary)  # torchrun: every rank's summary, on rank 0
    if merged is not None:
        _print_stage_summary(
            merged, verb="extracted", unit="patches", outputs=f"features in {cfg.features.dir}"
        )
        if summary.extra.get("random_init"):
            console.print(
                "[bold red]warning:[/] RANDOM encoder weights (features.random_init): for tests "
                "and demos only",
                highlight=False,
            )
        _print_next(merged, f"bidistill run {config} --out runs/first")
    _exit_if_failed(summary)


@app.command()
def encoders() -> None:
    """List the registered patch encoders: dimension, input size, MPP, licence and gating.

    Any timm model works too (`timm:<name>`), and timm models on the Hugging Face Hub
    (`hf-hub:<org>/<repo>`). Gated models need their licence accepted on the Hub and HF_TOKEN set;
    offline, set `features.checkpoint` to a downloaded weights file.

    Example: bidistill encoders
    """
    from rich.table import Table

    from bidistill.features.encoders import list_encoders

    table = Table(title="Patch encoders (features.encoder)", title_justify="left")
    for column in ("name", "D", "input", "MPP", "licence", "gated", "weights"):
        table.add_column(column, justify="right" if column in ("D", "MPP") else "left")
    for spec in list_encoders():
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
    console.print(
        "also: timm:<name> (any timm model), hf-hub:<org>/<repo>, or a local model folder; "
        "next: set features.encoder in your config, then `bidistill extract CONFIG`",
        highlight=False,
        soft_wrap=True,
    )


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
    seed: int = typer.Option(0, "--seed", help="Random seed: same seed, same bytes."),
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
    seed: int | None = typer.Option(None, "--seed", help="Override training.seed."),
    fold: int = typer.Option(0, "--fold", min=0, help="Fold to train (kfold splits)."),
) -> None:
    """Train methods on the cohort's feature files (finished methods are skipped).

    A method whose predictions.csv exists is done; delete its folder to retrain it.

    Example: bidistill train experiment.yaml --method bd --out runs/exp1
    """
    from bidistill.training.cli_train import train_from_config

    written = train_from_config(
        _load(config), out, methods=method or None, epochs=epochs, seed=seed, fold=fold
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
    """Run every stage not done yet: tile, extract, train each method, evaluate, report.

    With a `slides` section, slides without features are tiled and extracted first; each stage
    skips what is done, so a rerun resumes.

    Writes the run directory: config.yaml, splits.json, one folder per method, predictions.csv,
    metrics.csv, metrics_by_seed.csv, delong.csv, report.html, report.md and figures/.

    Example: bidistill run experiment.yaml --out runs/exp1
    """
    from bidistill.pipeline import run_experiment

    result = run_experiment(config, out, progress=not no_progress)
    _print_run_summary(result.metrics, out)
    if _load(config).features.random_init:
        from bidistill.pixels import RANDOM_FEATURES_WARNING

        console.print(f"[bold red]WARNING:[/] {RANDOM_FEATURES_WARNING}", highlight=False)


@app.command()
def evaluate(
    run_dir: Path = typer.Argument(..., help="Run directory with <method>/predictions.csv."),
) -> None:
    """Recompute the missing-rate sweep, metrics, DeLong tests and report of a run directory.

    Reads each <method>/predictions.csv (nothing is trained) and the run's config.yaml.

    Example: bidistill evaluate runs/exp1
    """
    from bidistill.evaluation import evaluate_run

    tables = evaluate_run(run_dir)
    _print_run_summary(tables.metrics, run_dir)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_run"), "--out", help="Folder for the cohort and run."),
    patients: int | None = typer.Option(
        None,
        "--patients",
        min=20,
        help="Synthetic patients (default 1058, the size of BCNB; 100 with --from-slides).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the synthetic cohort."),
    from_slides: bool = typer.Option(
        False,
        "--from-slides",
        help="Start from synthetic slides in the BCNB layout: bcnb prepare, tile, extract (a "
        "small random-init encoder), train, report (a few minutes).",
    ),
) -> None:
    """Train BD and baselines on a synthetic cohort and write the report (about 30 s).

    The whole tool end to end on a laptop CPU: cohort in OUT/cohort, run in OUT/run. Reruns
    resume. With --from-slides it starts from pixels (OUT/BCNB) instead of features.

    Example: bidistill demo --out demo_run
    """
    import time

    start = time.perf_counter()
    if from_slides:
        from bidistill.pixels import RANDOM_FEATURES_WARNING, run_slides_demo

        result = run_slides_demo(out, patients=patients or 100, seed=seed)
        console.print(f"[bold red]WARNING:[/] {RANDOM_FEATURES_WARNING}", highlight=False)
    else:
        from bidistill.pipeline import run_demo

        result = run_demo(out, patients=patients or 1058, seed=seed)
    _print_auc_table(result.metrics, "Demo: AUC by share of test patients without clinical data")
    console.print(
        f"done in {time.perf_counter() - start:.0f} s. Report: {result.run_dir / 'report.html'}"
        f"  (tables: {result.run_dir / 'metrics.csv'})",
        highlight=False,
    )
