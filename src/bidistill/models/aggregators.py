"""MIL aggregators: a padded bag of instance features in, one bag embedding and weights out.

Every aggregator takes ``bags`` [B, N, D] with ``tile_valid`` [B, N] (True = real instance) and
returns an ``Aggregate``: the embedding [B, H] and per-instance weights [B, N] that are zero on
padding (shares that sum to 1; ``additive``: signed contributions that sum to its embedding).
Padding never changes the result. A bag with no valid instance (it cannot come from our
data loader, but a caller may build one) gets a zero embedding and zero weights instead of NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

AggregatorName = Literal[
    "abmil-mean",
    "abmil",
    "abmil-sum",
    "abmil-count",
    "abmil-count-mean",
    "additive",
    "mean",
    "mean-count",
    "transmil",
]
# The gated-attention aggregators: each name's flags of ``GatedAttentionMIL`` (one place per name).
GATED_ATTENTION: dict[str, dict[str, Any]] = {
    "abmil": {},
    "abmil-mean": {"with_mean": True},
    "abmil-sum": {"gate": "sigmoid"},
    "abmil-count": {"with_count": True},
    "abmil-count-mean": {"with_mean": True, "with_count": True},
    "additive": {"gate": "additive"},
}
# ``abmil-sum`` and ``additive`` divide their sums over the instances by this: a bag of 10 fully
# gated instances pools to about one instance (bags hold 10 to 100,000; no bag-size normalising).
SUM_SCALE = 10.0


@dataclass
class Aggregate:
    embedding: Tensor  # [B, H]
    attention: Tensor  # [B, N]: shares summing to 1 (additive: contributions summing to z)


def masked_softmax(scores: Tensor, valid: Tensor) -> Tensor:
    """Softmax over the last axis restricted to ``valid``; an all-invalid row gives zeros."""
    scores = scores.masked_fill(~valid, float("-inf"))
    # A row of -inf would softmax to NaN: give it a finite score, then zero it.
    empty = ~valid.any(dim=-1, keepdim=True)
    weights = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1)
    return weights * valid


class _Projection(nn.Sequential):
    """Instance features D → H: the first and most expensive layers of every aggregator,
    ``layers`` times Linear → ReLU → Dropout (the first D → H, the others H → H)."""

    def __init__(self, in_dim: int, hidden_dim: int, dropout: float, layers: int = 1):
        modules: list[nn.Module] = []
        for i in range(layers):
            width = in_dim if i == 0 else hidden_dim
            modules += [nn.Linear(width, hidden_dim), nn.ReLU(), nn.Dropout(dropout)]
        super().__init__(*modules)


class GatedAttentionMIL(nn.Module):
    """Gated attention MIL pooling (Ilse, Tomczak & Welling, ICML 2018).

    With h_k = ReLU(W_p x_k) the projected instances,

        a_k = softmax_k( w^T [ tanh(V h_k) ⊙ sigmoid(U h_k) ] ),    z = Σ_k a_k h_k.

    ``with_mean`` (the ``abmil-mean`` aggregator) appends the plain mean of the projected
    instances, z = [Σ_k a_k h_k, mean_k h_k]: attention finds the telling instances but
    normalises away how many there are, while the mean keeps the shares of instance kinds (how
    much of the tissue is tumour, a faint shift of every instance). On the accuracy suite
    (benchmarks/accuracy) it narrowed a WSI-only model's gap to the Bayes limit where the slide
    signal is diffuse (slides-see-all: 0.069 to 0.051, two seeds) and changed little elsewhere.
    It is not the default because the attention half is then free to look anywhere: on the demo
    cohort the WSI-only branch's top-attention tiles were planted key instances less often than
    chance, so its heatmaps would mislead (tests/inference/test_heatmap.py).

    ``gate="sigmoid"`` (the ``abmil-sum`` aggregator) does not normalise: each instance's gate
    is sigmoid(score_k) in (0, 1) and z = Σ_k sigmoid(score_k) h_k / ``SUM_SCALE``, so the
    embedding grows with the number of telling instances, which a softmax normalises away (it
    says "there are key instances", not "how many"). The weights returned are the gates'
    shares, g_k / Σ_j g_j, so that they sum to 1 as every aggregator's do; a heatmap ranks the
    tiles as the gates do.

    ``with_count`` (the ``abmil-count`` aggregator) keeps the softmax pooling and appends one
    number, log(1 + Σ_k sigmoid(score_k)): how many instances the same attention logits find
    telling, on a log scale that stays small for bags of 100,000 instances.

    ``with_count`` and ``with_mean`` together (the ``abmil-count-mean`` aggregator) give
    [Σ_k a_k h_k, mean_k h_k, log(1 + Σ_k sigmoid(score_k))]: the attention and its count read
    the telling instances and how many there are, the mean a faint change of every cell (a trait
    that shifts one tissue's cells a little, which no attention singles out).

    ``gate="additive"`` (the ``additive`` aggregator; Javed et al., "Additive MIL", NeurIPS
    2022, with sigmoid gates in place of the softmax so that it also sees how many) gives each
    instance one number of evidence, e_k = v^T h_k + b, and sums the gated evidence into the
    slide's evidence, z = Σ_k c_k with c_k = sigmoid(score_k) e_k / ``SUM_SCALE`` (a
    one-number embedding). The weights returned are the contributions c_k themselves, signed:
    a tile's heatmap value is exactly what it adds to z, which the method's head reads (with
    the clinical embedding, where it fuses).
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 128,
        attention_dim: int = 64,
        dropout=0.25,
        *,
        with_mean: bool = False,
        with_count: bool = False,
        gate: Literal["softmax", "sigmoid", "additive"] = "softmax",
        instance_layers: int = 1,
    ):
        super().__init__()
        self.gate, self.with_count = gate, with_count
        self.project = _Projection(in_dim, hidden_dim, dropout, instance_layers)
        self.attention_v = nn.Linear(hidden_dim, attention_dim)
        self.attention_u = nn.Linear(hidden_dim, attention_dim)
        self.attention_w = nn.Linear(attention_dim, 1)
        self.with_mean = with_mean
        self.out_dim = (2 * hidden_dim if with_mean else hidden_dim) + int(with_count)
        if gate == "additive":
            self.evidence = nn.Linear(hidden_dim, 1)
            self.out_dim = 1

    def forward(self, bags: Tensor, tile_valid: Tensor) -> Aggregate:
        h = self.project(bags)  # [B, N, H]
        gate = torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))
        scores = self.attention_w(gate).squeeze(-1)  # [B, N]
        if self.gate != "softmax" or self.with_count:
            gates = torch.sigmoid(scores) * tile_valid
        if self.gate == "additive":
            weights = gates * self.evidence(h).squeeze(-1) / SUM_SCALE
            embedding = weights.sum(dim=1, keepdim=True)
        elif self.gate == "sigmoid":
            embedding = torch.einsum("bn,bnh->bh", gates, h) / SUM_SCALE
            weights = gates / gates.sum(dim=1, keepdim=True).clamp_min(torch.finfo(h.dtype).tiny)
        else:
            weights = masked_softmax(scores, tile_valid)
            embedding = torch.einsum("bn,bnh->bh", weights, h)
        if self.with_mean:
            valid = tile_valid.to(h.dtype)
            mean = valid / valid.sum(dim=1, keepdim=True).clamp_min(1.0)
            embedding = torch.cat([embedding, torch.einsum("bn,bnh->bh", mean, h)], dim=-1)
        if self.with_count:
            count = gates.sum(dim=1, keepdim=True)
            embedding = torch.cat([embedding, torch.log1p(count)], dim=-1)
        return Aggregate(embedding, weights)


