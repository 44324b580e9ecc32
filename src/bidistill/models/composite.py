"""Baselines made of two separate models, chosen or combined per patient by availability."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from bidistill.models.base import (
    Method,
    MethodDims,
    MethodOptions,
    Part,
    Stage,
    distillation_kl,
    route,
    route_outputs,
)
from bidistill.models.batch import Batch, Output
from bidistill.models.blocks import ClinicalMLP
from bidistill.models.registry import register_method


@register_method("switch")
class Switch(Method):
    """A WSI-only model and a fusion model; each patient gets the one its data allows.

    Training: both sub-models in one run, their losses summed. Their parameters are disjoint, so
    each sub-model's gradient comes from its own loss only (the one coupling is the global
    gradient-norm clipping). Joint training costs the same compute as two runs, and each
    sub-model keeps its own best epoch: the fusion model on the validation patients with
    clinical data, the WSI model on every validation patient without it.
    """

    fused_read = ("fusion.aggregator", "fusion.head")
    fused_clinical = ("fusion.clinical",)

    def __init__(self, dims: MethodDims, options: MethodOptions):
        super().__init__(dims, options)
        self.wsi = self.make_wsi_classifier()
        self.fusion = self.make_fusion_model()

    def stages(self) -> list[Stage]:
        parts = (Part("fusion", "present", ("fusion",)), Part("wsi", "absent", ("wsi",)))
        return [Stage("main", "routed", parts=parts)]

    def forward(self, batch: Batch) -> Output:
        wsi = self.wsi(batch)
        fusion = self.fusion(batch, batch.clinical)
        extras = {"logits_wsi": wsi.logits, "logits_fusion": fusion.logits}
        return route_outputs(batch.clinical_present, fusion, wsi, extras)

    def loss(self, batch: Batch, output: Output) -> dict[str, Tensor]:
        x = output.extras
        terms = {
            "ce_wsi": self.ce(x["logits_wsi"], batch.labels),
            "ce_fusion": self.ce(x["logits_fusion"], batch.labels, batch.clinical_present),
        }
        terms["total"] = terms["ce_wsi"] + terms["ce_fusion"]
        return terms


@register_method("ensemble")
class Ensemble(Method):
    """Late fusion: the mean of a WSI-only and a clinical-only model's probabilities.

    Where clinical data is absent only the WSI model's probability is used (the BD paper's
    ensemble baseline). Trained jointly with independent losses summed, as ``switch``, and
    selected as a whole on the routed score: unlike the switch's sub-models, the two models
    are not independent at prediction (the average needs both), so they share one epoch.
    ``logits`` are the log of the combined probabilities, so softmax(logits) gives them back.
    """

    def __init__(self, dims: MethodDims, options: MethodOptions):
        super().__init__(dims, options)
        self.wsi = self.make_wsi_classifier()
        self.clinical = ClinicalMLP(dims.clinical_dim, options.clinical_hidden, options.dropout)
        self.clinical_head = nn.Linear(options.clinical_hidden, self.n_classes)

    def forward(self, batch: Batch) -> Output:
        wsi = self.wsi(batch)
        logits_clinical = self.clinical_head(self.clinical(batch.clinical))
        p_wsi = torch.softmax(wsi.logits, dim=-1)
        p_both = (p_wsi + torch.softmax(logits_clinical, dim=-1)) / 2
        p = route(batch.clinical_present, p_both, p_wsi)
        return Output(
            logits=torch.log(p.clamp_min(1e-12)),
            attention=wsi.attention,
            extras={"logits_wsi": wsi.logits, "logits_clinical": logits_clinical},
        )

    def loss(self, batch: Batch, output: Output) -> dict[str, Tensor]:
        x = output.extras
        terms = {
            "ce_wsi": self.ce(x["logits_wsi"], batch.labels),
            "ce_clinical": self.ce(x["logits_clinical"], batch.labels, batch.clinical_present),
        }
        terms["total"] = terms["ce_wsi"] + terms["ce_clinical"]
        return terms


class KDOptions(MethodOptions):
    # The same distillation term and weights as BD's, so that the two compare on what differs.
    lambda_kd: float = Field(default=2.0, ge=0, description="Weight of the T²·KL term.")
    temperature: float = Field(default=1.0, gt=0)


@register_method("kd")
class OneWayKD(Method):
    """One-way distillation: a fusion teacher, then a WSI-only student taught by it.

    Two stages: ``teacher`` trains the fusion model (selected on validation AUC with clinical
    data); ``student`` freezes it and trains the student with
    CE(z_S, y) + λ_kd · T² · KL(softmax(z_T/T) ‖ softmax(z_S/T)) (the KL on patients with
    clinical data, the teacher's input). Routed like ``switch``: teacher where clinical data is
    present, student where not.
    """

    Options = KDOptions
    fused_read = ("teacher.aggregator", "teacher.head")
    fused_clinical = ("teacher.clinical",)

    def __init__(self, dims: MethodDims, options: KDOptions):
        super().__init__(dims, options)
        self.teacher = self.make_fusion_model()
        self.student = self.make_wsi_classifier()

    def stages(self) -> list[Stage]:
        # The frozen teacher serves the patients with clinical data; the student is selected
        # on the patients without (the teacher's half of a routed score would not move).
        return [Stage("teacher", "present"), Stage("student", "absent")]

    def set_stage(self, name: str) -> None:
        super().set_stage(name)
        self.train(self.training)

    def held_in(self, stage: str) -> list[nn.Parameter]:
        if stage == "student":
            return list(self.teacher.parameters())
        return super().held_in(stage)

    def train(self, mode: bool = True) -> OneWayKD:
        super().train(mode)
        if self.stage == "student":
            self.teacher.eval()  # a frozen teacher gives deterministic targets (no dropout)
        return self

    def forward(self, batch: Batch) -> Output:
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.stage == "teacher"):
            teacher = self.teacher(batch, batch.clinical)
        student = self.student(batch)
        extras = {"logits_teacher": teacher.logits, "logits_student": student.logits}
        return route_outputs(batch.clinical_present, teacher, student, extras)

    def loss(self, batch: Batch, output: Output) -> dict[str, Tensor]:
        x, o = output.extras, self.options
        present = batch.clinical_present
        if self.stage == "teacher":
            ce = self.ce(x["logits_teacher"], batch.labels, present)
            return {"ce_teacher": ce, "total": ce}
        terms = {
            "ce_student": self.ce(x["logits_student"], batch.labels),
            "kl": o.lambda_kd
            * distillation_kl(x["logits_teacher"], x["logits_student"], o.temperature, present),
        }
        terms["total"] = terms["ce_student"] + terms["kl"]
        return terms
