"""The method interface: one ``nn.Module`` contract shared by BD and every baseline
(``forward(batch) -> Output``, ``loss(batch, output)`` with its ``"total"`` and named, already
weighted terms, ``stages()``; docs/internal-interfaces.md). A method decides per sample what to
do when ``clinical_present`` is False."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from bidistill.models.aggregators import AggregatorName, make_aggregator
from bidistill.models.batch import Batch, Output
from bidistill.models.blocks import FusionHead, FusionModel, WSIClassifier

Selection = Literal["present", "absent", "routed"]

# The stage ``clinical_start: slides`` (and ``reads``) puts first: the fused slide read alone.
SLIDES_STAGE = "slides"
# The stage ``clinical_start: reads`` puts second: the fused clinical embedding with a linear
# read of its own, trained alone.
CLINICAL_STAGE = "clinical"


class MethodOptions(BaseModel):
    """Options every method accepts; a method's own options subclass this."""

    model_config = ConfigDict(extra="forbid")

    aggregator: AggregatorName = Field(
        default="abmil-count",
        description="abmil-count (gated attention and the log of how many instances it finds "
        "telling; the default by the accuracy suite's rule, README), abmil (gated attention), "
        "abmil-mean (attention and the mean, concatenated), abmil-count-mean (the three), "
        "abmil-sum (gated instances summed: sees how many), additive (each instance's gated "
        "evidence summed into one number), mean, mean-count (the mean and the log of the bag's "
        "size; its heatmaps need --score leave-one-out) or transmil.",
    )
    hidden_dim: int = Field(default=128, ge=2, description="Bag embedding size.")
    instance_layers: int = Field(
        default=1,
        ge=1,
        le=4,
        description="Linear + ReLU + Dropout layers (hidden_dim wide) that embed each instance "
        "before the pooling. One is a linear read of the patch features; two let a model "
        "measure a tile against its own kind (a faint change of one tissue's cells).",
    )
    clinical_hidden: int = Field(default=64, ge=2, description="Clinical embedding size.")
    dropout: float = Field(default=0.25, ge=0, lt=1)
    bag_layers: int = Field(
        default=0,
        ge=0,
        le=4,
        description="Linear + ReLU layers (hidden_dim wide) on the pooled bag embedding before "
        "a head reads it; 0: the head reads the pooling directly. One lets a model read a "
        "posterior that is not one direction of the pooled embedding (several classes; a "
        "clinical subtype that changes how much the slides matter). Heatmaps are unchanged: "
        "they draw the pooling's weights.",
    )
    clinical_start: Literal["random", "silent", "slides", "reads"] = Field(
        default="random",
        description="How a fusion head starts reading the clinical embedding: random weights; "
        "silent (zero weights: the untrained head reads the slides alone, and the clinical "
        "data enters as far as training finds it useful; helps small cohorts); or slides (a "
        "first stage trains the fused slide read alone, the aggregator and the fusion head "
        "with the clinical embedding at zero, on every patient, selected on the val AUC "
        "without clinical data; the method's own stages start from it, silent, so that the "
        "clinical data cannot cut short what the slides have to teach); or reads (as slides, "
        "then a second stage trains the clinical embedding the fusion head reads, with a "
        "linear read of its own, on the patients with clinical data, so that neither modality "
        "is learned in the other's shadow). Methods with no fused slide read (wsi-only, "
        "ensemble, clinical-only) ignore it.",
    )


@dataclass(frozen=True)
class MethodDims:
    """The shapes a method is built for; with ``patch_encoder`` (end-to-end mode: a factory of
    trainable patch encoders) each aggregator takes tiles (``models.patch_encoder``)."""

    in_dim: int  # D (the .h5 files', or the patch encoder's)
    clinical_dim: int  # C: the values, then one missing indicator per feature
    n_clinical_features: int  # F
    feature_slices: tuple[tuple[int, int], ...]  # feature f's value columns: clinical[:, a:b]
    n_classes: int = 2  # K: every head's logits [B, K]
    patch_encoder: Callable[[], nn.Module] | None = field(default=None, compare=False, repr=False)

    @property
    def n_values(self) -> int:
        return self.clinical_dim - self.n_clinical_features


@dataclass(frozen=True)
class Part:
    """Parameters selected on their own validation score within a stage."""

    name: str  # train_log.csv's column val_score_<name>
    select: Selection
    modules: tuple[str, ...]  # the method's submodules (attribute names) that make it up


