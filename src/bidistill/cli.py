"""The `bidistill` command line: thin wrappers that parse, validate and call one stage each.

Heavy imports (torch, openslide, pandas) happen inside the commands so that `--help` stays fast.
Our own errors (bad config, bad table, bad file) are caught once, here, and printed as one clear
message with a non-zero exit; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console

app = typer.Typer(
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

console = Console(stderr=True)


def _user_errors() -> tuple[type[Exception], ...]:
    """The exception types that mean bad input (not a bug): printed without a traceback."""
    from bidistill.errors import BidistillError

    return (BidistillError,)


def _fail(err: Exception) -> NoReturn:
    console.print(f"[bold red]error:[/] {err}", highlight=False, markup=False)
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
        _fail(FileExistsError(f"{output} exists; pass --force to overwrite it"))
    from bidistill._io import write_text

    write_text(output, template_text(bcnb=bcnb))
    console.print(f"wrote {output}: edit the paths and columns, then `bidistill run {output}`")


@app.command("config")
def show_config(config: Path = typer.Argument(..., help="Experiment YAML.")) -> None:
    """Validate a config and print it with every default filled in and paths resolved.

    Example: bidistill config experiment.yaml
    """
    from bidistill.config import dump_config

    try:
        typer.echo(dump_config(_load(config)))
    except _user_errors() as err:
        _fail(err)


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
    from bidistill.cohort.synthetic import make_feature_cohort

    if max_instances < min_instances:
        _fail(ValueError("--max-instances must be at least --min-instances"))
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

    try:
        cfg = _load(config)
        summary = tile_from_config(cfg, workers=workers, skip_errors=skip_errors)
    except _user_errors() as err:
        _fail(err)
    coords_dir = cfg.tiling.coords_dir
    console.print(
        f"tiled {len(summary.tiled)} slides ({sum(summary.tiled.values())} tiles), "
        f"{len(summary.skipped)} already done, {len(summary.failed)} failed; "
        f"coords in {coords_dir}, QC images in {coords_dir / 'qc'}",
        highlight=False,
    )
    for slide_id in summary.empty:
        console.print(f"[yellow]warning:[/] {slide_id}: no tile kept; open its QC image")
    if summary.failed:
        console.print(f"[bold red]{len(summary.failed)} slides failed:[/]")
        for slide_id, reason in summary.failed.items():
            console.print(f"  {slide_id}: {reason}", highlight=False, markup=False)
        if not summary.tiled and not summary.skipped:
            raise typer.Exit(code=1)
