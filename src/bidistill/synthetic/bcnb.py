"""A synthetic cohort in the exact layout of the BCNB download, with a label the pixels show
(what the slides and the table hold: docs/internal-interfaces.md, "Synthetic data"). Same seed ⇒
the same bytes in every file (the xlsx carries fixed timestamps).
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from bidistill._io import atomic_path, write_text
from bidistill.cohort.bcnb import BCNB_COLUMNS, CLINICAL_XLSX, SPLIT_DIR, SPLIT_FILES, WSI_DIR
from bidistill.synthetic.features import tracked

ALN_CLASSES = ("N0", "N+(1-2)", "N+(>2)")
ALN_SHARES = (0.55, 0.27, 0.18)  # close to BCNB's 655 / 210 / 193 of 1058
# How strongly each ALN class shows in the tumour nuclei (0: like N0, 1: strongest).
ALN_SIGNAL = {"N0": 0.0, "N+(1-2)": 0.6, "N+(>2)": 1.0}
SUBTYPES = ("Luminal A", "Luminal B", "HER2(+)", "Triple negative")
SUBTYPE_SHARES = (0.35, 0.35, 0.15, 0.15)
TUMOUR_TYPES = ("Invasive ductal carcinoma", "Invasive lobular carcinoma", "Other type")
TUMOUR_TYPE_SHARES = (0.85, 0.05, 0.10)
ALND, SLNB = "Axillary lymph node dissection", "Sentinel lymph node biopsy"

_FIXED_TIME = datetime(2020, 1, 1)  # xlsx docProps and zip entries: same seed, same bytes
_BACKGROUND = 234
_PEN_BLUE = (38, 62, 168)
_MAX_STRENGTH = 1.2
_MIN_PATIENTS = 10  # enough for both classes in each of the three splits


@dataclass
class _Patient:
    patient_id: str
    aln: str
    clinical: dict[str, Any]


def make_bcnb_folder(
    out_dir: str | Path,
    *,
    patients: int = 30,
    seed: int = 0,
    slide_size: tuple[int, int] = (2048, 1536),
    jpeg_quality: int = 80,
    signal: float = 1.0,
    signal_noise: float = 0.15,
    slides: bool = True,
    progress: bool = True,
) -> Path:
    """Write a synthetic BCNB folder of ``patients`` (ids "1" … str(patients)), one slide each.

    ``signal``: strength of the ALN signal in the tumour nuclei; ``signal_noise``: the sd of the
    patient-level noise on it (the default leaves the classes almost apart: ``signal_oracle_auc``
    says how far). ``slides=False`` writes the clinical part only (fast; for table tests).
    """
    if patients < _MIN_PATIENTS:
        raise ValueError(f"patients must be >= {_MIN_PATIENTS} (got {patients})")
    width, height = slide_size
    if signal_noise < 0:
        raise ValueError(f"signal_noise must be >= 0 (got {signal_noise})")
    if min(width, height) < 512:
        raise ValueError(f"slide_size must be at least 512 px a side (got {slide_size})")
    out_dir = Path(out_dir)
    cohort = _make_patients(patients, seed)
    _write_xlsx(out_dir / CLINICAL_XLSX, cohort)
    _write_splits(out_dir / SPLIT_DIR, cohort, seed)
    if not slides:
        return out_dir
    for index, patient in tracked(list(enumerate(cohort)), progress, "synthetic BCNB slides"):
        # One generator per slide: a slide does not change when --patients grows.
        rng = np.random.default_rng([seed, 1, index])
        strength = _strength(patient.aln, signal, signal_noise, rng)
        image, polygons = _draw_slide(rng, (width, height), float(strength))
        stem = out_dir / WSI_DIR / patient.patient_id
        with atomic_path(stem.with_suffix(".jpg")) as tmp:
            image.save(tmp, format="JPEG", quality=jpeg_quality)
        tumours = [{"name": f"Annotation {k}", "vertices": p} for k, p in enumerate(polygons)]
        write_text(stem.with_suffix(".json"), json.dumps({"positive": tumours, "negative": []}))
    return out_dir


def _strength(aln: str, signal: float, noise: float, rng: np.random.Generator) -> float:
    """How node-positive a patient's tumour looks: the class's signal plus patient noise."""
    return float(np.clip(ALN_SIGNAL[aln] * signal + rng.normal(0, noise), 0, _MAX_STRENGTH))


def signal_oracle_auc(
    signal: float = 1.0, signal_noise: float = 0.15, *, draws: int = 200_000, seed: int = 0
) -> float:
    """N0-vs-N+ AUC of an oracle that reads each patient's planted strength exactly: the ceiling
    of a WSI-only model on these slides (no model beats it in expectation)."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    classes = rng.choice(len(ALN_CLASSES), draws, p=ALN_SHARES)
    levels = np.array([ALN_SIGNAL[c] for c in ALN_CLASSES])[classes] * signal
    strength = np.clip(levels + rng.normal(0, signal_noise, draws), 0, _MAX_STRENGTH)
    return float(roc_auc_score(classes > 0, strength))


