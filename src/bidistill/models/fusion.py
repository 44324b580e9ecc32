"""Fusion baselines: one model over [bag embedding, clinical embedding], and the ways it can
cope with a missing clinical modality (fill it, learn a token for it, or impute it from the
slides)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from bidistill.models.base import Method, MethodDims, MethodOptions, mse, route
from bidistill.models.batch import Batch, Output
from bidistill.models.blocks import mlp
from bidistill.models.registry import register_method


class OneFusionModel(Method):
    """A method built on one ``FusionModel``: its aggregator and head are the fused slide read."""

    fused_read = ("model.aggregator", "model.head")
    fused_clinical = ("model.clinical",)

    def __init__(self, dims: MethodDims, options: MethodOptions):
        super().__init__(dims, options)
        self.model = self.make_fusion_model()


@register_method("fusion-mean")
class FusionMean(OneFusionModel):
    """Fusion trained on complete data; a missing value is the training mean, with its flag set.

    This is the ``ClinicalEncoder``'s own imputation, so the input is used as encoded. Only
    patients with clinical data train the model ("complete data"); without clinical data it
    sees the all-missing row (every feature imputed, every indicator 1).
    """

    selection = "present"

    def clinical_input(self, batch: Batch) -> Tensor:
        return batch.clinical

    def forward(self, batch: Batch) -> Output:
        return self.model(batch, self.clinical_input(batch))

    def loss(self, batch: Batch, output: Output) -> dict[str, Tensor]:
        ce = self.ce(output.logits, batch.labels, batch.clinical_present)
        return {"ce": ce, "total": ce}


@register_method("fusion-zero")
class FusionZero(FusionMean):
    """As ``fusion-mean``, but every missing value is 0 (indicator still 1).

    Standardised numeric features have training mean 0, so for them zero and mean filling agree;
    they differ for binary and ordinal features (imputed with the training prevalence / mean).
    """

    def clinical_input(self, batch: Batch) -> Tensor:
        missing = self.feature_columns(~batch.clinical_valid, indicators=False)
        return batch.clinical.masked_fill(missing, 0.0)


class ModDropOptions(MethodOptions):
    drop_rate: float = Field(default=0.3, ge=0, lt=1, description="Whole-modality dropout.")


@register_method("moddrop")
class ModDrop(OneFusionModel):
    """Fusion with modality dropout and a learned missing token (Neverova et al. 2016 style).

    In training each patient's clinical embedding is replaced, with probability ``drop_rate``,
    by a learned token; a patient without clinical data always gets the token. At prediction the
    token stands in wherever ``clinical_present`` is False.
    """

    Options = ModDropOptions

    def __init__(self, dims: MethodDims, options: ModDropOptions):
        super().__init__(dims, options)
        self.missing_token = nn.Parameter(torch.zeros(options.clinical_hidden))

    def forward(self, batch: Batch) -> Output:
        agg = self.model.embed_bag(batch)
        e = self.model.embed_clinical(batch.clinical)
        absent = self.drop_modality(batch.clinical_present, self.options.drop_rate)
        e = torch.where(absent[:, None], self.missing_token.expand_as(e), e)
        logits = self.model.classify(agg.embedding, e)
        return Output(logits, agg.attention, {"h": agg.embedding, "e": e})

    def loss(self, batch: Batch, output: Output) -> dict[str, Tensor]:
        ce = self.ce(output.logits, batch.labels)
        return {"ce": ce, "total": ce}


class AEImputeOptions(MethodOptions):
    reconstruct: Literal["input", "embedding"] = Field(
        default="input",
        description="Reconstruct the encoded clinical input or its embedding from the bag.",
    )
    lambda_rec: float = Field(default=1.0, ge=0, description="Weight of the reconstruction.")


@register_method("ae-impute")
class AEImpute(OneFusionModel):
    """Fusion with the clinical data imputed from the slides when it is missing.

    A decoder learns to reconstruct the clinical input (``reconstruct: input``: the encoded
    values, read back as if every feature were observed) or the clinical embedding
    (``embedding``) from the bag embedding, trained on the patients with clinical data. The
    fusion head is trained both on the real clinical data and on the (detached) reconstruction,
    so that it knows what an imputed input looks like; the reconstruction is used wherever
    ``clinical_present`` is False. This is the "AE imputation" baseline of the BD paper.
    """

    Options = AEImputeOptions

    def __init__(self, dims: MethodDims, options: AEImputeOptions):
        super().__init__(dims, options)
        target = dims.n_values if options.reconstruct == "input" else options.clinical_hidden
        self.decoder = mlp(self.model.bag_dim, options.clinical_hidden, target, options.dropout)

    def _imputed_embedding(self, reconstruction: Tensor) -> Tensor:
        if self.options.reconstruct == "embedding":
            return reconstruction
        indicators = torch.zeros(
            len(reconstruction), self.dims.n_clinical_features, device=reconstruction.device
        )
        return self.model.embed_clinical(torch.cat([reconstruction, indicators], dim=1))

    def forward(self, batch: Batch) -> Output:
        agg = self.model.embed_bag(batch)
        h = agg.embedding
        e_real = self.model.embed_clinical(batch.clinical)
        reconstruction = self.decoder(h)
        e_imputed = self._imputed_embedding(reconstruction.detach())
        logits_real = self.model.classify(h, e_real)
        logits_imputed = self.model.classify(h, e_imputed)
        logits = route(batch.clinical_present, logits_real, logits_imputed)
        extras = {
            "h": h,
            "e": e_real,
            "reconstruction": reconstruction,
            "logits_real": logits_real,
            "logits_imputed": logits_imputed,
        }
        return Output(logits, agg.attention, extras)

    def loss(self, batch: Batch, output: Output) -> dict[str, Tensor]:
        x = output.extras
        present = batch.clinical_present
        if self.options.reconstruct == "embedding":
            target = x["e"].detach()
        else:
            target = batch.clinical[:, : self.dims.n_values]
        terms = {
            "ce_real": self.ce(x["logits_real"], batch.labels, present),
            "ce_imputed": self.ce(x["logits_imputed"], batch.labels),
            "reconstruction": self.options.lambda_rec * mse(x["reconstruction"], target, present),
        }
        terms["total"] = sum(terms.values())
        return terms
