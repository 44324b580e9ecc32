"""The one training loop over any bag source (``training.bag_source``): stages, epochs, steps,
selection with early stopping, and the resumable state (docs/internal-interfaces.md).

A stage made of parts (e.g. BD's multi-modal and single-modal branches, which share no
parameters and never use each other at prediction) keeps each part's own best epoch, because
one checkpoint for two branches that peak at different epochs shortchanges one of them; a part
that stops improving for ``patience`` epochs is frozen at its best while the others train on.
Epochs count from 1 within each stage everywhere (progress, run.log, train_log.csv, model.json);
a stage whose start is a candidate (``Stage.start_is_candidate``) records it as epoch 0."""

from __future__ import annotations

import copy
import itertools
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from bidistill._io import atomic_path, remove_temp_files
from bidistill.config import TrainingConfig
from bidistill.devices import autocast
from bidistill.errors import BidistillError
from bidistill.models.base import Method, Part, Selection, Stage
from bidistill.scores import auc_or_nan
from bidistill.training.bag_source import BagSource, Pass, Schedule
from bidistill.training.distributed import (
    Processes,
    average_buffers,
    barrier,
    gather,
    sum_gradients,
)
from bidistill.training.progress import EpochBar

log = logging.getLogger(__name__)

# What each selection score is, in the words the console and run.log use.
SELECTION: dict[Selection, str] = {
    "present": "val AUC of the patients with clinical data (val_auc_with_clinical)",
    "absent": "val AUC with clinical data withheld (val_auc_absent)",
    "routed": "mean of val AUC with clinical data as given and withheld (routed)",
}


class TrainingDivergedError(BidistillError, RuntimeError):
    """A loss term or a prediction became NaN or infinite (the settings' doing, e.g. the
    learning rate, since the feature files are checked for NaN/inf when they are opened)."""


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

    @classmethod
    def from_dict(cls, data: dict) -> StageResult:
        parts = [
            PartResult(p["part"], p["select"], p["best_epoch"], p["val_score"])
            for p in data["parts"]
        ]
        return cls(data["stage"], data["select"], data["epochs_run"], parts)


@dataclass
class FitResult:
    log_rows: list[dict] = field(default_factory=list)
    stages: list[StageResult] = field(default_factory=list)


@dataclass
class LoopState:
    """Where training is (what ``training_state.pt`` holds besides the tensors)."""

    fingerprint: str = ""
    stage: int = 0  # index of the stage in training (== number of stages: all done)
    epoch: int = 0  # epochs of that stage done
    tracks: list[dict] = field(default_factory=list)  # per part: best epoch, score, counters
    log_rows: list[dict] = field(default_factory=list)
    stages: list[dict] = field(default_factory=list)  # StageResult.to_dict of each stage done


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

    def counters(self) -> dict:
        """What the training state keeps of the track besides its best weights."""
        best = {"epoch": self.best.best_epoch, "score": self.best.best_score}
        return best | {"stale": self.stale, "last": self.last, "frozen": bool(self.frozen)}


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


def _freeze(method: Method, track: _Track) -> None:
    """Freeze a stopped part for the rest of the stage (in eval mode, see ``_train_epoch``).
    Its outputs stay what the part gives at its best, e.g. the targets BD's multi-modal branch
    sets its single-modal branch."""
    track.frozen = [
        p
        for name, p in method.named_parameters()
        if p.requires_grad and any(_within(name, m) for m in track.part.modules)
    ]
    for p in track.frozen:
        p.requires_grad_(False)


def _record(method: Method, tracks: list[_Track], epoch: int, aucs, *, candidate: bool) -> None:
    weights = method.state_dict()
    for track in tracks:
        if not track.frozen:
            track.update(epoch, aucs.score(track.part.select), weights, candidate)


def passes_per_epoch(min_steps: int | None, epochs: int, steps: int) -> int:
    """Passes over the training patients in one epoch: 1, or on a small cohort as many as make
    ``epochs`` epochs of ``steps`` steps a pass take at least ``min_steps`` steps. Stretching
    each epoch, not adding epochs, keeps warm-up, patience and the validation schedule as set."""
    if not min_steps or steps < 1:
        return 1
    return max(1, math.ceil(min_steps / (epochs * steps)))


def _stop_stale_parts(method: Method, tracks: list[_Track], patience: int) -> bool:
    """Freeze at its best each part that has not improved for ``patience`` epochs while others
    still do; False when none is left improving (the stage ends)."""
    if not [t for t in tracks if not t.frozen and t.stale < patience]:
        return False
    for track in tracks:
        if not track.frozen and track.stale >= patience:
            method.load_state_dict({**method.state_dict(), **track.state})
            _freeze(method, track)
    return True


def _restore_best(method: Method, stage: Stage, tracks: list[_Track], epochs_run: int):
    """The end of a stage: every part back to its best weights, and trainable again."""
    best = method.state_dict()
    for track in tracks:
        best.update(track.state)
        for p in track.frozen:
            p.requires_grad_(True)
    method.load_state_dict(best)
    return StageResult(stage.name, stage.select, epochs_run, [t.best for t in tracks])


