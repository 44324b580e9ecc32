"""Bags of instance features per patient, and their collation into padded ``Batch``es.

Feature files are read through ``bidistill.features.FeatureStore``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader

from bidistill.errors import FeatureFileError
from bidistill.features.hygiene import check_values
from bidistill.features.store import FeatureStore
from bidistill.models.batch import Batch
from bidistill.training.seeding import seed_worker

log = logging.getLogger(__name__)


class StoreBags:
    """Bag i = the concatenated features of patient i's slides (a patient is one bag)."""

    def __init__(self, store: FeatureStore, slides_per_patient: Sequence[Sequence[str]]):
        self.store = store
        self.slides_per_patient = [list(s) for s in slides_per_patient]

    def __len__(self) -> int:
        return len(self.slides_per_patient)

    def lengths(self) -> list[int]:
        """Instances per bag, read from the file headers (no features loaded)."""
        return [sum(self.store.lengths[s] for s in slides) for slides in self.slides_per_patient]

    def __call__(self, i: int) -> np.ndarray:
        parts = [self.store.get(s) for s in self.slides_per_patient[i]]
        if not parts:
            return np.zeros((0, self.store.dim), dtype=np.float32)
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


class ArrayBags:
    """Bags given as arrays (prediction on features already in memory)."""

    def __init__(self, bags: Sequence[np.ndarray]):
        self.bags = list(bags)

    def __len__(self) -> int:
        return len(self.bags)

    def lengths(self) -> list[int]:
        return [len(b) for b in self.bags]

    def __call__(self, i: int) -> np.ndarray:
        return self.bags[i]


class PatientBags(torch.utils.data.Dataset):
    """One item per patient: its bag (``bags(i)``: features [n_i, D]), encoded clinical data
    and label. In training ``instance_dropout`` drops that share of a bag's instances (at least
    one is kept) and ``max_instances`` caps it (also a memory bound); the subset depends only on
    (seed, epoch, patient), never on the worker that draws it, so runs repeat exactly."""

    def __init__(
        self,
        bags: StoreBags | ArrayBags,
        clinical: np.ndarray,
        clinical_valid: np.ndarray,
        clinical_present: np.ndarray,
        labels: np.ndarray | None = None,
        *,
        max_instances: int | None = None,
        instance_dropout: float = 0.0,
        seed: int = 0,
    ):
        self.bags = bags
        rows = clinical_tensors(clinical, clinical_valid, clinical_present, labels)
        self.clinical, self.clinical_valid, self.clinical_present, self.labels = rows
        self.max_instances = max_instances
        self.instance_dropout = instance_dropout
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def lengths(self) -> list[int]:
        """Instances per item as ``__getitem__`` returns it (after the training subset)."""
        return [self._kept(n) for n in self.bags.lengths()]

    def _kept(self, n: int) -> int:
        kept = max(int(round(n * (1 - self.instance_dropout))), min(n, 1))
        return min(kept, self.max_instances or kept)

    def __len__(self) -> int:
        return len(self.clinical)

    def __getitem__(self, i: int) -> dict:
        features = torch.from_numpy(np.asarray(self.bags(i)))
        n = len(features)
        kept = self._kept(n)
        if kept < n:
            generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, i)) % 2**62)
            keep = torch.randperm(n, generator=generator)[:kept].sort().values
            features = features[keep]
        return {
            "features": features,
            "clinical": self.clinical[i],
            "clinical_valid": self.clinical_valid[i],
            "clinical_present": self.clinical_present[i],
            "label": None if self.labels is None else self.labels[i],
        }


class LengthBucketSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of bags of similar size, so that little compute goes into padding: shuffled
    patients cut into pools of ``pool_batches`` batches, sorted by length within a pool, the
    batches shuffled; unshuffled, all patients sorted by length (iterate the sampler beside the
    loader to know which patients each batch holds)."""

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        shuffle: bool,
        generator: torch.Generator | None = None,
        pool_batches: int = 8,
    ):
        self.lengths = torch.as_tensor(list(lengths))
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        self.pool = batch_size * pool_batches

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self):
        n = len(self.lengths)
        if not self.shuffle:
            order = torch.argsort(self.lengths, stable=True)
            yield from (
                order[i : i + self.batch_size].tolist() for i in range(0, n, self.batch_size)
            )
            return
        order = torch.randperm(n, generator=self.generator)
        batches = []
        for start in range(0, n, self.pool):
            pool = order[start : start + self.pool]
            pool = pool[torch.argsort(self.lengths[pool], stable=True)]
            batches += [
                pool[i : i + self.batch_size].tolist() for i in range(0, len(pool), self.batch_size)
            ]
        for b in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[b]


def clinical_tensors(clinical, clinical_valid, clinical_present, labels) -> tuple:
    """Per-patient clinical rows [n, C], validity [n, F], presence and labels as tensors."""
    return (
        torch.as_tensor(np.array(clinical, dtype=np.float32)),
        torch.as_tensor(np.array(clinical_valid, dtype=bool)),
        torch.as_tensor(np.array(clinical_present, dtype=bool)),
        None if labels is None else torch.as_tensor(np.array(labels, np.int64)),
    )


def collate_bags(items: list[dict], key: str = "features", dtype=torch.float32) -> Batch:
    """Pad the bags (``item[key]``) to the largest one in the batch as ``dtype`` (float16 files
    are computed in float32; tiles stay uint8); ``tile_valid`` marks the real instances."""
    bags, tile_valid = pad_bags([item[key] for item in items], dtype)
    labels = None if items[0]["label"] is None else torch.stack([i["label"] for i in items])
    return Batch(bags, tile_valid, *stack_clinical(items), labels=labels)


def pad_bags(bags: list[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Bags [n_i, ...] padded into [B, N_max, ...] of ``dtype``, and ``tile_valid`` [B, N_max]."""
    lengths = [len(bag) for bag in bags]
    n_max = max(max(lengths), 1)  # an empty bag still gets one (invalid) slot
    padded = torch.zeros(len(bags), n_max, *bags[0].shape[1:], dtype=dtype)
    tile_valid = torch.zeros(len(bags), n_max, dtype=torch.bool)
    for b, (bag, n) in enumerate(zip(bags, lengths)):
        padded[b, :n] = bag
        tile_valid[b, :n] = True
    return padded, tile_valid


