"""Where a WSI-only model loses to the Bayes limit: the pooling, the instance model or training.

Trains small WSI-only MIL models on one suite cohort (``bidistill.synthetic.suite``) with plain
torch, outside the product, so that one part at a time can be swapped: the pooling (gated
attention with the log count, ``abmil-count``; attention, mean and count, ``abmil-count-mean``;
the mean and log(n), ``mean-count``), the instance features (``feat=oracle``: each instance's
exact log-likelihood ratios key : tissue and marked : tissue from the cohort's own generator,
in place of its features: a perfect instance model) and the training (lr, epochs, dropout).
The head is the product's: Linear -> ReLU -> Dropout -> Linear on the pooled embedding. Test AUC
at the best validation epoch against the cohort's exact WSI-only limit (``bayes_absent``).

A variant is POOLING[+KEY=VALUE...], e.g. ``mean-count+lr=1e-3+feat=oracle``; keys: lr
(default 2e-4), epochs (40), patience (10), drop (0.25), layers (1), H (128), bs (16), wd (1e-2),
feat (``oracle``).

Usage:
    python benchmarks/accuracy/pooling_diagnostic.py sparse-partial \
        abmil-count,mean-count,mean-count+lr=1e-3,abmil-count+feat=oracle --seeds 3
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch
from scipy.special import logsumexp
from sklearn.metrics import roc_auc_score
from torch import nn

from bidistill.synthetic.latent import _DIFFUSE_AXES, DrawnCohort, draw_latent_cohort
from bidistill.synthetic.suite import SUITE

POOLINGS = ("abmil-count", "abmil-count-mean", "mean-count")


def oracle_features(cohort: DrawnCohort, bag: np.ndarray) -> np.ndarray:
    """[n, 2] each instance's exact log p(x | key) - log p(x | tissue) and marked : tissue."""
    world = cohort.world
    x = world.from_features(bag)[:, _DIFFUSE_AXES:]

    def log_density(centres: np.ndarray) -> np.ndarray:
        d2 = ((x[:, None] - centres[None, :, _DIFFUSE_AXES:]) ** 2).sum(-1)
        return logsumexp(-d2 / 2, axis=1) - np.log(len(centres))

    tissue = log_density(world.background)
    key = log_density(world.key[None])
    marked = log_density(world.background + world.marker)
    return np.stack([key - tissue, marked - tissue], 1).astype(np.float32)


class Model(nn.Module):
    def __init__(self, pooling: str, dim: int, hidden: int, layers: int, dropout: float):
        super().__init__()
        stack: list[nn.Module] = []
        for i in range(layers):
            stack += [nn.Linear(dim if i == 0 else hidden, hidden), nn.ReLU(), nn.Dropout(dropout)]
        self.project = nn.Sequential(*stack)
        self.v, self.u, self.w = nn.Linear(hidden, 64), nn.Linear(hidden, 64), nn.Linear(64, 1)
        self.pooling = pooling
        width = {"abmil-count": hidden + 1, "abmil-count-mean": 2 * hidden + 1}
        self.head = nn.Sequential(
            nn.Linear(width.get(pooling, hidden + 1), 64),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(64, 1),
        )

    def forward(self, bags: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        h = self.project(bags)
        weights = valid.float()
        n = weights.sum(1, keepdim=True)
        mean = (h * weights[..., None]).sum(1) / n
        if self.pooling == "mean-count":
            return self.head(torch.cat([mean, torch.log1p(n)], -1)).squeeze(-1)
        scores = self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h))).squeeze(-1)
        attention = torch.softmax(scores.masked_fill(~valid, -torch.inf), 1)
        parts = [torch.einsum("bn,bnh->bh", attention, h)]
        if self.pooling == "abmil-count-mean":
            parts.append(mean)
        parts.append(torch.log1p((torch.sigmoid(scores) * weights).sum(1, keepdim=True)))
        return self.head(torch.cat(parts, -1)).squeeze(-1)


