"""The steps of end-to-end training: optimiser and schedule, which process runs which forward
pass and the per-pass seed.

Optimisers: AdamW, or SGD with momentum as the BCNB authors' code (lr 1e-4, momentum 0.3,
weight decay 1e-3; github.com/bupt-ai-cz/BALNMP, ``code/train.py``), over two parameter groups
(the patch encoders, ``end_to_end.backbone_lr``, and everything else). Schedulers, stepped per
epoch: cosine decay over the stage, cosine annealing with warm restarts (their T_0 = 20,
T_mult = 2) or constant.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bidistill.config import EndToEndConfig, TrainingConfig
from bidistill.models.patch_encoder import patch_encoder_parameters
from bidistill.training.distributed import Processes
from bidistill.training.pixel_bags import BagSpec


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


def augments(e2e: EndToEndConfig) -> bool:
    a = e2e.augment
    return bool(a.flip or a.rotate or a.brightness or a.contrast or a.saturation or a.hue)


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
