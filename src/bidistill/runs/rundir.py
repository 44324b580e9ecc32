"""The run folder and its one owner: every file name, the fold layout, a trained method's files
(the layout is drawn in docs/internal-interfaces.md). Training and evaluation write, inference and
the report read, through ``RunDir`` and ``MethodDir``; no other module spells a name of this folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bidistill._io import atomic_path, write_csv, write_json
from bidistill.errors import CheckpointError

_FOLDS = "folds"
_FOLD_PREFIX = "fold"


class MethodDir:
    """One trained method's folder: its files, written and read here."""

    def __init__(self, path: str | Path, fold: int = 0):
        self.path = Path(path)
        self.fold = fold

    def __fspath__(self) -> str:  # so that MethodDir(a MethodDir) is that folder
        return str(self.path)

    weights = property(lambda self: self.path / "model.safetensors")
    meta = property(lambda self: self.path / "model.json")
    clinical_encoder = property(lambda self: self.path / "clinical_encoder.json")
    train_log = property(lambda self: self.path / "train_log.csv")
    training_state = property(lambda self: self.path / "training_state.pt")
    predictions = property(lambda self: self.path / "predictions.csv")

    @property
    def key(self) -> str:
        return self.path.name

    @property
    def done(self) -> bool:
        """Trained to the end: ``predictions.csv`` is written last."""
        return self.predictions.is_file()

    def save(
        self,
        *,
        state_dict: dict[str, Any],
        meta: dict[str, Any],
        encoder,
        train_log: pd.DataFrame,
        predictions: pd.DataFrame,
    ) -> None:
        """Write the method's files, each atomically, ``predictions.csv`` last."""
        state = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        with atomic_path(self.weights) as tmp:
            save_file(state, str(tmp))
        write_json(self.meta, meta)
        encoder.save(self.clinical_encoder)
        write_csv(self.train_log, train_log)
        write_csv(self.predictions, predictions)

    def read_meta(self, required: tuple[str, ...] = ()) -> dict[str, Any]:
        """``model.json``; ``CheckpointError`` naming the file when it is missing, not a JSON
        object or lacks a ``required`` key (``a.b`` for a nested one)."""
        path = self._existing(self.meta)
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise self.damaged(path, f"not valid JSON ({reason(err)})") from err
        if not isinstance(meta, dict):
            raise self.damaged(path, "not a JSON object")
        missing = [key for key in required if not _has(meta, key)]
        # A missing parent is named alone ("dims", not also every "dims.<key>").
        missing = [key for key in missing if key.rpartition(".")[0] not in missing]
        if missing:
            raise self.damaged(path, f"lacks {', '.join(missing)}")
        return meta

    def read_weights(self) -> dict[str, Any]:
        path = self._existing(self.weights)
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise self.damaged(path, f"unreadable ({reason(err)})") from err

    def read_predictions(self) -> pd.DataFrame:
        path = self.predictions
        if not path.is_file():
            raise CheckpointError(f"{path}: missing; the method's training did not finish")
        try:
            return pd.read_csv(path, dtype={"patient_id": str})
        except (OSError, ValueError) as err:  # pandas' parser errors are ValueErrors
            raise self.damaged(path, f"unreadable ({reason(err)})") from err

    def _existing(self, path: Path) -> Path:
        if not path.is_file():
            raise CheckpointError(f"{path}: missing; train the method with `bidistill train`")
        return path

    @staticmethod
    def damaged(path: Path, problem: str) -> CheckpointError:
        """A damaged checkpoint file: the method has to be trained again."""
        return CheckpointError(
            f"{path}: {problem}; the file is damaged: delete the folder {path.parent} and rerun "
            "`bidistill run CONFIG --out RUN` to train it again"
        )