@dataclass(frozen=True)
class Stage:
    """One training run of a method's: a fresh optimiser, its own early stopping. Each of its
    ``parts`` (sharing no parameters, not using each other at prediction, e.g. BD's branches)
    keeps its own best epoch; together they must hold every parameter the stage trains."""

    name: str
    select: Selection
    epochs: int | None = None  # None: the training config's
    parts: tuple[Part, ...] = ()
    # Its starting weights are a candidate too (epoch 0, validated before any step): the
    # stage after the slides stage, whose start is the selected slide read, so that the fused
    # model is kept only where it beats the slides alone on the validation patients.
    start_is_candidate: bool = False


class Method(nn.Module):
    """Base class: shared loss helpers, class weights, the all-missing clinical row, stages."""

    name: ClassVar[str] = ""  # set by ``register_method``
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    selection: ClassVar[Selection] = "routed"
    # The submodules of the fused slide read (the aggregator and fusion head that the fused
    # prediction goes through; ``read_slides``): what the slides stage trains. Empty: none.
    fused_read: ClassVar[tuple[str, ...]] = ()
    # The submodules that make the clinical embedding the fused head reads
    # (``embed_clinical_read``): what the clinical stage trains, with ``clinical_read``.
    fused_clinical: ClassVar[tuple[str, ...]] = ()

    def __init__(self, dims: MethodDims, options: MethodOptions):
        super().__init__()
        self.dims = dims
        self.options = options
        self._held: list[nn.Parameter] = []  # trainable parameters the stage does not train
        self.stage = self.training_stages()[0].name
        self.register_buffer("class_weights", torch.ones(dims.n_classes), persistent=False)
        # What the fitted ClinicalEncoder outputs for a patient with no clinical data (imputed
        # values, indicators 1). Saved with the weights; the trainer sets it before training.
        blank = torch.zeros(dims.clinical_dim)
        blank[dims.n_values :] = 1.0
        self.register_buffer("blank_clinical", blank)

    # --- stages and setup -------------------------------------------------------------------

    def stages(self) -> list[Stage]:
        """The method's own stages."""
        return [Stage("main", self.selection)]

    @property
    def slides_first(self) -> bool:
        return bool(self.fused_read) and self.options.clinical_start in ("slides", "reads")

    @property
    def clinical_second(self) -> bool:
        return bool(self.fused_clinical) and self.options.clinical_start == "reads"

    def training_stages(self) -> list[Stage]:
        """What the trainer runs: the slides stage first with ``clinical_start: slides`` (and
        the clinical stage after it with ``reads``), then the method's own stages."""
        own = self.stages()
        if not self.slides_first:
            return own
        reads = [Stage(SLIDES_STAGE, "absent")]
        if self.clinical_second:
            reads.append(Stage(CLINICAL_STAGE, "present"))
        return [*reads, replace(own[0], start_is_candidate=True), *own[1:]]

    def set_stage(self, name: str) -> None:
        names = [s.name for s in self.training_stages()]
        if name not in names:
            raise ValueError(f"{self.name}: unknown stage {name!r}; stages are {names}")
        self.stage = name
        for p in self._held:  # only what the last stage held: a frozen backbone stays frozen
            p.requires_grad_(True)
        self._held = [p for p in self.held_in(name) if p.requires_grad]
        for p in self._held:
            p.requires_grad_(False)

    def held_in(self, stage: str) -> list[nn.Parameter]:
        """The parameters ``stage`` does not train: the slides stage trains only the fused slide
        read, the clinical stage only the fused clinical embedding and its read, and the own
        stages leave that read (which they do not use) alone."""
        if stage == SLIDES_STAGE:
            trained = self.fused_read
        elif stage == CLINICAL_STAGE:
            trained = (*self.fused_clinical, "clinical_read")
        else:
            return list(self.clinical_read.parameters()) if self.clinical_second else []
        inside = {id(p) for m in trained for p in self.get_submodule(m).parameters()}
        return [p for p in self.parameters() if id(p) not in inside]

    def __call__(self, batch: Batch) -> Output:
        # The slides stage predicts with the fused slide read on every route, so that training
        # and the selection (val AUC without clinical data) both see it.
        if self.stage == SLIDES_STAGE:
            return self.read_slides(batch)
        if self.stage == CLINICAL_STAGE:
            e = self.embed_clinical_read(batch.clinical)
            return Output(self.clinical_read(e), None, {"e": e})
        return super().__call__(batch)

    def read_slides(self, batch: Batch) -> Output:
        """The fused prediction with the clinical embedding at zero (``fused_read``'s path): by
        default that of the ``FusionModel`` whose aggregator and head ``fused_read`` names; a
        method whose fused read is built otherwise (BD, ShaSpec) overrides it."""
        fusion_model = self.get_submodule(self.fused_read[0].removesuffix(".aggregator"))
        return fusion_model.read_slides(batch)

    def embed_clinical_read(self, clinical: Tensor) -> Tensor:
        """The clinical embedding the fusion head reads (``fused_clinical``'s path): by default
        the output of its one module; ShaSpec's is built otherwise."""
        return self.get_submodule(self.fused_clinical[0])(clinical)

    @property
    def clinical_embedding_dim(self) -> int:
        """The width of ``embed_clinical_read``'s embedding."""
        return self.get_submodule(self.fused_clinical[0]).out_dim

    def add_clinical_read(self) -> None:
        """Build the clinical stage's linear read of the fused clinical embedding (``reads``
        only: no parameters otherwise). ``create_method`` calls it once the method is built,
        and its draws leave the random state as they found it, so that the method's modules
        start, and its slides stage trains, as with ``clinical_start: slides``."""
        if self.clinical_second:
            with torch.random.fork_rng(devices=[]):
                self.clinical_read = nn.Linear(self.clinical_embedding_dim, self.n_classes)

    def training_loss(self, batch: Batch, output: Output) -> dict[str, Tensor]:
        """The terms the trainer minimises: ``loss``, or in the slides stage the fused slide
        read's cross-entropy over every patient."""
        if self.stage == SLIDES_STAGE:
            ce = self.ce(output.logits, batch.labels)
            return {"ce_slides": ce, "total": ce}
        if self.stage == CLINICAL_STAGE:
            ce = self.ce(output.logits, batch.labels, batch.clinical_present)
            return {"ce_clinical": ce, "total": ce}
        return self.loss(batch, output)

    def set_class_weights(self, weights: Tensor) -> None:
        """Per-class weights [K] for the cross-entropy terms (inverse class frequency)."""
        self.class_weights = weights.to(self.class_weights)

    def set_blank_clinical(self, values: Tensor) -> None:
        """The encoder's output for an all-missing clinical row, [C]."""
        if values.shape != self.blank_clinical.shape:
            raise ValueError(
                f"blank clinical row has shape {tuple(values.shape)}, "
                f"expected {tuple(self.blank_clinical.shape)}"
            )
        self.blank_clinical.copy_(values)

    def make_aggregator(self) -> nn.Module:
        o = self.options
        aggregator = make_aggregator(
            o.aggregator, self.dims.in_dim, o.hidden_dim, o.dropout, o.instance_layers
        )
        if self.dims.patch_encoder is not None:  # end-to-end: its own encoder in front
            from bidistill.models.patch_encoder import EncodedAggregator

            return EncodedAggregator(self.dims.patch_encoder(), aggregator)
        return aggregator

    def make_wsi_classifier(self) -> WSIClassifier:
        o = self.options
        return WSIClassifier(
            self.make_aggregator(),
            o.clinical_hidden,
            o.dropout,
            n_classes=self.n_classes,
            **self._bag_reading(),
        )

    @property
    def n_classes(self) -> int:
        return self.dims.n_classes

    @property
    def score_shape(self) -> tuple[int, ...]:
        """A patient's ``Output.probabilities``: one number (binary) or one per class."""
        return () if self.n_classes == 2 else (self.n_classes,)

    def make_fusion_head(self, bag_dim: int, other_dim: int) -> FusionHead:
        """A head over a bag embedding (``bag_dim``) and a clinical (or stand-in) embedding
        (``other_dim``) → [B, K]; its clinical columns start at zero with ``clinical_start:
        silent``."""
        o = self.options
        return FusionHead(
            bag_dim,
            other_dim,
            o.clinical_hidden,
            o.dropout,
            silent=o.clinical_start != "random",
            n_classes=self.n_classes,
            **self._bag_reading(),
        )

    def make_fusion_model(self) -> FusionModel:
        o = self.options
        return FusionModel(
            self.make_aggregator(),
            self.dims.clinical_dim,
            o.clinical_hidden,
            o.dropout,
            silent=o.clinical_start != "random",
            n_classes=self.n_classes,
            **self._bag_reading(),
        )

    def _bag_reading(self) -> dict[str, int]:
        """The layers every head puts between the pooled bag embedding and its classifier."""
        return {"bag_layers": self.options.bag_layers, "bag_width": self.options.hidden_dim}

    # --- clinical input helpers -------------------------------------------------------------

    def feature_columns(self, per_feature: Tensor, *, indicators: bool = True) -> Tensor:
        """A per-feature mask [B, F] spread over the encoded columns [B, C]: each feature's
        value columns, and (with ``indicators``) its missing-indicator column."""
        columns = torch.zeros(
            len(per_feature), self.dims.clinical_dim, dtype=torch.bool, device=per_feature.device
        )
        for f, (start, stop) in enumerate(self.dims.feature_slices):
            columns[:, start:stop] = per_feature[:, f : f + 1]
            if indicators:
                columns[:, self.dims.n_values + f] = per_feature[:, f]
        return columns

    def drop_features(self, clinical: Tensor, clinical_valid: Tensor, rate: float) -> Tensor:
        """Training augmentation: mark each observed feature missing with probability ``rate``
        (exactly what the encoder gives a blank cell: its imputed value and indicator 1)."""
        if rate <= 0 or not self.training:
            return clinical
        drop = (torch.rand(clinical_valid.shape, device=clinical.device) < rate) & clinical_valid
        columns = self.feature_columns(drop)
        return torch.where(columns, self.blank_clinical.expand_as(clinical), clinical)

    def drop_modality(self, present: Tensor, rate: float) -> Tensor:
        """Which patients go without clinical data [B]: those without it and, in training, a
        random share ``rate`` of the others (modality dropout)."""
        absent = ~present
        if self.training and rate > 0:
            absent = absent | (torch.rand(len(present), device=present.device) < rate)
        return absent

    # --- loss helpers -----------------------------------------------------------------------

    def ce(self, logits: Tensor, labels: Tensor, mask: Tensor | None = None) -> Tensor:
        """Class-weighted cross-entropy averaged over ``mask`` [B]; 0 (connected to the graph)
        when no sample is selected."""
        weights = self.class_weights[labels]
        if mask is not None:
            weights = weights * mask.to(weights.dtype)
        per_sample = F.cross_entropy(logits, labels, reduction="none")
        return (per_sample * weights).sum() / weights.sum().clamp_min(1e-8)


