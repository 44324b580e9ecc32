"""The `bidistill` command line: thin wrappers that parse, validate and call one stage each.

Heavy imports (torch, openslide, pandas) happen inside the commands so that `--help` stays fast.
Every command ends by printing the next command to run (``_next``), on stderr and never wrapped
mid-command, so that it can be pasted.

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
from rich.console import Console

from bidistill._cli_help import HelpCommand, HelpGroup

console = Console(stderr=True)


class _HandledGroup(HelpGroup):
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
synth_app = typer.Typer(
    cls=HelpGroup, help="Make synthetic cohorts for tests, demos and benchmarks."
)
bcnb_app = typer.Typer(
    cls=HelpGroup, help="The BCNB breast-cancer cohort (axillary lymph node metastasis)."
)
app.add_typer(synth_app, name="synth")
app.add_typer(bcnb_app, name="bcnb")


def _version(value: bool) -> None:
    if value:
        from bidistill import __version__

        typer.echo(f"bidistill {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Whole-slide image + clinical models that keep working when clinical data is missing.

    Start with `bidistill init --synthetic -o first/exp.yaml`, or `bidistill demo`.
    """


def _fail(message: str) -> NoReturn:
    """Stop a command with one error line (for checks made in the CLI itself)."""
    _print_error(message)
    raise typer.Exit(code=1)


def _load(config_path: Path):
    from bidistill.config import load_config

    return load_config(config_path)


def _arg(path: Path | str) -> str:
    """A path as the user would type it in a shell (quoted when it needs to be)."""
    import shlex

    return shlex.quote(str(path))


def _next(command: str) -> None:
    """The last line of a command: what to run next, never wrapped, so it can be pasted."""
    from rich.text import Text

    console.print(Text.assemble(("next: ", "bold green"), command), soft_wrap=True, highlight=False)


def _say(message: str) -> None:
    console.print(message, soft_wrap=True, highlight=False, markup=False)


def _has_command(name: str) -> bool:
    """Whether this build has a `bidistill <name>` command (hints name only commands that exist)."""
    return any(
        (info.name or (info.callback.__name__ if info.callback else "")) == name
        for info in app.registered_commands
    )


def _default_run_dir(config: Path, loaded=None) -> Path:
    """``runs/<the config's name>`` (its file name when the name has unusual characters)."""
    import re

    name = (loaded or _load(config)).name
    return Path("runs") / (name if re.fullmatch(r"[\w.+-]+", name) else config.stem)


# --- init / config ------------------------------------------------------------------------------


