"""The experiment config: one YAML file describes one experiment.

Every section is a pydantic model with ``extra="forbid"``, so a misspelt key is an error that names
the key, its section and the file. Paths are relative to the config file. ``load_config`` is the
only way in: it reads the YAML, resolves paths and turns pydantic's errors into ``ConfigError``.
"""

from __future__ import annotations

import difflib
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from bidistill.errors import ConfigError

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # pragma: no cover - Python 3.10

    class StrEnum(str, Enum):
        def __str__(self) -> str:
            return str(self.value)


# Seeds reach NumPy's legacy seeding and scikit-learn's random_state, which take 32 bits.
MAX_SEED = 2**32 - 1
# torch device names a config may hold; whether the device exists is checked when a stage starts.
DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:\d+)?|xpu(:\d+)?)$"


class _Section(BaseModel):
    # No NaN or infinity in any number: `lr: .inf` would pass `gt=0` and wreck the training.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads `epochs: true` as 1; a YAML boolean where a number belongs is a typo.
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and _expects_number(field.annotation):
            raise ValueError(f"expected a number, got {str(value).lower()}")
        return value


def _expects_number(annotation: Any) -> bool:
    """True when ``annotation`` admits int or float but not bool (``int``, ``float | None``...)."""
    members = set(getattr(annotation, "__args__", ())) or {annotation}
    return bool(members & {int, float}) and bool not in members


# --- cohort -------------------------------------------------------------------------------------


class ClinicalKind(StrEnum):
    numeric = "numeric"
    categorical = "categorical"
    ordinal = "ordinal"
    binary = "binary"


class ValueParser(StrEnum):
    number = "number"  # "3,5" → 3.5, stray whitespace, units stripped ("2.1 cm")
    percent = "percent"  # "30%", "0.3", "30-40%", "＜5%", "＞30%" → fraction in [0, 1]


class ClinicalColumn(_Section):
    """One clinical feature: a column of the cohort table and how to read it."""

    column: str = Field(description="Column name in the cohort table.")
    kind: ClinicalKind
    parser: ValueParser | None = Field(
        default=None, description="How to parse text cells of a numeric column."
    )
    categories: list[str] | None = Field(
        default=None,
        description="Ordinal: the levels in order (required). Categorical: the allowed levels "
        "(optional; default: the levels seen in training).",
    )
    positive: list[str] | None = Field(
        default=None,
        description="Binary: the values that mean 1 (default: 1, yes, true, positive, +).",
    )
    name: str | None = Field(default=None, description="Short feature name; default: the column.")

    @property
    def feature_name(self) -> str:
        return self.name or self.column

    @model_validator(mode="after")
    def _check_kind_options(self) -> ClinicalColumn:
        if self.kind == ClinicalKind.ordinal and not self.categories:
            raise ValueError(
                f"ordinal column '{self.column}' needs 'categories': its levels in order"
            )
        if self.parser is not None and self.kind != ClinicalKind.numeric:
            raise ValueError(f"'parser' applies to numeric columns only ('{self.column}')")
        return self