def fit(
    method: Method,
    source: BagSource,
    cfg: TrainingConfig,
    *,
    device: torch.device,
    epochs: int | None = None,
    progress: bool = True,
    processes: Processes = Processes(),
    precision: torch.dtype = torch.float32,
    state_file: Path | None = None,
    fingerprint: str = "",
) -> FitResult:
    """Train ``method`` on ``source`` through its stages; leave it holding each stage's (parts')
    best weights. ``epochs`` overrides ``cfg.epochs`` (not a stage's own); ``precision``: of the
    forward passes; ``state_file``: kept at every epoch boundary, resumed from when it holds
    ``fingerprint`` (None: not resumable). Returns the log rows and each stage's selection."""
    loop = _Loop(method, source, cfg, device, progress, processes, precision, state_file)
    state, payload = loop.resume(fingerprint)
    stages = method.training_stages()
    for index in range(state.stage, len(stages)):
        stage = stages[index]
        loop.fit_stage(stage, index, stage.epochs or epochs or cfg.epochs, state, payload)
        payload = None
    return FitResult(state.log_rows, [StageResult.from_dict(s) for s in state.stages])


@dataclass
class _Loop:
    """What every stage of one ``fit`` call shares."""

    method: Method
    source: BagSource
    cfg: TrainingConfig
    device: torch.device
    progress: bool
    processes: Processes
    precision: torch.dtype
    state_file: Path | None

    def resume(self, fingerprint: str) -> tuple[LoopState, dict | None]:
        payload = load_state(self.state_file, fingerprint, self.device)
        if payload is None:
            return LoopState(fingerprint), None
        state = LoopState(**payload["state"])
        self.method.load_state_dict(payload["model"])
        message = (
            f"{self.method.name}: resuming from {self.state_file.name} (stage {state.stage + 1}, "
            f"epoch {state.epoch + 1}, {len(state.log_rows)} epochs done)"
        )
        log.info("%s", message)
        if self.progress and self.processes.is_main:
            from rich.console import Console

            Console(stderr=True).print(message, highlight=False, soft_wrap=True)
        return state, payload

    def fit_stage(
        self, stage: Stage, index: int, epochs: int, state: LoopState, payload: dict | None
    ) -> None:
        method, cfg = self.method, self.cfg
        method.set_stage(stage.name)
        one_pass = self.source.steps_per_epoch()  # a tile source plans an epoch to count them
        passes = passes_per_epoch(cfg.min_steps, epochs, one_pass)
        steps = passes * one_pass
        if passes > 1:
            log.info(
                "%s: %d passes over the training patients an epoch, so that %d epochs take at "
                "least training.min_steps = %d optimiser steps (%d)",
                method.name, passes, epochs, cfg.min_steps, epochs * steps,
            )  # fmt: skip
        schedule = self.source.schedule(method, epochs, steps)
        half_on_cuda = self.precision == torch.float16 and self.device.type == "cuda"
        scaler = torch.amp.GradScaler("cuda") if half_on_cuda else None
        tracks = _tracks(method, stage)
        if payload is not None and payload["optimizer"] is not None:
            self._restore(payload, schedule, scaler, tracks, state)
        label = f"{method.name}/{stage.name}" if len(method.training_stages()) > 1 else method.name
        bar = EpochBar(
            self.progress and self.processes.is_main, label, parts=[t.part.name for t in tracks]
        )
        with bar:
            bar.note(_selection_note(label, stage, tracks))
            if stage.start_is_candidate and state.epoch == 0:
                self._record_start(stage, schedule, tracks, state)
            for epoch in range(state.epoch + 1, epochs + 1):
                started = time.perf_counter()
                bar.start_epoch(epoch, epochs, steps)
                stopped = [m for t in tracks if t.frozen for m in t.part.modules]
                drawn = range(len(state.log_rows) * passes, (len(state.log_rows) + 1) * passes)
                terms = self._train_epoch(schedule, scaler, epoch, drawn, bar, stopped)
                average_buffers(method, self.processes)
                aucs = self.validate()
                # The learning-rate warm-up's epochs are no candidates: a barely trained model
                # wins them only by the noise of a small validation set (a branch whose score
                # stays at chance would keep its first epoch's weights, attention and all).
                warmup = schedule.warmup_epochs
                _record(method, tracks, epoch, aucs, candidate=epoch > warmup or epochs <= warmup)
                lr = schedule.optimizer.param_groups[0]["lr"]
                state.log_rows.append(_log_row(stage, epoch, lr, terms, aucs, tracks, started))
                if not schedule.per_step:
                    schedule.scheduler.step()
                bar.finish_epoch(terms["total"], {t.part.name: t.best.best_score for t in tracks})
                state.epoch = epoch
                if not _stop_stale_parts(method, tracks, cfg.patience):
                    break
                if epoch < epochs:
                    state.tracks = [t.counters() for t in tracks]
                    self._save(state, schedule, scaler, tracks)
        result = _restore_best(method, stage, tracks, state.epoch)
        log.info("%s: %s", label, _selection_summary(result))
        state.stages.append(result.to_dict())
        state.stage, state.epoch, state.tracks = index + 1, 0, []
        self._save(state, None, None, [])

    def _record_start(self, stage: Stage, schedule: Schedule, tracks, state: LoopState) -> None:
        """Epoch 0: the stage's starting weights, validated and recorded as a candidate."""
        started = time.perf_counter()
        aucs = self.validate()
        _record(self.method, tracks, 0, aucs, candidate=True)
        lr = schedule.optimizer.param_groups[0]["lr"]
        state.log_rows.append(_log_row(stage, 0, lr, {}, aucs, tracks, started))

    def validate(self) -> ValidationAUCs:
        patients = self.source.patients["val"]
        given, withheld = self.source.probabilities(self.method, "val")
        labels, with_clinical = patients.labels, patients.clinical_present
        return ValidationAUCs(
            present=auc_or_nan(labels, given),
            absent=auc_or_nan(labels, withheld),
            with_clinical=auc_or_nan(labels[with_clinical], given[with_clinical]),
        )

    def _train_epoch(
        self, schedule: Schedule, scaler, epoch: int, drawn: range, bar, stopped
    ) -> dict:
        """One epoch of steps: a pass over the training patients for each of ``drawn`` (passes
        run before, over all stages, which draws the bags); the loss terms averaged over bags."""
        method, cfg, optimizer = self.method, self.cfg, schedule.optimizer
        method.train()
        for module in stopped:
            method.get_submodule(module).eval()
        params = [p for p in method.parameters() if p.requires_grad]
        sums: dict[str, float] = {}
        seen = 0
        for step in itertools.chain.from_iterable(map(self.source.train_steps, drawn)):
            optimizer.zero_grad(set_to_none=True)
            for one in step:
                seen += len(one.batch)
                self._forward_backward(one, scaler, epoch, sums)
            sum_gradients(params, self.processes)
            if scaler is not None:
                scaler.unscale_(optimizer)
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(method.parameters(), cfg.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if schedule.per_step:
                schedule.scheduler.step()
            bar.advance(sums.get("total", 0.0) / max(seen, 1))
        totals = gather((sums, seen), self.processes)
        seen_all = max(sum(s for _, s in totals), 1)
        return {k: sum(t[0].get(k, 0.0) for t in totals) / seen_all for k in sums}

    def _forward_backward(self, one: Pass, scaler, epoch: int, sums: dict) -> None:
        method = self.method
        if one.seed is not None:
            torch.manual_seed(one.seed)
        with autocast(self.device, self.precision):
            output = method(one.batch)
            terms = method.training_loss(one.batch, output)
        total = terms["total"]
        if not torch.isfinite(total):
            values = {k: float(v) for k, v in terms.items()}
            raise TrainingDivergedError(
                f"{method.name}/{method.stage}, epoch {epoch}: loss is not finite {values}; "
                "lower training.lr or check the features for NaN"
            )
        scaled = total if one.passes == 1 else total.float() / one.passes
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        n = len(one.batch)
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach()) * n

    def _restore(self, payload, schedule: Schedule, scaler, tracks, state: LoopState) -> None:
        schedule.optimizer.load_state_dict(payload["optimizer"])
        schedule.scheduler.load_state_dict(payload["scheduler"])
        if scaler is not None and payload["scaler"] is not None:
            scaler.load_state_dict(payload["scaler"])
        for track, counters, best in zip(tracks, state.tracks, payload["best"]):
            track.best.best_epoch, track.best.best_score = counters["epoch"], counters["score"]
            track.stale, track.last, track.state = counters["stale"], counters["last"], best
            if counters["frozen"]:
                _freeze(self.method, track)

    def _save(self, state: LoopState, schedule: Schedule | None, scaler, tracks) -> None:
        if self.state_file is None:
            return
        if self.processes.is_main:
            payload = {
                "state": asdict(state),
                "model": self.method.state_dict(),
                "optimizer": schedule.optimizer.state_dict() if schedule else None,
                "scheduler": schedule.scheduler.state_dict() if schedule else None,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "best": [t.state for t in tracks],
            }
            with atomic_path(self.state_file) as tmp:
                torch.save(payload, tmp)
        barrier(self.processes)


def load_state(path: Path | None, fingerprint: str, device: torch.device) -> dict | None:
    """The saved state of this training (None: none, unreadable, or of other settings)."""
    if path is None or not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # a damaged file costs a restart, never a wrong resume
        log.warning("%s: unreadable (%s); training starts over", path, err)
        return None
    if payload.get("state", {}).get("fingerprint") != fingerprint:
        log.warning("%s: made with other settings, patients or weights; starting over", path)
        return None
    return payload


def remove_state(path: Path) -> None:
    """Training is done: remove its state, and the partial copies that a process killed while
    saving it left (each as large as the weights and the optimiser together)."""
    path.unlink(missing_ok=True)
    for leftover in remove_temp_files(path):
        log.info("removed %s, left by a killed save", leftover)


def _log_row(stage, epoch, lr, terms, aucs: ValidationAUCs, tracks, started) -> dict:
    row = {
        "stage": stage.name,
        "epoch": epoch,
        "lr": lr,
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
