"""The checks made before any work: one list per stage (``CHECKS``), and the run folder's own.
`config` runs them all, so it says ok to exactly what the stages then accept."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from bidistill._text import count, every, verb
from bidistill.config import ExperimentConfig
from bidistill.errors import (
    BidistillError,
    CheckpointError,
    CohortError,
    ConfigError,
    SlideError,
)
from bidistill.features.identity import (
    FeatureIdentity,
    check_matches,
    common_identity,
    config_identity,
)
from bidistill.runs.fingerprint import read_run_info, write_run_info
from bidistill.runs.rundir import MethodDir, RunDir
from bidistill.slide_stages import Shard, missing_slides

OK, WARN, BLOCK = "ok", "warning", "missing"


@dataclass
class Finding:
    """One checked config key: ``status`` ``ok``, ``missing`` (blocks ``stages``) or ``warning``
    (blocks only stages that `run` does not need); ``detail`` says what was found or how to fix
    it."""

    key: str
    status: str
    detail: str
    stages: tuple[str, ...] = ()

    def line(self) -> str:
        # An error that names its key already is shown as is.
        return self.detail if self.detail.startswith(self.key) else f"{self.key}: {self.detail}"


@dataclass
class Checks:
    """What the stages' checks found, and the feature store they opened (for the work)."""

    findings: list[Finding]
    stages: list[str]  # the stages checked
    store: Any = None  # the opened FeatureStore, when every feature file was there

    def blocking(self) -> list[Finding]:
        return [f for f in self.findings if f.status != OK]

    def blocked_stages(self) -> dict[str, list[str]]:
        return {
            stage: [f.key for f in self.findings if f.status != OK and stage in f.stages]
            for stage in self.stages
        }

    def require(self, command: str, config_path: str | Path) -> None:
        """Raise one ``ConfigError`` line naming every problem that blocks ``command``."""
        problems = self.blocking()
        if problems:
            raise ConfigError(
                f"{config_path}: `bidistill {command}` cannot start: "
                + "; ".join(f.line() for f in problems)
                + f" (`bidistill config {config_path}` checks every stage)"
            )


def _blocked(key: str, detail: str) -> list[Finding]:
    return [Finding(key, BLOCK, detail)]


def _refused(key: str, check: Callable, *args) -> list[Finding]:
    """``check(*args)``'s error as the blocking finding of ``key`` (none when it passes)."""
    try:
        check(*args)
    except BidistillError as err:
        return _blocked(key, str(err))
    return []


def run_stages(config: ExperimentConfig, slide_ids: Sequence[str]) -> list[str]:
    """The stages `run` goes through: tile and extract only with a `slides` section and a
    slide without a feature file."""
    if config.slides is None or not slide_ids:
        return ["train"]
    if config.training.on_tiles:  # the methods read tiles; nothing is extracted
        return ["tile", "train"]
    from bidistill.features.store import feature_path

    folder = config.features.dir
    if all(feature_path(folder, s).is_file() for s in slide_ids):
        return ["train"]
    return ["tile", "extract", "train"]


def check_stages(
    config: ExperimentConfig,
    stages: Sequence[str] | None = None,
    *,
    run_dir: Path | None = None,
    need_features: bool = True,
    skip_errors: bool = False,
    shard=None,
    in_memory: str = "no",
) -> Checks:
    """Run the checks of ``stages`` (default: those `run` goes through). ``need_features``
    False: every method is trained already, the feature files are not read again; ``in_memory``:
    how to open the feature store, kept for training when every file is there."""
    context = _Context(config, run_dir, need_features, skip_errors, shard, in_memory)
    if stages is None:
        stages = run_stages(config, context.slide_ids())
    return _run_checks(context, list(stages))


def check_config(config: ExperimentConfig, *, run_dir: Path | None = None) -> Checks:
    """`bidistill config`: every stage the config can use; problems of stages that `run` would
    not go through are warnings."""
    stages = ["train"]
    if config.slides is not None:
        stages = ["tile", "train"] if config.training.on_tiles else ["tile", "extract", "train"]
    context = _Context(config, run_dir)
    checks = _run_checks(context, stages)
    needed = set(run_stages(config, context.slide_ids()))
    for finding in checks.findings:
        if finding.status == BLOCK and not needed & set(finding.stages):
            finding.status = WARN
            finding.detail += f" (blocks `bidistill {' / '.join(finding.stages)}` only)"
    return checks