class LabelConfig(_Section):
    """The label made from one column: binary (``positive`` values are 1, ``negative`` values
    0) or K classes (``classes``: each class's name and its values; codes 0..K-1 in order)."""

    column: str = Field(description="The label's column in the table.")
    positive: list[str] | None = Field(
        default=None,
        min_length=1,
        description="Binary label: values of the column that mean 1 (give this or `classes`).",
    )
    negative: list[str] | None = Field(
        default=None,
        description="Values that mean 0; default: every other non-blank value. With `negative` "
        "set, a value in neither list is an error unless `unlisted: drop`.",
    )
    classes: dict[str, list[str]] | None = Field(
        default=None,
        description="A label of two or more named classes, each a list of the column's values "
        "(e.g. `{N0: [N0], N+(1-2): [N+(1-2)], N+(>2): [N+(>2)]}`); codes follow the order "
        "written. Two classes are the binary task with the second class positive. A value in "
        "no list is an error unless `unlisted: drop`.",
    )
    unlisted: Literal["error", "drop"] = Field(
        default="error",
        description="What a label value in no list does: `error` stops with a list of such "
        "values; `drop` leaves those patients out (and says how many).",
    )
    positive_name: str | None = Field(
        default=None,
        description="The positive class as predictions name it; default: the positive values "
        "joined with 'or' (e.g. `N+(1-2) or N+(>2)`).",
    )
    negative_name: str | None = Field(
        default=None,
        description="The negative class as predictions name it; default: the negative values "
        "joined with 'or', else `not <positive class>`.",
    )

    @property
    def n_classes(self) -> int:
        return len(self.classes) if self.classes else 2

    @property
    def binary(self) -> bool:
        return self.n_classes == 2

    @property
    def class_names(self) -> list[str]:
        """Each class's name, in code order (binary: negative, positive)."""
        return list(self.classes) if self.classes else [self.negative_class, self.positive_class]

    @property
    def class_values(self) -> list[list[str]] | None:
        """Each class's values in code order; None for a binary label whose 0 is "the rest"."""
        if self.classes:
            return list(self.classes.values())
        return None if self.negative is None else [self.negative, self.positive or []]

    @property
    def positive_class(self) -> str:
        """The class that a binary probability is the probability of, as the config names it."""
        if self.classes:
            return list(self.classes)[-1]
        return self.positive_name or " or ".join(self.positive or [])

    @property
    def negative_class(self) -> str:
        if self.classes:
            return list(self.classes)[0]
        if self.negative_name:
            return self.negative_name
        if self.negative:
            return " or ".join(self.negative)
        joined = len(self.positive or []) > 1 and not self.positive_name
        return f"not ({self.positive_class})" if joined else f"not {self.positive_class}"

    def describe(self) -> str:
        """The label as the report and messages name it."""
        if self.classes:
            return f"'{self.column}' ({' vs '.join(self.classes)})"
        negative = ", ".join(self.negative) if self.negative else "the rest"
        return f"'{self.column}' ({', '.join(self.positive or [])} vs {negative})"

    @model_validator(mode="after")
    def _one_form(self) -> LabelConfig:
        if (self.positive is None) == (self.classes is None):
            raise ValueError(
                "give the label's classes either as 'positive' (with an optional 'negative': "
                "a binary label) or as 'classes' (each class's name and values), not both"
            )
        if self.classes is not None:
            binary_keys = ("negative", "positive_name", "negative_name")
            if given := [k for k in binary_keys if getattr(self, k) is not None]:
                raise ValueError(
                    f"{given} belong to the binary form; with 'classes' each class is named "
                    "by its key"
                )
            if len(self.classes) < 2:
                raise ValueError(f"'classes' needs two or more classes, got {list(self.classes)}")
            if empty := [name for name, values in self.classes.items() if not values]:
                raise ValueError(f"classes {empty} list no values of '{self.column}'")
        elif self.unlisted == "drop" and self.negative is None:
            raise ValueError(
                "'unlisted: drop' needs 'negative': without it every value that is not "
                "positive means 0, so no value is unlisted"
            )
        return self


class SplitMode(StrEnum):
    auto = "auto"  # the table's split column when there is one, else holdout
    table = "table"
    holdout = "holdout"
    kfold = "kfold"


class SplitConfig(_Section):
    mode: SplitMode = SplitMode.auto
    val_fraction: float = Field(default=0.15, gt=0, lt=1)
    test_fraction: float = Field(default=0.2, gt=0, lt=1)
    folds: int = Field(default=5, ge=2, description="kfold: number of folds over train+val.")
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="Seed of the random splits.")


