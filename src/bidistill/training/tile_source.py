"""End-to-end mode's bag source: bags of tiles through a trainable patch encoder (the BCNB and BD
papers' protocol: an ImageNet backbone fine-tuned on bags of random patches, the patient's score
the mean of its bags' probabilities); loop, selection and run folder are the feature trainer's.

Each forward pass re-seeds torch from (seed, epoch, step, pass), so dropout, like the bags and
their augmentation, depends on the seed alone: one process and N processes give the same
weights up to floating point, and a resumed run the weights of an uninterrupted one. SGD's
defaults follow the BCNB authors' code (github.com/bupt-ai-cz/BALNMP, ``code/train.py``)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from bidistill.cohort import ClinicalEncoder, Cohort
from bidistill.config import ExperimentConfig
from bidistill.devices import resolve_precision
from bidistill.models import Method
from bidistill.models.patch_encoder import encoded_aggregators, patch_encoder_parameters
from bidistill.training.backbone import load_backbone, patch_encoder_factory
from bidistill.training.bag_source import Pass, Patients, Schedule
from bidistill.training.distributed import Processes, gather
from bidistill.training.feature_source import slides_by_patient
from bidistill.training.threads import cpu_threads_for
from bidistill.training.tile_bags import (
    BagSpec,
    TileBags,
    check_bag_settings,
    tile_index_from_config,
    tile_loader,
    training_bags,
)
from bidistill.training.tile_predict import GIVEN, WITHHELD, predict_patients


class TileSource:
    """Bags of tiles per split, read by loader workers (``training.tile_bags``)."""

    resumable = True

    def __init__(
        self,
        config: ExperimentConfig,
        cohort: Cohort,
        split_ids: dict[str, list[str]],
        encoder: ClinicalEncoder,
        processes: Processes,
        device: torch.device,
    ):
        self.config, self.cohort, self.split_ids = config, cohort, split_ids
        self.tcfg, self.e2e = config.training, config.training.end_to_end
        check_bag_settings(self.tcfg.batch_size, self.e2e.micro_batch)
        self.processes, self.device = processes, device
        self.precision = resolve_precision(self.e2e.precision, device)
        backbone, self.spec = load_backbone(config)
        self.in_dim = self.spec.dim
        self.patch_encoder = patch_encoder_factory(backbone, self.spec)
        self.rows = {name: cohort.subset(ids) for name, ids in split_ids.items()}
        self.encoded = {
            name: encoder.transform(rows[cohort.feature_names]) for name, rows in self.rows.items()
        }
        self.patients = {
            name: Patients(
                list(split_ids[name]),
                rows["label"].to_numpy(np.int64),
                np.asarray(self.encoded[name].present, dtype=bool),
            )
            for name, rows in self.rows.items()
        }

    def start(self, method: Method, device: torch.device) -> None:
        from bidistill.slides import slide_cache_dir

        if device.type in ("cuda", "cpu"):
            for module in encoded_aggregators(method).values():
                module.encoder.to(memory_format=torch.channels_last)
        reads_tiles = bool(encoded_aggregators(method))  # clinical-only methods read none
        slides_of = slides_by_patient(self.cohort)
        self.datasets, self.loaders = {}, {}
        for name, ids in self.split_ids.items():
            encoded = self.encoded[name]
            per_patient = [slides_of.get(p, []) if reads_tiles else [] for p in ids]
            dataset = TileBags(
                tile_index_from_config(self.config, per_patient),
                encoded.values,
                encoded.valid,
                encoded.present,
                self.patients[name].labels,
                augment=self.e2e.augment if name == "train" else None,
                cache_dir=slide_cache_dir(self.config),
            )
            self.datasets[name] = dataset
            self.loaders[name] = tile_loader(dataset, workers=self.tcfg.num_workers, device=device)

    def cpu_threads(self, method: Method, device: torch.device):
        """One torch thread for a tiny backbone on the CPU, all of them for real ones: the work
        of a step, as parameters x tiles x (input side / 32)^2."""
        side = int(self.spec.preprocess["size"])
        tiles = self.e2e.bag_size * max(1.0, (side / 32) ** 2)
        return cpu_threads_for(method, device, batch_size=self.e2e.micro_batch, bag_lengths=[tiles])

    def schedule(self, method: Method, epochs: int, steps: int) -> Schedule:
        """AdamW or SGD over two parameter groups (the patch encoders and everything else),
        the schedule stepped per epoch."""
        tcfg, e2e = self.tcfg, self.e2e
        in_encoders = patch_encoder_parameters(method)
        trainable = [p for p in method.parameters() if p.requires_grad]
        heads = [p for p in trainable if id(p) not in in_encoders]
        backbone = [p for p in trainable if id(p) in in_encoders]
        groups = [{"params": heads, "lr": tcfg.lr, "name": "heads"}]
        if backbone:
            groups.append(
                {"params": backbone, "lr": e2e.backbone_lr or tcfg.lr, "name": "backbone"}
            )
        if e2e.optimizer == "sgd":
            optimizer = torch.optim.SGD(
                groups, momentum=e2e.momentum, weight_decay=tcfg.weight_decay
            )
        else:
            optimizer = torch.optim.AdamW(groups, weight_decay=tcfg.weight_decay)
        lr = torch.optim.lr_scheduler
        if e2e.scheduler == "cosine-restarts":
            scheduler = lr.CosineAnnealingWarmRestarts(
                optimizer, T_0=e2e.restart_epochs, T_mult=e2e.restart_mult
            )
        elif e2e.scheduler == "cosine":
            scheduler = lr.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
        else:
            scheduler = lr.LambdaLR(optimizer, lambda _: 1.0)
        return Schedule(optimizer, scheduler, per_step=False)

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self._plan(0)) / self.tcfg.batch_size)

    def _plan(self, drawn: int) -> list[BagSpec]:
        dataset = self.datasets["train"]
        a = self.e2e.augment
        return training_bags(
            [dataset.tiles.n_tiles(i) for i in range(len(dataset))],
            self.split_ids["train"],
            seed=self.tcfg.seed,
            epoch=drawn,
            bag_size=self.e2e.bag_size,
            limit=self.e2e.train_bags_per_patient,
            augment=bool(a.flip or a.rotate or a.brightness or a.contrast or a.saturation or a.hue),
        )

    def train_steps(self, drawn: int) -> Iterator[Iterator[Pass]]:
        steps = plan_steps(
            self._plan(drawn), self.tcfg.batch_size, self.e2e.micro_batch, self.processes
        )
        loader = self.loaders["train"]
        loader.batch_sampler.set_plan([micro for step in steps for _, _, micro in step])
        batches = iter(loader)
        for index, step in enumerate(steps):
            yield self._passes(batches, step, drawn, index)

    def _passes(self, batches, step, drawn: int, index: int) -> Iterator[Pass]:
        for j, passes, _ in step:  # read one micro-batch at a time: a step may not fit at once
            seed = micro_seed(self.tcfg.seed, drawn, index, j)
            yield Pass(next(batches).to(self.device, non_blocking=True), seed, passes)

    def probabilities(
        self, method: Method, split: str, *, final: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each patient's bags' probabilities reduced (``end_to_end.reduction``), over every
        process's share of the patients (dealt round-robin)."""
        ids, world, rank = self.split_ids[split], self.processes.world, self.processes.rank
        result = predict_patients(
            method,
            self.loaders[split],
            [(item, pid) for item, pid in enumerate(ids) if item % world == rank],
            self.meta()["end_to_end"],
            self.device,
            passes=(GIVEN, WITHHELD),
        )
        shares = gather([result.probabilities[p] for p in (GIVEN, WITHHELD)], self.processes)
        given, withheld = (
            np.array([shares[i % world][k][i // world] for i in range(len(ids))]) for k in (0, 1)
        )
        return given, withheld

    def meta(self) -> dict[str, Any]:
        """``model.json``'s ``features`` and ``end_to_end`` blocks: what prediction needs to
        rebuild and feed the method (the backbone, the bags, the tiles' geometry)."""
        e2e = self.e2e
        slides = [s for dataset in self.datasets.values() for s in dataset.tiles.slides]
        tiles = {
            "patch_size": next((s.patch_size for s in slides), self.config.tiling.patch_size),
            "mpp": next((s.tile_mpp for s in slides if s.tile_mpp is not None), None),
        }
        return {
            "features": {
                "encoder": self.spec.encoder,
                "dim": self.spec.dim,
                "identity": {"encoder": self.spec.encoder, **tiles},
            },
            "end_to_end": {
                "backbone": self.spec.to_dict(),
                "bag_size": e2e.bag_size,
                "bags_per_patient": e2e.bags_per_patient,
                "reduction": e2e.reduction,
                "eval_batch": e2e.eval_batch,
                "precision": e2e.precision,
                "seed": self.tcfg.seed,
                "tiles": tiles,
            },
        }

    def fingerprint(self) -> str:
        """The starting weights and the tiles the bags are drawn from."""
        digest = hashlib.sha256(repr(sorted(self.spec.to_dict().items())).encode())
        for dataset in self.datasets.values():
            for slide in dataset.tiles.slides:
                digest.update(slide.slide_id.encode())
                digest.update(np.ascontiguousarray(slide.coords).tobytes())
        return digest.hexdigest()[:20]

    def close(self) -> None:
        for dataset in self.datasets.values():
            dataset.close()


def micro_seed(seed: int, epoch: int, step: int, index: int) -> int:
    """The torch seed of one forward pass: the same in any process that runs it."""
    key = np.random.SeedSequence([seed, epoch, step, index, 4]).generate_state(1, np.uint64)[0]
    return int(key % (2**63 - 1))


def plan_steps(plan: list[BagSpec], batch_size: int, micro_batch: int, processes: Processes):
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
