"""Attention heatmaps over the slide thumbnail, and montages of the top and bottom tiles (or
the same of each tile's leave-one-out effect: ``SlideAttention.score``).

Each tile's score becomes its percentile within the slide (attention weights span orders of
magnitude and depend on the bag size; ranks compare across slides and branches). A thumbnail
pixel gets the mean percentile of the tiles covering it: with tiles that do not overlap that is
one tile's value (a map of squares, never blurred); with overlapping tiles (tiled with
``tiling.overlap``) each pixel averages the tiles over it, which makes the map finer.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bidistill._io import atomic_path  # noqa: E402
from bidistill.inference.results import SlideAttention  # noqa: E402

HEATMAP_SIDE = 1024  # longest side of the thumbnail under the map (about the panel size)
CMAP = "turbo"
ALPHA = 0.55
DPI = 100


def score_grid(
    coords: np.ndarray,
    values: np.ndarray,
    tile_size: int,
    downsample: tuple[float, float],
    shape: tuple[int, int],
) -> np.ndarray:
    """The mean of ``values`` of the tiles (level-0 top-left ``coords``, side ``tile_size``)
    covering each pixel of a thumbnail of ``shape`` at ``downsample``; NaN where none does."""
    h, w = shape
    dx, dy = downsample
    # Rounded edges: neighbouring tiles share an edge exactly, so no pixel mixes two of them.
    x0 = np.clip(np.round(coords[:, 0] / dx), 0, w).astype(np.int64)
    y0 = np.clip(np.round(coords[:, 1] / dy), 0, h).astype(np.int64)
    x1 = np.clip(np.round((coords[:, 0] + tile_size) / dx), 0, w).astype(np.int64)
    y1 = np.clip(np.round((coords[:, 1] + tile_size) / dy), 0, h).astype(np.int64)
    x1, y1 = np.maximum(x1, np.minimum(x0 + 1, w)), np.maximum(y1, np.minimum(y0 + 1, h))
    total = _box_sum(values.astype(np.float64), x0, y0, x1, y1, shape)
    count = _box_sum(np.ones(len(values)), x0, y0, x1, y1, shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0.5, total / count, np.nan)


def _box_sum(values, x0, y0, x1, y1, shape) -> np.ndarray:
    """Σ of ``values`` over the boxes covering each pixel (a 2-D difference array)."""
    h, w = shape
    diff = np.zeros((h + 1, w + 1))
    np.add.at(diff, (y0, x0), values)
    np.add.at(diff, (y0, x1), -values)
    np.add.at(diff, (y1, x0), -values)
    np.add.at(diff, (y1, x1), values)
    return diff.cumsum(axis=0).cumsum(axis=1)[:h, :w]


def _canvas(
    attention: SlideAttention, tile_size: int, slide
) -> tuple[np.ndarray, tuple[float, float]]:
    """The background: the slide's thumbnail, or white over the tiles' extent without a slide."""
    if slide is not None:
        downsample = max(slide.width, slide.height, 1) / HEATMAP_SIDE
        return slide.thumbnail(max(downsample, 1.0))
    extent = attention.coords.max(axis=0) + tile_size if len(attention.coords) else (1, 1)
    ds = max(float(max(extent)) / HEATMAP_SIDE, tile_size / 16, 1.0)
    w, h = max(1, int(np.ceil(extent[0] / ds))), max(1, int(np.ceil(extent[1] / ds)))
    return np.full((h, w, 3), 255, dtype=np.uint8), (ds, ds)


def render_heatmap(
    path: str | Path,
    attention: SlideAttention,
    *,
    tile_size: int,
    title: str,
    slide=None,
) -> Path:
    """One panel per branch (BD: multi-modal and single-modal): percentile-scaled attention
    over the thumbnail of ``slide`` (None: a white canvas), with a colour bar; the routed
    branch's panel says it was used. Writes the PNG at ``path`` (atomically)."""
    thumbnail, downsample = _canvas(attention, tile_size, slide)
    h, w = thumbnail.shape[:2]
    branches = attention.branches
    panel_width = 6.5 if len(branches) > 1 else 9.0
    fig, axes = plt.subplots(
        1,
        len(branches),
        figsize=(panel_width * len(branches), panel_width * h / max(w, 1) + 1.2),
        squeeze=False,
        layout="constrained",
    )
    image = None
    for ax, branch in zip(axes[0], branches):
        grid = score_grid(
            attention.coords, attention.percentiles(branch), tile_size, downsample, (h, w)
        )
        ax.imshow(thumbnail, interpolation="none")
        image = ax.imshow(
            np.ma.masked_invalid(grid),
            cmap=CMAP,
            vmin=0,
            vmax=1,
            alpha=ALPHA if slide is not None else 1.0,
            interpolation="none",
        )
        used = " (used for the prediction)" if branch == attention.routed else ""
        ax.set_title(f"{branch}{used}" if len(branches) > 1 else _what(attention), fontsize=11)
        ax.set_axis_off()
    if slide is None:
        axes[0][0].text(
            0.01, 0.01, "no slide image: tiles at their coordinates", fontsize=8,
            transform=axes[0][0].transAxes,
        )  # fmt: skip
    bar = fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, pad=0.01)
    bar.set_label(f"{_what(attention)} percentile within the slide (1 = highest)")
    fig.suptitle(title, fontsize=12)
    return _save(fig, path)


def top_and_bottom(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ``k`` highest (descending) and ``k`` lowest (ascending) scores, disjoint."""
    k = max(0, min(k, len(scores) // 2 if len(scores) > 1 else len(scores)))
    order = np.argsort(-scores, kind="stable")
    return order[:k], order[::-1][:k]


def render_montage(
    path: str | Path,
    attention: SlideAttention,
    slide,
    *,
    tile_size: int,
    title: str,
    k: int = 8,
    display: int = 192,
) -> Path:
    """The ``k`` tiles with the highest and the ``k`` with the lowest score of the routed
    branch, read from the slide (a ``WholeSlide`` or a ``PatchFolder``), as a PNG at ``path``."""
    branch = attention.routed or attention.branches[0]
    scores = attention.scores[branch]
    percentiles = attention.percentiles(branch)
    top, bottom = top_and_bottom(scores, k)
    columns = max(len(top), 1)
    fig, axes = plt.subplots(
        2, columns, figsize=(1.9 * columns, 4.6), squeeze=False, layout="constrained"
    )
    for row, (label, indices) in enumerate((("highest", top), ("lowest", bottom))):
        for col in range(columns):
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(indices):
                ax.set_axis_off()
                continue
            i = int(indices[col])
            x, y = attention.coords[i]
            ax.imshow(slide.read_tile(int(x), int(y), tile_size, display), interpolation="none")
            ax.set_title(f"tile {i}: {percentiles[i]:.0%}", fontsize=8)
        axes[row][0].set_ylabel(f"{label} {_what(attention)}", fontsize=10)
    fig.suptitle(f"{title}\n{branch}: top and bottom {len(top)} tiles", fontsize=11)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    return path


def _what(attention: SlideAttention) -> str:
    """What the map draws, in words."""
    return "attention" if attention.score == "attention" else "leave-one-out effect"