class MeanPoolMIL(nn.Module):
    """Mean of the projected instances: the simplest baseline aggregator.

    ``with_count`` (the ``mean-count`` aggregator) appends log(1 + n), n the bag's valid
    instances: z = [mean_k h_k, log(1 + n)]. The mean gives the shares of the instance kinds,
    the count how far to trust them: the same share of key instances says more in a bag of 3,000
    than in one of 30, which a posterior weighs and a mean alone cannot (a Deep Sets read of the
    bag, Zaheer et al. 2017: the head is the nonlinear function of the pooled sums). Every tile
    weighs the same in the pooling, so its attention map is flat: draw its heatmaps with
    ``--score leave-one-out``.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 128,
        dropout: float = 0.25,
        instance_layers: int = 1,
        *,
        with_count: bool = False,
    ):
        super().__init__()
        self.project = _Projection(in_dim, hidden_dim, dropout, instance_layers)
        self.with_count = with_count
        self.out_dim = hidden_dim + int(with_count)

    def forward(self, bags: Tensor, tile_valid: Tensor) -> Aggregate:
        h = self.project(bags)
        valid = tile_valid.to(h.dtype)
        count = valid.sum(dim=1, keepdim=True)
        weights = valid / count.clamp_min(1.0)
        embedding = torch.einsum("bn,bnh->bh", weights, h)
        if self.with_count:
            embedding = torch.cat([embedding, torch.log1p(count)], dim=-1)
        return Aggregate(embedding, weights)


class TransMIL(nn.Module):
    """A TransMIL-style aggregator (Shao et al., NeurIPS 2021): a class token and self-attention.

    Two differences from the published model, both deliberate: exact multi-head attention
    replaces the Nyström approximation (bags that fit in memory need no approximation), and the
    PPEG convolution is left out because it needs instances laid out on a square grid, which a
    patient's pooled, subsampled bag is not. The returned weights are the class token's attention
    over the instances in the last layer, averaged over heads.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 128,
        heads: int = 4,
        layers: int = 2,
        dropout=0.25,
        instance_layers: int = 1,
    ):
        super().__init__()
        self.project = _Projection(in_dim, hidden_dim, dropout, instance_layers)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        nn.init.normal_(self.cls_token, std=0.02)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden_dim) for _ in range(layers))
        self.attentions = nn.ModuleList(
            nn.MultiheadAttention(hidden_dim, heads, dropout=0.1, batch_first=True)
            for _ in range(layers)
        )
        self.feedforwards = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(hidden_dim),
                nn.Linear(hidden_dim, 2 * hidden_dim),
                nn.GELU(),
                nn.Linear(2 * hidden_dim, hidden_dim),
            )
            for _ in range(layers)
        )
        self.final_norm = nn.LayerNorm(hidden_dim)
        self.out_dim = hidden_dim

    def forward(self, bags: Tensor, tile_valid: Tensor) -> Aggregate:
        h = self.project(bags)
        x = torch.cat([self.cls_token.expand(len(h), -1, -1), h], dim=1)  # [B, 1+N, H]
        # The class token is always valid, so no row of the attention is fully masked.
        always = torch.ones_like(tile_valid[:, :1])
        ignore = ~torch.cat([always, tile_valid], dim=1)  # PyTorch: True = ignore
        weights = None
        for norm, attention, feedforward in zip(self.norms, self.attentions, self.feedforwards):
            y = norm(x)
            attended, weights = attention(y, y, y, key_padding_mask=ignore, need_weights=True)
            x = x + attended
            x = x + feedforward(x)
        cls_weights = weights[:, 0, 1:] * tile_valid  # [B, N], heads averaged by PyTorch
        # The class token also attends to itself: renormalise over the instances.
        cls_weights = cls_weights / cls_weights.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return Aggregate(self.final_norm(x[:, 0]), cls_weights)