class CohortConfig(_Section):
    table: Path = Field(description="CSV or XLSX, one row per slide (or per patient).")
    sheet: str | int | None = Field(default=None, description="XLSX sheet; default: the first.")
    patient_column: str
    slide_column: str | None = Field(
        default=None, description="Slide id column; leave out for clinical-only work."
    )
    label: LabelConfig
    split_column: str | None = None
    clinical: list[ClinicalColumn] = Field(default_factory=list)
    leakage_columns: list[str] = Field(
        default_factory=list,
        description="Columns that are the label in disguise: never accepted as features.",
    )
    allow_separating: list[str] = Field(
        default_factory=list,
        description="Features allowed to separate the training labels almost perfectly "
        "(single-feature AUC >= 0.95); any other such feature stops the run.",
    )
    splits: SplitConfig = Field(default_factory=SplitConfig)

    @model_validator(mode="after")
    def _refuse_leaking_features(self) -> CohortConfig:
        leaking = {self.label.column, *self.leakage_columns}
        for col in self.clinical:
            if col.column in leaking:
                what = "the label column" if col.column == self.label.column else "a leakage column"
                raise ValueError(
                    f"clinical column '{col.column}' is {what}: it reveals the label and can "
                    "never be a feature; remove it from 'clinical'"
                )
        names = [c.feature_name for c in self.clinical]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"clinical features named more than once: {dupes}")
        return self


# --- slides and tiling --------------------------------------------------------------------------


class MaskKind(StrEnum):
    auto = "auto"  # annotations where a slide has them, tissue detection elsewhere
    annotations = "annotations"
    tissue = "tissue"
    none = "none"


class SlidesConfig(_Section):
    dir: Path = Field(
        description="Folder of slide files named <slide_id>.<ext> (or patch folders)."
    )
    mpp: float | None = Field(
        default=None, gt=0, description="Microns per pixel for files that lack it."
    )
    mpp_column: str | None = Field(
        default=None, description="Cohort-table column with a per-slide MPP."
    )
    annotations_dir: Path | None = Field(
        default=None, description="Folder of <slide_id>.json (BCNB) or .geojson (QuPath)."
    )
    cache_dir: Path | None = Field(
        default=None,
        description="Where plain images (JPEG, PNG) are converted once to tiled pyramidal "
        "TIFFs; default: <tiling.coords_dir>/.cache.",
    )


class TilingConfig(_Section):
    coords_dir: Path = Field(
        default=Path("coords"), description="Output: <coords_dir>/<slide_id>.h5 and qc/*.png."
    )
    patch_size: int = Field(default=256, ge=16, description="Tile side in pixels at `mpp`.")
    mpp: float | None = Field(
        default=0.5, gt=0, description="Target microns per pixel; null tiles at level 0."
    )
    magnification: float | None = Field(
        default=None,
        gt=0,
        description="Target objective magnification instead of mpp (20 means 0.5 µm/px, the "
        "usual 10 / magnification convention).",
    )
    overlap: int = Field(default=0, ge=0, description="Overlap between tiles in pixels.")
    mask: MaskKind = Field(
        default=MaskKind.auto,
        description="auto: annotations where a slide has them, tissue detection elsewhere.",
    )
    min_mask_fraction: float = Field(
        default=0.5, ge=0, le=1, description="Keep a tile when this share of it is in the mask."
    )
    max_blank_fraction: float = Field(
        default=0.3, ge=0, le=1, description="Drop tiles with more background than this."
    )
    min_region_fraction: float = Field(
        default=5e-4,
        ge=0,
        lt=1,
        description="Tissue detection: drop regions smaller than this share of the slide.",
    )
    remove_pen: bool = Field(
        default=True,
        description="Treat blue, green and black ink as background, and drop tiles with blue or "
        "green marker on more than 1% of them, whatever the mask.",
    )
    workers: int = Field(default=1, ge=1, description="Slides tiled in parallel (processes).")
    qc: bool = Field(default=True, description="Write a QC PNG per slide.")

    @model_validator(mode="before")
    @classmethod
    def _magnification_sets_mpp(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("magnification") is None:
            return data
        mpp = 10 / float(data["magnification"])
        given = data.get("mpp")
        if given is not None and abs(float(given) - mpp) > 1e-9 and "mpp" in data:
            raise ValueError(
                f"magnification {data['magnification']} means mpp {mpp:g}, but mpp is {given}: "
                "give one of them"
            )
        return {**data, "mpp": mpp}

    @model_validator(mode="after")
    def _overlap_below_patch(self) -> TilingConfig:
        if self.overlap >= self.patch_size:
            raise ValueError(
                f"overlap ({self.overlap}) must be smaller than patch_size ({self.patch_size})"
            )
        return self


# --- features -----------------------------------------------------------------------------------


class FeaturesConfig(_Section):
    dir: Path = Field(
        default=Path("features"), description="Output: <dir>/<slide_id>.h5 (CLAM/TRIDENT layout)."
    )
    encoder: str = Field(
        default="resnet50-trunc",
        description="Patch encoder: a registry name (`bidistill encoders`), 'timm:<name>', "
        "'hf-hub:org/model', or a local model folder.",
    )
    checkpoint: Path | None = Field(
        default=None,
        description="Local weights file for the encoder's architecture (offline sites); nothing "
        "is downloaded.",
    )
    random_init: bool = Field(
        default=False,
        description="Random encoder weights (tests and demos only): the features carry no "
        "pretrained knowledge, and every file and report says so.",
    )
    batch_size: int = Field(default=64, ge=1, description="Tiles per forward pass.")
    num_workers: int = Field(
        default=2, ge=0, description="Data-loader processes reading tiles (0: in the main one)."
    )
    precision: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto", description="auto: bfloat16 (else float16) on a GPU, float32 on the CPU."
    )
    device: str = Field(
        default="auto", pattern=DEVICE_PATTERN, description="auto, cpu, cuda, cuda:1, mps."
    )

    @model_validator(mode="after")
    def _checkpoint_or_random(self) -> FeaturesConfig:
        if self.random_init and self.checkpoint is not None:
            raise ValueError("give `checkpoint` or `random_init: true`, not both")
        return self


