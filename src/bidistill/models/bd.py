"""Bidirectional distillation (BD; Zhang et al. 2024, arXiv 2401.01553).

Two branches, each with its own WSI aggregator, trained together and distilling into each other:

- multi-modal branch M: h_M = agg_M(bag), e_M = clinical_mlp(clinical), z_M = head_M([h_M, e_M])
- single-modal branch S: h_S = agg_S(bag), e_S = prompt, z_S = head_S([h_S, e_S])

    L_M = CE(z_M, y) + λ_h · MSE(h_M, sg(h_S))
    L_S = CE(z_S, y) + λ_e · MSE(e_S, sg(e_M)) + λ_kd · T² · KL(softmax(sg(z_M)/T) ‖ softmax(z_S/T))

sg is the stop-gradient: M's alignment term moves only agg_M, S's terms move only S. Prediction
routes per patient: z_M where ``clinical_present``, z_S where not.

Differences from the published code, stated so results can be compared: the published code
divides the log-probabilities by T *after* the softmax and leaves out T²; we soften the logits
(softmax(z/T)) and scale by T², the standard distillation (Hinton et al. 2015), so that the
gradient of the KL term does not shrink as T grows. The terms that need the clinical modality
(CE of M, the e alignment and the KL, whose teacher is z_M) are averaged over the patients that
have it; the h alignment and CE of S use every patient.

Options beyond the paper:
- ``prompt: wsi`` predicts e_S from S's own bag embedding (an MLP on h_S) instead of the
  paper's single learned vector (``prompt: learned``), so the stand-in for the clinical
  embedding can differ per patient; it is trained toward sg(e_M) by the same λ_e term.
- ``warmup_epochs`` trains M alone first (the published code appears to start from a trained
  multi-modal model), then both branches together.
- ``feature_dropout`` marks observed clinical features missing at random during training, so
  that M learns to use the missing indicators (per-feature gaps such as a blank grade).
- ``lambda_slide`` adds λ_slide · CE(slide_head(h_M), y) over every patient to L_M: a
  slides-only head on M's bag embedding (gradient blending's unimodal head, Wang et al.,
  CVPR 2020), so that M's slide read is trained as a WSI-only model's is even where the
  clinical data, learned first, would let M stop before it. The head is not used to predict.
- ``branch_selection`` (default on): M and S never use each other at prediction, so each keeps
  its own best epoch, M on the validation AUC with clinical data and S on the one without. With
  one checkpoint for both, chosen on their mean, the branch that peaks at another epoch loses.

``PAPER_OPTIONS`` holds the published form (its weights, temperature and learned prompt, one
checkpoint for both branches), to run beside the defaults: ``{name: bd, label: bd-paper, ...}``.
"""

from __future__ import annotations

from typing import Literal

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
    mse,
    route,
)
from bidistill.models.batch import Batch, Output
from bidistill.models.blocks import ClinicalMLP, mlp
from bidistill.models.registry import register_method

# BD as published (Zhang et al. 2024): the paper's loss weights and temperature, its learned
# prompt, no warm-up, no feature dropout and fusion heads with random weights throughout.
PAPER_OPTIONS = {
    "lambda_h": 0.2,
    "lambda_e": 0.5,
    "lambda_kd": 0.5,
    "temperature": 1.2,
    "prompt": "learned",
    "warmup_epochs": 0,
    "feature_dropout": 0.0,
    "branch_selection": False,
    "clinical_start": "random",
    "aggregator": "abmil",
    "bag_layers": 0,
    "instance_layers": 1,
}


class BDOptions(MethodOptions):
    lambda_h: float = Field(default=0.2, ge=0, description="Weight of MSE(h_M, sg(h_S)).")
    lambda_e: float = Field(default=0.5, ge=0, description="Weight of MSE(e_S, sg(e_M)).")
    lambda_kd: float = Field(default=2.0, ge=0, description="Weight of the T²·KL term.")
    temperature: float = Field(default=1.0, gt=0, description="Distillation temperature T.")
    prompt: Literal["learned", "wsi"] = "learned"
    warmup_epochs: int = Field(default=0, ge=0, description="Epochs of M alone first.")
    feature_dropout: float = Field(default=0.0, ge=0, lt=1)
    lambda_slide: float = Field(
        default=0.0,
        ge=0,
        description="Weight of CE(slide_head(h_M), y) over every patient: a slides-only head on "
        "M's bag embedding, so that M's slide read learns what a WSI-only model learns even "
        "where the clinical data would let it stop (gradient blending, Wang et al. 2020); 0: off.",
    )
    branch_selection: bool = Field(
        default=True,
        description="Each branch keeps its own best epoch (M on the val AUC with clinical "
        "data, S without); false: one epoch for both, on the routed score.",
    )


