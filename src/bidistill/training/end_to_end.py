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
was made with the same settings, patients and starting weights (``training.training_state``).
Optimisers and schedules: ``training.steps``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from bidistill._io import write_csv
from bidistill.cohort import ClinicalEncoder, Cohort, Splits, check_separating_features
from bidistill.config import EndToEndConfig, ExperimentConfig, MethodConfig
from bidistill.models import create_method
from bidistill.models.base import Stage
from bidistill.models.patch_encoder import encoded_aggregators
from bidistill.training.backbone import BackboneSpec, load_backbone, patch_encoder_factory
from bidistill.training.checkpoint import PREDICTIONS, save_checkpoint
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
from bidistill.training.progress import EpochBar
from bidistill.training.seeding import seed_everything
from bidistill.training.steps import (
    augments,
    make_optimizer,
    make_scheduler,
    micro_seed,
    plan_steps,
    selection_score,
)
from bidistill.training.training_state import (
    STATE,
    TrainingState,
    fingerprint,
    load_state,
    remove_state,
    save_state,
    tiles_digest,
)

log = logging.getLogger(__name__)

TRAIN_LOG = "train_log.csv"


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
        self.fingerprint = fingerprint(config, method_cfg, cohort, self.split_ids, self.spec)
        self.fingerprint += tiles_digest(
            s for p in self.parts.values() for s in p.dataset.tiles.slides
        )

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
        payload = load_state(state_path, self.fingerprint, self.device)
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
            shown = self.progress and self.processes.is_main
            parts = [part.name for part in stage.parts] or None
            with EpochBar(shown, label, parts=parts) as bar:
                for epoch in range(state.epoch, epochs):
                    row = self._epoch(stage, epoch, epochs, state, optimizer, scaler, bar)
                    scheduler.step()
                    best = self._select(stage, epoch, row, state, best)
                    state.log_rows.append(row)
                    state.epoch, state.global_epoch = epoch + 1, state.global_epoch + 1
                    bar.finish_epoch(row["loss_total"], _best_scores(label, state))
                    if state.stale >= self.tcfg.patience or epoch + 1 == epochs:
                        break
                    self._checkpoint(state_path, state, optimizer, scheduler, scaler, best)
            self.method.load_state_dict(best)
            state.stage_results.append(_stage_result(stage, state))
            for part in state.stage_results[-1]["parts"]:
                log.info(
                    "%s/%s: best epoch %d (val %s AUC %.3f)",
                    self.method.name,
                    part["part"],
                    part["best_epoch"],
                    part["select"],
                    part["val_score"],
                )
            state.stage, state.epoch = index + 1, 0
            state.best_epoch, state.best_score, state.stale = -1, -math.inf, 0
            state.parts = {}
            self._checkpoint(state_path, state, None, None, None, None)
        self.state = state

    def _select(self, stage: Stage, epoch: int, row: dict, state: TrainingState, best):
        """Keep the best weights so far: the whole method's on the stage's score, or each part's
        on its own (BD's branches: each its own best epoch, as the feature trainer does);
        ``state.stale`` counts the epochs since the last part improved."""
        if not stage.parts:
            score = row["val_score"]
            if best is None or (np.isfinite(score) and score > state.best_score + 1e-6):
                state.best_epoch, state.best_score, state.stale = epoch, float(score), 0
                return _copy(self.method.state_dict())
            state.stale += 1
            return best
        current = self.method.state_dict()
        for part in stage.parts:
            track = state.parts.setdefault(
                part.name, {"best_epoch": -1, "best_score": -math.inf, "stale": 0}
            )
            score = row[f"val_score_{part.name}"]
            if (
                best is None
                or track["best_epoch"] < 0
                or (np.isfinite(score) and score > track["best_score"] + 1e-6)
            ):
                track.update(best_epoch=epoch, best_score=float(score), stale=0)
                keys = [k for k in current if any(_within(k, m) for m in part.modules)]
                best = {**(best or _copy(current)), **_copy({k: current[k] for k in keys})}
            else:
                track["stale"] += 1
        state.stale = min(track["stale"] for track in state.parts.values())
        return best

    def _checkpoint(self, path, state, optimizer, scheduler, scaler, best) -> None:
        if self.processes.is_main:
            save_state(path, state, self.method, optimizer, scheduler, scaler, best)
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
        aucs = self._validate("routed" if stage.parts else stage.select)
        score = selection_score(stage.select, *aucs)
        parts = {f"val_score_{p.name}": selection_score(p.select, *aucs) for p in stage.parts}
        return {
            "stage": stage.name,
            "epoch": epoch + 1,  # counted from 1, as in the feature trainer's log
            "lr": optimizer.param_groups[0]["lr"],
            **{f"loss_{k}": v for k, v in terms.items()},
            "val_auc_present": aucs[0],
            "val_auc_absent": aucs[1],
            "val_auc_with_clinical": aucs[2],
            "val_score": score,
            **parts,
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
        steps = plan_steps(plan, self.tcfg.batch_size, self.e2e.micro_batch, self.processes)
        train.loader.batch_sampler.set_plan([m for step in steps for _, _, m in step])
        batches = iter(train.loader)
        self.method.train()
        params = [p for p in self.method.parameters() if p.requires_grad]
        sums: dict[str, float] = {}
        seen = 0
        bar.start_epoch(epoch + 1, epochs, len(steps))
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
            remove_state(method_dir)
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


def _copy(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items()}


def _within(key: str, module: str) -> bool:
    return key == module or key.startswith(module + ".")


def _stage_result(stage: Stage, state: TrainingState) -> dict:
    """The ``model.json`` ``selection`` entry of a stage, in the feature trainer's form
    (epochs counted from 1)."""
    if stage.parts:
        parts = [
            {
                "part": p.name,
                "select": p.select,
                "best_epoch": state.parts[p.name]["best_epoch"] + 1,
                "val_score": state.parts[p.name]["best_score"],
            }
            for p in stage.parts
        ]
    else:
        parts = [
            {
                "part": stage.name,
                "select": stage.select,
                "best_epoch": state.best_epoch + 1,
                "val_score": state.best_score,
            }
        ]
    return {"stage": stage.name, "select": stage.select, "epochs_run": state.epoch, "parts": parts}


def _best_scores(label: str, state: TrainingState) -> dict[str, float]:
    """Each selected part's best validation score so far (the whole method's when no parts)."""
    if state.parts:
        return {name: track["best_score"] for name, track in state.parts.items()}
    return {label: state.best_score}