# --- methods, training, evaluation --------------------------------------------------------------


class MethodConfig(BaseModel):
    """A method by registry name with its own options; the method validates the options."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(description="Registry name, e.g. bd, wsi-only.")
    label: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$",
        description="Name of this entry in the run directory and the report (default: the "
        "method name), so one method can run twice with other options.",
    )

    @property
    def key(self) -> str:
        """The entry's folder name in the run directory and its name in the report."""
        return self.label or self.name

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


# --- end-to-end training ------------------------------------------------------------------


class AugmentConfig(_Section):
    """Training augmentation of the tiles (end-to-end mode), drawn per tile from the seed."""

    flip: bool = Field(default=True, description="Random horizontal and vertical flips.")
    rotate: bool = Field(default=True, description="Random rotations by multiples of 90°.")
    brightness: float = Field(
        default=0.0, ge=0, lt=1, description="Colour jitter: brightness factor in 1 ± this."
    )
    contrast: float = Field(
        default=0.0, ge=0, lt=1, description="Colour jitter: contrast factor in 1 ± this."
    )
    saturation: float = Field(
        default=0.0, ge=0, lt=1, description="Colour jitter: saturation factor in 1 ± this."
    )
    hue: float = Field(
        default=0.0, ge=0, le=0.5, description="Colour jitter: hue shift in ± this (of a turn)."
    )


