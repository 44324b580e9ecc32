"""Feature mode's bag source: bags of feature rows from the cohort's ``.h5`` files."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from bidistill.cohort import ClinicalEncoder, Cohort
from bidistill.config import ExperimentConfig, TrainingConfig
from bidistill.features.hygiene import available_memory_bytes
from bidistill.features.identity import config_identity
from bidistill.features.store import FeatureStore
from bidistill.models import Method
from bidistill.models.streaming import (
    DEFAULT_MEMORY_BUDGET,
    ArrayBag,
    BagTooLargeError,
    chunk_rows,
    encode_bag,
    predict_encoded,
)
from bidistill.training.bag_source import Pass, Patients, Schedule, warmup_cosine
from bidistill.training.data import (
    PatientBags,
    StoreBags,
    bag_loader,
    withhold_clinical,
)
from bidistill.training.threads import cpu_threads_for


def open_feature_store(
    config: ExperimentConfig, cohort: Cohort, *, progress: bool = False
) -> FeatureStore:
    """The cohort's feature files, in RAM when ``training.in_memory`` allows."""
    return FeatureStore(
        config.features.dir,
        cohort.slides["slide_id"].tolist(),
        in_memory=config.training.in_memory,
        progress=progress,
    )


class FeatureSource:
    """Bags of feature rows per split (``parts``: split → (patient ids, their
    ``PatientBags``); ``features``: ``model.json``'s ``features`` block)."""

    patch_encoder = None
    precision = torch.float32
    resumable = False

    def __init__(
        self,
        parts: dict[str, tuple[list[str], PatientBags]],
        cfg: TrainingConfig,
        dim: int,
        features: dict[str, Any] | None = None,
    ):
        self.parts = parts
        self.cfg = cfg
        self.in_dim = dim
        self.features = features or {}
        self.patients = {
            name: Patients(list(ids), bags.labels.numpy(), bags.clinical_present.numpy())
            for name, (ids, bags) in parts.items()
        }

    def start(self, method: Method, device: torch.device) -> None:
        self.device = device
        for ids, bags in self.parts.values():  # a bag too large to predict fails now
            _check_predictable(method, ids, bags.bags.lengths(), self.in_dim)
        cfg = self.cfg
        self.loaders = {
            name: bag_loader(
                self.parts[name][1],
                cfg.batch_size,
                shuffle=name == "train",
                workers=cfg.num_workers,
                seed=cfg.seed,
            )
            for name in ("train", "val")
        }

    def cpu_threads(self, method: Method, device: torch.device):
        lengths = self.parts["train"][1].lengths()
        return cpu_threads_for(method, device, batch_size=self.cfg.batch_size, bag_lengths=lengths)

    def schedule(self, method: Method, epochs: int, steps: int) -> Schedule:
        params = [p for p in method.parameters() if p.requires_grad]
        cfg = self.cfg
        # foreach: one fused update for all parameters (torch's CPU default loops over them).
        optimizer = torch.optim.AdamW(
            params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True
        )
        scheduler = warmup_cosine(optimizer, cfg.lr_warmup_epochs * steps, epochs * steps)
        return Schedule(optimizer, scheduler, per_step=True, warmup_epochs=cfg.lr_warmup_epochs)

    def steps_per_epoch(self) -> int:
        return len(self.loaders["train"])

    def train_steps(self, drawn: int) -> Iterator[Iterator[Pass]]:
        loader = self.loaders["train"]
        loader.dataset.set_epoch(drawn)  # so that epochs and stages draw different subsets
        for batch in loader:
            yield iter([Pass(batch.to(self.device))])

    def probabilities(
        self, method: Method, split: str, *, final: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        if not final:
            return predict_loader(method, self.loaders[split], self.device)
        # Whole bags for every split (the training subsets are an augmentation), each through
        # the bounded-memory predictor of ``predict``, encoded once for both clinical passes.
        bags = self.parts[split][1]
        was_training = method.training
        method.eval()
        n = len(bags)
        shape = (n, *method.score_shape)
        present, absent = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        budget = training_budget()  # read the free memory once, not once per patient
        for i in range(n):
            bag = ArrayBag(bags.bags(i))
            encoded = encode_bag(method, bag, memory_budget=budget, device=self.device)
            given = (bags.clinical[i], bags.clinical_valid[i], bool(bags.clinical_present[i]))
            withheld = (method.blank_clinical, torch.zeros_like(bags.clinical_valid[i]), False)
            present[i] = predict_encoded(method, encoded, bag.dim, *given).probability
            absent[i] = predict_encoded(method, encoded, bag.dim, *withheld).probability
        method.train(was_training)
        return present, absent

    def meta(self) -> dict[str, Any]:
        return {"features": self.features}

    def fingerprint(self) -> str:
        return ""

    def close(self) -> None:
        pass


@torch.no_grad()
def predict_loader(
    method: Method, loader: DataLoader, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """(P(label = 1) with clinical data as given, withheld) per patient, in dataset order, in
    ``eval()`` mode (the previous mode restored)."""
    was_training = method.training
    method.eval()
    shape = (len(loader.dataset), *method.score_shape)
    present, absent = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    # The sampler batches bags by size; its batches give each prediction's place.
    for indices, batch in zip(loader.batch_sampler, loader):
        batch = batch.to(device)
        present[indices] = method(batch).probabilities.float().cpu().numpy()
        blank = withhold_clinical(batch, method.blank_clinical)
        absent[indices] = method(blank).probabilities.float().cpu().numpy()
    method.train(was_training)
    return present, absent


# Training has no --memory-budget: its predictions table may use most of the free memory, where
# predict's default budget is sized for any laptop. A bag that is one chunk under both budgets
# (any bag of up to millions of instances) is predicted bit for bit as `predict` does.
TRAINING_MEMORY_SHARE = 0.6
TRAINING_REMEDY = (
    f"free memory (training predicts within {TRAINING_MEMORY_SHARE:.0%} of what is free) or tile "
    "the slides coarser"
)


def training_budget() -> int:
    """Bytes for what grows with a bag in the predictions table."""
    return max(DEFAULT_MEMORY_BUDGET, int(TRAINING_MEMORY_SHARE * available_memory_bytes()))


def _check_predictable(method: Method, ids: list[str], lengths: list[int], dim: int) -> None:
    """Refuse, before training, a bag that the predictions table could not predict."""
    if not lengths:
        return
    largest = int(np.argmax(lengths))
    try:
        chunk_rows(method, lengths[largest], dim, training_budget(), TRAINING_REMEDY)
    except BagTooLargeError as err:
        raise BagTooLargeError(f"patient '{ids[largest]}': {err}") from None


def _patient_bags(
    cfg: TrainingConfig,
    cohort: Cohort,
    ids: list[str],
    encoder: ClinicalEncoder,
    store: FeatureStore,
    slides: dict[str, list[str]],
    split: str,
) -> PatientBags:
    rows = cohort.subset(ids)
    encoded = encoder.transform(rows[cohort.feature_names])
    bags = StoreBags(store, [slides.get(p, []) for p in ids])
    train = split == "train"
    return PatientBags(
        bags,
        encoded.values,
        encoded.valid,
        encoded.present,
        rows["label"].to_numpy(np.int64),
        max_instances=cfg.max_instances if train else None,
        instance_dropout=cfg.instance_dropout if train else 0.0,
        seed=cfg.seed,
    )


def slides_by_patient(cohort: Cohort) -> dict[str, list[str]]:
    # One groupby over the whole table (not a filter per patient): rows of a patient need not
    # be adjacent, and 1000 filters would cost seconds.
    return {str(p): list(s) for p, s in cohort.slides.groupby("patient_id")["slide_id"]}


def open_feature_source(
    config: ExperimentConfig,
    cohort: Cohort,
    split_ids: dict[str, list[str]],
    encoder: ClinicalEncoder,
    *,
    store: FeatureStore | None,
    progress: bool,
) -> FeatureSource:
    """The feature rows of each split's patients (the store's files, opened unless given)."""
    store = store or open_feature_store(config, cohort, progress=progress)
    slides = slides_by_patient(cohort)
    parts = {
        name: (ids, _patient_bags(config.training, cohort, ids, encoder, store, slides, name))
        for name, ids in split_ids.items()
    }
    features = {
        "dir": str(config.features.dir),
        "encoder": config.features.encoder,
        "dim": store.dim,
        # What made the features (a later prediction refuses features of another kind).
        "identity": store.identity.filled_from(config_identity(config)).to_dict(),
    }
    return FeatureSource(parts, config.training, store.dim, features)
