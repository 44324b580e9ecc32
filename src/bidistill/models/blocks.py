"""Building blocks shared by the methods: the clinical encoder, the fusion head, and the two
models that several methods combine (a WSI classifier and a WSI + clinical fusion model).

The blocks are built from dimensions and modules, never from a whole method. The WSI models take
their aggregator as a module: anything that maps a bag ``[B, N, D]`` with ``tile_valid`` to an
``Aggregate`` (with an ``out_dim``) fits, e.g. a trainable patch encoder in front of an
aggregator.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bidistill.models.aggregators import Aggregate
from bidistill.models.batch import Batch, Output


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


class BagReader(nn.Sequential):
    """``n_layers`` Linear → ReLU layers on the pooled bag embedding, ``bag_dim`` → ``width``
    (none: the identity; ``out_dim`` says the width it gives). A head reads one direction of
    whatever it is given; a layer between the pooling and the head lets it read a posterior
    that is not one direction of the pooled embedding (several classes, a clinical subtype that
    changes how much the slides matter)."""

    def __init__(self, bag_dim: int, width: int, n_layers: int):
        layers: list[nn.Module] = []
        for i in range(n_layers):
            layers += [nn.Linear(bag_dim if i == 0 else width, width), nn.ReLU()]
        super().__init__(*layers)
        self.out_dim = width if n_layers else bag_dim


class FusionHead(nn.Module):
    """Classifier over a bag embedding and a clinical embedding: (h, e) → logits [B, K].

    ``bag_layers``: Linear → ReLU layers on h first (``BagReader``, to ``bag_width``).
    ``silent``: the clinical columns start with zero weights, so that the untrained head reads
    the slides alone and the clinical data enters only as far as training finds it useful. With
    random weights the clinical embedding adds noise to every logit from the first step, which
    a small cohort never trains away (the slides demo at 60 training patients: a fusion model's
    validation AUC 0.70 with the clinical data, 0.89 with it blanked).
    """

    def __init__(
        self,
        bag_dim: int,
        clinical_dim: int,
        hidden_dim: int = 64,
        dropout: float = 0.25,
        *,
        silent: bool = False,
        n_classes: int = 2,
        bag_layers: int = 0,
        bag_width: int = 128,
    ):
        super().__init__()
        self.read_bag = BagReader(bag_dim, bag_width, bag_layers)
        width = self.read_bag.out_dim
        self.net = mlp(width + clinical_dim, hidden_dim, n_classes, dropout)
        self.clinical_dim = clinical_dim
        if silent:
            with torch.no_grad():
                self.net[0].weight[:, width:] = 0.0

    def forward(self, h: Tensor, e: Tensor) -> Tensor:
        return self.net(torch.cat([self.read_bag(h), e], dim=-1))

    def read_slides(self, h: Tensor) -> Tensor:
        """Logits from the bag embedding with the clinical embedding at zero."""
        return self(h, h.new_zeros(len(h), self.clinical_dim))


class WSIClassifier(nn.Module):
    """Aggregator → MLP head: the attention-MIL model of the BCNB paper (WSI only), with
    ``bag_layers`` between them (``BagReader``)."""

    def __init__(
        self,
        aggregator: nn.Module,
        head_hidden: int,
        dropout: float,
        *,
        n_classes: int = 2,
        bag_layers: int = 0,
        bag_width: int = 128,
    ):
        super().__init__()
        self.aggregator = aggregator
        self.read_bag = BagReader(aggregator.out_dim, bag_width, bag_layers)
        self.head = mlp(self.read_bag.out_dim, head_hidden, n_classes, dropout)

    def forward(self, batch: Batch) -> Output:
        agg = self.aggregator(batch.bags, batch.tile_valid)
        logits = self.head(self.read_bag(agg.embedding))
        return Output(logits, agg.attention, {"h": agg.embedding})


class FusionModel(nn.Module):
    """Aggregator → h; clinical MLP → e; head([h, e]) → logits.

    Methods that treat the clinical embedding in their own way (a learned missing token, an
    imputed embedding) call the three steps ``embed_bag``, ``embed_clinical`` and ``classify``.
    """

    def __init__(
        self,
        aggregator: nn.Module,
        clinical_dim: int,
        clinical_hidden: int,
        dropout,
        *,
        silent: bool = False,
        n_classes: int = 2,
        bag_layers: int = 0,
        bag_width: int = 128,
    ):
        super().__init__()
        self.aggregator = aggregator
        self.clinical = ClinicalMLP(clinical_dim, clinical_hidden, dropout)
        self.head = FusionHead(
            aggregator.out_dim,
            clinical_hidden,
            clinical_hidden,
            dropout,
            silent=silent,
            n_classes=n_classes,
            bag_layers=bag_layers,
            bag_width=bag_width,
        )

    @property
    def bag_dim(self) -> int:
        return self.aggregator.out_dim

    def embed_bag(self, batch: Batch) -> Aggregate:
        return self.aggregator(batch.bags, batch.tile_valid)

    def embed_clinical(self, clinical: Tensor) -> Tensor:
        """[B, C] → e [B, clinical_hidden]."""
        return self.clinical(clinical)

    def classify(self, h: Tensor, e: Tensor) -> Tensor:
        """[h, e] → logits [B, K]."""
        return self.head(h, e)

    def read_slides(self, batch: Batch) -> Output:
        """The prediction with the clinical embedding at zero: the slides read alone."""
        agg = self.embed_bag(batch)
        return Output(self.head.read_slides(agg.embedding), agg.attention, {"h": agg.embedding})

    def forward(self, batch: Batch, clinical: Tensor) -> Output:
        agg = self.embed_bag(batch)
        e = self.embed_clinical(clinical)
        return Output(self.classify(agg.embedding, e), agg.attention, {"h": agg.embedding, "e": e})
