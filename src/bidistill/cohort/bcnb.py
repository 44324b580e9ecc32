"""The BCNB adapter: the public BCNB download (layout in the README) → ``cohort.csv`` (one row
per slide: ``patient_id``, ``slide_id``, ``split`` and the raw clinical columns) and a ready
``config.yaml``. Values are not parsed here: the config declares each column's kind and parser.
``--protocol paper`` adds ``bidistill/configs/bcnb-paper.yaml`` and trains on the authors' patches
(``paper_patches/``) when present, else on tiles of the annotated tumour regions.
"""

from __future__ import annotations

import difflib
import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from bidistill._io import write_csv, write_text
from bidistill._text import count, verb
from bidistill.cohort.parsers import normalise_text
from bidistill.config import parse_config
from bidistill.errors import CohortError

CLINICAL_XLSX = "patient-clinical-data.xlsx"
SPLIT_DIR = "dataset-splitting"
SPLIT_FILES = {"train": "train_id.txt", "val": "val_id.txt", "test": "test_id.txt"}
WSI_DIR = "WSIs"
PAPER_PATCHES_DIR = "paper_patches"
# BCNB slides are scanned at 20x; the JPEGs carry no resolution, so this is an assumption.
ASSUMED_MPP = 0.5

PATIENT_ID = "Patient ID"
ALN_STATUS = "ALN status"
BCNB_COLUMNS = (
    PATIENT_ID,
    "Age(years)",
    "Tumour Size(cm)",
    "Tumour Type",
    "ER",
    "PR",
    "HER2",
    "HER2 Expression",
    "Histological grading",
    "Surgical",
    "Ki67",
    "Molecular subtype",
    "Number of lymph node metastases",
    ALN_STATUS,
)
# The nodal status, the node count and the surgery (chosen with the nodal status known) all
# reveal the ALN label: refused as features for every ALN task.
ALN_LEAKAGE = (ALN_STATUS, "Number of lymph node metastases", "Surgical")


@dataclass(frozen=True)
class BcnbTask:
    """A binary task: ``label`` column values in ``positive`` are 1, in ``negative`` 0; or,
    with ``classes`` (name → values), a K-class task. ``leakage`` lists the columns that reveal
    the label. A sub-task (``leaves_out``) leaves out the patients with any other value (its
    config says ``unlisted: drop``); for the others, any other value is an error."""

    label: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    leakage: tuple[str, ...]
    description: str
    leaves_out: bool = False
    classes: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def class_values(self) -> dict[str, tuple[str, ...]]:
        """Class → its values, as the summary counts them (binary: positive, negative)."""
        if self.classes:
            return dict(self.classes)
        return {"positive": self.positive, "negative": self.negative}

    def label_config(self) -> dict[str, Any]:
        """The config's ``cohort.label`` entry."""
        if self.classes:
            label = {"column": self.label, "classes": {n: list(v) for n, v in self.classes}}
        else:
            label = {"column": self.label, "positive": list(self.positive)}
            label["negative"] = list(self.negative)
        return label | ({"unlisted": "drop"} if self.leaves_out else {})

    def describe(self) -> str:
        if self.classes:
            listed = ", ".join(f"{n} {list(v)}" for n, v in self.classes)
            return f"label '{self.label}' classes {listed}"
        return (
            f"label '{self.label}' positive {list(self.positive)}, negative {list(self.negative)}"
        )


