"""``training.mode: end-to-end``: a method and its patch encoders trained on bags of tiles.

The protocol of the BCNB and BD papers: an ImageNet backbone fine-tuned end to end on bags of
10 random patches of a patient (each branch of BD with its own backbone), the patient's score
the mean of its bags' probabilities, the model selected on the validation AUC. Everything else
is as in feature mode: the same methods and stages, the same clinical encoding (fitted on the
training patients), class weights, run folder and ``predictions.csv``.

A training step is ``training.batch_size`` bags, processed ``micro_batch`` bags per forward
pass; its gradient is the mean of its forward passes' gradients, spread over the processes under
torchrun (``training.distributed``). Each forward pass re-seeds torch from (seed, epoch, step,
pass), so dropout draws, like the bags and their augmentation (``training.pixel_bags``), depend
on the seed alone: one process and N processes give the same weights up to floating point, and
a run killed and resumed gives the weights of an uninterrupted one.

The state of training (weights, optimiser, scheduler, gradient scaler, best weights so far,
early-stopping counters, log) is written atomically to ``<method>/training_state.pt`` at every
epoch boundary and removed once ``predictions.csv`` is written; a rerun resumes from it when it
was made with the same settings, patients and starting weights.

Optimisers: AdamW, or SGD with momentum as the BCNB authors' code (lr 1e-4, momentum 0.3,
weight decay 1e-3; github.com/bupt-ai-cz/BALNMP, ``code/train.py``); schedulers, stepped per
epoch: cosine decay over the stage, cosine annealing with warm restarts (their T_0 = 20,
T_mult = 2) or constant. The encoder's parameters form their own group
(``end_to_end.backbone_lr``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from bidistill._io import atomic_path, write_csv
from bidistill.cohort import ClinicalEncoder, Cohort, Splits, check_separating_features
from bidistill.config import EndToEndConfig, ExperimentConfig, MethodConfig, TrainingConfig
from bidistill.models import create_method
from bidistill.models.patch_encoder import encoded_aggregators, patch_encoder_parameters
from bidistill.training.backbone import BackboneSpec, load_backbone, patch_encoder_factory
from bidistill.training.checkpoint import save_checkpoint
from bidistill.training.distributed import (
    Processes,
    average_buffers,
    barrier,
    broadcast_parameters,
    gather,
    process_device,
    start_processes,
    sum_gradients,
)
from bidistill.training.loop import TrainingDivergedError, auc_or_nan
from bidistill.training.pixel_bags import (
    BagSpec,
    PixelBags,
    check_bag_settings,
    pixel_loader,
    prediction_bags,
    tile_index_from_config,
    to_batch,
    training_bags,
)
from bidistill.training.pixel_predict import (
    GIVEN,
    WITHHELD,
    autocast,
    reduce_bags,
    resolve_precision,
    run_bags,
)
from bidistill.training.seeding import seed_everything

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.csv"
TRAIN_LOG = "train_log.csv"
STATE = "training_state.pt"


# --- the patients ------------------------------------------------------------------------------


@dataclass
class _Split:
    """One split's patients and their bags' source."""

    ids: list[str]
    dataset: PixelBags
    loader: Any

    def bags(self, e2e: EndToEndConfig, seed: int, processes: Processes) -> list[BagSpec]:
        """This process's share of the split's prediction bags (patients dealt round-robin)."""
        specs = []
        for item, pid in enumerate(self.ids):
            if item % processes.world != processes.rank:
                continue
            for tiles in prediction_bags(
                self.dataset.tiles.n_tiles(item),
                pid,
                seed=seed,
                bag_size=e2e.bag_size,
                limit=e2e.bags_per_patient,
            ):
                specs.append(BagSpec(item, tiles))
        return specs


def _datasets(
    config: ExperimentConfig,
    cohort: Cohort,
    split_ids: dict[str, list[str]],
    encoder: ClinicalEncoder,
    *,
    reads_tiles: bool,
    device: torch.device,
) -> dict[str, _Split]:
    from bidistill.slides import slide_cache_dir

    slides_of = {str(p): list(s) for p, s in cohort.slides.groupby("patient_id")["slide_id"]}
    tcfg = config.training
    splits = {}
    for name, ids in split_ids.items():
        rows = cohort.subset(ids)
        encoded = encoder.transform(rows[cohort.feature_names])
        per_patient = [slides_of.get(p, []) if reads_tiles else [] for p in ids]
        dataset = PixelBags(
            tile_index_from_config(config, per_patient),
            encoded.values,
            encoded.valid,
            encoded.present,
            rows["label"].to_numpy(np.int64),
            augment=tcfg.end_to_end.augment if name == "train" else None,
            cache_dir=slide_cache_dir(config),
        )
        loader = pixel_loader(dataset, workers=tcfg.num_workers, device=device)
        splits[name] = _Split(ids, dataset, loader)
    return splits


# --- optimiser and schedule --------------------------------------------------------------------


def make_optimizer(method: nn.Module, tcfg: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW or SGD over two parameter groups: the patch encoders and everything else."""
    e2e = tcfg.end_to_end
    in_encoders = patch_encoder_parameters(method)
    trainable = [p for p in method.parameters() if p.requires_grad]
    heads = [p for p in trainable if id(p) not in in_encoders]
    backbone = [p for p in trainable if id(p) in in_encoders]
    groups = [{"params": heads, "lr": tcfg.lr, "name": "heads"}]
    if backbone:
        groups.append({"params": backbone, "lr": e2e.backbone_lr or tcfg.lr, "name": "backbone"})
    if e2e.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=e2e.momentum, weight_decay=tcfg.weight_decay)
    return torch.optim.AdamW(groups, weight_decay=tcfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, e2e: EndToEndConfig, epochs: int):
    """Stepped once per epoch."""
    if e2e.scheduler == "cosine-restarts":
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            optimizer, T_0=e2e.restart_epochs, T_mult=e2e.restart_mult
        )
    if e2e.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def selection_score(select: str, present: float, absent: float, with_clinical: float) -> float:
    """The validation score a stage is selected on (the feature loop's definition)."""
    if select == "present":
        return with_clinical if np.isfinite(with_clinical) else present
    if select == "absent":
        return absent
    return (present + absent) / 2


