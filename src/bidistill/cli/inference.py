"""A trained run on new patients: predict, heatmap."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from bidistill._cli_help import HelpCommand
from bidistill._text import count
from bidistill.cli.base import app, console, say, say_next, shell_arg, warnings_shown
from bidistill.errors import BidistillError, ConfigError

_RUN_HELP = "Run directory (what `bidistill run` wrote)."
_FEATURES_HELP = "Folder of <slide_id>.h5 feature files, or single files (repeatable)."
_CLINICAL_HELP = (
    "Table of the patients (the training table's columns; labels not needed). Without it, "
    "each feature file is one patient without clinical data."
)
_METHOD_HELP = "Method folder of the run (default: the reference method, bd)."
_CONFIG_HELP = "The run's experiment YAML, for a run made by `bidistill train` (no config.yaml)."
DEFAULT_BUDGET_MIB = 512
_BUDGET_HELP = "MiB for one bag's features and activations; larger bags are read in chunks."
# One option object for both commands (typer reads it, never changes it).
_BUDGET = typer.Option(DEFAULT_BUDGET_MIB, "--memory-budget", min=4, help=_BUDGET_HELP)
_TILES_HELP = (
    "With --slides: folder of the slides' coords files (slides without one are tiled into it "
    "with the run's tiling settings; a feature run's new features go to its features/). "
    "Default: tiles/ beside --out."
)

RANDOM_WEIGHTS_WARNING = (
    "this run's patch encoder had RANDOM weights (features.random_init): its predictions carry "
    "no pretrained knowledge and mean nothing for patients (for tests and demos only)"
)


def _bag_source(trained, features: list[Path] | None, slides, tiles: Path):
    """Feature files; or new slides, whose tiles an end-to-end run reads and a feature run first
    encodes with its own settings."""
    from bidistill.inference.new_slides import Tiles

    if features and not trained.end_to_end:
        return features
    if slides or trained.end_to_end:
        return Tiles(coords=tiles, slides=tuple(slides or ()))
    return None


def _check_output_folder(folder: Path, given: Path | None = None) -> None:
    """Make ``folder`` and check that it takes files, before any work (``given``: the --out
    that the messages name, default ``folder``)."""
    from bidistill.experiment.checks import prepare_output_dir

    given = given or folder
    blocking = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        where = "is a file" if blocking == given else f"{blocking} is a file"
        raise ConfigError(
            f"--out {given}: {where}, not a folder; choose another --out (or move that file)"
        )
    prepare_output_dir(folder)


def _check_output_csv(out: Path) -> None:
    if out.is_dir():
        raise ConfigError(
            f"--out {out}: is a folder; give the CSV file to write (e.g. {out / 'predictions.csv'})"
        )
    _check_output_folder(out.parent, out)


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
    memory_budget: float = _BUDGET,
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
    from bidistill.inference.load import load_run

    _check_output_csv(out)  # before any work: the table is written only at the end
    tiles = tiles or out.parent / "tiles"
    with warnings_shown(python_warnings=True):
        trained = load_run(run_dir, method, config=config, device=device)
        table = trained.predict(
            _bag_source(trained, features, slides, tiles),
            clinical,
            patients=patient or None,
            memory_budget=int(memory_budget * 2**20),
            progress=True,
        )
    write_csv(out, table)
    branches = ", ".join(f"{b} {n}" for b, n in table["branch"].value_counts().items())
    label = trained.config.cohort.label
    decided = (
        f"{int(table['decision'].sum())} {trained.positive_class} at the run's validation "
        "thresholds"
        if label.binary
        else ", ".join(f"{int((table['predicted'] == c).sum())} {c}" for c in label.class_names)
        + " (each patient's class of highest probability)"
    )
    say(
        f"predicted {count(len(table), 'patient')} with {trained.method}: {decided} "
        f"(branches: {branches}); wrote {out}",
    )
    _warn_if_random(trained)
    if not trained.aggregators or not (features or slides):
        say_next(f"open {shell_arg(out)}")
        return
    heatmap_args = [
        *_bag_args(trained, features, slides, tiles),
        *_same_choice_args(clinical, method, patient, config, memory_budget, device),
    ]
    say_next(
        f"bidistill heatmap --run {shell_arg(run_dir)} {' '.join(heatmap_args)} "
        f"--out {shell_arg(out.parent / 'heatmaps')}"
    )


def _bag_args(trained, features: list[Path] | None, slides: list[Path] | None, tiles: Path):
    """The bag source as ``predict`` read it, as ``heatmap`` options (slides also give the maps
    their images)."""
    args = [f"--features {shell_arg(f)}" for f in features or ()]
    args += [f"--slides {shell_arg(s)}" for s in slides or ()]
    if slides and (not features or trained.end_to_end):
        args.append(f"--tiles {shell_arg(tiles)}")  # where predict tiled (and encoded) them
    return args


def _same_choice_args(clinical, method, patients, config, memory_budget, device) -> list[str]:
    """The options that decide a prediction, so that the heatmap predicts what predict did
    (without --clinical it would use another branch, probability and decision)."""
    args = [f"--clinical {shell_arg(clinical)}"] if clinical else []
    args += [f"--method {shell_arg(method)}"] if method else []
    args += [f"--patient {shell_arg(p)}" for p in patients or ()]
    args += [f"--config {shell_arg(config)}"] if config else []
    args += [f"--memory-budget {memory_budget:g}"] if memory_budget != DEFAULT_BUDGET_MIB else []
    args += [f"--device {shell_arg(device)}"] if device != "auto" else []
    return args


def _warn_if_random(trained) -> None:
    if trained.random_init:
        console.print(f"[bold red]WARNING:[/] {RANDOM_WEIGHTS_WARNING}", highlight=False)


class Score(str, Enum):
    """``heatmap --score``: ``bidistill.inference.results.HeatmapScore``."""

    attention = "attention"
    leave_one_out = "leave-one-out"


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
    memory_budget: float = _BUDGET,
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, mps."),
    tiles: Path | None = typer.Option(None, "--tiles", help=_TILES_HELP),
    score: Score = typer.Option(
        "attention",
        "--score",
        help="What a tile's value is: its attention weight (where the pooling looked), or "
        "leave-one-out: the log-odds the branch's prediction loses without the tile (what the "
        "prediction rests on; 2-3x the time; feature runs).",
    ),
) -> None:
    """Attention heatmaps (both branches for bd), top/bottom tile montages, and the tiles and
    tissue contours as GeoJSON for QuPath.

    Per slide: <slide>.heatmap.png, <slide>.montage.png, <slide>.tiles.csv,
    <slide>.tiles.geojson and <slide>.tissue.geojson; plus predictions.csv. Without --features,
    the slides given with --slides are tiled (into --tiles) and, for a feature run, encoded with
    the run's settings first.

    Example: bidistill heatmap --run runs/exp1 --features new/h5 --slides new/wsi --out maps

    Example: bidistill heatmap --run runs/exp1 --features new/h5 --score leave-one-out --out maps
    """
    from bidistill.inference.load import load_run
    from bidistill.inference.maps import write_attention_maps

    _check_output_folder(out)
    with warnings_shown(python_warnings=True):
        trained = load_run(run_dir, method, config=config, device=device)
        source = _bag_source(trained, features, slides, tiles or out / "tiles")
        if source is None:
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
            score=score.value,
        )
    n_files = sum(len(f) for f in summary.files.values())
    say(
        f"wrote {count(n_files, 'file')} for {count(len(summary.files), 'slide')} of "
        f"{count(len(summary.predictions), 'patient')} to {out}",
    )
    _warn_if_random(trained)
    if summary.without_image:
        say(_without_image_line(summary.without_image, given=bool(slides)))
    written = [path for paths in summary.files.values() for path in paths]
    geojson = _first_named(written, ".tiles.geojson")
    if geojson is not None:
        say(f"in QuPath: File > Import objects {geojson} over the slide")
    shown = _first_named(written, ".heatmap.png", ".montage.png", ".tiles.csv")
    say_next(f"open {shell_arg(shown or out / 'predictions.csv')}")


def _without_image_line(slide_ids: list[str], *, given: bool) -> str:
    shown = ", ".join(slide_ids[:5]) + (", ..." if len(slide_ids) > 5 else "")
    where = (
        "not found among --slides (give each as <slide_id>.<ext>, or a patch folder named "
        "<slide_id>, in a given folder)"
        if given
        else "without an image (give --slides)"
    )
    return (
        f"{count(len(slide_ids), 'slide')} {where}: {shown}; drawn on a blank canvas, no montage "
        "or tissue contours"
    )


def _first_named(paths: list[Path], *endings: str) -> Path | None:
    """The first path with the first ending that any path has."""
    named = (path for ending in endings for path in paths if path.name.endswith(ending))
    return next(named, None)