# --- clinical table -----------------------------------------------------------------------------


def _make_patients(n: int, seed: int) -> list[_Patient]:
    rng = np.random.default_rng([seed, 0])
    # Exact class counts (then shuffled), so that small cohorts still have every class.
    counts = np.floor(np.array(ALN_SHARES) * n).astype(int)
    counts[0] += n - counts.sum()
    aln = rng.permutation(np.repeat(np.arange(3), counts))
    return [_clinical_row(str(i + 1), ALN_CLASSES[c], rng) for i, c in enumerate(aln)]


def _clinical_row(patient_id: str, aln: str, rng: np.random.Generator) -> _Patient:
    node_positive = aln != "N0"
    subtype = SUBTYPES[rng.choice(4, p=SUBTYPE_SHARES)]
    er, pr, her2 = _receptors(subtype, rng)
    # Mildly informative, as in BCNB: N+ tumours are a little larger and of higher grade.
    size = float(np.exp(rng.normal(np.log(2.2) + 0.3 * node_positive, 0.4)))
    grade = int(np.clip(round(rng.normal(2.0 + 0.35 * node_positive, 0.7)), 1, 3))
    nodes = {"N0": 0, "N+(1-2)": int(rng.integers(1, 3)), "N+(>2)": int(rng.integers(3, 26))}[aln]
    surgical = ALND if rng.random() < (0.9 if node_positive else 0.3) else SLNB
    row = {
        "Patient ID": int(patient_id),
        "Age(years)": int(np.clip(rng.normal(50, 10), 26, 84)),
        # Mostly numbers; a few typed as text with a decimal comma.
        "Tumour Size(cm)": (
            f"{size:.1f}".replace(".", ",") if rng.random() < 0.1 else round(size, 1)
        ),
        "Tumour Type": TUMOUR_TYPES[rng.choice(3, p=TUMOUR_TYPE_SHARES)],
        "ER": er,
        "PR": pr,
        "HER2": her2,
        "HER2 Expression": _her2_expression(her2, rng),
        # BCNB leaves many grades blank.
        "Histological grading": None if rng.random() < 0.25 else grade,
        "Surgical": surgical,
        "Ki67": _ki67_text(subtype, rng),
        "Molecular subtype": subtype,
        "Number of lymph node metastases": nodes,
        "ALN status": aln,
    }
    return _Patient(patient_id=patient_id, aln=aln, clinical=row)


def _receptors(subtype: str, rng: np.random.Generator) -> tuple[str, str, str]:
    def status(p: float) -> str:
        return "Positive" if rng.random() < p else "Negative"

    if subtype == "Luminal A":
        return "Positive", status(0.8), "Negative"
    if subtype == "Luminal B":
        return status(0.92), status(0.6), status(0.3)
    if subtype == "HER2(+)":
        return "Negative", "Negative", "Positive"
    return "Negative", "Negative", "Negative"


def _her2_expression(her2: str, rng: np.random.Generator) -> Any:
    if her2 == "Positive":
        return "3+" if rng.random() < 0.8 else "2+"
    level = ("0", "1+", "2+")[rng.choice(3, p=(0.35, 0.4, 0.25))]
    return 0 if level == "0" and rng.random() < 0.5 else level  # "0" sometimes stored as number


