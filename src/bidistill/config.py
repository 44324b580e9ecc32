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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bidistill.errors import ConfigError

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # pragma: no cover - Python 3.10

    class StrEnum(str, Enum):
        def __str__(self) -> str:
            return str(self.value)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
    """A binary label made from one column: ``positive`` values are 1, ``negative`` values 0."""

    column: str
    positive: list[str] = Field(min_length=1, description="Values of the column that mean 1.")
    negative: list[str] | None = Field(
        default=None,
        description="Values that mean 0; default: every other non-blank value. Rows whose value "
        "is in neither list are left out of the cohort (and counted in the log).",
    )


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
    seed: int = 0


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
        default=True, description="Tissue detection: treat blue, green and black ink as background."
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
    dir: Path = Path("features")
    encoder: str = Field(
        default="resnet50-trunc",
        description="Patch encoder: a registry name, a timm name, 'hf-hub:org/model', or a "
        "local checkpoint path.",
    )
    checkpoint: Path | None = None
    batch_size: int = Field(default=64, ge=1)
    num_workers: int = Field(default=2, ge=0)
    precision: Literal["float32", "float16"] = "float32"
    device: str = "auto"


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


class TrainingConfig(_Section):
    epochs: int = Field(default=40, ge=1)
    batch_size: int = Field(default=16, ge=1)
    lr: float = Field(default=2e-4, gt=0)
    weight_decay: float = Field(default=1e-2, ge=0)
    lr_warmup_epochs: int = Field(
        default=2, ge=0, description="Epochs of linear learning-rate warm-up (then cosine decay)."
    )
    grad_clip: float | None = Field(default=1.0, gt=0)
    class_weighting: bool = True
    patience: int = Field(default=10, ge=1, description="Early-stopping patience in epochs.")
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
    num_workers: int = Field(default=0, ge=0)
    device: str = Field(default="auto", description="auto, cpu, cuda, cuda:1, mps.")
    seed: int = 0

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
    missing_rates: list[float] = Field(default=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    mask_seeds: int = Field(default=10, ge=1)
    bootstrap: int = Field(default=1000, ge=0)
    ci_level: float = Field(default=0.95, gt=0, lt=1)
    threshold: Literal["youden"] | float = "youden"
    reference_method: str = "bd"
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


class ExperimentConfig(_Section):
    name: str = "experiment"
    cohort: CohortConfig
    slides: SlidesConfig | None = None
    tiling: TilingConfig = Field(default_factory=TilingConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    methods: list[MethodConfig] = Field(default_factory=lambda: [MethodConfig(name="bd")])
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)

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

    def resolve_paths(self, base_dir: Path) -> ExperimentConfig:
        """Make every relative path absolute against ``base_dir`` (the config file's folder)."""
        for section in (self, self.cohort, self.slides, self.tiling, self.features):
            if section is None:
                continue
            for name in type(section).model_fields:
                value = getattr(section, name)
                if isinstance(value, Path) and not value.is_absolute():
                    setattr(section, name, (base_dir / value).resolve())
        return self


# --- loading ------------------------------------------------------------------------------------


def load_config(path: str | Path) -> ExperimentConfig:
    """Read, validate and resolve an experiment config.

    Raises:
        ConfigError: the file is missing or is not YAML, or a key is unknown, misspelt, of the
            wrong type or out of range; the message names the file, the section and the key.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found (make one with `bidistill init`)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return parse_config(raw, source=path).resolve_paths(path.parent.resolve())


def parse_config(raw: dict[str, Any], *, source: str | Path = "<config>") -> ExperimentConfig:
    """Validate a config mapping; errors become ``ConfigError`` naming ``source``."""
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        lines = [_describe_error(e, raw) for e in err.errors()]
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
        model = _model_in(field.annotation) or model
    return list(model.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found:
            return found
    return None


def dump_config(config: ExperimentConfig) -> str:
    """The resolved config as YAML (for the run directory and `bidistill config`)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
