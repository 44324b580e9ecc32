"""The training loop: stages, epochs, AdamW with warm-up + cosine, early stopping, evaluation.

One loop serves every method: a method's ``stages()`` are run in order, each with a fresh
optimiser and its own early stopping on the validation AUC the stage names (clinical data
present, scored on the patients that have it; absent; or the mean of both, with clinical data
as given and withheld, for methods that route by modality). At the end of a stage
the best epoch's weights are restored.
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
from torch.utils.data import DataLoader

from bidistill.config import TrainingConfig
from bidistill.errors import BidistillError
from bidistill.models.base import Method, Selection, Stage
from bidistill.models.batch import Batch
from bidistill.training.data import withhold_clinical

log = logging.getLogger(__name__)


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


def selection_score(
    select: Selection, auc_present: float, auc_absent: float, auc_with_clinical: float
) -> float:
    """The validation score a stage is selected on.

    ``present`` scores the patients that have clinical data (``auc_with_clinical``): the others
    would be scored by whatever the method does without it, e.g. the still untrained student
    of ``kd``'s teacher stage or BD's single-modal branch during warm-up, which is noise for
    this stage. It falls back to every patient when that subset lacks one of the classes.
    """
    if select == "present":
        return auc_with_clinical if np.isfinite(auc_with_clinical) else auc_present
    if select == "absent":
        return auc_absent
    return (auc_present + auc_absent) / 2


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
class StageResult:
    stage: str
    best_epoch: int
    best_score: float
    epochs_run: int


@dataclass
class FitResult:
    log_rows: list[dict] = field(default_factory=list)
    stages: list[StageResult] = field(default_factory=list)


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
    """Train ``method`` through its stages; leave it holding each stage's best weights.

    Args:
        val_labels: labels of the validation patients, in ``val_loader`` order.
        epochs: overrides ``cfg.epochs`` (stages with their own epoch count keep it).

    Returns:
        One log row per epoch (stage, epoch, lr, every named loss term, validation AUCs, time)
        and per stage the best epoch and its score.
    """
    result = FitResult()
    for stage in method.stages():
        stage_epochs = stage.epochs or epochs or cfg.epochs
        result.stages.append(
            _fit_stage(
                method,
                stage,
                stage_epochs,
                train_loader,
                val_loader,
                val_labels,
                cfg,
                device,
                progress,
                result.log_rows,
            )
        )
    return result


def _fit_stage(
    method,
    stage: Stage,
    epochs: int,
    train_loader,
    val_loader,
    val_labels,
    cfg,
    device,
    progress: bool,
    log_rows: list[dict],
) -> StageResult:
    method.set_stage(stage.name)
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = len(train_loader)
    scheduler = warmup_cosine(optimizer, cfg.warmup_epochs * steps, epochs * steps)
    best = StageResult(stage.name, best_epoch=-1, best_score=-math.inf, epochs_run=0)
    best_state = None
    stale = 0
    with_clinical = val_loader.dataset.clinical_present.numpy()
    bar = _EpochBar(
        progress, f"{method.name}/{stage.name}" if len(method.stages()) > 1 else method.name
    )
    with bar:
        for epoch in range(epochs):
            started = time.perf_counter()
            # A global epoch index, so that stages draw different instance subsets.
            train_loader.dataset.set_epoch(len(log_rows))
            terms = _train_epoch(
                method, train_loader, optimizer, scheduler, cfg, device, bar, epoch, epochs
            )
            prob_present, prob_absent = predict_loader(method, val_loader, device)
            auc_present = auc_or_nan(val_labels, prob_present)
            auc_absent = auc_or_nan(val_labels, prob_absent)
            auc_with_clinical = auc_or_nan(val_labels[with_clinical], prob_present[with_clinical])
            score = selection_score(stage.select, auc_present, auc_absent, auc_with_clinical)
            log_rows.append(
                {
                    "stage": stage.name,
                    "epoch": epoch,
                    "lr": optimizer.param_groups[0]["lr"],
                    **{f"loss_{k}": v for k, v in terms.items()},
                    "val_auc_present": auc_present,
                    "val_auc_absent": auc_absent,
                    "val_auc_with_clinical": auc_with_clinical,
                    "val_score": score,
                    "seconds": time.perf_counter() - started,
                }
            )
            bar.finish_epoch(epoch, epochs, terms["total"], score)
            best.epochs_run = epoch + 1
            if best_state is None or (np.isfinite(score) and score > best.best_score + 1e-6):
                best.best_epoch, best.best_score = epoch, float(score)
                best_state = copy.deepcopy(method.state_dict())
                stale = 0
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
    method.load_state_dict(best_state)
    log.info(
        "%s/%s: best epoch %d (val %s AUC %.3f)",
        method.name,
        stage.name,
        best.best_epoch,
        stage.select,
        best.best_score,
    )
    return best


def _train_epoch(method, loader, optimizer, scheduler, cfg, device, bar, epoch, epochs):
    method.train()
    sums: dict[str, float] = {}
    seen = 0
    bar.start_epoch(epoch, epochs, len(loader))
    for batch in loader:
        batch: Batch = batch.to(device)
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


class _EpochBar:
    """A rich progress bar over one epoch's batches, with the running loss and val AUC."""

    def __init__(self, enabled: bool, label: str):
        self.enabled = enabled
        self.label = label
        self.last_score = float("nan")
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                transient=False,
            )

    def __enter__(self):
        if self.enabled:
            self.progress.start()
            self.task = self.progress.add_task(self.label, total=1, status="")
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.stop()

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        if self.enabled:
            self.progress.reset(
                self.task, total=steps, description=f"{self.label} epoch {epoch + 1}/{epochs}"
            )

    def advance(self, running_loss: float) -> None:
        if self.enabled:
            self.progress.update(self.task, advance=1, status=self._status(running_loss))

    def finish_epoch(self, epoch: int, epochs: int, loss: float, score: float) -> None:
        self.last_score = score
        if self.enabled:
            self.progress.update(self.task, status=self._status(loss))

    def _status(self, loss: float) -> str:
        return f"loss {loss:.4f}  val AUC {self.last_score:.3f}"