def _ki67_text(subtype: str, rng: np.random.Generator) -> Any:
    """Ki67 as BCNB writes it: fractions, percents, ranges, censored values, full-width signs."""
    if rng.random() < 0.05:
        return None
    low = subtype == "Luminal A"
    percent = int(np.clip(rng.normal(10 if low else 35, 5 if low else 15), 1, 90))
    style = rng.choice(6)
    if percent < 5 and style < 4:
        return "<5%" if style == 3 else "＜5%"
    if percent > 60 and style < 3:
        return "＞60%"
    if style == 0:
        return round(percent / 100, 2)  # a number, as a fraction
    if style == 1:
        return f"{percent / 100:g}"  # "0.3"
    if style == 2:
        lo = 5 * (percent // 5)
        return f"{lo}-{lo + 10}%"
    return f"{percent}%"


def _write_xlsx(path: Path, cohort: list[_Patient]) -> None:
    """Write the clinical table with fixed timestamps (docProps and zip entries)."""
    import openpyxl
    from openpyxl.writer.excel import ExcelWriter

    workbook = openpyxl.Workbook()
    sheet = workbook.active
    sheet.title = "Sheet1"
    sheet.append(list(BCNB_COLUMNS))
    for patient in cohort:
        sheet.append([patient.clinical[c] for c in BCNB_COLUMNS])
    # openpyxl's save() stamps the current time; ExcelWriter keeps the properties as set.
    workbook.properties.created = _FIXED_TIME
    workbook.properties.modified = _FIXED_TIME
    raw = io.BytesIO()
    with zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED) as archive:
        ExcelWriter(workbook, archive).write_data()
    with atomic_path(path) as tmp:
        tmp.write_bytes(_with_fixed_zip_times(raw.getvalue()))


def _with_fixed_zip_times(data: bytes) -> bytes:
    """The same zip with every entry dated ``_FIXED_TIME`` (zipfile stamps the current time)."""
    out = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(data)) as source,
        zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as target,
    ):
        for info in source.infolist():
            fixed = zipfile.ZipInfo(info.filename, date_time=_FIXED_TIME.timetuple()[:6])
            fixed.compress_type = zipfile.ZIP_DEFLATED
            fixed.external_attr = info.external_attr
            target.writestr(fixed, source.read(info))
    return out.getvalue()


def _write_splits(split_dir: Path, cohort: list[_Patient], seed: int) -> None:
    """60/20/20 train/val/test, stratified on N0 vs N+, with CRLF line ends like BCNB's files."""
    rng = np.random.default_rng([seed, 2])
    members: dict[str, list[str]] = {split: [] for split in SPLIT_FILES}
    for node_positive in (False, True):
        ids = [p.patient_id for p in cohort if (p.aln != "N0") == node_positive]
        ids = [ids[i] for i in rng.permutation(len(ids))]
        n_val = n_test = max(1, round(0.2 * len(ids)))
        members["val"] += ids[:n_val]
        members["test"] += ids[n_val : n_val + n_test]
        members["train"] += ids[n_val + n_test :]
    for split, name in SPLIT_FILES.items():
        ordered = sorted(members[split], key=int)
        with atomic_path(split_dir / name) as tmp:
            tmp.write_bytes(b"".join(f"{pid}\r\n".encode() for pid in ordered))


# --- slides -------------------------------------------------------------------------------------


def _draw_slide(
    rng: np.random.Generator, size: tuple[int, int], strength: float
) -> tuple[Image.Image, list[list[list[int]]]]:
    """One slide whose tumour looks ``strength`` node-positive (~0: N0, ~1: N+(>2)), and its
    tumour polygons as lists of [x, y] vertices."""
    width, height = size
    strips = _strip_paths(rng, width, height)
    tissue = Image.new("L", size, 0)
    draw_tissue = ImageDraw.Draw(tissue)
    for points, thickness in strips:
        draw_tissue.line(points, fill=255, width=thickness, joint="curve")
    tissue_mask = np.asarray(tissue) > 0

    polygons = [_tumour_polygon(rng, points, thickness, size) for points, thickness in strips]
    tumour = Image.new("L", size, 0)
    draw_tumour = ImageDraw.Draw(tumour)
    for poly in polygons:
        draw_tumour.polygon([tuple(v) for v in poly], fill=255)
    tumour_mask = (np.asarray(tumour) > 0) & tissue_mask

    image = _stained_background(rng, tissue)
    draw = ImageDraw.Draw(image)
    # Normal tissue: sparse, small, pale nuclei, the same for every label.
    normal = tissue_mask & ~tumour_mask
    _draw_nuclei(draw, rng, normal, per_px=1 / 2500, radius=(2, 4), colour=(165, 120, 185))
    # Tumour: density, size and darkness grow with the nodal involvement.
    dark = tuple(int(c) for c in np.array((150, 105, 180)) - strength * np.array((85, 80, 60)))
    radius = (3 + strength, 4.5 + 2 * strength)
    _draw_nuclei(
        draw, rng, tumour_mask, per_px=(1 + 2 * strength) / 900, radius=radius, colour=dark
    )
    for poly in polygons:
        if rng.random() < 0.7:
            _draw_pen_outline(draw, rng, poly)
    return image, polygons