def micro_seed(seed: int, epoch: int, step: int, index: int) -> int:
    """The torch seed of one forward pass: the same in any process that runs it."""
    key = np.random.SeedSequence([seed, epoch, step, index, 4]).generate_state(1, np.uint64)[0]
    return int(key % (2**63 - 1))


# --- the state of training --------------------------------------------------------------------


@dataclass
class TrainingState:
    """What ``training_state.pt`` holds besides the tensors: where training is, and its log."""

    fingerprint: str
    stage: int = 0  # index of the stage in training (== number of stages: all done)
    epoch: int = 0  # next epoch of that stage
    global_epoch: int = 0  # epochs run over all stages (draws the bags)
    best_epoch: int = -1
    best_score: float = -math.inf
    stale: int = 0
    log_rows: list[dict] = field(default_factory=list)
    stage_results: list[dict] = field(default_factory=list)


def _fingerprint(config, method_cfg, cohort, split_ids, spec: BackboneSpec) -> str:
    """What decides the weights: the settings, the method, the patients' rows, the starting
    weights. Left out on purpose: the device, the loader workers and the number of processes,
    which change nothing."""
    from bidistill.runs.inputs import cohort_rows

    patients = [p for ids in split_ids.values() for p in ids]
    data = {
        "training": config.training.model_dump(mode="json", exclude={"num_workers", "device"}),
        "method": method_cfg.model_dump(mode="json"),
        "patients": split_ids,
        "rows": cohort_rows(cohort, patients),
        "backbone": spec.to_dict(),
    }
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _tiles_digest(parts: dict[str, _Split]) -> str:
    """The tiles the bags are drawn from (every slide's coordinates)."""
    digest = hashlib.sha256()
    for part in parts.values():
        for slide in part.dataset.tiles.slides:
            digest.update(slide.slide_id.encode())
            digest.update(np.ascontiguousarray(slide.coords).tobytes())
    return digest.hexdigest()[:12]