def stack_clinical(items: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch's clinical rows, their validity and presence."""
    keys = ("clinical", "clinical_valid", "clinical_present")
    return tuple(torch.stack([item[key] for item in items]) for key in keys)


def withhold_clinical(batch: Batch, blank_clinical: torch.Tensor) -> Batch:
    """The batch as if no patient had clinical data (``blank_clinical`` [C]: the fitted
    encoder's output for an all-blank row)."""
    return Batch(
        bags=batch.bags,
        tile_valid=batch.tile_valid,
        clinical=blank_clinical.to(batch.clinical).expand_as(batch.clinical).clone(),
        clinical_valid=torch.zeros_like(batch.clinical_valid),
        clinical_present=torch.zeros_like(batch.clinical_present),
        labels=batch.labels,
    )


def bag_loader(dataset: PatientBags, batch_size: int, *, shuffle: bool, workers: int, seed: int):
    """Batches of ``dataset`` grouped by bag size (``LengthBucketSampler``), seeded."""
    generator = torch.Generator().manual_seed(seed)
    sampler = LengthBucketSampler(
        dataset.lengths(), batch_size, shuffle=shuffle, generator=generator
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_bags,
        num_workers=workers,
        worker_init_fn=seed_worker if workers else None,
        generator=generator,
    )


class FileBag:
    """A patient's bag: its slides' ``.h5`` feature files, in order, read a chunk at a time
    (CLAM's older ``[1, n, D]`` layout included); only the headers are read here."""

    def __init__(self, paths: Sequence[str | Path]):
        self.paths = [Path(p) for p in paths]
        self.lengths: list[int] = []
        dims, dtypes = set(), []
        for path in self.paths:
            shape, dtype = _features_shape(path)
            self.lengths.append(shape[-2])
            dims.add(shape[-1])
            dtypes.append(dtype)
        if len(dims) > 1:
            raise FeatureFileError(
                f"{', '.join(map(str, self.paths))}: the slides' feature files have different "
                f"dimensions {sorted(dims)}; extract every slide with the same encoder"
            )
        self.dim = dims.pop() if dims else 0
        self.dtype = np.result_type(*dtypes) if dtypes else np.dtype(np.float32)
        self.n_instances = sum(self.lengths)

    def chunks(self, rows: int) -> Iterator[np.ndarray]:
        """Blocks of ``rows`` rows across the files' boundaries (as ``ArrayBag``'s, so that a
        prediction does not depend on how a patient's tiles are split into slides), read into
        one buffer that every block reuses: a block is valid until the next one is asked for."""
        buffer = np.empty((max(1, min(rows, self.n_instances)), self.dim), dtype=self.dtype)
        filled = 0
        for path in self.paths:
            with h5py.File(path, "r") as h5:
                dataset = h5["features"]
                n, start = dataset.shape[-2], 0
                while start < n:
                    stop = min(n, start + len(buffer) - filled)
                    block = buffer[filled : filled + stop - start]
                    where = np.s_[0, start:stop] if dataset.ndim == 3 else np.s_[start:stop]
                    dataset.read_direct(block, source_sel=where)
                    # NaN would pass the aggregators and surface as a NaN probability.
                    check_values(path, block, first_row=start)
                    filled += stop - start
                    start = stop
                    if filled == len(buffer):
                        yield buffer
                        filled = 0
        if filled:
            yield buffer[:filled]


def _features_shape(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    if not path.is_file():
        raise FeatureFileError(f"{path}: feature file not found")
    try:
        with h5py.File(path, "r") as h5:
            shape, dtype = tuple(h5["features"].shape), h5["features"].dtype
    except (OSError, KeyError) as err:
        raise FeatureFileError(f"{path}: not a readable feature file ({err})") from err
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[0] != 1):
        raise FeatureFileError(f"{path}: 'features' must be [n, D], got {shape}")
    return shape, dtype