def make_aggregator(
    name: AggregatorName, in_dim: int, hidden_dim: int, dropout: float, instance_layers: int = 1
) -> nn.Module:
    """An aggregator by name: ``abmil-mean`` (gated attention and the mean, concatenated),
    ``abmil`` (gated attention), ``abmil-sum`` (gated instances summed, not normalised),
    ``abmil-count`` (gated attention and the log of the gates' sum), ``abmil-count-mean`` (the
    three concatenated), ``additive`` (each instance's gated evidence summed into one number),
    ``mean``, ``mean-count`` (the mean and the log of the bag's size) or ``transmil``; each
    embeds the instances with ``instance_layers`` Linear → ReLU → Dropout layers first."""
    if name in GATED_ATTENTION:
        return GatedAttentionMIL(
            in_dim,
            hidden_dim,
            attention_dim=max(hidden_dim // 2, 8),
            dropout=dropout,
            instance_layers=instance_layers,
            **GATED_ATTENTION[name],
        )
    if name in ("mean", "mean-count"):
        return MeanPoolMIL(
            in_dim, hidden_dim, dropout, instance_layers, with_count=name == "mean-count"
        )
    if name == "transmil":
        heads = 4 if hidden_dim % 4 == 0 else 1
        return TransMIL(
            in_dim, hidden_dim, heads=heads, dropout=dropout, instance_layers=instance_layers
        )
    *others, last = get_args(AggregatorName)
    raise ValueError(f"unknown aggregator {name!r}; choose {', '.join(others)} or {last}")
