"""Single-modality baselines: a WSI-only MIL model and clinical-only models."""

from __future__ import annotations

from torch import Tensor, nn

from bidistill.models.base import Method, MethodDims, MethodOptions
from bidistill.models.batch import Batch, Output
from bidistill.models.blocks import ClinicalMLP
from bidistill.models.registry import register_method


@register_method("wsi-only")
class WSIOnly(Method):
    """Attention MIL on the slides alone; clinical data is ignored (prob_present = prob_absent)."""

    selection = "absent"

    def __init__(self, dims: MethodDims, options: MethodOptions):
        super().__init__(dims, options)
        self.model = self.make_wsi_classifier()

    def forward(self, batch: Batch) -> Output:
        return self.model(batch)

    def loss(self, batch: Batch, output: Output) -> dict[str, Tensor]:
        ce = self.ce(output.logits, batch.labels)
        return {"ce": ce, "total": ce}


@register_method("clinical-only")
class ClinicalOnly(Method):
    """An MLP on the encoded clinical vector (values + missing indicators); no slides.

    Trained on the patients with clinical data. Without clinical data it sees the all-missing
    row, which it never trained on: one constant for every such patient (AUC 0.5), which is
    the honest answer of a model that has nothing to go on.
    """

    selection = "present"

    def __init__(self, dims: MethodDims, options: MethodOptions):
        super().__init__(dims, options)
        o = options
        self.encoder = ClinicalMLP(dims.clinical_dim, o.clinical_hidden, o.dropout)
        self.head = nn.Linear(o.clinical_hidden, self.n_classes)

    def forward(self, batch: Batch) -> Output:
        e = self.encoder(batch.clinical)
        return Output(self.head(e), None, {"e": e})

    def loss(self, batch: Batch, output: Output) -> dict[str, Tensor]:
        ce = self.ce(output.logits, batch.labels, batch.clinical_present)
        return {"ce": ce, "total": ce}


@register_method("clinical-linear")
class ClinicalLinear(Method):
    """Logistic regression on the encoded clinical vector (the BCNB paper's clinical baseline).

    L2 regularisation comes from the optimiser's weight decay. The weights start at zero, as
    logistic regression's do: a random start would only slow the fit of a convex model.
    """

    selection = "present"

    def __init__(self, dims: MethodDims, options: MethodOptions):
        super().__init__(dims, options)
        self.linear = nn.Linear(dims.clinical_dim, self.n_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, batch: Batch) -> Output:
        return Output(self.linear(batch.clinical), None, {})

    def loss(self, batch: Batch, output: Output) -> dict[str, Tensor]:
        ce = self.ce(output.logits, batch.labels, batch.clinical_present)
        return {"ce": ce, "total": ce}
