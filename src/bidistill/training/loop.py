"""The training loop: stages, epochs, AdamW with a learning-rate warm-up and cosine decay, and
model selection with early stopping.

One loop serves every method. A method's ``stages()`` run in order, each with a fresh optimiser.
After every epoch the validation patients are predicted twice, with their clinical data as in the
table and with all of it withheld, which gives three AUCs (``train_log.csv`` columns):

- ``val_auc_present``: every validation patient, clinical data as given;
- ``val_auc_with_clinical``: only the validation patients that have clinical data, as given;
- ``val_auc_absent``: every validation patient, clinical data withheld.

A stage selects its best epoch on the score it names (``Stage.select``, see ``SELECTION``). A
stage made of parts (``Stage.parts``: e.g. BD's multi-modal and single-modal branches, which
share no parameters and never use each other at prediction) keeps each part's own best epoch on
the part's own score, because one checkpoint for two branches that peak at different epochs
shortchanges one of them. Early stopping ends a stage when no part has improved for
``patience`` epochs; then every part's best weights are restored.

Epochs count from 1 within each stage everywhere: progress bar, run.log, ``train_log.csv`` and
``model.json``.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn
from torch.utils.data import DataLoader

from bidistill.config import TrainingConfig
from bidistill.errors import BidistillError
from bidistill.models.base import Method, Part, Selection, Stage
from bidistill.models.batch import Batch
from bidistill.training.data import withhold_clinical
from bidistill.training.progress import EpochBar

log = logging.getLogger(__name__)

# What each selection score is, in the words the console and run.log use.
SELECTION: dict[Selection, str] = {
    "present": "val AUC of the patients with clinical data (val_auc_with_clinical)",
    "absent": "val AUC with clinical data withheld (val_auc_absent)",
    "routed": "mean of val AUC with clinical data as given and withheld (routed)",
}


class TrainingDivergedError(BidistillError, RuntimeError):
    """A loss term became NaN or infinite (the settings' doing, e.g. the learning rate, since
    the feature files are checked for NaN/inf when they are opened)."""


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda, then mps, then cpu; anything else as torch reads it."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def warmup_cosine(optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up to the base LR, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def auc_or_nan(labels: np.ndarray, scores: np.ndarray) -> float:
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores))


@dataclass(frozen=True)
class ValidationAUCs:
    present: float  # every patient, clinical data as given
    absent: float  # every patient, clinical data withheld
    with_clinical: float  # the patients with clinical data, as given

    def score(self, select: Selection) -> float:
        """The score a stage or part is selected on.

        ``present`` scores the patients that have clinical data: the others would be scored by
        whatever the method does without it, e.g. the still untrained student of ``kd``'s
        teacher stage, which is noise for this selection. It falls back to every patient when
        that subset lacks one of the classes.
        """
        if select == "present":
            return self.with_clinical if np.isfinite(self.with_clinical) else self.present
        if select == "absent":
            return self.absent
        return (self.present + self.absent) / 2


@torch.no_grad()
def predict_loader(
    method: Method, loader: DataLoader, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """P(label = 1) per patient, in loader order, with clinical data as given and withheld.

    Runs in ``eval()`` mode under ``no_grad`` and restores the previous mode.

    Returns:
        (prob_present [n], prob_absent [n]).
    """
    was_training = method.training
    method.eval()
    n = len(loader.dataset)
    present, absent = np.zeros(n, np.float32), np.zeros(n, np.float32)
    # The sampler batches bags by size; its batches give each prediction's place.
    for indices, batch in zip(loader.batch_sampler, loader):
        batch = batch.to(device)
        present[indices] = method(batch).probabilities.float().cpu().numpy()
        blank = withhold_clinical(batch, method.blank_clinical)
        absent[indices] = method(blank).probabilities.float().cpu().numpy()
    method.train(was_training)
    return present, absent


@dataclass
class PartResult:
    part: str
    select: Selection
    best_epoch: int  # 1-based
    best_score: float


@dataclass
class StageResult:
    stage: str
    select: Selection
    epochs_run: int
    parts: list[PartResult]

    def to_dict(self) -> dict:
        """The ``model.json`` ``selection`` entry of this stage."""
        return {
            "stage": self.stage,
            "select": self.select,
            "epochs_run": self.epochs_run,
            "parts": [
                {
                    "part": p.part,
                    "select": p.select,
                    "best_epoch": p.best_epoch,
                    "val_score": p.best_score,
                }
                for p in self.parts
            ],
        }


@dataclass
class FitResult:
    log_rows: list[dict] = field(default_factory=list)
    stages: list[StageResult] = field(default_factory=list)


@dataclass
class _Fit:
    """What every stage of one ``fit`` call shares."""

    method: Method
    train_loader: DataLoader
    val_loader: DataLoader
    val_labels: np.ndarray
    cfg: TrainingConfig
    device: torch.device
    progress: bool
    log_rows: list[dict] = field(default_factory=list)

    def validate(self) -> ValidationAUCs:
        present, absent = predict_loader(self.method, self.val_loader, self.device)
        with_clinical = self.val_loader.dataset.clinical_present.numpy()
        return ValidationAUCs(
            present=auc_or_nan(self.val_labels, present),
            absent=auc_or_nan(self.val_labels, absent),
            with_clinical=auc_or_nan(self.val_labels[with_clinical], present[with_clinical]),
        )


def fit(
    method: Method,
    train_loader: DataLoader,
    val_loader: DataLoader,
    val_labels: np.ndarray,
    cfg: TrainingConfig,
    *,
    device: torch.device,
    epochs: int | None = None,
    progress: bool = True,
) -> FitResult:
    """Train ``method`` through its stages; leave it holding each stage's (parts') best weights.

    Args:
        val_labels: labels of the validation patients, in ``val_loader`` order.
        epochs: overrides ``cfg.epochs`` (stages with their own epoch count keep it).

    Returns:
        One log row per epoch (stage, epoch, lr, every named loss term, validation AUCs and
        selection scores, time) and per stage each part's best epoch and score.
    """
    run = _Fit(method, train_loader, val_loader, val_labels, cfg, device, progress)
    result = FitResult(log_rows=run.log_rows)
    for stage in method.stages():
        result.stages.append(_fit_stage(run, stage, stage.epochs or epochs or cfg.epochs))
    return result


@dataclass
class _Track:
    """The best epoch so far of one selected part."""

    part: Part
    keys: list[str]  # the part's state-dict keys
    best: PartResult
    state: dict[str, Tensor] | None = None
    stale: int = 0
    last: float = math.nan  # the score of the last epoch
    frozen: list[nn.Parameter] = field(default_factory=list)  # set when the part has stopped

    def update(self, epoch: int, score: float, state: dict[str, Tensor], candidate: bool) -> None:
        """Record an epoch's score; only a ``candidate`` epoch can become the best."""
        self.last = float(score)
        if not candidate:
            return
        if self.state is None or (np.isfinite(score) and score > self.best.best_score + 1e-6):
            self.best.best_epoch, self.best.best_score = epoch, float(score)
            self.state = {k: copy.deepcopy(state[k]) for k in self.keys}
            self.stale = 0
        else:
            self.stale += 1


