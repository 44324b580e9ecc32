"""Model selection in the training loop, with a method whose predictions are scripted per epoch."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from bidistill.config import TrainingConfig
from bidistill.models import Batch, Method, MethodDims, MethodOptions, Output
from bidistill.training.data import ArrayBags, PatientBags, bag_loader
from bidistill.training.loop import fit


class ScriptedMethod(Method):
    """Scores each patient from its bag [label, noise] by a rule that depends on the epoch.

    Epoch 0: patients with clinical data ranked perfectly, the others inverted (like kd's
    teacher stage, where the untrained student scores the patients without clinical data).
    Epoch 1: patients with clinical data ranked worse, the others perfectly.
    """

    selection = "present"

    def __init__(self):
        dims = MethodDims(in_dim=2, clinical_dim=2, n_clinical_features=1, feature_slices=((0, 1),))
        super().__init__(dims, MethodOptions())
        self.weight = nn.Parameter(torch.zeros(()))
        self.epochs_trained = 0

    def forward(self, batch: Batch) -> Output:
        if self.training:
            self.epochs_trained += 1  # one batch per epoch
        label, noise = batch.bags[:, 0, 0], batch.bags[:, 0, 1]
        if self.epochs_trained == 1:
            with_clinical, without = label, 1 - label
        else:
            with_clinical, without = label + 1.5 * noise, label
        score = torch.where(batch.clinical_present, with_clinical, without)
        logits = torch.stack([torch.zeros_like(score), score - 0.5], dim=1)
        return Output(logits + 0 * self.weight, None, {})

    def loss(self, batch: Batch, output: Output) -> dict[str, Tensor]:
        total = self.weight**2 + 0 * output.logits.sum()
        return {"total": total}


def test_present_stage_is_selected_on_the_patients_with_clinical_data():
    n = 40
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 2
    bags = [np.array([[y, rng.random()]], np.float32) for y in labels]
    present = np.arange(n) < n // 2
    clinical = np.stack([np.zeros(n), (~present).astype(float)], axis=1)
    dataset = PatientBags(ArrayBags(bags), clinical, present[:, None], present, labels)
    loader = bag_loader(dataset, 64, shuffle=False, workers=0, seed=0)
    cfg = TrainingConfig(epochs=2, patience=5, lr_warmup_epochs=0, grad_clip=None)

    method = ScriptedMethod()
    result = fit(method, loader, loader, labels, cfg, device=torch.device("cpu"), progress=False)

    rows = result.log_rows
    # Over every patient, epoch 1 looks better; over those with clinical data, epoch 0 is.
    assert rows[1]["val_auc_present"] > rows[0]["val_auc_present"]
    assert rows[0]["val_score"] == 1.0 > rows[1]["val_score"]
    assert [p.best_epoch for p in result.stages[0].parts] == [1]  # epochs count from 1
    assert [row["epoch"] for row in rows] == [1, 2]