def _run_checks(context: _Context, stages: list[str]) -> Checks:
    context.stages = stages
    findings: list[Finding] = []
    done: set[Callable] = set()
    for stage in stages:
        for check in CHECKS[stage]:
            if check in done:
                continue
            done.add(check)
            owners = tuple(s for s in stages if check in CHECKS[s])
            for finding in check(context):
                finding.stages = owners
                findings.append(finding)
    return Checks(findings, stages, store=context.store)


@dataclass
class _Context:
    """The config and what the checks loaded from the disk (each thing once)."""

    config: ExperimentConfig
    run_dir: Path | None = None
    need_features: bool = True
    skip_errors: bool = False
    shard: Any = None
    in_memory: str = "no"
    stages: list[str] = field(default_factory=list)
    store: Any = None
    cohort_error: str | None = None  # the table reads, but its cells do not

    @cached_property
    def table_findings(self) -> list[Finding]:
        return _check_table(self.config)

    @cached_property
    def cohort(self):
        """The cohort (without the two-class check), or None when the table does not load."""
        if any(f.status != OK for f in self.table_findings):
            return None
        from bidistill.cohort import load_cohort

        slides = self.config.slides
        try:
            return load_cohort(
                self.config.cohort,
                mpp_column=slides.mpp_column if slides else None,
                require_classes=False,
            )
        except BidistillError as err:
            self.cohort_error = str(err)
            return None

    def slide_ids(self) -> list[str]:
        cohort = self.cohort
        if cohort is None or cohort.slides is None or "slide_id" not in cohort.slides:
            return []
        return [str(s) for s in cohort.slides["slide_id"]]

    def owned(self, slide_ids: list[str]) -> list[str]:
        return [s for s in slide_ids if self.shard is None or self.shard.owns(s)]

    @cached_property
    def slide_jobs(self):
        """(jobs, missing files) of the tiling stage, or None when they cannot be listed."""
        from bidistill.slides.stage import jobs_from_config

        try:
            return jobs_from_config(self.config)
        except BidistillError:
            return None  # _slides says why


def _cohort(context: _Context) -> list[Finding]:
    findings = context.table_findings
    if context.cohort is None and context.cohort_error is not None:
        error = Finding("cohort.table", BLOCK, context.cohort_error)
        return [f for f in findings if f.status != OK] + [error]
    return list(findings)


def _check_table(config: ExperimentConfig) -> list[Finding]:
    from bidistill.cohort.table import declared_columns, read_table

    cohort = config.cohort
    table = Path(cohort.table)
    if not table.is_file():
        return _blocked(
            "cohort.table",
            f"{table} not found: every stage reads the cohort table (one row per slide: "
            "patient id, slide id, label, clinical columns)",
        )
    try:
        frame = read_table(table, cohort.sheet)
    except CohortError as err:
        return [Finding("cohort.table", BLOCK, str(err))]
    findings = [Finding("cohort.table", OK, f"{table} ({len(frame)} rows)")]
    mpp_column = config.slides.mpp_column if config.slides else None
    for key, names in declared_columns(cohort, mpp_column).items():
        for name in names:
            if name not in frame.columns:
                columns = ", ".join(map(str, frame.columns))
                detail = f"column '{name}' is not in {table.name} (its columns: {columns})"
                findings += _blocked(key, detail)
    return findings


def _slides(context: _Context) -> list[Finding]:
    config = context.config
    if config.slides is None:
        return [Finding("slides", BLOCK, "the config has no `slides` section: set `slides.dir`")]
    if context.cohort is None:
        return []  # the cohort's own finding says why
    if not config.cohort.slide_column:
        return _blocked(
            "cohort.slide_column",
            "not set: tiling needs the table's slide id column (one row per slide)",
        )
    folder = Path(config.slides.dir)
    if not folder.is_dir():
        return [Finding("slides.dir", BLOCK, f"{folder} not found: tiling reads the slides there")]
    jobs, missing = context.slide_jobs or ([], {})
    try:
        missing_slides(
            missing,
            context.shard or Shard(),
            skip_errors=context.skip_errors,
            hint="add the files or remove those rows from the cohort table (or pass "
            "--skip-errors to go on past them: `tile` and `extract` list them at the end)",
        )
    except SlideError as err:
        return [Finding("slides.dir", BLOCK, str(err))]
    return [Finding("slides.dir", OK, f"{folder} (a file for {every(len(jobs), 'slide')})")]


def _annotations(context: _Context) -> list[Finding]:
    slides = context.config.slides
    if slides is None or slides.annotations_dir is None:
        return []
    folder = Path(slides.annotations_dir)
    if folder.is_dir():
        return [Finding("slides.annotations_dir", OK, str(folder))]
    return _blocked(
        "slides.annotations_dir",
        f"{folder} not found: tiling would use the tissue mask instead of your annotations; "
        "fix the path, or remove slides.annotations_dir",
    )


