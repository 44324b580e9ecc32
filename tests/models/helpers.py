"""Random batches with odd sizes, so that a swapped axis fails loudly."""

from __future__ import annotations

import torch

from bidistill.models import Batch, create_method

IN_DIM = 37
FEATURE_SLICES = [(0, 1), (1, 2), (2, 5), (5, 6)]  # numeric, binary, 3-level one-hot, ordinal
N_FEATURES = len(FEATURE_SLICES)
CLINICAL_DIM = 6 + N_FEATURES


def make_batch(b: int = 5, n: int = 11, *, seed: int = 0, present=None) -> Batch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, n + 1, (b,), generator=g)
    lengths[0] = n
    tile_valid = torch.arange(n)[None] < lengths[:, None]
    bags = torch.randn(b, n, IN_DIM, generator=g) * tile_valid[..., None]
    clinical_valid = torch.rand(b, N_FEATURES, generator=g) > 0.2
    if present is None:
        present = torch.tensor([i % 3 != 1 for i in range(b)])
    clinical_valid &= present[:, None]
    values = torch.randn(b, 6, generator=g)
    clinical = torch.cat([values, (~clinical_valid).float()], dim=1)
    labels = torch.tensor([i % 2 for i in range(b)])
    return Batch(bags, tile_valid, clinical, clinical_valid, present, labels)


def build(name: str, **options):
    torch.manual_seed(0)
    return create_method(
        name,
        in_dim=IN_DIM,
        clinical_dim=CLINICAL_DIM,
        n_clinical_features=N_FEATURES,
        feature_slices=FEATURE_SLICES,
        **options,
    )


def pad_more(batch: Batch, extra: int) -> Batch:
    """The same batch with ``extra`` more padded slots holding garbage (not zeros)."""
    b, n, d = batch.bags.shape
    garbage = torch.full((b, extra, d), 123.0)
    return Batch(
        torch.cat([batch.bags, garbage], dim=1),
        torch.cat([batch.tile_valid, torch.zeros(b, extra, dtype=torch.bool)], dim=1),
        batch.clinical,
        batch.clinical_valid,
        batch.clinical_present,
        batch.labels,
    )