def _save_state(
    path: Path, state: TrainingState, method, optimizer, scheduler, scaler, best
) -> None:
    payload = {
        "state": state.__dict__,
        "model": method.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "best": best,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _load_state(path: Path, fingerprint: str, device: torch.device) -> dict | None:
    if not path.is_file():
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


# --- training -----------------------------------------------------------------------------------


def train_end_to_end(
    config: ExperimentConfig,
    method_cfg: MethodConfig,
    run_dir: str | Path,
    *,
    cohort: Cohort,
    splits: Splits,
    fold: int = 0,
    progress: bool = True,
) -> Path:
    """Train one method end to end on one fold and write its folder (as ``train_method``).

    Under torchrun every process calls this; process 0 writes the files.

    Raises:
        ConfigError: bad end-to-end settings. SlideError: slides or coords files missing.
        EncoderError: the encoder cannot be loaded. TrainingDivergedError: a loss not finite.
    """
    method_dir = Path(run_dir) / method_cfg.key
    if (method_dir / PREDICTIONS).is_file():
        log.info("%s: done already (%s exists), skipped", method_cfg.key, PREDICTIONS)
        return method_dir
    tcfg, e2e = config.training, config.training.end_to_end
    check_bag_settings(tcfg.batch_size, e2e.micro_batch)
    started = time.perf_counter()
    trainer = _Trainer(config, method_cfg, cohort, splits, fold, progress=progress)
    with trainer.cpu_threads():
        trainer.run(method_dir)
        trainer.finish(method_dir, started)
    return method_dir


class _Trainer:
    """One method's end-to-end training: set up, resumable epochs, predictions, files."""

    def __init__(self, config, method_cfg, cohort, splits, fold: int, *, progress: bool):
        self.config, self.method_cfg, self.cohort, self.fold = config, method_cfg, cohort, fold
        self.tcfg = config.training
        self.e2e = config.training.end_to_end
        self.progress = progress
        chosen = splits.folds[fold]
        self.split_ids = {
            "train": list(chosen.train),
            "val": list(chosen.val),
            "test": list(splits.test),
        }
        self.processes = start_processes(process_device(self.tcfg.device, Processes()))
        self.device = process_device(self.tcfg.device, self.processes)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.precision = resolve_precision(self.e2e.precision, self.device)
        train_rows = cohort.subset(self.split_ids["train"])
        check_separating_features(
            train_rows[cohort.feature_names],
            train_rows["label"],
            cohort.columns,
            config.cohort.allow_separating,
        )
        self.encoder = ClinicalEncoder(cohort.columns).fit(train_rows[cohort.feature_names])
        backbone, self.spec = load_backbone(config)
        seed_everything(self.tcfg.seed)
        self.method = create_method(
            method_cfg.name,
            in_dim=self.spec.dim,
            clinical_dim=self.encoder.n_outputs_,
            n_clinical_features=self.encoder.n_features_,
            feature_slices=self.encoder.feature_slices_,
            patch_encoder=patch_encoder_factory(backbone, self.spec),
            **method_cfg.options,
        )
        del backbone
        self.method.set_blank_clinical(torch.from_numpy(self.encoder.missing_row().values[0]))
        if self.tcfg.class_weighting:
            from bidistill.training.train import class_weights

            self.method.set_class_weights(class_weights(train_rows["label"].to_numpy(np.int64)))
        self.method.to(self.device)
        if self.device.type in ("cuda", "cpu"):
            for module in encoded_aggregators(self.method).values():
                module.encoder.to(memory_format=torch.channels_last)
        broadcast_parameters(self.method, self.processes)
        self.parts = _datasets(
            config,
            cohort,
            self.split_ids,
            self.encoder,
            reads_tiles=bool(encoded_aggregators(self.method)),
            device=self.device,
        )
        self.fingerprint = _fingerprint(config, method_cfg, cohort, self.split_ids, self.spec)
        self.fingerprint += _tiles_digest(self.parts)

    def cpu_threads(self):
        """One torch thread for a tiny backbone on the CPU (``training.threads``), all of them
        for real ones: the work of a step, as parameters x tiles x (input side / 32)^2."""
        from bidistill.training.threads import cpu_threads_for

        side = int(self.spec.preprocess["size"])
        tiles = self.e2e.bag_size * max(1.0, (side / 32) ** 2)
        return cpu_threads_for(
            self.method, self.device, batch_size=self.e2e.micro_batch, bag_lengths=[tiles]
        )

    # --- the epochs ----------------------------------------------------------------------------

    def run(self, method_dir: Path) -> None:
        state_path = method_dir / STATE
        payload = _load_state(state_path, self.fingerprint, self.device)
        state = TrainingState(self.fingerprint)
        if payload is not None:
            state = TrainingState(**payload["state"])
            self.method.load_state_dict(payload["model"])
            self._say(
                f"{self.method_cfg.key}: resuming from {state_path.name} (stage {state.stage + 1}"
                f", epoch {state.epoch + 1}, {state.global_epoch} epochs done)"
            )
        stages = self.method.stages()
        for index in range(state.stage, len(stages)):
            stage = stages[index]
            self.method.set_stage(stage.name)
            epochs = stage.epochs or self.tcfg.epochs
            optimizer = make_optimizer(self.method, self.tcfg)
            scheduler = make_scheduler(optimizer, self.e2e, epochs)
            scaler = self._scaler()
            best = None
            if payload is not None and payload["optimizer"] is not None:
                optimizer.load_state_dict(payload["optimizer"])
                scheduler.load_state_dict(payload["scheduler"])
                if scaler is not None and payload["scaler"] is not None:
                    scaler.load_state_dict(payload["scaler"])
                best = payload["best"]
            payload = None
            label = self.method.name if len(stages) == 1 else f"{self.method.name}/{stage.name}"
            with _EpochBar(self.progress and self.processes.is_main, label) as bar:
                for epoch in range(state.epoch, epochs):
                    row = self._epoch(stage, epoch, epochs, state, optimizer, scaler, bar)
                    scheduler.step()
                    improved = best is None or (
                        np.isfinite(row["val_score"]) and row["val_score"] > state.best_score + 1e-6
                    )
                    if improved:
                        state.best_epoch, state.best_score = epoch, float(row["val_score"])
                        best = {k: v.detach().clone() for k, v in self.method.state_dict().items()}
                        state.stale = 0
                    else:
                        state.stale += 1
                    state.log_rows.append(row)
                    state.epoch, state.global_epoch = epoch + 1, state.global_epoch + 1
                    bar.finish_epoch(row["loss_total"], row["val_score"])
                    if state.stale >= self.tcfg.patience or epoch + 1 == epochs:
                        break
                    self._checkpoint(state_path, state, optimizer, scheduler, scaler, best)
            self.method.load_state_dict(best)
            state.stage_results.append(
                {
                    "stage": stage.name,
                    "select": stage.select,
                    "best_epoch": state.best_epoch,
                    "val_score": state.best_score,
                    "epochs_run": state.epoch,
                }
            )
            log.info(
                "%s/%s: best epoch %d (val %s AUC %.3f)",
                self.method.name,
                stage.name,
                state.best_epoch,
                stage.select,
                state.best_score,
            )
            state.stage, state.epoch = index + 1, 0
            state.best_epoch, state.best_score, state.stale = -1, -math.inf, 0
            self._checkpoint(state_path, state, None, None, None, None)
        self.state = state

    def _checkpoint(self, path, state, optimizer, scheduler, scaler, best) -> None:
        if self.processes.is_main:
            _save_state(path, state, self.method, optimizer, scheduler, scaler, best)
        barrier(self.processes)

    def _scaler(self):
        if self.precision == torch.float16 and self.device.type == "cuda":
            return torch.amp.GradScaler("cuda")
        return None

    def _epoch(self, stage, epoch, epochs, state, optimizer, scaler, bar) -> dict:
        started = time.perf_counter()
        terms, bags = self._train_epoch(epoch, epochs, state.global_epoch, optimizer, scaler, bar)
        train_seconds = time.perf_counter() - started
        average_buffers(self.method, self.processes)
        aucs = self._validate(stage.select)
        score = selection_score(stage.select, *aucs)
        return {
            "stage": stage.name,
            "epoch": epoch,
            "lr": optimizer.param_groups[0]["lr"],
            **{f"loss_{k}": v for k, v in terms.items()},
            "val_auc_present": aucs[0],
            "val_auc_absent": aucs[1],
            "val_auc_with_clinical": aucs[2],
            "val_score": score,
            "bags": bags,
            "train_seconds": train_seconds,
            "seconds": time.perf_counter() - started,
        }

    def _train_epoch(self, epoch, epochs, global_epoch, optimizer, scaler, bar):
        """One epoch of steps; returns the loss terms averaged over bags and the bag count."""
        train = self.parts["train"]
        dataset = train.dataset
        n_tiles = [dataset.tiles.n_tiles(i) for i in range(len(dataset))]
        plan = training_bags(
            n_tiles,
            train.ids,
            seed=self.tcfg.seed,
            epoch=global_epoch,
            bag_size=self.e2e.bag_size,
            limit=self.e2e.train_bags_per_patient,
            augment=augments(self.e2e),
        )
        steps = _steps(plan, self.tcfg.batch_size, self.e2e.micro_batch, self.processes)
        train.loader.batch_sampler.set_plan([m for step in steps for _, _, m in step])
        batches = iter(train.loader)
        self.method.train()
        params = [p for p in self.method.parameters() if p.requires_grad]
        sums: dict[str, float] = {}
        seen = 0
        bar.start_epoch(epoch, epochs, len(steps))
        for step_index, step in enumerate(steps):
            for index, n_passes, _ in step:
                batch = to_batch(next(batches), self.device)
                torch.manual_seed(micro_seed(self.tcfg.seed, global_epoch, step_index, index))
                with autocast(self.device, self.precision):
                    output = self.method(batch)
                    terms = self.method.loss(batch, output)
                total = terms["total"]
                if not torch.isfinite(total):
                    values = {k: float(v) for k, v in terms.items()}
                    raise TrainingDivergedError(
                        f"{self.method.name}/{self.method.stage}, epoch {epoch}: loss is not "
                        f"finite {values}; lower training.lr"
                    )
                scaled = total.float() / n_passes
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
                n = len(batch)
                seen += n
                for name, value in terms.items():
                    sums[name] = sums.get(name, 0.0) + float(value.detach()) * n
            sum_gradients(params, self.processes)
            if scaler is not None:
                scaler.unscale_(optimizer)
            if self.tcfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, self.tcfg.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bar.advance(sums.get("total", 0.0) / max(seen, 1))
        totals = gather((sums, seen), self.processes)
        seen_all = sum(s for _, s in totals) or 1
        names = totals[0][0].keys()
        return {k: sum(t[0].get(k, 0.0) for t in totals) / seen_all for k in names}, len(plan)

    def _validate(self, select: str) -> tuple[float, float, float]:
        passes = {"present": (GIVEN,), "absent": (WITHHELD,)}.get(select, (GIVEN, WITHHELD))
        part = self.parts["val"]
        probabilities = self._patient_probabilities(part, passes)
        labels = part.dataset.labels.numpy()
        with_clinical = part.dataset.clinical_present.numpy()
        present = absent = with_clin = float("nan")
        if GIVEN in probabilities:
            present = auc_or_nan(labels, probabilities[GIVEN])
            with_clin = auc_or_nan(labels[with_clinical], probabilities[GIVEN][with_clinical])
        if WITHHELD in probabilities:
            absent = auc_or_nan(labels, probabilities[WITHHELD])
        return present, absent, with_clin

    def _patient_probabilities(self, part: _Split, passes) -> dict[str, np.ndarray]:
        """Each patient's probability per pass, over every process's share of the patients."""
        specs = part.bags(self.e2e, self.tcfg.seed, self.processes)
        result = run_bags(
            self.method,
            part.loader,
            specs,
            self.device,
            eval_batch=self.e2e.eval_batch,
            precision=self.precision,
            passes=passes,
        )
        mine = {
            name: reduce_bags(specs, values, len(part.ids), self.e2e.reduction)
            for name, values in result.probabilities.items()
        }
        shares = gather(mine, self.processes)
        owner = np.arange(len(part.ids)) % self.processes.world  # who predicted each patient
        columns = np.arange(len(part.ids))
        return {name: np.stack([s[name] for s in shares])[owner, columns] for name in passes}

    # --- the files -----------------------------------------------------------------------------

    def finish(self, method_dir: Path, started: float) -> None:
        predictions = self._predict_all()
        if self.processes.is_main:
            e2e_meta = end_to_end_meta(self.config, self.spec, self.parts)
            meta = {
                "fold": self.fold,
                "selection": self.state.stage_results,
                "training": self.tcfg.model_dump(mode="json"),
                "features": {
                    "encoder": self.spec.encoder,
                    "dim": self.spec.dim,
                    "identity": {"encoder": self.spec.encoder, **e2e_meta["tiles"]},
                },
                "end_to_end": e2e_meta,
                "patients": self.split_ids,
                "train_seconds": round(time.perf_counter() - started, 2),
            }
            save_checkpoint(method_dir, self.method, self.encoder, meta)
            write_csv(method_dir / TRAIN_LOG, pd.DataFrame(self.state.log_rows))
            from bidistill.training.train import _refuse_non_finite

            _refuse_non_finite(predictions, self.method_cfg.key, method_dir / PREDICTIONS)
            write_csv(method_dir / PREDICTIONS, predictions)  # last: marks the method as done
            (method_dir / STATE).unlink(missing_ok=True)
            seconds = time.perf_counter() - started
            log.info("%s: trained end to end in %.1f s", self.method.name, seconds)
        barrier(self.processes)
        for part in self.parts.values():
            part.dataset.close()

    def _predict_all(self) -> pd.DataFrame:
        frames = []
        for split, part in self.parts.items():
            probabilities = self._patient_probabilities(part, (GIVEN, WITHHELD))
            frames.append(
                pd.DataFrame(
                    {
                        "patient_id": part.ids,
                        "split": split,
                        "fold": self.fold,
                        "label": part.dataset.labels.numpy(),
                        "clinical_available": part.dataset.clinical_present.numpy(),
                        "prob_present": probabilities[GIVEN],
                        "prob_absent": probabilities[WITHHELD],
                    }
                )
            )
        return pd.concat(frames, ignore_index=True)

    def _say(self, message: str) -> None:
        log.info("%s", message)
        if self.progress and self.processes.is_main:
            from rich.console import Console

            Console(stderr=True).print(message, highlight=False, soft_wrap=True)


def _steps(plan: list[BagSpec], batch_size: int, micro_batch: int, processes: Processes):
    """The epoch's steps; per step this process's forward passes as (index in the step, passes
    in the step, bags). Pass j of a step goes to process j mod N."""
    steps = []
    for start in range(0, len(plan), batch_size):
        bags = plan[start : start + batch_size]
        passes = [bags[i : i + micro_batch] for i in range(0, len(bags), micro_batch)]
        steps.append(
            [
                (j, len(passes), micro)
                for j, micro in enumerate(passes)
                if j % processes.world == processes.rank
            ]
        )
    return steps


def end_to_end_meta(config: ExperimentConfig, spec: BackboneSpec, parts) -> dict[str, Any]:
    """``model.json``'s ``end_to_end`` block: what prediction needs to rebuild and feed the
    method (the backbone, the bags, the tiles' geometry)."""
    e2e = config.training.end_to_end
    slides = [s for part in parts.values() for s in part.dataset.tiles.slides]
    tile_mpp = next((s.tile_mpp for s in slides if s.tile_mpp is not None), None)
    return {
        "backbone": spec.to_dict(),
        "bag_size": e2e.bag_size,
        "bags_per_patient": e2e.bags_per_patient,
        "reduction": e2e.reduction,
        "eval_batch": e2e.eval_batch,
        "precision": e2e.precision,
        "seed": config.training.seed,
        "tiles": {
            "patch_size": next((s.patch_size for s in slides), config.tiling.patch_size),
            "mpp": tile_mpp,
        },
    }


class _EpochBar:
    """A rich progress bar over one epoch's steps, with the running loss and the val score."""

    def __init__(self, enabled: bool, label: str):
        self.enabled, self.label, self.score = enabled, label, float("nan")

    def __enter__(self) -> _EpochBar:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("steps  {task.fields[status]}"),
            )
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=1, status="")
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.stop()

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        if self.enabled:
            self.bar.reset(
                self.task, total=steps, description=f"{self.label} epoch {epoch + 1}/{epochs}"
            )

    def advance(self, loss: float) -> None:
        if self.enabled:
            self.bar.update(self.task, advance=1, status=self._status(loss))

    def finish_epoch(self, loss: float, score: float) -> None:
        self.score = score
        if self.enabled:
            self.bar.update(self.task, status=self._status(loss))

    def _status(self, loss: float) -> str:
        return f"loss {loss:.4f}  val AUC {self.score:.3f}"


def augments(e2e: EndToEndConfig) -> bool:
    a = e2e.augment
    return bool(a.flip or a.rotate or a.brightness or a.contrast or a.saturation or a.hue)