def _slide_mpps(context: _Context) -> list[Finding]:
    config = context.config
    listed = context.slide_jobs
    if config.tiling.mpp is None or listed is None or context.skip_errors:
        return []
    from bidistill.slides.coords import coords_path
    from bidistill.slides.reader import metadata_mpp

    todo = [
        job
        for job in listed[0]
        if context.owned([job.slide_id])
        and not coords_path(config.tiling.coords_dir, job.slide_id).is_file()
        and not job.path.is_dir()  # patch folders are cut already
    ]
    unknown = [job.path for job in todo if job.mpp is None and metadata_mpp(job.path) is None]
    if not unknown:
        return []
    more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
    return _blocked(
        "slides.mpp",
        f"{unknown[0]}{more}: the file has no microns-per-pixel in its metadata, so it "
        "cannot be tiled at a target MPP; give `slides.mpp` (every slide), "
        "`slides.mpp_column` (a column of the cohort table), or set `tiling.mpp: null` to "
        "tile at level 0",
    )


def _tiles(context: _Context) -> list[Finding]:
    if "tile" in context.stages or context.skip_errors:
        return []
    from bidistill.features.store import feature_path
    from bidistill.slides.coords import coords_path

    config = context.config
    todo = [
        s
        for s in context.owned(context.slide_ids())
        if not feature_path(config.features.dir, s).is_file()
    ]
    untiled = [s for s in todo if not coords_path(config.tiling.coords_dir, s).is_file()]
    if not untiled:
        return []
    return _blocked(
        "tiling.coords_dir",
        f"{len(untiled)} of {count(len(todo), 'slide')} to extract "
        f"{verb(len(untiled), 'is', 'are')} not tiled in "
        f"{config.tiling.coords_dir} (first: {untiled[0]}): run `bidistill tile` first",
    )


def _extraction_device(context: _Context) -> list[Finding]:
    return _refused(
        "features.device", check_device, context.config.features.device, "features.device"
    )


def _two_classes(context: _Context) -> list[Finding]:
    from bidistill.cohort.table import check_two_classes

    if context.cohort is None:
        return []
    return _refused("cohort.label", check_two_classes, context.cohort, context.config.cohort)


def _bags(context: _Context) -> list[Finding]:
    config = context.config
    slide_ids = context.slide_ids()
    if not slide_ids or not context.need_features:
        return []
    if config.training.on_tiles:
        return _tiles_for_training(config, slide_ids, context.stages)
    return _feature_files(context, slide_ids)


def _tiles_for_training(
    config: ExperimentConfig, slide_ids: list[str], stages: list[str]
) -> list[Finding]:
    from bidistill.slides.coords import coords_path

    folder = Path(config.tiling.coords_dir)
    missing = [s for s in slide_ids if not coords_path(folder, s).is_file()]
    if not missing:
        tiled = every(len(slide_ids), "slide")
        return [Finding("tiling.coords_dir", OK, f"{folder} (tiles of {tiled})")]
    not_tiled = (
        f"{len(missing)} of {count(len(slide_ids), 'slide')} {verb(len(missing), 'is', 'are')} "
        "not tiled"
    )
    if "tile" in stages:
        return [
            Finding("tiling.coords_dir", OK, f"{not_tiled} yet in {folder}: `run` tiles them first")
        ]
    return _blocked(
        "tiling.coords_dir",
        f"{not_tiled} in {folder} (first: {missing[0]}): end-to-end training reads their tiles; "
        "tile them (`bidistill tile`, or `run` with a `slides` section)",
    )


def _feature_files(context: _Context, slide_ids: list[str]) -> list[Finding]:
    """The feature files that exist pass training's checks; the others must be extracted."""
    from bidistill.features.store import FeatureStore, feature_path

    config = context.config
    folder = Path(config.features.dir)
    present = [s for s in slide_ids if feature_path(folder, s).is_file()]
    try:
        identity = check_cohort_features(config, present, context.run_dir)
        if len(present) == len(slide_ids):
            context.store = FeatureStore(
                folder, slide_ids, in_memory=context.in_memory, identity=identity
            )
    except BidistillError as err:
        return [Finding("features.dir", BLOCK, str(err))]
    if len(present) == len(slide_ids):
        every_slide = every(len(present), "slide")
        return [Finding("features.dir", OK, f"{folder} (a feature file for {every_slide})")]
    missing = [s for s in slide_ids if s not in set(present)]
    where = (
        f"{folder} not found"
        if not folder.is_dir()
        else f"{len(missing)} of {count(len(slide_ids), 'slide')} "
        f"{verb(len(missing), 'has', 'have')} no feature file in {folder} "
        f"(first: {feature_path(folder, missing[0]).name})"
    )
    if "extract" in context.stages:
        return [Finding("features.dir", OK, f"{where}: `run` tiles and extracts them first")]
    how = "`bidistill extract`" if config.slides else "add a `slides` section, and `run` does"
    return _blocked(
        "features.dir",
        f"{where}: training reads one <slide_id>.h5 per slide (CLAM/TRIDENT layout); "
        f"extract them ({how})",
    )


