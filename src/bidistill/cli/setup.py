"""Commands that set an experiment up: init, config, synth, bcnb prepare."""

from __future__ import annotations

from pathlib import Path

import typer

from bidistill._cli_help import HelpCommand
from bidistill.cli.base import (
    app,
    bcnb_app,
    console,
    default_run_dir,
    fail,
    free_run_dir,
    load_experiment,
    print_error,
    say,
    say_next,
    shell_arg,
    synth_app,
)

# One option object for both synth commands (typer reads it, never changes it).
_SEED = typer.Option(0, "--seed", min=0, max=2**32 - 1, help="Random seed: same seed, same bytes.")


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
        fail("--synthetic and --bcnb exclude each other: choose one template")
    folder = output.parent
    targets = [output] + ([folder / "cohort.csv", folder / "features"] if synthetic else [])
    existing = [str(p) for p in targets if p.exists()]
    if existing and not force:
        fail(f"{', '.join(existing)} exists already; pass --force to overwrite")
    if synthetic:
        from bidistill.synthetic.features import make_feature_cohort

        patients = SYNTHETIC_COHORT["patients"]
        say(f"writing a synthetic cohort of {patients} patients to {folder} ...")
        make_feature_cohort(
            folder,
            patients=patients,
            dim=SYNTHETIC_COHORT["dim"],
            instances=SYNTHETIC_COHORT["instances"],
            config_name=None,
            progress=True,
        )
    write_text(output, template_text(bcnb=bcnb, synthetic=synthetic))
    say(f"wrote {output}")
    from bidistill.experiment.checks import check_config

    todo = [f for f in check_config(load_experiment(output)).findings if f.status != "ok"]
    if todo:
        say("to fill in before it runs (paths are relative to the config):")
        for finding in todo:
            say(f"  {finding.key}: {finding.detail}")
    say_next(f"bidistill config {shell_arg(output)}")


@app.command("config", cls=HelpCommand)
def show_config(config: Path = typer.Argument(..., help="Experiment YAML.")) -> None:
    """Validate a config, print it with every default filled in and paths resolved, and run
    the checks of every stage (tile, extract, train) that `run`, `tile` and `extract` make
    before any work.

    The config goes to stdout, the checks to stderr: each problem with the stage it blocks.
    Feature files that `run` makes from the slides count as there. Exits 1 when `bidistill run`
    cannot start yet.

    Example: bidistill config experiment.yaml
    """
    from rich.text import Text

    from bidistill.config import dump_config
    from bidistill.experiment.checks import BLOCK, check_config
    from bidistill.models.registry import check_method_configs

    loaded = load_experiment(config)
    check_method_configs(loaded.methods, source=config)
    typer.echo(dump_config(loaded))
    run_dir = default_run_dir(config, loaded)
    checks = check_config(loaded, run_dir=run_dir if run_dir.is_dir() else None)
    say(f"checked what each stage needs of {config}:")
    styles = {"ok": "green", "warning": "yellow", "missing": "bold red"}
    for finding in checks.findings:
        line = Text.assemble(
            "  ", (f"{finding.status:<8}", styles[finding.status]), f"{finding.key}: "
        )
        line.append(finding.detail)
        console.print(line, soft_wrap=True, highlight=False)
    for stage, keys in checks.blocked_stages().items():
        say(f"  {stage:<8}" + (f"blocked by {', '.join(keys)}" if keys else "ready"))
    blocking = [f for f in checks.findings if f.status == BLOCK]
    if not blocking:
        out = free_run_dir(config, loaded)
        say_next(f"bidistill run {shell_arg(config)} --out {shell_arg(out)}")
        return
    keys = ", ".join(dict.fromkeys(f.key for f in blocking))
    print_error(f"{config}: `bidistill run` cannot start yet: fix {keys} (see above)")
    say_next(f"bidistill config {shell_arg(config)}   (after editing {config})")
    raise typer.Exit(code=1)


@synth_app.command("features", cls=HelpCommand)
def synth_features(
    out: Path = typer.Option(..., "--out", metavar="DIR", help="Folder to write the cohort into."),
    patients: int = typer.Option(200, "--patients", min=20, help="Number of patients."),
    seed: int = _SEED,
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
        fail("--max-instances must be at least --min-instances")
    config = make_feature_cohort(
        out,
        patients=patients,
        seed=seed,
        dim=dim,
        instances=(min_instances, max_instances),
        with_split=not no_split,
        progress=True,
    )
    say(f"wrote a synthetic cohort of {patients} patients to {out}; config: {config}")
    say_next(f"bidistill run {shell_arg(config)} --out {shell_arg(out / 'run')}")


@synth_app.command("bcnb", cls=HelpCommand)
def synth_bcnb(
    out: Path = typer.Option(
        ..., "--out", metavar="DIR", help="Folder to write the BCNB-layout cohort into."
    ),
    patients: int = typer.Option(30, "--patients", min=10, help="Number of patients (slides)."),
    seed: int = _SEED,
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
    say(
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
    from bidistill.slide_stages import folder_size

    size_mb = folder_size(out) / 1e6
    say(f"wrote a synthetic BCNB folder of {patients} patients to {out} ({size_mb:.1f} MB)")
    say_next(
        f"bidistill bcnb prepare --root {shell_arg(out)} --out {shell_arg(str(out) + '-cohort')}"
    )


@bcnb_app.command("prepare", cls=HelpCommand)
def bcnb_prepare(
    root: Path = typer.Option(
        ..., "--root", metavar="DIR", help="The BCNB download (holds the clinical xlsx)."
    ),
    out: Path = typer.Option(
        ..., "--out", metavar="DIR", help="Folder for cohort.csv and config.yaml."
    ),
    task: str = typer.Option(
        "aln",
        "--task",
        help="aln | aln-n0-vs-1-2 | aln-n0-vs-gt2 | er | pr | her2 (binary), aln3 (N0, "
        "N+(1-2), N+(>2)) | subtype (the four molecular subtypes; ER, PR, HER2 and Ki67 are "
        "never features).",
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
        say_next(f"bidistill tile {shell_arg(report.config_path)}")
    else:
        say_next(f"bidistill run {shell_arg(report.config_path)} --out {shell_arg(out / 'run')}")