def padded(bags: list[np.ndarray], labels: np.ndarray):
    n = max(len(b) for b in bags)
    x = np.zeros((len(bags), n, bags[0].shape[1]), np.float32)
    valid = np.zeros((len(bags), n), bool)
    for i, bag in enumerate(bags):
        x[i, : len(bag)], valid[i, : len(bag)] = bag, True
    return torch.tensor(x), torch.tensor(valid), torch.tensor(labels, dtype=torch.float32)


def train_and_test(cohort: DrawnCohort, variant: str, seed: int) -> tuple[float, int]:
    """Test AUC at the best validation epoch, and that epoch."""
    pooling, *pairs = variant.split("+")
    if pooling not in POOLINGS:
        raise SystemExit(f"{variant}: pooling one of {', '.join(POOLINGS)}")
    o = dict(pair.split("=") for pair in pairs)
    bags = cohort.bags
    if o.get("feat") == "oracle":
        bags = [oracle_features(cohort, bag) for bag in bags]
    splits = np.array(cohort.splits)
    data = {}
    for split in ("train", "val", "test"):
        index = np.flatnonzero(splits == split)
        data[split] = padded([bags[i] for i in index], cohort.patients.label[index])
    torch.manual_seed(seed)
    dropout, epochs, batch = (
        float(o.get("drop", 0.25)),
        int(o.get("epochs", 40)),
        int(o.get("bs", 16)),
    )
    model = Model(
        pooling, data["train"][0].shape[-1], int(o.get("H", 128)), int(o.get("layers", 1)), dropout
    )
    lr = float(o.get("lr", 2e-4))
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=float(o.get("wd", 1e-2)))
    x, valid, y = data["train"]
    steps = epochs * -(-len(y) // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, lr, total_steps=steps, pct_start=0.05)
    shuffle = torch.Generator().manual_seed(seed)
    best, best_state, best_epoch, waited = -1.0, None, 0, 0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(y), generator=shuffle)
        for start in range(0, len(order), batch):
            b = order[start : start + batch]
            loss = nn.functional.binary_cross_entropy_with_logits(model(x[b], valid[b]), y[b])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
        model.eval()
        with torch.no_grad():
            auc = roc_auc_score(data["val"][2], model(*data["val"][:2]))
        if auc > best:
            best, best_epoch, waited = auc, epoch, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            waited += 1
            if waited >= int(o.get("patience", 10)):
                break
    model.load_state_dict(best_state)
    model.eval()
    with torch.no_grad():
        return float(roc_auc_score(data["test"][2], model(*data["test"][:2]))), best_epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cohort", choices=sorted(SUITE))
    parser.add_argument("variants", help="Comma-separated POOLING[+KEY=VALUE...].")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="Patients x this (smoke tests).")
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = SUITE[args.cohort]
    if args.scale != 1:
        scaled = (
            max(int(spec.patients * args.scale), 40),
            max(int(spec.test_patients * args.scale), 40),
        )
        spec = replace(spec, patients=scaled[0], test_patients=scaled[1])
    cohort = draw_latent_cohort(spec, seed=0)  # at scale 1, the suite's cohort
    test = [i for i, s in enumerate(cohort.splits) if s == "test"]
    exact = cohort.posterior_frame(test)
    limit = roc_auc_score(exact["label"], exact["bayes_absent"])
    print(f"{args.cohort}: WSI-only limit {limit:.4f}\n")
    print("| variant | gap to the limit | test AUC per seed | best epoch per seed | seconds |")
    print("|---|---|---|---|---|")
    for variant in args.variants.split(","):
        started = time.perf_counter()
        results = [train_and_test(cohort, variant, seed) for seed in range(args.seeds)]
        aucs = np.array([auc for auc, _ in results])
        print(
            f"| {variant} | {limit - aucs.mean():.4f} | {' / '.join(f'{a:.3f}' for a in aucs)} | "
            f"{' / '.join(str(e) for _, e in results)} | {time.perf_counter() - started:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