class RunDir:
    """A run folder (``bidistill run``, ``train``, ``evaluate`` write it; the rest read it)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    config = property(lambda self: self.path / "config.yaml")
    cohort_summary = property(lambda self: self.path / "cohort.json")
    splits = property(lambda self: self.path / "splits.json")
    run_info = property(lambda self: self.path / "run.json")
    log = property(lambda self: self.path / "run.log")
    lock = property(lambda self: self.path / "run.lock")
    lock_holder = property(lambda self: self.path / "run.lock.json")
    tracking = property(lambda self: self.path / "tracking.json")
    predictions = property(lambda self: self.path / "predictions.csv")
    metrics = property(lambda self: self.path / "metrics.csv")
    metrics_by_seed = property(lambda self: self.path / "metrics_by_seed.csv")
    delong = property(lambda self: self.path / "delong.csv")
    report = property(lambda self: self.path / "report.html")
    report_markdown = property(lambda self: self.path / "report.md")
    figures = property(lambda self: self.path / "figures")
    train_missing_table = property(lambda self: self.path / "train_missing.csv")

    def __fspath__(self) -> str:
        return str(self.path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def fold_count(self) -> int:
        """The number of folds the run trains (``splits.json``; one when there is none)."""
        from bidistill.cohort import Splits

        return len(Splits.load(self.splits).folds) if self.splits.is_file() else 1

    def fold_root(self, fold: int, folds: int) -> Path:
        """Where fold ``fold`` of ``folds`` keeps its methods: the run itself for a holdout
        run, ``folds/fold<k>`` for a k-fold run."""
        return self.path if folds == 1 else self.path / _FOLDS / f"{_FOLD_PREFIX}{fold}"

    def method(self, key: str, fold: int = 0, folds: int = 1) -> MethodDir:
        return MethodDir(self.fold_root(fold, folds) / key, fold)

    def joined(self, key: str) -> MethodDir:
        """The method's folder at the run's top: its model (holdout) or, in a k-fold run, the
        folds' predictions joined."""
        return MethodDir(self.path / key)

    def trained_methods(self) -> dict[str, list[MethodDir]]:
        """method key → its folders that hold weights, one per fold (k-fold runs first listed
        by fold; a holdout folder wins)."""
        per_fold: dict[str, list[MethodDir]] = {}
        for fold, root in sorted(self._fold_roots().items()):
            for weights in sorted(root.glob("*/model.safetensors")):
                per_fold.setdefault(weights.parent.name, []).append(MethodDir(weights.parent, fold))
        holdout = {
            w.parent.name: [MethodDir(w.parent)] for w in self.path.glob("*/model.safetensors")
        }
        return {**per_fold, **dict(sorted(holdout.items()))}

    def model_dir(self, key: str) -> MethodDir:
        """The folder holding a method's model: its own, or fold 0's in a k-fold run."""
        own = self.joined(key)
        if own.meta.is_file() or not (self.path / _FOLDS).is_dir():
            return own
        return MethodDir(self.path / _FOLDS / f"{_FOLD_PREFIX}0" / key, 0)

    def _fold_roots(self) -> dict[int, Path]:
        roots = {}
        for path in self.path.glob(f"{_FOLDS}/{_FOLD_PREFIX}*"):
            index = path.name.removeprefix(_FOLD_PREFIX)
            if index.isdigit():
                roots[int(index)] = path
        return roots

    def predicted_methods(self) -> list[MethodDir]:
        """The folders at the run's top that hold a method's predictions."""
        return [MethodDir(p.parent) for p in sorted(self.path.glob("*/predictions.csv"))]

    def method_metas(self) -> list[Path]:
        """Every ``model.json`` under the run (train-time missingness runs included)."""
        return sorted(self.path.rglob("model.json"))

    def has_method(self, key: str) -> bool:
        """Whether any folder of the method exists (holdout, a fold, a train-missing run)."""
        folders = [self.path / key, *self.path.glob(f"{_FOLDS}/*/{key}")]
        return any(f.exists() for f in folders) or any(
            r.has_method(key) for r in self.train_missing_runs()
        )

    def train_missing(self, rate: float) -> RunDir:
        """The run trained with clinical data withheld from ``rate`` of its training patients."""
        return RunDir(self.path / "train_missing" / f"{rate:g}")

    def train_missing_runs(self) -> list[RunDir]:
        return [RunDir(p) for p in sorted(self.path.glob("train_missing/*")) if p.is_dir()]

    def stage_name(self, path: Path) -> str:
        """A path inside the run as ``run.json`` names its stage (``bd``, ``folds/fold1/bd``)."""
        return Path(path).relative_to(self.path).as_posix()


def _has(meta: dict, dotted: str) -> bool:
    node: Any = meta
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def reason(err: BaseException) -> str:
    """An exception as a short phrase (KeyError's message is only the key)."""
    text = " ".join(str(err).split())
    if isinstance(err, KeyError):
        return f"no {text}"
    return text[:200] or type(err).__name__