@app.command(cls=HelpCommand)
def init(
    output: Path = typer.Option(
        Path("bidistill.yaml"), "-o", "--output", metavar="FILE", help="Config file to write."
    ),
    synthetic: bool = typer.Option(
        False,
        "--synthetic",
        help="Also write a small synthetic cohort beside the config (cohort.csv, features/), "
        "so that it runs as written: the quickest way to see the whole tool work.",
    ),
    bcnb: bool = typer.Option(
        False, "--bcnb", help="Template for BCNB's axillary lymph node task instead."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite existing files."),
) -> None:
    """Write a commented experiment config that validates as written.

    The generic template names your files (cohort table, slides, features) and says what to fill
    in; with --synthetic it comes with a cohort to run on.

    Example: bidistill init --synthetic -o first/exp.yaml
    """
    from bidistill._io import write_text
    from bidistill.templates import SYNTHETIC_COHORT, template_text

    if synthetic and bcnb:
        _fail("--synthetic and --bcnb exclude each other: choose one template")
    folder = output.parent
    targets = [output] + ([folder / "cohort.csv", folder / "features"] if synthetic else [])
    existing = [str(p) for p in targets if p.exists()]
    if existing and not force:
        _fail(f"{', '.join(existing)} exists already; pass --force to overwrite")
    if synthetic:
        from bidistill.synthetic.features import make_feature_cohort

        patients = SYNTHETIC_COHORT["patients"]
        _say(f"writing a synthetic cohort of {patients} patients to {folder} ...")
        make_feature_cohort(
            folder,
            patients=patients,
            dim=SYNTHETIC_COHORT["dim"],
            instances=SYNTHETIC_COHORT["instances"],
            config_name=None,
            progress=True,
        )
    write_text(output, template_text(bcnb=bcnb, synthetic=synthetic))
    _say(f"wrote {output}")
    from bidistill.preflight import check_config_paths

    todo = [f for f in check_config_paths(_load(output)) if f.status != "ok"]
    if todo:
        _say("to fill in before it runs (paths are relative to the config):")
        for finding in todo:
            _say(f"  {finding.key}: {finding.detail}")
    _next(f"bidistill config {_arg(output)}")


@app.command("config", cls=HelpCommand)
def show_config(config: Path = typer.Argument(..., help="Experiment YAML.")) -> None:
    """Validate a config, print it with every default filled in and paths resolved, and check
    that the files it names exist.

    The config goes to stdout, the checks to stderr. Each missing path is named with the stage
    that needs it. Exits 1 when `bidistill run` cannot start yet.

    Example: bidistill config experiment.yaml
    """
    from rich.text import Text

    from bidistill.config import dump_config
    from bidistill.models.registry import check_method_configs
    from bidistill.preflight import check_config_paths

    loaded = _load(config)
    check_method_configs(loaded.methods, source=config)
    typer.echo(dump_config(loaded))
    findings = check_config_paths(loaded)
    _say(f"checked the files {config} names:")
    styles = {"ok": "green", "warning": "yellow", "missing": "bold red"}
    for finding in findings:
        line = Text.assemble(
            "  ", (f"{finding.status:<8}", styles[finding.status]), f"{finding.key}: "
        )
        line.append(finding.detail)
        console.print(line, soft_wrap=True, highlight=False)
    blocking = [f for f in findings if f.blocks_run]
    if not blocking:
        _next(f"bidistill run {_arg(config)} --out {_arg(_default_run_dir(config, loaded))}")
        return
    keys = ", ".join(f.key for f in blocking)
    _print_error(f"{config}: `bidistill run` cannot start yet: fix {keys} (see above)")
    slides_ok = any(f.key == "slides.dir" and f.status == "ok" for f in findings)
    if {f.key for f in blocking} == {"features.dir"} and slides_ok:
        _next(f"bidistill tile {_arg(config)}")
    else:
        _next(f"bidistill config {_arg(config)}   (after editing {config})")
    raise typer.Exit(code=1)


# --- synthetic cohorts --------------------------------------------------------------------------


@synth_app.command("features", cls=HelpCommand)
def synth_features(
    out: Path = typer.Option(..., "--out", metavar="DIR", help="Folder to write the cohort into."),
    patients: int = typer.Option(200, "--patients", min=20, help="Number of patients."),
    seed: int = typer.Option(
        0, "--seed", min=0, max=2**32 - 1, help="Random seed: same seed, same bytes."
    ),
    dim: int = typer.Option(64, "--dim", min=2, help="Feature dimension D."),
    min_instances: int = typer.Option(
        50, "--min-instances", min=1, help="Fewest instances (tiles) in a patient's bag."
    ),
    max_instances: int = typer.Option(
        300, "--max-instances", min=1, help="Most instances (tiles) in a patient's bag."
    ),
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
    _say(f"wrote a synthetic cohort of {patients} patients to {out}; config: {config}")
    _next(f"bidistill run {_arg(config)} --out {_arg(out / 'run')}")


@synth_app.command("bcnb", cls=HelpCommand)
def synth_bcnb(
    out: Path = typer.Option(
        ..., "--out", metavar="DIR", help="Folder to write the BCNB-layout cohort into."
    ),
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
    _say(
        f"writing a synthetic BCNB folder of {patients} patients ({slide_width} x {slide_height} "
        f"px JPEG slides) to {out} ..."
    )
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
    _say(f"wrote a synthetic BCNB folder of {patients} patients to {out} ({size_mb:.1f} MB)")
    _next(f"bidistill bcnb prepare --root {_arg(out)} --out {_arg(str(out) + '-cohort')}")


# --- BCNB ---------------------------------------------------------------------------------------


@bcnb_app.command("prepare", cls=HelpCommand)
def bcnb_prepare(
    root: Path = typer.Option(
        ..., "--root", metavar="DIR", help="The BCNB download (holds the clinical xlsx)."
    ),
    out: Path = typer.Option(
        ..., "--out", metavar="DIR", help="Folder for cohort.csv and config.yaml."
    ),
    task: str = typer.Option(
        "aln", "--task", help="aln | aln-n0-vs-1-2 | aln-n0-vs-gt2 | er | pr | her2."
    ),
    features: str = typer.Option(
        "balnmp5", "--features", help="balnmp5 (age, size, ER, PR, HER2) | all (no leakage)."
    ),
    protocol: str = typer.Option(
        "features",
        "--protocol",
        help="features (MIL on patch features) | paper (the published protocol: VGG16-BN "
        "trained end to end on bags of 10 patches; configs/bcnb-paper.yaml).",
    ),
) -> None:
    """Turn the BCNB download into a cohort table and a ready experiment config.

    Works without WSIs/ (clinical-only). Prints what it found: patients, slides, annotations,
    label balance per split and missing values per column. --protocol paper reproduces the
    papers' end-to-end training, on paper_patches/ when it is there.

    Example: bidistill bcnb prepare --root BCNB --out bcnb-aln --task aln --features balnmp5
    """
    from bidistill.cohort.bcnb import prepare_bcnb

    report = prepare_bcnb(root, out, task=task, feature_set=features, protocol=protocol)
    typer.echo(report.format())
    if report.needs_tiling:
        _next(f"bidistill tile {_arg(report.config_path)}")
    else:
        _next(f"bidistill run {_arg(report.config_path)} --out {_arg(out / 'run')}")


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
        _say("fix the failed slides or remove them from the cohort table first")
    _next(command)


def _exit_if_failed(summary) -> None:
    if summary.failed:
        raise typer.Exit(code=1)


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
    if cfg.tiling.qc:
        from bidistill.slides.qc import write_cohort_overview

        overview = write_cohort_overview(coords_dir)
        if overview is not None:
            _say(f"cohort overview: {overview}")
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
    _print_next(summary, f"bidistill extract {_arg(config)}")
    _exit_if_failed(summary)


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
        run_dir = _default_run_dir(config, cfg)
        _print_next(merged, f"bidistill run {_arg(config)} --out {_arg(run_dir)}")
    _exit_if_failed(summary)


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
        "set features.encoder in your config",
        highlight=False,
        soft_wrap=True,
    )
    _next("bidistill extract CONFIG")


# --- train / run / evaluate / demo / compare ----------------------------------------------------


@app.command(cls=HelpCommand)
def train(
    config: Path = typer.Argument(..., help="Experiment YAML."),
    out: Path = typer.Option(
        ..., "--out", metavar="DIR", help="Run folder; each method writes out/<method>/."
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
    _next(f"bidistill evaluate {_arg(out)}")


def _print_results(metrics, delong, run_dir: Path) -> None:
    """The results table, its legend and the headline (stdout), then where the report is."""
    from bidistill.evaluation.console import print_results

    reference = str(delong["reference"].iloc[0]) if len(delong) else _reference_of(run_dir)
    print_results(metrics, delong, reference=reference)
    _say(f"report: {run_dir / 'report.html'}  (tables: {run_dir / 'metrics.csv'})")


def _reference_of(run_dir: Path) -> str:
    from bidistill.config import EvaluationConfig

    config = run_dir / "config.yaml"
    return (
        _load(config).evaluation.reference_method
        if config.is_file()
        else (EvaluationConfig().reference_method)
    )


class _ConsoleLog:
    """Show every warning on the console while a command runs; without it they would go only
    to the run's ``run.log``. (Stage messages reach the console through ``say``.)"""

    def __enter__(self):
        import logging

        class StageFilter(logging.Filter):
            def filter(self, record: logging.LogRecord) -> bool:
                return record.levelno >= logging.WARNING

        class Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                prefix = "warning: " if record.levelno >= logging.WARNING else ""
                _say(prefix + record.getMessage())

        self.handler = Handler(logging.INFO)
        self.handler.addFilter(StageFilter())
        self.logger = logging.getLogger("bidistill")
        self.old_level = self.logger.level
        self.logger.addHandler(self.handler)
        self.logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.old_level)


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

    from bidistill.pipeline import run_experiment

    out = out or _default_run_dir(config)
    with _ConsoleLog():
        result = run_experiment(config, out, progress=not no_progress, say=_say)
    _print_results(result.metrics, pd.read_csv(out / "delong.csv"), out)
    cfg = _load(config)
    if cfg.features.random_init:
        from bidistill.pixels import RANDOM_FEATURES_WARNING

        console.print(f"[bold red]WARNING:[/] {RANDOM_FEATURES_WARNING}", highlight=False)
    _next(_predict_command(cfg, out))


def _predict_command(cfg, run_dir: Path) -> str:
    """`bidistill predict` as it runs on the training cohort itself: the command to adapt to
    new patients (their features folder and table)."""
    command = f"bidistill predict --run {_arg(_shown(run_dir))}"
    if cfg.cohort.slide_column:
        command += f" --features {_arg(_shown(cfg.features.dir))}"
    command += f" --clinical {_arg(_shown(cfg.cohort.table))}"
    return command + f" --out {_arg(_shown(run_dir / 'new_patients.csv'))}"


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
    _print_results(tables.metrics, tables.delong, run_dir)
    _next(f"open {_arg(run_dir / 'report.html')}")


@app.command(cls=HelpCommand)
def demo(
    out: Path = typer.Option(
        Path("demo_run"), "--out", metavar="DIR", help="Folder for the cohort and run."
    ),
    patients: int | None = typer.Option(
        None,
        "--patients",
        min=20,
        help="Synthetic patients (default 1058, the size of BCNB; 100 with --from-slides).",
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

    start = time.perf_counter()
    with _ConsoleLog():
        if from_slides:
            from bidistill.pixels import run_slides_demo

            result = run_slides_demo(out, patients=patients or 100, seed=seed, say=_say)
        else:
            from bidistill.pipeline import run_demo

            result = run_demo(out, patients=patients or 1058, seed=seed, say=_say)
    _print_results(result.metrics, pd.read_csv(result.run_dir / "delong.csv"), result.run_dir)
    if from_slides:
        from bidistill.pixels import RANDOM_FEATURES_WARNING

        console.print(f"[bold red]WARNING:[/] {RANDOM_FEATURES_WARNING}", highlight=False)
    _say(f"done in {time.perf_counter() - start:.0f} s")
    _next(f"open {_arg(result.run_dir / 'report.html')}")


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

    For e.g. two encoders or two settings: AUC with its CI per run, method and missing rate.
    Each method of each later run is tested against the same method of the first run, at every
    missing rate, with the same nested masks (Holm-corrected per rate). Writes compare.csv,
    compare_delong.csv and compare.png to --out.

    Example: bidistill compare runs/resnet runs/uni --out comparison
    """
    from bidistill.evaluation.compare import compare_runs
    from bidistill.evaluation.console import print_comparison

    if len(runs) < 2:
        _fail("compare needs at least two run directories")
    if label and len(label) != len(runs):
        _fail(f"--label given {len(label)} times for {len(runs)} runs: give one per run")
    result = compare_runs(runs, out, labels=label or None, methods=method or None)
    print_comparison(result)
    _say(f"wrote {result.table_path}, {result.delong_path} and {result.figure_path}")
    _next(f"open {_arg(result.figure_path)}")


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
_TILES_HELP = (
    "With --slides: folder of the slides' coords files (slides without one are tiled into it "
    "with the run's tiling settings; a feature run's new features go to its features/). "
    "Default: tiles/ beside --out."
)


def _bag_source(trained, features: list[Path] | None, slides, tiles: Path):
    """What the run predicts from: feature files; or new slides, whose tiles an end-to-end run
    reads and a feature run first encodes with its own settings."""
    from bidistill.inference.new_slides import Tiles

    end_to_end = getattr(trained, "end_to_end", False)
    if features and not end_to_end:
        return features
    return Tiles(coords=tiles, slides=tuple(slides or ())) if slides or end_to_end else None


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


@app.command(cls=HelpCommand)
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
    slides: list[Path] = typer.Option(
        None,
        "--slides",
        help="New slides instead of --features: slide files, patch folders or folders of slides "
        "(repeatable), tiled and encoded with the run's settings.",
    ),
    tiles: Path | None = typer.Option(None, "--tiles", help=_TILES_HELP),
) -> None:
    """Predict new patients with a trained run, with or without their clinical data.

    Writes one row per patient: probability, decision at the run's validation threshold, the
    branch that predicted (BD: multi-modal with clinical data, single-modal without) and the
    clinical values that were missing. From feature files (--features, of the run's encoder,
    patch size and MPP), or from new slides (--slides): tiled and encoded with the run's own
    settings into --tiles. A run trained end to end (training.mode: end-to-end) reads the
    slides' tiles itself.

    Example: bidistill predict --run runs/exp1 --slides new/wsi --clinical new.csv --out pred.csv
    """
    from bidistill._io import write_csv

    with _warnings_as_lines():
        trained = _load_run(run_dir, method, config, device)
        table = trained.predict(
            _bag_source(trained, features, slides, tiles or out.parent / "tiles"),
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
    if slides and not features:
        slide_args = " ".join(f"--slides {_arg(s)}" for s in slides)
        tiles_arg = _arg(tiles or out.parent / "tiles")
        _next(
            f"bidistill heatmap --run {_arg(run_dir)} {slide_args} --tiles {tiles_arg} "
            f"--out {_arg(out.parent / 'heatmaps')}"
        )
    elif features:
        features_args = " ".join(f"--features {_arg(f)}" for f in features)
        _next(
            f"bidistill heatmap --run {_arg(run_dir)} {features_args} "
            f"--out {_arg(out.parent / 'heatmaps')}"
        )
    else:
        _next(f"open {_arg(out)}")


@app.command(cls=HelpCommand)
def heatmap(
    run_dir: Path = typer.Option(..., "--run", help=_RUN_HELP),
    features: list[Path] = typer.Option(
        None,
        "--features",
        help=_FEATURES_HELP + " Or --slides alone: tiled and encoded with the run's settings.",
    ),
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
    tiles: Path | None = typer.Option(None, "--tiles", help=_TILES_HELP),
) -> None:
    """Attention heatmaps (both branches for bd), top/bottom tile montages, and the tiles and
    tissue contours as GeoJSON for QuPath.

    Per slide: <slide>.heatmap.png, <slide>.montage.png, <slide>.tiles.csv,
    <slide>.tiles.geojson and <slide>.tissue.geojson; plus predictions.csv. Without --features,
    the slides given with --slides are tiled (into --tiles) and, for a feature run, encoded with
    the run's settings first.

    Example: bidistill heatmap --run runs/exp1 --features new/h5 --slides new/wsi --out maps
    """
    from bidistill.inference.maps import write_attention_maps

    with _warnings_as_lines():
        trained = _load_run(run_dir, method, config, device)
        source = _bag_source(trained, features, slides, tiles or out / "tiles")
        if source is None:
            from bidistill.errors import BidistillError

            raise BidistillError("give the new patients' features (--features)")
        summary = write_attention_maps(
            trained,
            source,
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
        _say(f"in QuPath: File > Import objects {out / (first + '.tiles.geojson')} over the slide")
        _next(f"open {_arg(out / (first + '.heatmap.png'))}")
