"""Checks made before any work: each one stops a run that would otherwise fail (or mislead)
after minutes or hours of training."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from bidistill._text import count
from bidistill.errors import CohortError, ConfigError


def prepare_output_dir(out_dir: Path) -> None:
    """Create ``out_dir`` and make sure files can be written in it.

    Raises:
        ConfigError: ``out_dir`` is a file, cannot be created, or is not writable.
    """
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
    """Refuse a device that this machine does not have (``auto`` always works).

    Raises:
        ConfigError: naming the config key, the device and what the machine has.
    """
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
    training patients.

    Raises:
        CohortError: naming the split (and fold) or the column.
    """
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


# --- which config file a run folder belongs to --------------------------------------------------

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
    return Path(config_path).resolve() == (run_dir / "config.yaml").resolve()


def check_config_origin(run_dir: str | Path, config_path: str | Path) -> None:
    """Refuse a run folder made by another config file that still exists.

    A config copied from another keeps its `name:`, so both default to the same run folder; a
    rerun of the copy there would train into the other's results. The same file is recognised
    by its path, or by its path relative to the run folder (a project folder moved or copied
    with its runs); a recorded file that no longer exists was renamed or moved, and its folder
    goes on with this one.

    Raises:
        ConfigError: naming both config files and how to give this one its own folder.
    """
    from bidistill.runs.fingerprint import read_run_info

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
    from bidistill.runs.fingerprint import read_run_info, write_run_info

    if _is_resolved_copy(Path(run_dir), config_path):
        return  # the folder stays its original config's
    info = read_run_info(run_dir)
    origin = _config_origin(Path(run_dir), config_path)
    if info.get(CONFIG_FILE_KEY) != origin:
        info[CONFIG_FILE_KEY] = origin
        write_run_info(run_dir, info)