# One line per task. The molecular subtype is defined from ER, PR, HER2 (and Ki67), and the
# HER2 IHC score decides the HER2 status, so they leak the receptor labels.
TASKS: dict[str, BcnbTask] = {
    "aln": BcnbTask(ALN_STATUS, ("N+(1-2)", "N+(>2)"), ("N0",), ALN_LEAKAGE, "N0 vs N+ (any)"),
    "aln-n0-vs-1-2": BcnbTask(
        ALN_STATUS, ("N+(1-2)",), ("N0",), ALN_LEAKAGE, "N0 vs N+(1-2)", leaves_out=True
    ),
    "aln-n0-vs-gt2": BcnbTask(
        ALN_STATUS, ("N+(>2)",), ("N0",), ALN_LEAKAGE, "N0 vs N+(>2)", leaves_out=True
    ),
    "er": BcnbTask("ER", ("Positive",), ("Negative",), ("Molecular subtype",), "ER status"),
    "pr": BcnbTask("PR", ("Positive",), ("Negative",), ("Molecular subtype",), "PR status"),
    "her2": BcnbTask(
        "HER2", ("Positive",), ("Negative",), ("HER2 Expression", "Molecular subtype"), "HER2"
    ),
    # The three ALN classes the BCNB authors report.
    "aln3": BcnbTask(
        ALN_STATUS,
        (),
        (),
        ALN_LEAKAGE,
        "N0 vs N+(1-2) vs N+(>2)",
        classes=(("N0", ("N0",)), ("N+(1-2)", ("N+(1-2)",)), ("N+(>2)", ("N+(>2)",))),
    ),
    # The subtype is defined from ER, PR, HER2 and Ki67: none of them may be a feature.
    "subtype": BcnbTask(
        "Molecular subtype",
        (),
        (),
        ("ER", "PR", "HER2", "HER2 Expression", "Ki67"),
        "molecular subtype (four classes)",
        classes=tuple(
            (name, (name,)) for name in ("Luminal A", "Luminal B", "HER2(+)", "Triple negative")
        ),
    ),
}
DEFAULT_TASK = "aln"

# Short feature name → its `cohort.clinical` entry in the config.
FEATURES: dict[str, dict[str, Any]] = {
    "age": {"column": "Age(years)", "kind": "numeric"},
    "tumour_size": {"column": "Tumour Size(cm)", "kind": "numeric", "parser": "number"},
    "er": {"column": "ER", "kind": "binary", "positive": ["Positive"]},
    "pr": {"column": "PR", "kind": "binary", "positive": ["Positive"]},
    "her2": {"column": "HER2", "kind": "binary", "positive": ["Positive"]},
    "her2_expression": {
        "column": "HER2 Expression",
        "kind": "ordinal",
        "categories": ["0", "1+", "2+", "3+"],
    },
    "grade": {"column": "Histological grading", "kind": "ordinal", "categories": ["1", "2", "3"]},
    "ki67": {"column": "Ki67", "kind": "numeric", "parser": "percent"},
    "tumour_type": {"column": "Tumour Type", "kind": "categorical"},
    "subtype": {"column": "Molecular subtype", "kind": "categorical"},
}
FEATURE_SETS: dict[str, tuple[str, ...]] = {
    # The five features of the BCNB authors' baselines and of the BD paper.
    "balnmp5": ("age", "tumour_size", "er", "pr", "her2"),
    "all": tuple(FEATURES),
}
DEFAULT_FEATURE_SET = "balnmp5"


# --- reading the download -----------------------------------------------------------------------


def read_clinical(root: str | Path) -> pd.DataFrame:
    """``patient-clinical-data.xlsx`` as raw text: one row per patient, the 14 ``BCNB_COLUMNS``
    ("" for blank, whole numbers without ".0", full-width symbols kept as written)."""
    import openpyxl

    path = Path(root) / CLINICAL_XLSX
    if not path.is_file():
        raise CohortError(
            f"{root}: not a BCNB folder: {CLINICAL_XLSX} not found (expected the BCNB download "
            f"with {CLINICAL_XLSX}, {SPLIT_DIR}/ and {WSI_DIR}/)"
        )
    try:
        workbook = openpyxl.load_workbook(path, read_only=True, data_only=True)
        rows = list(workbook.worksheets[0].iter_rows(values_only=True))
        workbook.close()
    except Exception as err:  # openpyxl raises many types for a damaged file
        raise CohortError(f"{path}: cannot read the workbook ({err})") from err
    if not rows:
        raise CohortError(f"{path}: the first sheet is empty; expected the 14 BCNB columns")
    header = [_cell_text(h) for h in rows[0]]
    _check_header(header, path)
    index = {name: header.index(name) for name in BCNB_COLUMNS}
    records = []
    for row in rows[1:]:
        cells = [_cell_text(c) for c in row]
        if not any(cells):
            continue  # spreadsheets often end with formatted but empty rows
        cells += [""] * (len(header) - len(cells))
        records.append([cells[index[name]] for name in BCNB_COLUMNS])
    frame = pd.DataFrame(records, columns=list(BCNB_COLUMNS), dtype=str)
    _check_patient_ids(frame, path)
    return frame


