"""ShaSpec (Wang et al., CVPR 2023) adapted to one bag of slides plus one clinical table.

Each modality m ∈ {W (slides), C (clinical)} gets a stem to a common width d (the bag aggregator
for W, an MLP for C, since the inputs differ in kind), then

    shared_m = shared_encoder(stem_m)      (one module, applied to both modalities)
    specific_m = specific_encoder_m(stem_m)
    f_m = shared_m + fuse_m([shared_m, specific_m])      (residual fusion as in the paper)
    z = head([f_W, f_C])

A missing clinical modality gets f_C = shared_W: the shared feature of the present modality
stands in for the missing one, with no specific part. Losses:

    CE(z, y) + λ_dom · CE(domain_classifier(specific_m), m) + λ_align · MSE(shared_W, shared_C)

the domain term makes the specific features identify their modality, the alignment term
(on patients with both) pulls the shared features together. The paper's alignment is a
distribution-matching loss between modalities; with two modalities per patient we match the
features per patient. Clinical data is also withheld at random in training (``drop_rate``) so
the head learns the missing-modality path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from bidistill.models.base import Method, MethodDims, MethodOptions, masked_mean, mse
from bidistill.models.batch import Batch, Output
from bidistill.models.blocks import mlp
from bidistill.models.registry import register_method


class ShaSpecOptions(MethodOptions):
    lambda_domain: float = Field(default=0.1, ge=0)
    lambda_align: float = Field(default=0.1, ge=0)
    drop_rate: float = Field(default=0.3, ge=0, lt=1, description="Training clinical dropout.")


@register_method("shaspec")
class ShaSpec(Method):
    """ShaSpec: shared and specific features; see the module docstring."""

    Options = ShaSpecOptions
    fused_read = ("aggregator", "shared", "specific_wsi", "fuse_wsi", "head")
    # ``shared`` is the slide read's too: the clinical stage holds it.
    fused_clinical = ("clinical_stem", "specific_clinical", "fuse_clinical")

    def __init__(self, dims: MethodDims, options: ShaSpecOptions):
        super().__init__(dims, options)
        o = options
        self.aggregator = self.make_aggregator()
        d = self.aggregator.out_dim
        self.clinical_stem = mlp(dims.clinical_dim, o.clinical_hidden, d, o.dropout)
        self.shared = nn.Sequential(nn.Linear(d, d), nn.ReLU())
        self.specific_wsi = nn.Sequential(nn.Linear(d, d), nn.ReLU())
        self.specific_clinical = nn.Sequential(nn.Linear(d, d), nn.ReLU())
        self.fuse_wsi = nn.Linear(2 * d, d)
        self.fuse_clinical = nn.Linear(2 * d, d)
        self.domain_classifier = nn.Linear(d, 2)
        self.head = self.make_fusion_head(d, d)

    def _wsi_feature(self, stem_wsi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """f_W, with shared_W and specific_W."""
        shared_wsi, specific_wsi = self.shared(stem_wsi), self.specific_wsi(stem_wsi)
        f_wsi = shared_wsi + self.fuse_wsi(torch.cat([shared_wsi, specific_wsi], dim=-1))
        return f_wsi, shared_wsi, specific_wsi

    def _clinical_feature(self, stem_clinical: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """f_C, with shared_C and specific_C."""
        shared_clinical = self.shared(stem_clinical)
        specific_clinical = self.specific_clinical(stem_clinical)
        f_clinical = shared_clinical + self.fuse_clinical(
            torch.cat([shared_clinical, specific_clinical], dim=-1)
        )
        return f_clinical, shared_clinical, specific_clinical

    @property
    def clinical_embedding_dim(self) -> int:
        return self.aggregator.out_dim

    def embed_clinical_read(self, clinical: Tensor) -> Tensor:
        return self._clinical_feature(self.clinical_stem(clinical))[0]

    def read_slides(self, batch: Batch) -> Output:
        agg = self.aggregator(batch.bags, batch.tile_valid)
        f_wsi = self._wsi_feature(agg.embedding)[0]
        return Output(self.head.read_slides(f_wsi), agg.attention, {})

    def forward(self, batch: Batch) -> Output:
        agg = self.aggregator(batch.bags, batch.tile_valid)
        stem_wsi, stem_clinical = agg.embedding, self.clinical_stem(batch.clinical)
        f_wsi, shared_wsi, specific_wsi = self._wsi_feature(stem_wsi)
        f_clinical, shared_clinical, specific_clinical = self._clinical_feature(stem_clinical)
        absent = self.drop_modality(batch.clinical_present, self.options.drop_rate)
        f_clinical = torch.where(absent[:, None], shared_wsi, f_clinical)
        extras = {
            "shared_wsi": shared_wsi,
            "shared_clinical": shared_clinical,
            "specific_wsi": specific_wsi,
            "specific_clinical": specific_clinical,
        }
        return Output(self.head(f_wsi, f_clinical), agg.attention, extras)

    def loss(self, batch: Batch, output: Output) -> dict[str, Tensor]:
        x, o = output.extras, self.options
        present = batch.clinical_present
        wsi_domain = self.domain_classifier(x["specific_wsi"])
        clinical_domain = self.domain_classifier(x["specific_clinical"])
        zeros = torch.zeros(len(batch), dtype=torch.long, device=wsi_domain.device)
        domain = F.cross_entropy(wsi_domain, zeros) + masked_mean(
            F.cross_entropy(clinical_domain, zeros + 1, reduction="none"), present
        )
        terms = {
            "ce": self.ce(output.logits, batch.labels),
            "domain": o.lambda_domain * domain,
            "align": o.lambda_align * mse(x["shared_wsi"], x["shared_clinical"], present),
        }
        terms["total"] = sum(terms.values())
        return terms