def _training_device(context: _Context) -> list[Finding]:
    return _refused(
        "training.device", check_device, context.config.training.device, "training.device"
    )


def _tracking(context: _Context) -> list[Finding]:
    if not context.config.tracking.mlflow:
        return []
    from bidistill.experiment.tracking import require_mlflow

    return _refused("tracking.mlflow", require_mlflow)


# Each stage's checks, in the order they are reported; a check shared by stages runs once.
CHECKS: dict[str, list[Callable[[_Context], list[Finding]]]] = {
    "tile": [_cohort, _slides, _annotations, _slide_mpps],
    "extract": [_cohort, _slides, _tiles, _extraction_device],
    "train": [_cohort, _two_classes, _bags, _training_device, _tracking],
}


def check_cohort_features(
    config: ExperimentConfig, slide_ids: list[str], run_dir: Path | None
) -> FeatureIdentity | None:
    """The common identity of the slides' feature files that exist (None: none yet);
    ``FeatureFileError`` when they differ from each other, the config or the trained methods."""
    from bidistill.features.store import feature_path

    paths = [feature_path(config.features.dir, s) for s in slide_ids]
    paths = [p for p in paths if p.is_file()]
    if not paths:
        return None  # the training stage says which files are missing
    identity = common_identity(paths)
    check_matches(
        identity,
        config_identity(config),
        actual_where=f"the feature files in {paths[0].parent}",
        expected_where="the config's `features` section",
    )
    for model_json in RunDir(run_dir).method_metas() if run_dir is not None else []:
        try:  # the identity each trained method recorded
            recorded = MethodDir(model_json.parent).read_meta()["features"]["identity"]
        except (CheckpointError, KeyError, TypeError):
            continue  # none recorded; a damaged checkpoint is its own loader's to report
        if not recorded:
            continue
        check_matches(
            identity,
            FeatureIdentity.from_dict(recorded),
            actual_where=f"the feature files in {paths[0].parent}",
            expected_where=f"the features {model_json.parent.name} was trained on ({model_json})",
        )
    return identity


