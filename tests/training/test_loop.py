"""Model selection in the training loop, with a method whose predictions are scripted per epoch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from bidistill.config import TrainingConfig
from bidistill.models import Batch, Method, MethodDims, MethodOptions, Output, create_method
from bidistill.models.base import Part, Stage
from bidistill.training.bag_source import Pass, Schedule
from bidistill.training.data import ArrayBags, PatientBags
from bidistill.training.feature_source import FeatureSource
from bidistill.training.loop import fit

CPU = torch.device("cpu")


class EndToEndSteps(FeatureSource):
    """Feature bags stepped as end-to-end mode steps them: each forward pass re-seeded, SGD with
    a per-epoch schedule, the state kept at every epoch boundary."""

    resumable = True

    def schedule(self, method, epochs, steps):
        params = [p for p in method.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=self.cfg.lr, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        return Schedule(optimizer, scheduler, per_step=False)

    def train_steps(self, drawn):
        for step, batch in enumerate(self.loaders["train"]):
            yield iter([Pass(batch.to(self.device), seed=1000 * drawn + step)])


def _fit(method, dataset, cfg, steps=FeatureSource, state_file=None):
    """``fit`` on one dataset for training and validation (the scripted scores need no other)."""
    ids = [f"P{i}" for i in range(len(dataset))]
    source = steps({"train": (ids, dataset), "val": (ids, dataset)}, cfg, dim=2)
    source.start(method, CPU)
    return fit(method, source, cfg, device=CPU, progress=False, state_file=state_file)


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
    cfg = TrainingConfig(epochs=2, patience=5, lr_warmup_epochs=0, grad_clip=None, batch_size=64)

    method = ScriptedMethod()
    result = _fit(method, dataset, cfg)

    rows = result.log_rows
    # Over every patient, epoch 1 looks better; over those with clinical data, epoch 0 is.
    assert rows[1]["val_auc_present"] > rows[0]["val_auc_present"]
    assert rows[0]["val_score"] == 1.0 > rows[1]["val_score"]
    assert [p.best_epoch for p in result.stages[0].parts] == [1]  # epochs count from 1
    assert [row["epoch"] for row in rows] == [1, 2]


class TwoBranches(Method):
    """Two branches that share nothing: ``a`` scores the patients with clinical data, ``b`` those
    without. Each branch counts its training epochs (one batch per epoch) in a buffer; its
    ranking improves with the count up to its peak and degrades after, so the best epoch of
    each branch is known."""

    def __init__(self, peak_a: int, peak_b: int):
        dims = MethodDims(in_dim=2, clinical_dim=2, n_clinical_features=1, feature_slices=((0, 1),))
        super().__init__(dims, MethodOptions())
        self.a, self.b = nn.Linear(1, 1), nn.Linear(1, 1)
        self.a.register_buffer("count", torch.zeros(()))
        self.b.register_buffer("count", torch.zeros(()))
        self.peaks = (peak_a, peak_b)
        self.a_trained_in_eval: list[bool] = []

    def stages(self):
        parts = (Part("a", "present", ("a",)), Part("b", "absent", ("b",)))
        return [Stage("main", "routed", parts=parts)]

    def forward(self, batch: Batch) -> Output:
        if self.training:
            with torch.no_grad():
                for branch in (self.a, self.b):
                    branch.count += 1.0 if branch.weight.requires_grad else 0.0
            self.a_trained_in_eval.append(not self.a.training)
        label, noise = batch.bags[:, 0, 0], batch.bags[:, 0, 1]

        def score(count, peak):
            count = int(count)
            weight = count if count <= peak else peak - 2 * (count - peak)
            return 0.1 * weight * label + noise

        present = batch.clinical_present
        s = torch.where(
            present, score(self.a.count, self.peaks[0]), score(self.b.count, self.peaks[1])
        )
        s = s + 0 * (self.a.weight.sum() + self.b.weight.sum())
        return Output(torch.stack([torch.zeros_like(s), s], dim=1), None, {})

    def loss(self, batch: Batch, output: Output) -> dict[str, Tensor]:
        total = output.logits.sum() * 0 + self.a.weight.sum() ** 2 + self.b.weight.sum() ** 2
        return {"total": total}


def _two_branch_data(n: int = 200):
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 2
    bags = [np.array([[y, rng.random()]], np.float32) for y in labels]
    present = np.arange(n) < n // 2
    clinical = np.stack([np.zeros(n), (~present).astype(float)], axis=1)
    return PatientBags(ArrayBags(bags), clinical, present[:, None], present, labels)


@pytest.mark.parametrize("steps", [FeatureSource, EndToEndSteps], ids=["features", "end-to-end"])
def test_each_part_keeps_its_own_best_epoch_and_a_finished_part_stops(steps, tmp_path):
    """One part selection for both modes: a branch that stops improving is frozen at its best
    while the other trains on (end-to-end mode's steps: micro-batches, a per-epoch schedule and
    a state file at every epoch boundary)."""
    cfg = TrainingConfig(epochs=12, patience=3, lr_warmup_epochs=0, grad_clip=None, batch_size=200)
    method = TwoBranches(peak_a=2, peak_b=6)
    state = tmp_path / "training_state.pt" if steps.resumable else None
    result = _fit(method, _two_branch_data(), cfg, steps, state_file=state)

    best = {p.part: p.best_epoch for p in result.stages[0].parts}
    assert best == {"a": 2, "b": 6}
    # Each branch holds its best epoch's weights and buffers: a its 2nd epoch, b its 6th.
    assert int(method.a.count) == 2 and int(method.b.count) == 6
    # a stalled after epoch 2: after 3 stale epochs it was frozen, in eval mode, while b
    # trained on until it too had been stale for 3 epochs.
    assert result.stages[0].epochs_run == 9
    assert method.a_trained_in_eval == [False] * 5 + [True] * 4
    scores = [(r["val_score_a"], r["val_score_b"]) for r in result.log_rows]
    assert (
        max(scores, key=lambda s: s[0]) == scores[1] and max(s[1] for s in scores) == scores[5][1]
    )
    assert method.a.weight.requires_grad  # trainable again after the stage


def test_parts_must_hold_every_trained_parameter():
    class Incomplete(TwoBranches):
        def stages(self):
            return [Stage("main", "routed", parts=(Part("a", "present", ("a",)),))]

    cfg = TrainingConfig(epochs=1, lr_warmup_epochs=0, batch_size=200)
    with pytest.raises(ValueError, match=r"parameters \['b.weight', 'b.bias'\] belong to no part"):
        _fit(Incomplete(1, 1), _two_branch_data(), cfg)


def test_a_resumed_run_restores_the_frozen_part_and_trains_only_the_remaining_epochs(tmp_path):
    cfg = TrainingConfig(epochs=12, patience=3, lr_warmup_epochs=0, grad_clip=None, batch_size=200)
    torch.manual_seed(0)
    whole = _fit(TwoBranches(peak_a=2, peak_b=6), _two_branch_data(), cfg, EndToEndSteps)

    class KilledInEpoch7(TwoBranches):
        def forward(self, batch):
            if self.training and int(self.b.count) == 6:
                raise KeyboardInterrupt  # after epoch 6's state was kept
            return super().forward(batch)

    state = tmp_path / "training_state.pt"
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        _fit(KilledInEpoch7(2, 6), _two_branch_data(), cfg, EndToEndSteps, state_file=state)
    resumed_method = TwoBranches(peak_a=2, peak_b=6)  # other initial weights: the state wins
    resumed = _fit(resumed_method, _two_branch_data(), cfg, EndToEndSteps, state_file=state)

    # Epochs 7 to 9 only, with branch a still frozen (in eval mode) at its best weights.
    assert resumed_method.a_trained_in_eval == [True] * 3
    assert int(resumed_method.a.count) == 2 and int(resumed_method.b.count) == 6
    assert resumed.stages[0].to_dict() == whole.stages[0].to_dict()
    drop = {"seconds"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed.log_rows] == [
        {k: v for k, v in r.items() if k not in drop} for r in whole.log_rows
    ]


def test_one_function_builds_the_predictions_table():
    from bidistill.training.train import predictions_table

    cfg = TrainingConfig(epochs=1, lr_warmup_epochs=0, batch_size=64)
    train, test = _two_branch_data(30), _two_branch_data(40)
    ids = {"train": [f"T{i}" for i in range(30)], "test": [f"P{i}" for i in range(40)]}
    source = FeatureSource({k: (ids[k], d) for k, d in [("train", train), ("test", test)]}, cfg, 2)
    source.device = CPU
    torch.manual_seed(0)
    # A real method: the table goes through the bounded-memory predictor, which reads a bag
    # only through the method's aggregators.
    method = create_method(
        "bd", in_dim=2, clinical_dim=2, n_clinical_features=1, feature_slices=((0, 1),)
    )
    table = predictions_table(method, source, fold=3)
    assert list(table.columns) == [
        "patient_id",
        "split",
        "fold",
        "label",
        "clinical_available",
        "prob_present",
        "prob_absent",
    ]
    assert table["split"].tolist() == ["train"] * 30 + ["test"] * 40
    assert table["patient_id"].tolist() == ids["train"] + ids["test"]
    assert (table["fold"] == 3).all()
    tested = table[table["split"] == "test"]
    given, withheld = source.probabilities(method, "test", final=True)
    assert np.array_equal(tested["prob_present"], given)
    assert np.array_equal(tested["prob_absent"], withheld)
    assert tested["label"].tolist() == test.labels.tolist()
    assert tested["clinical_available"].tolist() == test.clinical_present.tolist()


class CountingSource(FeatureSource):
    """Feature bags that record which draw each pass over the training patients was."""

    def train_steps(self, drawn):
        self.draws.append(drawn)
        for step in super().train_steps(drawn):
            self.steps += 1
            yield step


def _fit_counting(cfg: TrainingConfig):
    data = _two_branch_data(20)
    ids = [f"P{i}" for i in range(20)]
    source = CountingSource({"train": (ids, data), "val": (ids, data)}, cfg, dim=2)
    source.draws, source.steps = [], 0
    torch.manual_seed(0)
    method = create_method(
        "wsi-only", in_dim=2, clinical_dim=2, n_clinical_features=1, feature_slices=((0, 1),)
    )
    source.start(method, CPU)
    result = fit(method, source, cfg, device=CPU, progress=False)
    return method, source, result


def test_a_small_cohort_trains_at_least_min_steps_in_the_epochs_it_was_given():
    """20 patients at batch 8: 3 steps a pass, 12 in 4 epochs. With min_steps 30 each epoch is
    3 passes (36 steps): still 4 epochs logged and validated, every pass a new draw."""
    cfg = TrainingConfig(epochs=4, patience=10, batch_size=8, min_steps=30, lr_warmup_epochs=1)
    _, source, result = _fit_counting(cfg)
    assert source.draws == list(range(12)) and source.steps == 36
    assert [row["epoch"] for row in result.log_rows] == [1, 2, 3, 4]
    # The schedule spans the 36 steps: warm-up for epoch 1's 9 steps, then a cosine that after
    # epoch 2 (step 18) is at cos-factor 0.75, and ends at 0 after epoch 4.
    lrs = [row["lr"] for row in result.log_rows]
    assert lrs[0] == pytest.approx(cfg.lr) and lrs[1] == pytest.approx(0.75 * cfg.lr)
    assert lrs[3] == pytest.approx(0.0, abs=1e-12)


def test_min_steps_already_reached_changes_nothing():
    base = dict(epochs=4, patience=10, batch_size=8, lr_warmup_epochs=1)
    plain, _, plain_result = _fit_counting(TrainingConfig(**base))
    reached, source, reached_result = _fit_counting(TrainingConfig(**base, min_steps=12))
    assert source.draws == [0, 1, 2, 3] and source.steps == 12
    for a, b in zip(plain.state_dict().values(), reached.state_dict().values()):
        assert torch.equal(a, b)
    losses = [
        [r["loss_total"] for r in result.log_rows] for result in (plain_result, reached_result)
    ]
    assert losses[0] == losses[1]