def _strip_paths(
    rng: np.random.Generator, width: int, height: int
) -> list[tuple[list[tuple[int, int]], int]]:
    """One or two gently curved, roughly horizontal biopsy cores: (polyline, thickness)."""
    n_strips = 1 if rng.random() < 0.4 else 2
    strips = []
    for k in range(n_strips):
        centre_y = height * (k + 1) / (n_strips + 1)
        thickness = int(height * rng.uniform(0.25, 0.31) * (1.3 if n_strips == 1 else 1))
        x0 = width * rng.uniform(0.04, 0.12)
        x1 = width * rng.uniform(0.88, 0.96)
        xs = np.linspace(x0, x1, 24)
        phase = 2 * np.pi * xs / width * rng.uniform(0.5, 1.5) + rng.uniform(0, 6.3)
        wave = height * 0.04 * np.sin(phase)
        ys = centre_y + wave + (xs - width / 2) * rng.uniform(-0.05, 0.05)
        strips.append(([(int(x), int(y)) for x, y in zip(xs, ys)], thickness))
    return strips


def _tumour_polygon(
    rng: np.random.Generator, points: list[tuple[int, int]], thickness: int, size: tuple[int, int]
) -> list[list[int]]:
    """An irregular blob on the strip, wide enough to hold several 256 px tiles."""
    cx, cy = points[int(rng.integers(6, len(points) - 6))]
    rx = thickness * rng.uniform(1.4, 2.4)
    ry = thickness * 0.5 * rng.uniform(0.95, 1.1)
    n = int(rng.integers(12, 20))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = rng.uniform(0.85, 1.1, n)
    xs = np.clip(cx + rx * radii * np.cos(angles), 0, size[0] - 1)
    ys = np.clip(cy + ry * radii * np.sin(angles), 0, size[1] - 1)
    return [[int(x), int(y)] for x, y in zip(xs, ys)]


def _stained_background(rng: np.random.Generator, tissue: Image.Image) -> Image.Image:
    """Grey glass with eosin-pink tissue whose tone varies smoothly (stroma-like): drawn on a
    coarse grid and upsampled by Pillow, smooth and fast on big slides."""
    width, height = tissue.size
    coarse = rng.normal(0, 1, (height // 64 + 2, width // 64 + 2, 1)).astype(np.float32)
    pink = np.array((232, 176, 206), np.float32) + coarse * np.array((6, 12, 8), np.float32)
    glass = np.full(3, _BACKGROUND, np.float32) + coarse * 1.5

    def upsampled(layer: np.ndarray) -> Image.Image:
        small = Image.fromarray(np.clip(layer, 0, 255).astype(np.uint8))
        return small.resize((width, height), Image.Resampling.BILINEAR)

    return Image.composite(upsampled(pink), upsampled(glass), tissue)


def _draw_nuclei(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    region: np.ndarray,
    *,
    per_px: float,
    radius: tuple[float, float],
    colour: tuple[int, int, int],
) -> None:
    """Scatter elliptic nucleus-like blobs over ``region`` at ``per_px`` blobs per pixel."""
    ys, xs = np.nonzero(region)
    count = int(len(xs) * per_px)
    if count == 0:
        return
    pick = rng.integers(0, len(xs), count)
    rx = rng.uniform(*radius, count)
    ry = rx * rng.uniform(0.7, 1.0, count)
    fills = np.clip(np.array(colour) + rng.integers(-18, 19, (count, 1)), 0, 255).tolist()
    for x, y, a, b, fill in zip(xs[pick].tolist(), ys[pick].tolist(), rx, ry, fills):
        draw.ellipse((x - a, y - b, x + a, y + b), fill=tuple(fill))


def _draw_pen_outline(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, polygon: list[list[int]]
) -> None:
    """A blue marker arc around a tumour, outside it, as a pathologist circles a region."""
    vertices = np.array(polygon, dtype=float)
    centre = vertices.mean(axis=0)
    reach = np.abs(vertices - centre).max(axis=0) + rng.uniform(30, 70)
    start = rng.uniform(0, 2 * np.pi)
    angles = start + np.linspace(0, rng.uniform(1.5, 4.0), 40)
    arc = [
        (float(centre[0] + reach[0] * np.cos(a)), float(centre[1] + reach[1] * np.sin(a)))
        for a in angles
    ]
    draw.line(arc, fill=_PEN_BLUE, width=int(rng.integers(6, 12)), joint="curve")