def _tracks(method: Method, stage: Stage) -> list[_Track]:
    """One track per part of the stage (one for the whole method when it has no parts)."""
    state = method.state_dict()
    parts = stage.parts or (Part(stage.name, stage.select, ("",)),)
    tracks = []
    for part in parts:
        keys = [k for k in state if any(_within(k, m) for m in part.modules)]
        tracks.append(_Track(part, keys, PartResult(part.name, part.select, 0, -math.inf)))
    covered = {k for t in tracks for k in t.keys}
    trained = [n for n, p in method.named_parameters() if p.requires_grad and n not in covered]
    if trained:
        raise ValueError(
            f"{method.name}/{stage.name}: parameters {trained[:3]} belong to no part; every "
            "trained parameter must belong to one, or it would keep its last epoch's value"
        )
    return tracks


def _within(key: str, module: str) -> bool:
    return module == "" or key == module or key.startswith(module + ".")


def _stop_part(method: Method, track: _Track) -> None:
    """A part that has not improved for ``patience`` epochs while others still do: back to its
    best weights, and frozen for the rest of the stage (in eval mode, see ``_train_epoch``).
    Its outputs stay what the part gives at its best, e.g. the targets BD's multi-modal
    branch sets its single-modal branch."""
    method.load_state_dict({**method.state_dict(), **track.state})
    track.frozen = [
        p
        for name, p in method.named_parameters()
        if p.requires_grad and any(_within(name, m) for m in track.part.modules)
    ]
    for p in track.frozen:
        p.requires_grad_(False)


def _stopped_modules(tracks: list[_Track]) -> list[str]:
    return [m for t in tracks if t.frozen for m in t.part.modules]