class Prompt(nn.Module):
    """The single-modal branch's stand-in for the clinical embedding, e_S [B, E].

    ``learned``: one learnable vector through an MLP (the paper); ``wsi``: an MLP on h_S.
    """

    def __init__(self, kind: str, bag_dim: int, embed_dim: int, dropout: float):
        super().__init__()
        self.kind = kind
        if kind == "learned":
            self.vector = nn.Parameter(torch.randn(embed_dim) * 0.02)
            self.net = mlp(embed_dim, embed_dim, embed_dim, 0.0)
        else:
            self.net = mlp(bag_dim, embed_dim, embed_dim, dropout)

    def forward(self, h_single: Tensor) -> Tensor:
        if self.kind == "learned":
            return self.net(self.vector).expand(len(h_single), -1)
        return self.net(h_single)


@register_method("bd")
class BidirectionalDistillation(Method):
    """BD: see the module docstring for the losses and the differences from the paper's code."""

    Options = BDOptions
    fused_read = ("aggregator_multi", "head_multi")
    fused_clinical = ("clinical",)

    def __init__(self, dims: MethodDims, options: BDOptions):
        super().__init__(dims, options)
        o = options
        self.aggregator_multi = self.make_aggregator()
        self.aggregator_single = self.make_aggregator()
        bag_dim = self.aggregator_multi.out_dim
        self.clinical = ClinicalMLP(dims.clinical_dim, o.clinical_hidden, o.dropout)
        self.prompt = Prompt(o.prompt, bag_dim, o.clinical_hidden, o.dropout)
        self.head_multi = self.make_fusion_head(bag_dim, o.clinical_hidden)
        self.head_single = self.make_fusion_head(bag_dim, o.clinical_hidden)
        if o.lambda_slide:  # only then: the weights of runs without it keep their shapes
            self.slide_head = nn.Linear(bag_dim, self.n_classes)

    def stages(self) -> list[Stage]:
        warmup = self.options.warmup_epochs
        multi = ("aggregator_multi", "clinical", "head_multi")
        multi += ("slide_head",) if self.options.lambda_slide else ()
        branches = (
            Part("multi", "present", multi),
            Part("single", "absent", ("aggregator_single", "prompt", "head_single")),
        )
        joint = Stage("joint", "routed", parts=branches if self.options.branch_selection else ())
        return [Stage("warmup", "present", epochs=warmup), joint] if warmup else [joint]

    def forward(self, batch: Batch) -> Output:
        present = batch.clinical_present
        # In eval a batch where every patient is on one route needs one branch only: this
        # halves the cost of prediction (and of validation, which predicts twice per epoch).
        if not self.training and present.all():
            return self._branch_output("multi", self._multi(batch))
        if not self.training and not present.any():
            return self._branch_output("single", self._single(batch))
        multi, single = self._multi(batch), self._single(batch)
        extras = {**multi, **single}
        return Output(
            logits=route(present, multi["logits_multi"], single["logits_single"]),
            attention=route(present, extras.pop("attention_multi"), extras.pop("attention_single")),
            extras=extras,
        )

    def _multi(self, batch: Batch) -> dict[str, Tensor]:
        clinical = self.drop_features(
            batch.clinical, batch.clinical_valid, self.options.feature_dropout
        )
        agg = self.aggregator_multi(batch.bags, batch.tile_valid)
        e = self.clinical(clinical)
        return {
            "h_multi": agg.embedding,
            "e_multi": e,
            "attention_multi": agg.attention,
            "logits_multi": self.head_multi(agg.embedding, e),
        }

    def read_slides(self, batch: Batch) -> Output:
        agg = self.aggregator_multi(batch.bags, batch.tile_valid)
        logits = self.head_multi.read_slides(agg.embedding)
        return Output(logits, agg.attention, {"h_multi": agg.embedding})

    def _single(self, batch: Batch) -> dict[str, Tensor]:
        agg = self.aggregator_single(batch.bags, batch.tile_valid)
        e = self.prompt(agg.embedding)
        return {
            "h_single": agg.embedding,
            "e_single": e,
            "attention_single": agg.attention,
            "logits_single": self.head_single(agg.embedding, e),
        }

    @staticmethod
    def _branch_output(name: str, branch: dict[str, Tensor]) -> Output:
        attention = branch.pop(f"attention_{name}")
        return Output(branch[f"logits_{name}"], attention, branch)

    def loss(self, batch: Batch, output: Output) -> dict[str, Tensor]:
        """Named, weighted terms; ``total`` = L_M + L_S (just CE of M in the warm-up stage)."""
        x, o, y = output.extras, self.options, batch.labels
        present = batch.clinical_present
        terms = {"ce_multi": self.ce(x["logits_multi"], y, present)}
        if o.lambda_slide:
            terms["ce_slide"] = o.lambda_slide * self.ce(self.slide_head(x["h_multi"]), y)
        if self.stage != "warmup":
            terms["mse_h"] = o.lambda_h * mse(x["h_multi"], x["h_single"].detach())
            terms["ce_single"] = self.ce(x["logits_single"], y)
            terms["mse_e"] = o.lambda_e * mse(x["e_single"], x["e_multi"].detach(), present)
            terms["kl"] = o.lambda_kd * distillation_kl(
                x["logits_multi"], x["logits_single"], o.temperature, present
            )
        terms["total"] = sum(terms.values())
        return terms
