"""Tissue quality control's tables and pictures, for ``wsi-anomaly qc`` and ``heatmap --qc``.

``wsi-anomaly qc`` (:mod:`wsi_anomaly.pipeline.qc_run`) measures every tissue tile of a slide
(:mod:`wsi_anomaly.slide.qc`), then writes in ``OUT/<slide name>/``:

* ``qc.png``: the slide's thumbnail with the tiles of each artifact class outlined in the class
  colour, and a legend with each class's fraction of the tissue;
* ``qc_tiles.csv``: one row per tissue tile — level-0 x, y, width, height, tissue fraction,
  every measurement and the flags;
* ``summary.json``: the slide, the settings, the fractions, the verdict and its reasons.

``OUT/qc_summary.csv`` is the cohort table: one row per slide with the fraction of tissue per
artifact class, the usable-tissue fraction and the pass / check / fail verdict with its reasons.

This module draws and writes those pieces (``qc_canvas``, ``write_qc_table``,
``write_qc_labels``, …) for one slide; ``heatmap --qc flag`` uses them too. The runs over slides
are :mod:`wsi_anomaly.pipeline.qc_run`'s.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from .outputs import (
    atomic_path,
)
from .slide.qc import (
    ARTIFACT_FLAGS,
    FLAG_COLOURS,
    FLAG_NAMES,
    VALUE_NAMES,
    TileQC,
    flag_labels,
    flag_masks,
)

log = logging.getLogger(__name__)


# -- tables and pictures -------------------------------------------------------------------------
def tissue_fractions(qc: TileQC, tissue_fraction: np.ndarray) -> dict[str, float]:
    """Fraction of the tiles' tissue (each tile weighted by its tissue fraction) per flag, for
    any artifact, and the usable rest."""
    weights = np.asarray(tissue_fraction, np.float64)
    total = float(weights.sum()) or 1.0
    masks = flag_masks(qc.flags)
    out = {name: float(weights[masks[name]].sum() / total) for name in FLAG_NAMES}
    artifact = np.zeros(len(weights), bool)
    for name in ARTIFACT_FLAGS:
        artifact |= masks[name]
    out["any_artifact"] = float(weights[artifact].sum() / total)
    out["usable_fraction"] = 1.0 - out["any_artifact"]
    return out


def write_qc_table(
    path: Path,
    coords: np.ndarray,
    tile_size_l0: float,
    tissue_fraction: np.ndarray,
    values: np.ndarray,
    flags: np.ndarray,
    names: tuple[str, ...] | list[str] = VALUE_NAMES,
) -> None:
    """``qc_tiles.csv``: x, y, width, height (level-0 px), tissue fraction, each measurement
    and ``flags`` (``;``-separated names, empty when clean)."""
    side = float(tile_size_l0)
    side_text = str(int(side)) if side.is_integer() else f"{side:g}"
    labels = flag_labels(flags)
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["x", "y", "width", "height", "tissue_fraction", *names, "flags"])
        for (x, y), frac, row, label in zip(
            np.asarray(coords).tolist(), np.asarray(tissue_fraction).tolist(), values, labels
        ):
            cells = [f"{v:.6g}" if math.isfinite(v) else "" for v in row.tolist()]
            writer.writerow([x, y, side_text, side_text, f"{frac:.6g}", *cells, label])


def qc_canvas(
    thumbnail: np.ndarray,
    thumbnail_downsample: float,
    coords: np.ndarray,
    tile_size_l0: float,
    flags: np.ndarray,
) -> np.ndarray:
    """The thumbnail (h, w, 3) uint8 with the tiles of each flag outlined in its colour
    (:data:`FLAG_COLOURS`); a tile with several flags gets the outline of the rarest-listed
    (artifact classes over ``border``)."""
    from scipy import ndimage

    canvas = np.array(thumbnail[..., :3], np.uint8, copy=True)
    h, w = canvas.shape[:2]
    width = max(2, max(h, w) // 400)  # outline width, px
    masks = flag_masks(flags)
    start = np.floor(np.asarray(coords, np.float64) / thumbnail_downsample).astype(np.int64)
    end = np.ceil((np.asarray(coords, np.float64) + tile_size_l0) / thumbnail_downsample)
    end = np.maximum(end.astype(np.int64), start + 1)
    for name in reversed(FLAG_NAMES):  # border first, so artifact outlines are drawn on top
        if not masks[name].any():
            continue
        region = np.zeros((h, w), bool)
        for (x0, y0), (x1, y1) in zip(start[masks[name]].tolist(), end[masks[name]].tolist()):
            region[max(0, y0) : min(h, y1), max(0, x0) : min(w, x1)] = True
        outline = region & ~ndimage.binary_erosion(region, iterations=width, border_value=0)
        canvas[outline] = FLAG_COLOURS[name]
    return canvas


def write_qc_picture(
    path: Path, canvas: np.ndarray, slide_name: str, fractions: dict[str, float], verdict: str
) -> None:
    """``qc.png``: the outlined thumbnail beside a legend of the classes and their fractions."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    h, w = canvas.shape[:2]
    scale = 8.0 / max(h, w)
    fig = Figure(figsize=(w * scale + 3.2, max(h * scale, 3.5) + 0.6), dpi=150, facecolor="white")
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.0, 0.0, w * scale / (w * scale + 3.2), 0.92))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    handles = [
        Patch(
            facecolor="none",
            edgecolor="#{:02x}{:02x}{:02x}".format(*FLAG_COLOURS[name]),
            linewidth=2,
            label=f"{name.replace('_', ' ')}: {fractions.get(name, 0.0):.1%}",
        )
        for name in FLAG_NAMES
    ]
    fig.legend(
        handles=handles,
        loc="center right",
        fontsize=8,
        title=f"tissue per class\nusable {fractions.get('usable_fraction', 0.0):.1%}",
        title_fontsize=8,
        frameon=False,
    )
    fig.suptitle(f"{slide_name} — tissue QC: {verdict}", fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def first_flag_labels(flags: np.ndarray) -> np.ndarray:
    """(n,) uint8 label per tile for an NGFF labels image: 0 clean, else 1 + the index in
    :data:`FLAG_NAMES` of its first flag (artifact classes come before ``border``)."""
    flags = np.asarray(flags, np.uint16)
    out = np.zeros(len(flags), np.uint8)
    for k in reversed(range(len(FLAG_NAMES))):
        out[(flags >> k & 1).astype(bool)] = k + 1
    return out


def write_qc_labels(
    ngff: Path, grid_shape: tuple[int, int], grid_index: np.ndarray, flags: np.ndarray
) -> None:
    """Add ``labels/qc`` to an OME-NGFF score image: one label per grid cell (see
    :func:`first_flag_labels`), on the same grid and transforms as the image's level 0, with
    each label's colour and name (``image-label``); the full flag bits are kept beside it as
    ``labels/qc_bits``."""
    import zarr

    rows, cols = grid_shape
    grid_index = np.asarray(grid_index, np.int64).reshape(-1, 2)
    inside = (
        (grid_index[:, 0] >= 0)
        & (grid_index[:, 0] < cols)
        & (grid_index[:, 1] >= 0)
        & (grid_index[:, 1] < rows)
    )
    labels = np.zeros((rows, cols), np.uint8)
    bits = np.zeros((rows, cols), np.uint16)
    labels[grid_index[inside, 1], grid_index[inside, 0]] = first_flag_labels(flags)[inside]
    bits[grid_index[inside, 1], grid_index[inside, 0]] = np.asarray(flags, np.uint16)[inside]
    group = zarr.open_group(str(ngff), mode="r+")
    ome: dict[str, Any] = json.loads(json.dumps(group.attrs["ome"]))  # plain dicts and lists
    level0 = ome["multiscales"][0]["datasets"][0]
    labels_group = group.require_group("labels")
    labels_group.attrs["ome"] = {"version": ome.get("version", "0.5"), "labels": ["qc"]}
    image = labels_group.create_group("qc", overwrite=True)
    image.attrs["ome"] = {
        "version": ome.get("version", "0.5"),
        "multiscales": [
            {
                "name": "tissue QC",
                "axes": ome["multiscales"][0]["axes"],
                "datasets": [{**level0, "path": "0"}],
            }
        ],
        "image-label": {
            "version": ome.get("version", "0.5"),
            "colors": [
                {"label-value": k + 1, "rgba": [*FLAG_COLOURS[name], 255]}
                for k, name in enumerate(FLAG_NAMES)
            ],
            "properties": [
                {"label-value": k + 1, "class": name} for k, name in enumerate(FLAG_NAMES)
            ],
            "source": {"image": "../../"},
        },
    }
    image.create_array(
        "0", shape=labels.shape, dtype="uint8", chunks=labels.shape, dimension_names=["y", "x"]
    )[...] = labels
    labels_group.create_array(
        "qc_bits", shape=bits.shape, dtype="uint16", chunks=bits.shape, dimension_names=["y", "x"]
    )[...] = bits
    labels_group["qc_bits"].attrs["wsi_anomaly"] = {"flag_bits": list(FLAG_NAMES)}