def prepare_output_dir(out_dir: Path) -> None:
    """Create ``out_dir`` and make sure files can be written in it."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir}: is a file, not a folder; give a folder for the run")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir, prefix=".bidistill-write-test-"):
            pass
    except OSError as err:
        raise ConfigError(
            f"--out {out_dir}: cannot write there ({err.strerror or err}); choose a writable folder"
        ) from None


def check_device(name: str, key: str) -> None:
    """Refuse a device that this machine does not have (``auto`` always works)."""
    if name == "auto":
        return
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"{key}: '{name}' is not a torch device ({err})") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                f"{key}: '{name}', but this machine has no usable CUDA GPU (torch "
                f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}); set "
                f"{key}: auto or cpu"
            )
        if device.index is not None and device.index >= count:
            raise ConfigError(f"{key}: '{name}', but this machine has {count} CUDA GPU(s)")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(f"{key}: '{name}', but MPS is not available here; set {key}: auto")
    elif device.type != "cpu":
        try:
            torch.empty(0, device=device)
        except Exception as err:  # torch raises RuntimeError or AssertionError per backend
            raise ConfigError(f"{key}: '{name}' is not usable here ({err})") from None


def check_trainable_cohort(cohort, splits) -> None:
    """Every evaluated split has both classes, and no declared clinical column is blank for all
    training patients."""
    labels = cohort.labels
    checks = [("test", splits.test)] + [
        (f"val (fold {i})" if len(splits.folds) > 1 else "val", f.val)
        for i, f in enumerate(splits.folds)
    ]
    for name, ids in checks:
        classes = np.unique(labels.loc[list(ids)].to_numpy())
        if len(classes) < 2:
            raise CohortError(
                f"{cohort.source}: the {name} split has {count(len(ids), 'patient')}, all of class "
                f"{int(classes[0]) if len(classes) else '-'}; AUC needs both classes: change the "
                "split column, or the split fractions or seed (then delete splits.json)"
            )
    for i, fold in enumerate(splits.folds):
        train = cohort.patients.loc[list(fold.train), cohort.feature_names]
        blank = [c.column for c in cohort.columns if train[c.feature_name].isna().all()]
        if blank:
            where = f" (fold {i})" if len(splits.folds) > 1 else ""
            raise CohortError(
                f"{cohort.source}: clinical column(s) {blank} are blank for every training "
                f"patient{where}: nothing can be learned from them; fill them in or remove them "
                "from cohort.clinical"
            )


# run.json's record of the config file that made the run folder.
CONFIG_FILE_KEY = "config_file"


def _config_origin(run_dir: Path, config_path: str | Path) -> dict[str, str]:
    config = Path(config_path).resolve()
    return {
        "path": str(config),
        "relative": Path(os.path.relpath(config, Path(run_dir).resolve())).as_posix(),
    }


def _is_resolved_copy(run_dir: Path, config_path: str | Path) -> bool:
    """Whether ``config_path`` is the resolved config that the run wrote into its own folder."""
    return Path(config_path).resolve() == RunDir(run_dir).config.resolve()


def check_config_origin(run_dir: str | Path, config_path: str | Path) -> None:
    """Refuse a run folder made by another config file that still exists.

    A config copied from another keeps its `name:`, so both default to the same run folder; a
    rerun of the copy there would train into the other's results. The same file is recognised
    by its path, or by its path relative to the run folder (a project folder moved or copied
    with its runs); a recorded file that no longer exists was renamed or moved, and its folder
    goes on with this one.
    """
    run_dir = Path(run_dir)
    if _is_resolved_copy(run_dir, config_path):
        return  # the run's own resolved config, which its finishing commands name
    recorded = read_run_info(run_dir).get(CONFIG_FILE_KEY)
    if not isinstance(recorded, dict):
        return  # a new folder, or one made before the record existed
    ours = _config_origin(run_dir, config_path)
    if recorded.get("path") == ours["path"] or recorded.get("relative") == ours["relative"]:
        return
    other = Path(str(recorded.get("path")))
    if not other.is_file():
        return  # renamed or moved: this config takes the folder over (and the record)
    raise ConfigError(
        f"--out {run_dir}: this run folder was made by another config file, {other}, not by "
        f"{config_path} (a copied config keeps the other's `name:`, and so its run folder); "
        f"pass --out with a folder of its own, e.g. --out {run_dir.parent / Path(config_path).stem}"
    )


def record_config_origin(run_dir: str | Path, config_path: str | Path) -> None:
    """Write in run.json which config file made the run folder (see ``check_config_origin``)."""
    if _is_resolved_copy(Path(run_dir), config_path):
        return  # the folder stays its original config's
    info = read_run_info(run_dir)
    origin = _config_origin(Path(run_dir), config_path)
    if info.get(CONFIG_FILE_KEY) != origin:
        info[CONFIG_FILE_KEY] = origin
        write_run_info(run_dir, info)


def check_run_folder(config: ExperimentConfig, config_path: str | Path, run: RunDir) -> None:
    """Refuse a run folder made by another config file, or holding a run of other cohort,
    features or training settings, or of other options of a method trained there."""
    from bidistill.config import load_config
    from bidistill.runs.inputs import TRAINING_SECTIONS, config_sections

    check_config_origin(run.path, config_path)
    if not run.config.is_file():
        return
    previous = load_config(run.config)
    # The sections that decide what a trained method is (methods may be added and evaluation
    # settings changed: that only adds or redoes work). Paths are left out: a moved project
    # folder is the same experiment; its files are fingerprinted by content.
    old = config_sections(previous, TRAINING_SECTIONS)
    new = config_sections(config, TRAINING_SECTIONS)
    changed = [s for s in TRAINING_SECTIONS if old[s] != new[s]]
    if changed:
        raise ConfigError(
            f"{run.path} holds a run made with other {', '.join(changed)} settings "
            f"(see {run.config}); use a new --out folder, or delete the folder to start over"
        )
    before = {m.key: m.model_dump(mode="json") for m in previous.methods}
    for method in config.methods:
        options = before.get(method.key)
        changed = options is not None and options != method.model_dump(mode="json")
        if changed and run.has_method(method.key):
            raise ConfigError(
                f"{run.path}: method '{method.key}' was trained with other options "
                f"({options}); give the new entry its own `label`, or delete "
                f"{run.joined(method.key).path} to train it again"
            )