def _cell_text(value: Any) -> str:
    """A spreadsheet cell as text, without interpreting it (the config's parsers do that)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        # A grade typed as 2 may be stored as 2.0, and 0.3 as 0.30000000000000004.
        return str(int(value)) if value.is_integer() else format(value, ".15g")
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return str(value).strip()


def _check_header(header: list[str], path: Path) -> None:
    missing = [name for name in BCNB_COLUMNS if name not in header]
    if missing:
        hints = []
        for name in missing:
            close = difflib.get_close_matches(name, [h for h in header if h], n=1)
            hints.append(f"'{name}'" + (f" (found '{close[0]}')" if close else ""))
        raise CohortError(
            f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(hints)}; "
            f"a BCNB clinical table has the 14 columns: {', '.join(BCNB_COLUMNS)}"
        )
    repeated = sorted({h for h in header if h in BCNB_COLUMNS and header.count(h) > 1})
    if repeated:
        raise CohortError(f"{path}: column(s) {repeated} appear more than once in the header")


def _check_patient_ids(frame: pd.DataFrame, path: Path) -> None:
    ids = frame[PATIENT_ID]
    # Spreadsheet row numbers: the header is row 1 (blank rows skipped above are rare).
    blank = ids.index[ids == ""]
    if len(blank):
        raise CohortError(f"{path}: row {blank[0] + 2}: blank '{PATIENT_ID}'")
    repeated = ids[ids.duplicated(keep=False)]
    if len(repeated):
        first = repeated.iloc[0]
        rows = ", ".join(str(i + 2) for i in repeated.index[repeated == first])
        raise CohortError(f"{path}: '{PATIENT_ID}' {first} appears on rows {rows}")


def read_splits(root: str | Path, patient_ids: list[str]) -> dict[str, str] | None:
    """patient id → ``train``/``val``/``test`` from the official split files, or None when
    ``dataset-splitting/`` is absent."""
    split_dir = Path(root) / SPLIT_DIR
    if not split_dir.is_dir():
        return None
    for name in SPLIT_FILES.values():
        if not (split_dir / name).is_file():
            present = sorted(p.name for p in split_dir.iterdir())
            raise CohortError(
                f"{split_dir / name}: split file not found; {SPLIT_DIR}/ must hold "
                f"{', '.join(SPLIT_FILES.values())} (it holds: {', '.join(present) or 'nothing'})"
            )
    known = set(patient_ids)
    assigned: dict[str, str] = {}
    where: dict[str, str] = {}
    for split, name in SPLIT_FILES.items():
        path = split_dir / name
        # splitlines() handles the CRLF line ends of the download; utf-8-sig drops a BOM.
        lines = path.read_bytes().decode("utf-8-sig").splitlines()
        unknown = []
        for line_no, line in enumerate(lines, start=1):
            patient_id = normalise_text(line)
            if not patient_id:
                continue
            if patient_id not in known:
                unknown.append(f"line {line_no}: '{patient_id}'")
                continue
            if patient_id in assigned:
                raise CohortError(
                    f"{path}: line {line_no}: patient '{patient_id}' is already in "
                    f"{where[patient_id]}; a patient belongs to one split"
                )
            assigned[patient_id] = split
            where[patient_id] = f"{path.name} line {line_no}"
        if unknown:
            shown = "; ".join(unknown[:5]) + (
                f"; … {len(unknown) - 5} more" if len(unknown) > 5 else ""
            )
            raise CohortError(
                f"{path}: {len(unknown)} patient id(s) not in {CLINICAL_XLSX}: {shown}"
            )
    return assigned


@dataclass
class SlideInventory:
    """What the BCNB folder holds besides the table, per patient id."""

    slides: dict[str, Path] = field(default_factory=dict)  # patient id → WSIs/<id>.jpg
    annotated: set[str] = field(default_factory=set)  # patients with WSIs/<id>.json
    paper_patches: set[str] = field(default_factory=set)  # patients with paper_patches/<id>*
    wsi_dir: Path | None = None
    patch_root: Path | None = None  # the folder of per-patient patch folders, when there is one


def find_slides(root: str | Path, patient_ids: list[str]) -> SlideInventory:
    """Find each patient's slide, tumour annotation and pre-cut patches (all optional)."""
    root = Path(root)
    inventory = SlideInventory()
    wsi_dir = root / WSI_DIR
    if wsi_dir.is_dir():
        inventory.wsi_dir = wsi_dir
        files = {p.name.lower(): p for p in wsi_dir.iterdir()}
        for pid in patient_ids:
            jpg = files.get(f"{pid}.jpg".lower()) or files.get(f"{pid}.jpeg".lower())
            if jpg is not None:
                inventory.slides[pid] = jpg
            if f"{pid}.json".lower() in files:
                inventory.annotated.add(pid)
    patch_dir = root / PAPER_PATCHES_DIR
    if (patch_dir / "patches").is_dir():  # paper_patches.zip unpacks to patches/<id>/
        patch_dir = patch_dir / "patches"
    if patch_dir.is_dir():
        # The patches are grouped per patient; accept a folder or files named after the id.
        stems = {p.name.split("_")[0].split(".")[0] for p in patch_dir.iterdir()}
        inventory.paper_patches = stems & set(patient_ids)
        folders = {p.name for p in patch_dir.iterdir() if p.is_dir()}
        if inventory.paper_patches & folders:
            inventory.patch_root = patch_dir
    return inventory