def masked_mean(per_sample: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``per_sample`` [B] over ``mask`` [B]; 0 when the mask is empty."""
    if mask is None:
        return per_sample.mean()
    m = mask.to(per_sample.dtype)
    return (per_sample * m).sum() / m.sum().clamp_min(1.0)


def mse(prediction: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error per sample (mean over features), averaged over ``mask``."""
    return masked_mean(((prediction - target) ** 2).mean(dim=-1), mask)


def distillation_kl(
    teacher_logits: Tensor, student_logits: Tensor, temperature: float, mask: Tensor | None = None
) -> Tensor:
    """T² · KL(softmax(sg(z_t)/T) ‖ softmax(z_s/T)), averaged over ``mask``.

    The teacher is detached here (the stop-gradient sg), so only the student learns from this
    term. T² keeps the gradient scale independent of T (Hinton et al. 2015).
    """
    teacher = torch.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    student = torch.log_softmax(student_logits / temperature, dim=-1)
    kl = (teacher.exp() * (teacher - student)).sum(dim=-1)
    return temperature**2 * masked_mean(kl, mask)


def route(present: Tensor, when_present: Tensor, when_absent: Tensor) -> Tensor:
    """Per sample: ``when_present`` where ``present`` [B], else ``when_absent``."""
    shape = (-1,) + (1,) * (when_present.dim() - 1)
    return torch.where(present.view(shape), when_present, when_absent)


def route_outputs(
    present: Tensor, when_present: Output, when_absent: Output, extras: dict[str, Tensor]
) -> Output:
    """One output from two sub-models' outputs: logits and attention routed per sample."""
    return Output(
        logits=route(present, when_present.logits, when_absent.logits),
        attention=route(present, when_present.attention, when_absent.attention),
        extras=extras,
    )