def _fit_stage(run: _Fit, stage: Stage, epochs: int) -> StageResult:
    method, cfg = run.method, run.cfg
    method.set_stage(stage.name)
    params = [p for p in method.parameters() if p.requires_grad]
    # foreach: one fused update for all parameters (torch's CPU default loops over them).
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    steps = len(run.train_loader)
    scheduler = warmup_cosine(optimizer, cfg.lr_warmup_epochs * steps, epochs * steps)
    tracks = _tracks(method, stage)
    label = f"{method.name}/{stage.name}" if len(method.stages()) > 1 else method.name
    bar = EpochBar(run.progress, label, parts=[t.part.name for t in tracks])
    with bar:
        bar.note(_selection_note(label, stage, tracks))
        epochs_run = 0
        for epoch in range(1, epochs + 1):
            started = time.perf_counter()
            # A global epoch index, so that stages draw different instance subsets.
            run.train_loader.dataset.set_epoch(len(run.log_rows))
            bar.start_epoch(epoch, epochs, steps)
            terms = _train_epoch(run, optimizer, scheduler, epoch, bar, _stopped_modules(tracks))
            aucs = run.validate()
            state = method.state_dict()
            # The learning-rate warm-up's epochs are no candidates: a barely trained model wins
            # them only by the noise of a small validation set (a branch whose score stays at
            # chance would keep its first epoch's weights, attention and all).
            candidate = epoch > cfg.lr_warmup_epochs or epochs <= cfg.lr_warmup_epochs
            for track in tracks:
                if not track.frozen:
                    track.update(epoch, aucs.score(track.part.select), state, candidate)
            run.log_rows.append(_log_row(stage, epoch, optimizer, terms, aucs, tracks, started))
            bar.finish_epoch(terms["total"], {t.part.name: t.best.best_score for t in tracks})
            epochs_run = epoch
            active = [t for t in tracks if not t.frozen and t.stale < cfg.patience]
            if not active:
                break
            for track in tracks:
                if not track.frozen and track.stale >= cfg.patience:
                    _stop_part(method, track)
    best = method.state_dict()
    for track in tracks:
        best.update(track.state)
        for p in track.frozen:
            p.requires_grad_(True)
    method.load_state_dict(best)
    result = StageResult(stage.name, stage.select, epochs_run, [t.best for t in tracks])
    log.info("%s: %s", label, _selection_summary(result))
    return result


def _log_row(stage, epoch, optimizer, terms, aucs: ValidationAUCs, tracks, started) -> dict:
    row = {
        "stage": stage.name,
        "epoch": epoch,
        "lr": optimizer.param_groups[0]["lr"],
        **{f"loss_{k}": v for k, v in terms.items()},
        "val_auc_present": aucs.present,
        "val_auc_absent": aucs.absent,
        "val_auc_with_clinical": aucs.with_clinical,
        "val_score": aucs.score(stage.select),
    }
    if stage.parts:
        row |= {f"val_score_{t.part.name}": aucs.score(t.part.select) for t in tracks}
    return row | {"seconds": time.perf_counter() - started}


def _selection_note(label: str, stage: Stage, tracks: list[_Track]) -> str:
    if not stage.parts:
        return f"{label}: the best epoch is chosen on the {SELECTION[stage.select]}"
    each = "; ".join(f"{t.part.name} on the {SELECTION[t.part.select]}" for t in tracks)
    return f"{label}: each part keeps its own best epoch: {each}"


def _selection_summary(result: StageResult) -> str:
    return "; ".join(
        f"{'' if len(result.parts) == 1 else p.part + ' '}best at epoch {p.best_epoch} of "
        f"{result.epochs_run} ({p.select} {p.best_score:.3f})"
        for p in result.parts
    )


def _train_epoch(
    run: _Fit, optimizer, scheduler, epoch: int, bar: EpochBar, stopped: list[str]
) -> dict:
    method, cfg = run.method, run.cfg
    method.train()
    for module in stopped:
        method.get_submodule(module).eval()
    sums: dict[str, float] = {}
    seen = 0
    for batch in run.train_loader:
        batch: Batch = batch.to(run.device)
        output = method(batch)
        terms = method.loss(batch, output)
        total = terms["total"]
        if not torch.isfinite(total):
            values = {k: float(v) for k, v in terms.items()}
            raise TrainingDivergedError(
                f"{method.name}/{method.stage}, epoch {epoch}: loss is not finite {values}; "
                "lower training.lr or check the features for NaN"
            )
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(method.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        n = len(batch)
        seen += n
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach()) * n
        bar.advance(sums["total"] / seen)
    return {name: total / max(seen, 1) for name, total in sums.items()}