class EndToEndConfig(_Section):
    """`training.mode: end-to-end`: the patch encoder (`features.encoder`, with
    `features.checkpoint` or `features.random_init`) trains inside the method on bags of tiles
    read from the slides (`slides.dir`, tiled by `bidistill tile` into `tiling.coords_dir`).
    `training.batch_size` counts bags per optimiser step; `training.max_instances`,
    `in_memory`, `instance_dropout` and `lr_warmup_epochs` do not apply."""

    bag_size: int = Field(default=10, ge=1, description="Tiles per bag (the papers: 10).")
    train_bags_per_patient: int | None = Field(
        default=None,
        ge=1,
        description="Bags per patient per training epoch, each epoch from a new shuffle of its "
        "tiles; null: every tile once per epoch (the BCNB code).",
    )
    bags_per_patient: int | None = Field(
        default=None,
        ge=1,
        description="Bags per patient at validation and prediction; null: every tile once.",
    )
    reduction: Literal["mean", "max", "median"] = Field(
        default="mean",
        description="Patient probability from its bags' probabilities (the papers: mean).",
    )
    micro_batch: int = Field(
        default=1,
        ge=1,
        description="Bags per forward pass; a step averages the gradients of its forward "
        "passes, so any number of processes gives the same step.",
    )
    eval_batch: int = Field(default=16, ge=1, description="Bags per forward pass in prediction.")
    input_size: int | None = Field(
        default=None,
        ge=8,
        description="Side the tiles are resized to for the encoder; null: the encoder's own.",
    )
    freeze_until: str | None = Field(
        default=None,
        description="Freeze the encoder up to and including this named block (e.g. `layer2`, "
        "`blocks.11`, `body.23`), or `all`; null: train all of it.",
    )
    checkpointing: bool = Field(
        default=False, description="Gradient checkpointing in the encoder (less memory)."
    )
    precision: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto",
        description="Mixed precision: auto is bfloat16 (else float16) on a GPU, float32 on CPU.",
    )
    optimizer: Literal["adamw", "sgd"] = Field(
        default="adamw", description="adamw, or sgd with `momentum` (the BCNB code)."
    )
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD momentum.")
    backbone_lr: float | None = Field(
        default=None, gt=0, description="Learning rate of the encoder; null: training.lr."
    )
    scheduler: Literal["cosine", "cosine-restarts", "constant"] = Field(
        default="cosine",
        description="Per epoch: cosine decay over the stage, cosine annealing with warm "
        "restarts (the BCNB code), or constant.",
    )
    restart_epochs: int = Field(default=20, ge=1, description="cosine-restarts: first period.")
    restart_mult: int = Field(default=2, ge=1, description="cosine-restarts: period growth.")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)


class TrainingConfig(_Section):
    epochs: int = Field(default=40, ge=1, description="Maximum epochs per training stage.")
    batch_size: int = Field(default=16, ge=1, description="Patients per batch.")
    lr: float = Field(default=2e-4, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(default=1e-2, ge=0, description="AdamW weight decay.")
    lr_warmup_epochs: int = Field(
        default=2, ge=0, description="Epochs of linear learning-rate warm-up (then cosine decay)."
    )
    grad_clip: float | None = Field(default=1.0, gt=0)
    class_weighting: bool = True
    patience: int = Field(default=10, ge=1, description="Early-stopping patience in epochs.")
    min_steps: int | None = Field(
        default=None,
        ge=1,
        description="Optimiser steps a training stage takes at least: where `epochs` x the "
        "steps of one pass fall short (a small cohort), each epoch makes several passes over the "
        "training patients, so warm-up, patience and validation keep their meaning in epochs; "
        "null: one pass an epoch.",
    )
    max_instances: int | None = Field(
        default=2048, ge=1, description="Instances sampled per bag in training; null: all."
    )
    instance_dropout: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="Share of each bag's instances left out at random in every training epoch.",
    )
    in_memory: Literal["auto", "yes", "no"] = "auto"
    mode: Literal["features", "end-to-end"] = Field(
        default="features",
        description="features: MIL on .h5 patch features; end-to-end: the patch encoder trains "
        "inside the method on bags of tiles (`training.end_to_end`).",
    )
    end_to_end: EndToEndConfig = Field(default_factory=EndToEndConfig)
    num_workers: int = Field(default=0, ge=0, description="Data-loader worker processes.")
    device: str = Field(
        default="auto", pattern=DEVICE_PATTERN, description="auto, cpu, cuda, cuda:1, mps."
    )
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="Seed of weights and shuffling.")

    @property
    def on_tiles(self) -> bool:
        """The methods read tiles and train the patch encoder (``mode: end-to-end``): tiling is
        needed, feature extraction is not. The one reading of ``mode``."""
        return self.mode == "end-to-end"

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        # `warmup_epochs` was renamed `lr_warmup_epochs` (0.2): BD has a `warmup_epochs` option
        # of its own (a training stage). Configs and run folders written before still load.
        if isinstance(data, dict) and "warmup_epochs" in data:
            data = dict(data)
            old = data.pop("warmup_epochs")
            if "lr_warmup_epochs" in data:
                raise ValueError(
                    "training: give lr_warmup_epochs only (warmup_epochs is its old name)"
                )
            data["lr_warmup_epochs"] = old
        return data