# --- writing the cohort -------------------------------------------------------------------------


def build_cohort_table(
    clinical: pd.DataFrame,
    splits: dict[str, str] | None,
    inventory: SlideInventory,
    *,
    patches: bool = False,
) -> pd.DataFrame:
    """``patient_id``, ``slide_id`` (blank without a JPEG, or with ``patches`` a patch folder),
    ``split`` and the raw clinical columns; patients in no split file are left out."""
    table = clinical.rename(columns={PATIENT_ID: "patient_id"})
    if splits is not None:
        table = table[table["patient_id"].isin(splits)].copy()
        table.insert(1, "split", [splits[p] for p in table["patient_id"]])
    if patches:  # the authors' patch folders, named by the patient id
        names = {p.name for p in inventory.patch_root.iterdir() if p.is_dir()}
        table.insert(1, "slide_id", [p if p in names else "" for p in table["patient_id"]])
    elif inventory.wsi_dir is not None:
        # The file stem, as the slide reader looks the file up by it (e.g. "12" for 12.JPG).
        stems = {p: path.stem for p, path in inventory.slides.items()}
        table.insert(1, "slide_id", [stems.get(p, "") for p in table["patient_id"]])
    return table.reset_index(drop=True)


def feature_columns(task: str, feature_set: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The `cohort.clinical` entries of ``feature_set`` for ``task``, and the features dropped
    (the label column and the task's leakage columns are never features)."""
    spec = _task(task)
    if feature_set not in FEATURE_SETS:
        raise CohortError(
            f"unknown BCNB feature set '{feature_set}'; choose one of: {', '.join(FEATURE_SETS)}"
        )
    kept, dropped = [], []
    for name in FEATURE_SETS[feature_set]:
        entry = FEATURES[name]
        if entry["column"] in {spec.label, *spec.leakage}:
            dropped.append(name)
        else:
            kept.append({"name": name, **entry})
    return kept, dropped


def _task(task: str) -> BcnbTask:
    if task not in TASKS:
        raise CohortError(f"unknown BCNB task '{task}'; choose one of: {', '.join(TASKS)}")
    return TASKS[task]


def config_text(
    *,
    task: str,
    feature_set: str,
    table: str,
    has_splits: bool,
    wsi_dir: Path | None,
    protocol: str = "features",
    patch_root: Path | None = None,
) -> str:
    """The experiment config YAML for ``task``, validated; no ``wsi_dir`` and no
    ``patch_root`` (the authors' patch folders) give a clinical-only config."""
    spec = _task(task)
    clinical, _ = feature_columns(task, feature_set)
    cohort: dict[str, Any] = {"table": table, "patient_column": "patient_id"}
    if wsi_dir is not None or patch_root is not None:
        cohort["slide_column"] = "slide_id"
    cohort["label"] = spec.label_config()
    if has_splits:
        cohort["split_column"] = "split"
    cohort["clinical"] = clinical
    cohort["leakage_columns"] = list(spec.leakage)
    if has_splits:
        cohort["splits"] = {"mode": "table"}
    parts = [
        f"# bidistill experiment: BCNB, task '{task}' ({spec.description}), "
        f"clinical features '{feature_set}'.\n"
        "# Written by `bidistill bcnb prepare`. The cohort table keeps every BCNB column with\n"
        "# its raw values, so another task or feature set is an edit of this file (or a rerun\n"
        "# with --task / --features).",
        f"name: bcnb-{task}" if protocol != "paper" else "",  # the protocol names it
        _yaml({"cohort": cohort}),
    ]
    if patch_root is not None:
        parts.append(_yaml({"slides": {"dir": str(patch_root), "mpp": ASSUMED_MPP}}))
    elif wsi_dir is not None:
        slides = {"dir": str(wsi_dir), "annotations_dir": str(wsi_dir)}
        slides_yaml = _yaml({"slides": slides}).rstrip("\n")
        # BCNB slides are scanned at 20x, but the JPEGs record no microns per pixel.
        slides_yaml += (
            f"\n  mpp: {ASSUMED_MPP}  # ASSUMED (20x scan): the BCNB JPEGs carry no MPP; "
            "check it before trusting tile sizes\n"
        )
        parts.append(slides_yaml)
    if protocol == "paper":  # the shipped protocol's sections, comments kept, under this task
        from bidistill.configs import protocol_text

        paper = protocol_text("bcnb-paper")
        parts.append(paper.replace("name: bcnb-aln-paper", f"name: bcnb-{task}-paper", 1))
    text = "\n".join(part.rstrip("\n") + "\n" for part in parts if part)
    parse_config(yaml.safe_load(text), source="<bcnb config>")  # a bug here must not ship
    return text


PROTOCOLS = ("features", "paper")


def _yaml(data: dict[str, Any]) -> str:
    return yaml.dump(data, Dumper=_ConfigDumper, sort_keys=False, allow_unicode=True)


class _ConfigDumper(yaml.SafeDumper):
    """Block style, except lists of plain values, which read best inline (``[Positive]``)."""


def _represent_list(dumper: yaml.SafeDumper, items: list) -> yaml.Node:
    inline = all(isinstance(i, (str, int, float)) for i in items)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", items, flow_style=inline)


_ConfigDumper.add_representer(list, _represent_list)


# --- prepare ------------------------------------------------------------------------------------


@dataclass
class PrepareReport:
    root: Path
    task: str
    feature_set: str
    table_path: Path
    config_path: Path
    patients: int
    patients_in_table: int
    slides: int
    annotated: int
    paper_patches: int
    has_wsi_dir: bool
    patients_without_slide: list[str]
    patients_without_split: list[str]
    features: list[str]
    dropped_features: list[str]
    label_counts: dict[str, dict[str, int]]  # split → {each class (binary: "positive",
    # "negative"), "left out"}
    missing: dict[str, int]  # column → blank cells
    protocol: str = "features"
    slides_from: str = WSI_DIR  # where a paper-protocol run reads its patches

    @property
    def needs_tiling(self) -> bool:
        return self.has_wsi_dir or self.protocol == "paper"

    def format(self) -> str:
        spec = TASKS[self.task]
        lines = [
            f"BCNB folder {self.root}",
            f"  patients: {self.patients} in {CLINICAL_XLSX}, {self.patients_in_table} in the "
            "cohort table",
        ]
        if self.has_wsi_dir:
            lines.append(
                f"  slides: {self.slides} JPEGs, {self.annotated} with tumour annotations "
                f"({WSI_DIR}/<id>.json)"
            )
        else:
            lines.append(f"  slides: none ({WSI_DIR}/ absent): clinical-only cohort")
        if self.paper_patches:
            lines.append(f"  paper_patches: {count(self.paper_patches, 'patient')}")
        if n_no_slide := len(self.patients_without_slide):
            lines.append(
                f"  warning: {count(n_no_slide, 'patient')} "
                f"{verb(n_no_slide, 'has', 'have')} no slide: "
                f"{_preview(self.patients_without_slide)}"
            )
        if n_no_split := len(self.patients_without_split):
            lines.append(
                f"  warning: {count(n_no_split, 'patient')} in no split file, left out: "
                f"{_preview(self.patients_without_split)}"
            )
        lines.append(f"task '{self.task}': {spec.description}; {spec.describe()}")
        columns = [*spec.class_values, "left out"]
        widths = [max(10, len(c) + 2) for c in columns]
        share = "" if spec.classes else f"{'% pos':>8}"
        head = "".join(f"{c:>{w}}" for c, w in zip(columns, widths))
        lines.append(f"  {'split':<8}{head}{share}")
        for split, counts in self.label_counts.items():
            cells = "".join(f"{counts[c]:>{w}}" for c, w in zip(columns, widths))
            if not spec.classes:
                labelled = counts["positive"] + counts["negative"]
                cells += f"{counts['positive'] / labelled:>8.0%}" if labelled else f"{'-':>8}"
            lines.append(f"  {split:<8}{cells}")
        for split, counts in self.label_counts.items():
            if split != "all" and min(counts[c] for c in spec.class_values) == 0:
                one = "one class only" if not spec.classes else "a class without patients"
                lines.append(f"  warning: split '{split}' has {one} for this task")
        lines.append(f"features ({self.feature_set}): {', '.join(self.features) or 'none'}")
        if self.dropped_features:
            lines.append(f"  dropped (reveal the label): {', '.join(self.dropped_features)}")
        lines.append("missing values per column:")
        for column, blank in self.missing.items():
            share = blank / self.patients_in_table if self.patients_in_table else 0
            lines.append(f"  {column:<34}{blank:>6}  ({share:.0%})")
        if self.protocol == "paper":
            source = (
                f"the authors' patches ({PAPER_PATCHES_DIR}/, one folder per patient)"
                if self.slides_from != WSI_DIR
                else f"256 px tiles of the annotated tumour regions ({WSI_DIR}/)"
            )
            lines.append(
                "protocol: paper (VGG16-BN trained end to end on bags of 10 patches, SGD, "
                f"cosine warm restarts; bidistill/configs/bcnb-paper.yaml) on {source}"
            )
        lines += [f"wrote {self.table_path}", f"wrote {self.config_path}"]
        return "\n".join(lines)


def _preview(ids: list[str], n: int = 5) -> str:
    return ", ".join(ids[:n]) + (f", … ({len(ids) - n} more)" if len(ids) > n else "")


def prepare_bcnb(
    root: str | Path,
    out_dir: str | Path,
    *,
    task: str = DEFAULT_TASK,
    feature_set: str = DEFAULT_FEATURE_SET,
    protocol: str = "features",
) -> PrepareReport:
    """Turn a BCNB download into ``<out_dir>/cohort.csv`` and ``<out_dir>/config.yaml``; works
    without ``WSIs/`` (clinical only) and without ``dataset-splitting/`` (the run splits)."""
    root, out_dir = Path(root), Path(out_dir)
    if not root.is_dir():
        raise CohortError(f"{root}: BCNB folder not found")
    spec = _task(task)
    features, dropped = feature_columns(task, feature_set)
    clinical = read_clinical(root)
    patient_ids = clinical[PATIENT_ID].tolist()
    splits = read_splits(root, patient_ids)
    inventory = find_slides(root, patient_ids)
    patches = _check_protocol(protocol, inventory, root)
    table = build_cohort_table(clinical, splits, inventory, patches=patches)

    table_path = out_dir / "cohort.csv"
    config_path = out_dir / "config.yaml"
    text = config_text(
        task=task,
        feature_set=feature_set,
        table=table_path.name,
        has_splits=splits is not None,
        wsi_dir=inventory.wsi_dir.resolve() if inventory.wsi_dir is not None else None,
        protocol=protocol,
        patch_root=inventory.patch_root.resolve() if patches else None,
    )
    write_csv(table_path, table)
    write_text(config_path, text)

    in_table = table["patient_id"].tolist()
    return PrepareReport(
        root=root,
        task=task,
        feature_set=feature_set,
        table_path=table_path,
        config_path=config_path,
        patients=len(patient_ids),
        patients_in_table=len(in_table),
        slides=len(inventory.slides),
        annotated=len(inventory.annotated),
        paper_patches=len(inventory.paper_patches),
        has_wsi_dir=inventory.wsi_dir is not None,
        protocol=protocol,
        slides_from="paper_patches" if patches else WSI_DIR,
        patients_without_slide=(
            [p for p in in_table if p not in inventory.slides] if inventory.wsi_dir else []
        ),
        patients_without_split=(
            [p for p in patient_ids if p not in splits] if splits is not None else []
        ),
        features=[f["name"] for f in features],
        dropped_features=dropped,
        label_counts=_label_counts(table, spec),
        missing={c: int((table[c] == "").sum()) for c in BCNB_COLUMNS if c != PATIENT_ID},
    )


def _check_protocol(protocol: str, inventory: SlideInventory, root: Path) -> bool:
    """Whether the config reads the authors' patch folders (``paper`` with ``paper_patches/``)."""
    if protocol not in PROTOCOLS:
        raise CohortError(f"unknown protocol '{protocol}'; choose one of: {', '.join(PROTOCOLS)}")
    if protocol != "paper":
        return False
    if inventory.patch_root is not None:
        return True
    if inventory.wsi_dir is None:
        raise CohortError(
            f"{root}: the paper protocol trains on the slides, but there is neither "
            f"{WSI_DIR}/ nor {PAPER_PATCHES_DIR}/ (one folder of patches per patient)"
        )
    return False


def _label_counts(table: pd.DataFrame, spec: BcnbTask) -> dict[str, dict[str, int]]:
    """Per split (and ``all``): patients per class of the task, and those it leaves out."""
    # Compare as the cohort loader does: NFKC-normalised and case-insensitive.
    class_of = {
        normalise_text(v).casefold(): name
        for name, values in spec.class_values.items()
        for v in values
    }

    def kind(value: str) -> str:
        return class_of.get(normalise_text(value).casefold(), "left out")

    def tally(rows: pd.DataFrame) -> dict[str, int]:
        found = Counter(kind(v) for v in rows[spec.label])
        return {k: found.get(k, 0) for k in [*spec.class_values, "left out"]}

    if "split" not in table:
        return {"all": tally(table)}
    order = {"train": 0, "val": 1, "test": 2}
    groups = sorted(table.groupby("split", sort=False), key=lambda g: order.get(g[0], 3))
    return {**{str(split): tally(rows) for split, rows in groups}, "all": tally(table)}
