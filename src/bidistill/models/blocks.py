"""Small building blocks shared by the methods: the clinical encoder and the fusion head."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def mlp(in_dim: int, hidden_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    """Linear → ReLU → Dropout → Linear."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden_dim, out_dim),
    )


class ClinicalMLP(nn.Module):
    """Clinical encoder: an MLP over the encoded clinical vector and its missing indicators.

    The input is the ``ClinicalEncoder`` layout (values, then one indicator per feature, 1 =
    missing), so per-feature missingness is an explicit input: a blank grade is imputed with the
    training mean *and* flagged, and the network learns what a flag means.

    Args:
        clinical_dim: C, the width of the encoded clinical vector (values + indicators).
        hidden_dim: width of the hidden layer and of the clinical embedding e.
    """

    def __init__(self, clinical_dim: int, hidden_dim: int = 64, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(clinical_dim, hidden_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
        )
        self.out_dim = hidden_dim

    def forward(self, clinical: Tensor) -> Tensor:
        """[B, C] → e [B, hidden_dim]."""
        return self.net(clinical)


class FusionHead(nn.Module):
    """Classifier over the concatenated embeddings: [h, e] → logits [B, 2]."""

    def __init__(self, in_dim: int, hidden_dim: int = 64, dropout: float = 0.25):
        super().__init__()
        self.net = mlp(in_dim, hidden_dim, 2, dropout)

    def forward(self, *embeddings: Tensor) -> Tensor:
        return self.net(torch.cat(embeddings, dim=-1))