class EvaluationConfig(_Section):
    missing_rates: list[float] = Field(default=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0], min_length=1)
    mask_seeds: int = Field(default=10, ge=1)
    bootstrap: int = Field(default=1000, ge=0)
    ci_level: float = Field(default=0.95, gt=0, lt=1)
    threshold: Literal["youden"] | float = "youden"
    reference_method: str = Field(
        default="bd",
        description="The method every other is tested against (DeLong); default: bd, or the "
        "first method when bd is not run.",
    )
    train_missing_rates: list[float] = Field(
        default_factory=list,
        description="Optional grid: share of training patients without "
        "clinical data, for methods that can learn from them.",
    )

    @field_validator("missing_rates", "train_missing_rates")
    @classmethod
    def _rates_in_unit_interval(cls, rates: list[float]) -> list[float]:
        bad = [r for r in rates if not 0 <= r <= 1]
        if bad:
            raise ValueError(f"rates must lie in [0, 1], got {bad}")
        return sorted(set(rates))

    @field_validator("threshold")
    @classmethod
    def _threshold_is_probability(cls, t: str | float) -> str | float:
        if isinstance(t, float) and not 0 < t < 1:
            raise ValueError(f"a fixed threshold must lie in (0, 1), got {t}")
        return t


class TrackingConfig(_Section):
    mlflow: str | None = Field(
        default=None,
        description="MLflow tracking URI (http://host:5000, sqlite:///mlflow.db, or a folder "
        "such as file:mlruns, relative to this file); needs `pip install 'bidistill[mlflow]'`.",
    )
    experiment: str | None = Field(
        default=None, description="MLflow experiment name; default: the config's name."
    )


class ExperimentConfig(_Section):
    name: str = "experiment"
    cohort: CohortConfig
    slides: SlidesConfig | None = None
    tiling: TilingConfig = Field(default_factory=TilingConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    methods: list[MethodConfig] = Field(
        default_factory=lambda: [MethodConfig(name="bd")], min_length=1
    )
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("methods", mode="before")
    @classmethod
    def _method_names_as_entries(cls, methods: Any) -> Any:
        # `methods: [bd, wsi-only]` is the common case; options need the mapping form.
        if isinstance(methods, list):
            return [{"name": m} if isinstance(m, str) else m for m in methods]
        return methods

    @model_validator(mode="after")
    def _unique_methods(self) -> ExperimentConfig:
        keys = [m.key for m in self.methods]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ValueError(
                f"methods listed more than once: {dupes} (give each variant its own 'label')"
            )
        return self

    @model_validator(mode="after")
    def _end_to_end_reads_slides(self) -> ExperimentConfig:
        if self.training.on_tiles and self.slides is None:
            raise ValueError(
                "training.mode: end-to-end trains on the slides' tiles: add a `slides` section "
                "(slides.dir) and tile them with `bidistill tile`"
            )
        return self

    @model_validator(mode="after")
    def _reference_is_a_method(self) -> ExperimentConfig:
        keys = [m.key for m in self.methods]
        reference = self.evaluation.reference_method
        if reference in keys:
            return self
        if "reference_method" in self.evaluation.model_fields_set:
            raise ValueError(
                f"evaluation.reference_method '{reference}' is not one of the methods "
                f"({', '.join(keys)}); name one of them"
            )
        self.evaluation.reference_method = keys[0]  # the default 'bd' is not run
        return self

    def resolve_paths(self, base_dir: Path) -> ExperimentConfig:
        """Make every relative path absolute against ``base_dir`` (the config file's folder)."""
        for section in (self, self.cohort, self.slides, self.tiling, self.features):
            if section is None:
                continue
            for name in type(section).model_fields:
                value = getattr(section, name)
                if isinstance(value, Path) and not value.is_absolute():
                    setattr(section, name, (base_dir / value).resolve())
        if self.tracking.mlflow:
            self.tracking.mlflow = resolve_tracking_uri(self.tracking.mlflow, base_dir)
        return self


def resolve_tracking_uri(uri: str, base_dir: Path) -> str:
    """A plain or ``file:`` path, relative to the config file, as an absolute ``file://`` URI;
    any other URI (``http://``, ``sqlite:///``, ``databricks``) as it is."""
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file") or (parsed.scheme == "file" and parsed.netloc):
        return uri
    path = Path(parsed.path if parsed.scheme == "file" else uri)
    return (path if path.is_absolute() else (base_dir / path).resolve()).as_uri()


# --- loading ------------------------------------------------------------------------------------


def load_config(path: str | Path) -> ExperimentConfig:
    """Read, validate and resolve an experiment config; every problem is one ``ConfigError``
    naming the file, the section and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found (make one with `bidistill init`)")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = err.object[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}: line {line}: not UTF-8 text (byte {err.object[err.start]:#04x}); save the "
            "file as UTF-8"
        ) from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: {_describe_yaml_error(err)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return parse_config(raw, source=path).resolve_paths(path.parent.resolve())


def _describe_yaml_error(err: yaml.YAMLError) -> str:
    """One line: where (line, column) and what, without PyYAML's multi-line excerpt."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    return f"{where}not valid YAML: {problem}" + (f" ({context})" if context else "")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one
    silently, so a second `training:` section would quietly replace the first)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"key '{key}' appears twice (first on line {seen[key].line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def parse_config(raw: dict[str, Any], *, source: str | Path = "<config>") -> ExperimentConfig:
    """Validate a config mapping; errors become ``ConfigError`` naming ``source``."""
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        lines = [_describe_error(e, raw) for e in err.errors()]
        if len(lines) == 1:
            raise ConfigError(f"{source}: invalid config: {lines[0]}") from None
        raise ConfigError(f"{source}: invalid config:\n  " + "\n  ".join(lines)) from None


_TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "string": "text",
    "list": "a list",
    "dict": "a mapping",
    "model": "a mapping",
    "path": "a path",
    "enum": "one of the listed values",
    "literal": "one of the listed values",
}


def _describe_error(error: dict[str, Any], raw: dict[str, Any]) -> str:
    loc = [str(p) for p in error["loc"]]
    key = ".".join(loc) or "<top level>"
    section = ".".join(loc[:-1]) or "top level"
    kind = error["type"]
    if kind == "extra_forbidden":
        valid = _valid_keys(loc[:-1])
        hint = difflib.get_close_matches(loc[-1], valid, n=1)
        did_you_mean = f" Did you mean '{hint[0]}'?" if hint else ""
        return (
            f"unknown key '{loc[-1]}' in section '{section}'.{did_you_mean} "
            f"Valid keys: {', '.join(valid)}"
        )
    if kind == "missing":
        return f"missing required key '{key}'"
    family = kind.split("_")[0]
    expected = _TYPE_WORDS.get(family)
    got = error.get("input")
    if expected and kind.endswith(("_type", "_parsing")):
        return f"'{key}': expected {expected}, got {got!r}"
    if kind == "value_error":  # our own validators: the message says it all
        message = str(error["msg"]).removeprefix("Value error, ")
        return message if not loc else f"'{key}': {message}"
    if kind == "string_pattern_mismatch" and loc[-1] == "device":
        return f"'{key}': expected auto, cpu, cuda, cuda:N, mps or xpu, got {got!r}"
    return f"'{key}': {error['msg']} (got {got!r})"


def _valid_keys(loc: list[str]) -> list[str]:
    """The field names of the model at ``loc`` (list indices are skipped)."""
    model: type[BaseModel] = ExperimentConfig
    for part in loc:
        if part.isdigit():
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        model = nested_model(field.annotation) or model
    return list(model.model_fields)


def nested_model(annotation: Any) -> type[BaseModel] | None:
    """The config section a field holds (``X``, ``X | None``, ``list[X]``), or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = nested_model(arg)
        if found:
            return found
    return None


def dump_config(config: ExperimentConfig) -> str:
    """The resolved config as YAML (for the run directory and `bidistill config`)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
