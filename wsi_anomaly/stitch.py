"""Scores → pictures, on a fixed colour scale (or, when asked, the slide's own).

The colour scale is derived from the model's *training* score distribution (stored in the
checkpoint), never from the scores being drawn, so the same score has the same colour on every
slide and in every run. Diverging ``coolwarm`` by default, as in the HaloAE paper: blue at the
training median (tissue like the training tissue), white at the training 99th percentile, red at
twice that distance above it (anomalous). :func:`slide_colour_scale` maps the slide's own median
and 99th percentile the same way (``basis="slide"``), for slides where the fixed scale saturates;
the "Anomalous" class stays on the model's fixed threshold either way
(:attr:`ColourScale.anomalous_at`).

:func:`render_slide_outputs` writes a slide's pictures and files (wsi.md §6) from one
:class:`SlideOutputs` on one display canvas (:func:`display_geometry`) that lines up with the
slide to the pixel.

Every tile has two values, the mean of its anomaly map and the map's peak; the model family
decides which one is the tile's score (``tile_score``, :data:`TILE_SCORES`): the one that ranks,
colours and classes tiles here, against the calibration's quantiles of the same value. Results
record the choice, so they are re-drawn the same way without the model
(:func:`recorded_tile_score`).
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from . import __version__
from .errors import InvalidInputError
from .outputs import atomic_path
from .slide.qc import TileQC, first_flags

if TYPE_CHECKING:
    from .models.calibration import Calibration


#: What a tile's score can be (``ModelFamily.tile_score``): the mean of its anomaly map (the
#: ``score`` column of tile tables) or the map's peak (the ``max`` column).
TILE_SCORES = ("mean", "max")


def recorded_tile_score(record: Mapping[str, Any] | None, where: str = "the result") -> str:
    """The tile score a result records (``summary.json``, a tile store's attributes): ``"mean"``
    when it records none (results written before the choice was recorded);
    :class:`~wsi_anomaly.errors.InvalidInputError` in one line for anything but
    :data:`TILE_SCORES`."""
    value = (record or {}).get("tile_score", "mean")
    if value not in TILE_SCORES:
        raise InvalidInputError(
            f"{where} records tile_score {value!r}, which is not one of "
            f"{', '.join(TILE_SCORES)}; re-draw it with heatmap and the model"
        )
    return str(value)


def headline_scores(scores: np.ndarray, max_scores: np.ndarray, tile_score: str) -> np.ndarray:
    """The tiles' scores by ``tile_score``: ``max_scores`` for ``"max"``, else ``scores``."""
    return max_scores if tile_score == "max" else scores


@dataclass(frozen=True)
class ColourScale:
    """A fixed piecewise-linear map from score to [0, 1] (then to a colour map).

    ``basis``: where vmin/vcenter are from — ``"training"`` (the model's calibration quantiles)
    or ``"slide"`` (the scored slide's own). ``anomalous_at``: the model's fixed "Anomalous"
    threshold (training 99th percentile) when it is not ``vcenter``, i.e. on a slide scale.
    """

    vmin: float
    vcenter: float
    vmax: float
    cmap: str = "coolwarm"
    basis: str = "training"
    anomalous_at: float | None = None

    @property
    def threshold(self) -> float:
        """The score at and above which a tile is classed "Anomalous" (the model's, always)."""
        return self.vcenter if self.anomalous_at is None else self.anomalous_at

    @classmethod
    def from_quantiles(
        cls,
        median: float,
        p99: float,
        cmap: str,
        basis: str = "training",
        anomalous_at: float | None = None,
    ) -> ColourScale:
        """Median → blue (vmin), 99th percentile → white (vcenter), twice that distance above
        → red (vmax)."""
        spread = max(p99 - median, 1e-6)
        return cls(median, median + spread, median + 3 * spread, cmap, basis, anomalous_at)

    @classmethod
    def from_dict(cls, cs: Mapping[str, Any]) -> ColourScale:
        """The scale recorded in a summary.json (older ones have no basis: training)."""
        at = cs.get("anomalous_at")
        return cls(
            float(cs["vmin"]),
            float(cs["vcenter"]),
            float(cs["vmax"]),
            str(cs.get("cmap", "coolwarm")),
            str(cs.get("basis", "training")),
            None if at is None else float(at),
        )

    def normalise(self, scores: np.ndarray) -> np.ndarray:
        s = np.asarray(scores, np.float64)
        low = 0.5 * (s - self.vmin) / max(self.vcenter - self.vmin, 1e-12)
        high = 0.5 + 0.5 * (s - self.vcenter) / max(self.vmax - self.vcenter, 1e-12)
        return np.clip(np.where(s <= self.vcenter, low, high), 0.0, 1.0)

    def to_rgb(self, scores: np.ndarray) -> np.ndarray:
        """Scores (any shape) → uint8 RGB of the same shape + (3,)."""
        from matplotlib import colormaps

        rgba = colormaps[self.cmap](self.normalise(scores))
        return (rgba[..., :3] * 255 + 0.5).astype(np.uint8)


def colour_scale(
    calibration: Calibration | Mapping[str, Any], which: str = "mean", cmap: str = "coolwarm"
) -> ColourScale:
    """The fixed scale of a model: training median → blue, 99th percentile → white; the
    "Anomalous" threshold is the model's (:meth:`Calibration.threshold`).

    ``which`` picks the tile-mean (``"mean"``) or tile-max (``"max"``: pixel maps, and tiles
    of a family whose tile score is the map's peak) quantiles.
    """
    if isinstance(calibration, Mapping):  # a checkpoint's plain calibration
        q = calibration["score_quantiles" if which == "mean" else "max_score_quantiles"]
        median, p99, threshold = float(q["0.5"]), float(q["0.99"]), float(q["0.99"])
    else:
        q = calibration.quantiles(which)
        median, p99, threshold = float(q["0.5"]), float(q["0.99"]), calibration.threshold(which)
    return ColourScale.from_quantiles(
        median, p99, cmap, anomalous_at=None if threshold == p99 else threshold
    )


#: ``--scale`` choices: the model's fixed training scale, or the slide's own percentiles.
SCALE_BASES = ("fixed", "slide")


def slide_colour_scale(scores: np.ndarray, fixed: ColourScale) -> ColourScale:
    """The slide's own scale, mapped as :func:`colour_scale` maps the training quantiles: this
    slide's median → blue, its 99th percentile → white, twice that distance above → red.

    ``fixed``: the model's scale, whose colour map is kept and whose threshold stays the
    "Anomalous" class (``anomalous_at``). Non-finite scores are ignored; with none left the
    fixed scale is returned unchanged.
    """
    s = np.asarray(scores, np.float64).reshape(-1)
    s = s[np.isfinite(s)]
    if len(s) == 0:
        return fixed
    return ColourScale.from_quantiles(
        float(np.quantile(s, 0.5)),
        float(np.quantile(s, 0.99)),
        fixed.cmap,
        basis="slide",
        anomalous_at=fixed.threshold,
    )


def scale_label(scale: ColourScale) -> str:
    """How the colour bar names its scale."""
    return (
        "tile anomaly score (this slide's scale)"
        if scale.basis == "slide"
        else "tile anomaly score (fixed scale)"
    )


def legend_words(scale: ColourScale) -> list[str]:
    """The legend in words, one entry per colour (blue, white, red)."""
    if scale.basis == "slide":
        return [
            "blue: this slide's median tile",
            "white: this slide's 99th percentile",
            "red: more anomalous than 99 % of this slide's tiles",
        ]
    return [
        "blue: like the training tissue (median)",
        "white: training 99th percentile",
        "red: more anomalous than 99 % of training tiles",
    ]


def result_provenance(
    slide_name: str,
    slide_fingerprint: str | None,
    model_identity: Mapping[str, Any],
    backbone: str | None,
    tile_score: str,
    scale: ColourScale,
    **inputs: Any,
) -> dict[str, Any]:
    """What made a slide's scores, as recorded in its outputs (NGFF attributes, GeoJSON,
    figure titles): the slide, the model file and family with its sha256, the backbone, the
    tile score, the colour scale and the software version, plus ``inputs`` (e.g. the feature
    file a run read)."""
    model_path = model_identity.get("model_path")
    return {
        "slide_name": slide_name,
        "slide_fingerprint": slide_fingerprint,
        "model_sha256": model_identity.get("model_sha256"),
        "model_name": model_identity.get("model_name"),
        "model_file": Path(model_path).name if model_path else None,
        "backbone": backbone,
        **inputs,
        "tile_score": tile_score,
        "colour_scale": asdict(scale),
        "software_version": __version__,
    }


def figure_title(slide_name: str, provenance: Mapping[str, Any] | None) -> str:
    """The title of heatmap.png and overlay.png: the slide and the model (file name, family
    and the first 12 hex digits of its sha256), as far as ``provenance`` records them."""
    prov = provenance or {}
    name, family, sha = prov.get("model_file"), prov.get("model_name"), prov.get("model_sha256")
    details = [str(family)] if family and name else []
    if sha:
        details.append(f"sha256 {str(sha)[:12]}")
    model = str(name or family or "unknown model")
    if details:
        model += f" ({', '.join(details)})"
    return f"{slide_name} · model {model}"


def save_map_png(
    score_map: np.ndarray,
    scale: ColourScale,
    path: str | Path,
    size: int,
    image: np.ndarray | None = None,
    alpha: float = 0.5,
) -> None:
    """An anomaly map (h × w) as a ``size``² PNG, blended over ``image`` when given.

    A colour bar of the scale (median, 99th percentile, anomalous) is drawn to the right.
    Written under a temporary name and renamed.
    """
    rgb = scale.to_rgb(score_map)
    heat = np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BILINEAR))
    if image is not None:
        heat = (alpha * heat + (1 - alpha) * image[..., :3]).astype(np.uint8)
        heat = np.concatenate([image[..., :3], heat], axis=1)
    heat = np.concatenate(
        [heat, np.asarray(colour_bar_figure(scale, size).canvas.buffer_rgba())[..., :3]], axis=1
    )
    with atomic_path(path) as tmp:
        Image.fromarray(heat).save(tmp, format="PNG")


#: Width of the colour bar beside a ``score --maps`` picture, as a share of its height.
COLOUR_BAR_SHARE = 0.62


def colour_bar_figure(scale: ColourScale, height_px: int):
    """A drawn matplotlib Figure, ``height_px`` tall: the colour bar of ``scale`` with its three
    values named, text at least :data:`MIN_TEXT_SHARE` of the height (and 10 px)."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    height_px = max(int(height_px), 64)
    width_px = max(140, round(COLOUR_BAR_SHARE * height_px))
    text_px = max(10.0, 0.045 * height_px)
    fig = Figure(figsize=(width_px / 100, height_px / 100), dpi=100, facecolor="white")
    FigureCanvasAgg(fig)
    # room below for the two-line label at the bottom tick, above for the one-line one
    below, above = 1.6 * text_px / height_px, 0.8 * text_px / height_px
    ax = fig.add_axes((0.08, below, 0.12, 1 - below - above))
    gradient = colormaps[scale.cmap](np.linspace(1.0, 0.0, 256))[:, None, :3]
    ax.imshow(gradient, aspect="auto", extent=(0, 1, 0, 1), interpolation="nearest")
    ax.set_xticks([])
    ax.yaxis.tick_right()
    ax.set_yticks([0.0, 0.5, 1.0])
    where = "this slide's" if scale.basis == "slide" else "normal"
    ax.set_yticklabels(
        [
            f"{scale.vmin:.3g}\n{where} median",
            f"{scale.vcenter:.3g}\n99th pct",
            f"{scale.vmax:.3g}+",
        ],
        fontsize=text_px * 72 / 100,
    )
    fig.canvas.draw()
    return fig


# --------------------------------------------------------------------------------------------
# Per-slide outputs (wsi.md §6)
# --------------------------------------------------------------------------------------------

#: Width of the title/colour-bar/legend panel appended to the right of heatmap.png and
#: overlay.png, and its minimum height (a tiny canvas gets a taller panel; the canvas stays
#: top-left).
LEGEND_PANEL_PX = (260, 480)
#: Characters per line of the panel's wrapped text.
_PANEL_CHARS = 38
CONTOUR_RGB = (0, 200, 0)
#: The smallest text in heatmap.png and overlay.png, as a share of the picture's height.
MIN_TEXT_SHARE = 0.02
#: Width of the tissue outline in thumbnail.png, as a share of the picture's longer side.
CONTOUR_SHARE = 0.004


@dataclass(frozen=True)
class SlideGeometry:
    """Where tiles lie on the slide. All lengths in level-0 pixels unless named otherwise."""

    width: int  # level-0 width
    height: int  # level-0 height
    mpp: float  # level-0 µm per pixel
    tile_size_l0: float  # side of one tile
    stride_l0: float  # step between grid cells (== tile_size_l0 by default)
    grid_cols: int
    grid_rows: int


def grid_origin(
    coords: np.ndarray, grid_index: np.ndarray, stride_l0: float
) -> tuple[float, float]:
    """Level-0 (x, y) of grid cell (0, 0)'s top-left corner: 0 for the grids the tiler lays,
    derived from the tiles so that an offset grid still fits. ``coords`` (N, 2) level-0 x, y;
    ``grid_index`` (N, 2) col, row."""
    if len(coords) == 0:
        return 0.0, 0.0
    origin = (np.asarray(coords) - np.asarray(grid_index) * float(stride_l0)).mean(axis=0)
    return float(origin[0]), float(origin[1])


@dataclass(frozen=True)
class DisplaySettings:
    """How a slide's outputs are drawn — what a re-draw from stored scores may change."""

    cmap: str = "coolwarm"
    scale: str = "fixed"  # fixed: the model's training scale | slide: the slide's percentiles
    alpha: float = 0.5  # opacity of the heat colours in overlay.png
    max_px: int = 2048  # longest side of the pictures' canvas
    top_k: int = 16  # tiles in top_tiles.png


@dataclass
class SlideOutputs:
    """Everything a slide's outputs are drawn from (see :func:`render_slide_outputs`).

    Each piece is kept with the results or can be read again: the per-tile arrays, the tiles of
    the gallery and the QC are the slide's tile store (``tiles.zarr``); the geometry, provenance
    and colour scale are in ``summary.json`` (``scale`` follows from the model's calibration, the
    scores and ``display``); the thumbnail and tissue mask come from the slide
    (``summary.json``'s ``slide_path``) as the tiler makes them.

    Shapes: ``coords`` (N, 2) int64 level-0 top-left (x, y) of the scored tiles; ``grid_index``
    (N, 2) (col, row) of each in the grid; ``scores``, ``max_scores`` (N,) float32 tile mean and
    max anomaly score (NaN: not scored); ``thumbnail`` (h, w, 3) uint8, pixel (i, j) covering
    level-0 [j·d, (j+1)·d) × [i·d, (i+1)·d) with d = ``thumbnail_downsample``; ``tissue_mask``
    (hm, wm) bool, likewise with ``mask_downsample``; ``top_tiles`` (index into coords, (T, T, 3)
    uint8 RGB), most anomalous first; ``maps`` (N, h, w) per-tile anomaly maps or None;
    ``tissue_fraction`` (N,) or None.

    ``tile_score`` (:data:`TILE_SCORES`, the model family's): which of ``scores`` and
    ``max_scores`` is the tiles' score (:attr:`headline`) — what the pictures colour, the NGFF
    score grid holds and the "Anomalous" class compares with ``scale.threshold``; ``scale`` is
    then on the calibration's quantiles of the same value, and ``top_tiles`` ranked by it.
    """

    slide_name: str
    geometry: SlideGeometry
    coords: np.ndarray
    grid_index: np.ndarray
    scores: np.ndarray
    max_scores: np.ndarray
    thumbnail: np.ndarray
    thumbnail_downsample: float
    tissue_mask: np.ndarray
    mask_downsample: float
    scale: ColourScale
    top_tiles: list[tuple[int, np.ndarray]]
    display: DisplaySettings = DisplaySettings()
    maps: np.ndarray | None = None
    tissue_fraction: np.ndarray | None = None
    provenance: Mapping[str, Any] | None = None
    qc: TileQC | None = None
    tile_score: str = "mean"

    @property
    def headline(self) -> np.ndarray:
        """(N,) float32: the tiles' scores by :attr:`tile_score`."""
        return headline_scores(
            np.asarray(self.scores, np.float32).reshape(-1),
            np.asarray(self.max_scores, np.float32).reshape(-1),
            self.tile_score,
        )


def display_geometry(geometry: SlideGeometry, max_px: int = 2048) -> tuple[float, tuple[int, int]]:
    """The display downsample ``d`` (level-0 px per PNG px) and canvas size ``(w, h)`` in px.

    The canvas covers the whole slide: ``(ceil(width / d), ceil(height / d))``, longest side at
    most ``max_px``. When a grid cell can be a whole number ``k`` of pixels (``d = stride_l0 /
    k``) it is, so cells are crisp squares of equal size; ``d`` never goes below 1 (no upsampling
    of the slide). Otherwise ``d = max(width, height) / max_px``.
    """
    if max_px < 1:
        raise ValueError(f"max_px must be positive, got {max_px}")
    longest = max(geometry.width, geometry.height)
    stride = float(geometry.stride_l0)
    d = max(longest / max_px, 1.0)
    for k in range(min(math.floor(stride * max_px / longest), math.floor(stride)), 0, -1):
        if math.ceil(longest * k / stride) <= max_px:  # guards float fuzz at the bound
            d = stride / k
            break
    return d, (math.ceil(geometry.width / d), math.ceil(geometry.height / d))


def render_slide_outputs(out_dir: Path, outputs: SlideOutputs) -> dict[str, str]:
    """Write heatmap/overlay/thumbnail PNGs, the NGFF score grid, QuPath GeoJSON and a gallery.

    ``outputs`` (:class:`SlideOutputs`, shapes there):
        scale: the colour scale: the model's fixed one (:func:`colour_scale` of the
            ``tile_score`` quantiles), or with ``--scale slide`` this slide's own
            (:func:`slide_colour_scale`), which the legend then names as such. The "Anomalous"
            class always uses ``scale.threshold``.
        tile_score: which value is the tiles' score (coloured, put in the NGFF grid, classed);
            ``tiles.csv`` and the GeoJSON keep both (``score``/``anomaly_score``: the map's
            mean, ``max``/``anomaly_max``: its peak) whichever it is.
        top_tiles: (index into coords, (T, T, 3) uint8 RGB), most anomalous first.
        display.max_px: longest side of the aligned canvas of the PNGs (see
            :func:`display_geometry`).
        maps: optional (N, h, w) per-tile anomaly maps; when given (and tiles do not overlap)
            the NGFF output also holds a finer, pixel-level map (see :func:`_write_ngff`).
        tissue_fraction: optional (N,) tissue fraction per tile, for ``tiles.csv``.
        provenance: what made these scores (model sha256 and name, slide fingerprint, colour
            scale, software version), recorded in the NGFF attributes and the GeoJSON
            collection so results of two models can be told apart; its slide and model make
            the title of heatmap.png and overlay.png (:func:`figure_title`).
        display.alpha: opacity of the heat colours in overlay.png (0 = slide only, 1 = heat only).
        qc: optional tissue QC of the tiles (measurements and flags, one row per tile): added
            to ``tiles.csv`` (``qc_flags`` and a ``qc_<name>`` column per measurement) and to
            ``tiles.geojson`` (measurements, and the class ``QC: <first flag>`` in the flag's
            colour for a flagged tile).
    Returns:
        Output name (``heatmap``, ``overlay``, ``thumbnail``, ``ngff``, ``geojson``,
        ``tiles_csv``, ``top_tiles``) → path written. Every file is written under a temporary name and renamed.

    The PNGs share one canvas: their top-left ``display_geometry(geometry, max_px)[1]`` pixels
    line up with the slide (canvas pixel (i, j) covers level-0 [j·d, (j+1)·d) × [i·d, (i+1)·d));
    heatmap and overlay carry a panel to the right of it with the title (above the colour bar,
    so the canvas keeps its place), colour bar and legend. ``d`` and the canvas size are also
    stored as PNG text chunks (``display_downsample``, ``canvas_px``).
    """
    out_dir = Path(out_dir)
    slide_name, geometry, scale = outputs.slide_name, outputs.geometry, outputs.scale
    coords, grid_index = outputs.coords, outputs.grid_index
    scores, max_scores = outputs.scores, outputs.max_scores
    thumbnail, thumbnail_downsample = outputs.thumbnail, outputs.thumbnail_downsample
    tissue_mask, mask_downsample = outputs.tissue_mask, outputs.mask_downsample
    top_tiles, maps, qc = outputs.top_tiles, outputs.maps, outputs.qc
    tissue_fraction, provenance = outputs.tissue_fraction, outputs.provenance
    max_px, alpha = outputs.display.max_px, outputs.display.alpha
    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    grid_index = np.asarray(grid_index, np.int64).reshape(-1, 2)
    scores = np.asarray(scores, np.float32).reshape(-1)
    max_scores = np.asarray(max_scores, np.float32).reshape(-1)
    if not len(coords) == len(grid_index) == len(scores) == len(max_scores):
        raise ValueError("coords, grid_index, scores and max_scores must have the same length")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
    if outputs.tile_score not in TILE_SCORES:
        raise ValueError(f"tile_score must be one of {', '.join(TILE_SCORES)}")
    headline = outputs.headline

    d, canvas = display_geometry(geometry, max_px)
    heat = _heat_canvas(geometry, d, canvas, coords, headline, scale)
    slide_rgb = _resample_to_canvas(
        np.asarray(thumbnail)[..., :3], thumbnail_downsample, d, canvas, fill=255
    )
    tissue = (
        _resample_to_canvas(
            np.asarray(tissue_mask, np.uint8) * 255, mask_downsample, d, canvas, fill=0
        )
        > 127
    )
    title = figure_title(slide_name, provenance)
    panel = _legend_panel(scale, geometry, canvas[1], title, outputs.tile_score)
    info = {"display_downsample": repr(d), "canvas_px": f"{canvas[0]}x{canvas[1]}"}

    painted = heat[..., 3:] > 0
    blended = np.where(painted, alpha * heat[..., :3] + (1 - alpha) * slide_rgb, slide_rgb)
    overlay = np.dstack([(blended + 0.5).astype(np.uint8), np.full(canvas[::-1], 255, np.uint8)])
    contoured = slide_rgb.copy()
    contoured[tissue_outline(tissue)] = CONTOUR_RGB

    paths = {
        "heatmap": out_dir / "heatmap.png",
        "overlay": out_dir / "overlay.png",
        "thumbnail": out_dir / "thumbnail.png",
        "ngff": out_dir / "heatmap.ome.zarr",
        "geojson": out_dir / "tiles.geojson",
        "tiles_csv": out_dir / "tiles.csv",
        "top_tiles": out_dir / "top_tiles.png",
    }
    provenance = dict(provenance or {})
    _save_png(_with_panel(heat, panel), paths["heatmap"], info)
    _save_png(_with_panel(overlay, panel), paths["overlay"], info)
    _save_png(contoured, paths["thumbnail"], info)
    _write_ngff(
        paths["ngff"], slide_name, geometry, coords, grid_index, headline, maps, scale, provenance
    )
    _write_geojson(
        paths["geojson"],
        slide_name,
        geometry,
        coords,
        scores,
        max_scores,
        scale,
        provenance,
        qc,
        headline,
    )
    _write_tile_table(
        paths["tiles_csv"],
        geometry,
        coords,
        scores,
        max_scores,
        scale,
        tissue_fraction,
        qc,
        headline,
    )
    _write_gallery(
        paths["top_tiles"], top_tiles, coords, scores, max_scores, geometry, outputs.tile_score
    )
    return {name: str(p) for name, p in paths.items()}


def tissue_outline(tissue: np.ndarray) -> np.ndarray:
    """The outline of a tissue mask, :data:`CONTOUR_SHARE` of the picture's longer side wide
    (at least 2 px), so that it shows at the picture's native size."""
    from skimage.morphology import isotropic_dilation
    from skimage.segmentation import find_boundaries

    edge = find_boundaries(tissue, mode="inner")
    width = max(2, round(CONTOUR_SHARE * max(tissue.shape)))
    # grown into the tissue only, so the outline never hides the background around it
    return isotropic_dilation(edge, width - 1) & tissue


def _heat_canvas(
    geometry: SlideGeometry,
    d: float,
    canvas: tuple[int, int],
    coords: np.ndarray,
    scores: np.ndarray,
    scale: ColourScale,
) -> np.ndarray:
    """(h, w, 4) uint8: each scored cell [x, x+stride) × [y, y+stride) filled with its colour.

    Cell edges sit at round(x / d); a cell is at least one pixel so no tile disappears.
    """
    w, h = canvas
    rgba = np.zeros((h, w, 4), np.uint8)
    ok = np.isfinite(scores)
    if not ok.any():
        return rgba
    xy, colours = coords[ok], scale.to_rgb(scores[ok])
    start = np.rint(xy / d).astype(np.int64)
    end = np.maximum(np.rint((xy + geometry.stride_l0) / d).astype(np.int64), start + 1)
    start = np.clip(start, 0, [w, h])
    end = np.clip(end, 0, [w, h])
    for (x0, y0), (x1, y1), c in zip(start.tolist(), end.tolist(), colours):
        rgba[y0:y1, x0:x1, :3] = c
        rgba[y0:y1, x0:x1, 3] = 255
    return rgba


def _resample_to_canvas(
    image: np.ndarray, src_downsample: float, d: float, canvas: tuple[int, int], fill: int
) -> np.ndarray:
    """Resample an image at ``src_downsample`` onto the display canvas, exactly.

    Canvas pixel j covers source pixels [j·d/s, (j+1)·d/s); the source is padded with ``fill``
    where the canvas reaches beyond it (the canvas covers the whole slide, a thumbnail may stop a
    fraction of a pixel short).
    """
    w, h = canvas
    box_w, box_h = w * d / src_downsample, h * d / src_downsample
    need_w, need_h = math.ceil(box_w - 1e-9), math.ceil(box_h - 1e-9)
    src_h, src_w = image.shape[:2]
    if need_w > src_w or need_h > src_h:
        pad = [(0, max(0, need_h - src_h)), (0, max(0, need_w - src_w))]
        pad += [(0, 0)] * (image.ndim - 2)
        image = np.pad(image, pad, constant_values=fill)
    pil = Image.fromarray(np.ascontiguousarray(image))
    box = (0.0, 0.0, min(box_w, pil.width), min(box_h, pil.height))
    return np.asarray(pil.resize((w, h), Image.Resampling.BILINEAR, box=box))


def _wrap(lines: list[str]) -> list[str]:
    import textwrap

    return [w for line in lines for w in (textwrap.wrap(line, _PANEL_CHARS) or [""])]


def _legend_panel(
    scale: ColourScale,
    geometry: SlideGeometry,
    canvas_h: int,
    title: str = "",
    tile_score: str = "mean",
) -> np.ndarray:
    """(H, W, 4) uint8: the title, the colour bar on the scale (named as the fixed training
    scale or this slide's) and a legend in words; W is LEGEND_PANEL_PX[0] on a small canvas and
    grows with a tall one so that the text stays readable (:func:`_legend_figure`)."""
    fig = _legend_figure(scale, geometry, canvas_h, title, tile_score)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba()).copy()


def _legend_zoom(canvas_h: int) -> float:
    """How much larger than its base size (8 pt text at 100 dpi) the legend panel is drawn, so
    that its text is at least :data:`MIN_TEXT_SHARE` of the picture's height."""
    base_text_px = 8 * 100 / 72
    return max(1.0, 1.01 * MIN_TEXT_SHARE * canvas_h / base_text_px)  # 1 %: pixel rounding


def _fitted_lines(text: str, width_px: float, fontsize: float = 8, weight: str = "bold"):
    """``text`` wrapped into lines that fit ``width_px`` at 100 dpi (measured, not guessed from
    a character count: a long model file name in a bold font is wider than it looks)."""
    import textwrap

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_px / 100, 1), dpi=100)
    renderer = FigureCanvasAgg(fig).get_renderer()
    probe = fig.text(0, 0.5, "", fontsize=fontsize, weight=weight)
    chars = _PANEL_CHARS
    while True:
        lines = textwrap.wrap(text, chars) or [""]
        probe.set_text("\n".join(lines))
        if chars <= 8 or probe.get_window_extent(renderer).x1 <= width_px:
            return lines
        chars -= 2


def _legend_figure(
    scale: ColourScale,
    geometry: SlideGeometry,
    canvas_h: int,
    title: str = "",
    tile_score: str = "mean",
):
    """The matplotlib Figure of :func:`_legend_panel` (laid out in base pixels, drawn at
    ``_legend_zoom(canvas_h)`` times 100 dpi); a tile score other than the map's mean is
    named in the legend."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    zoom = _legend_zoom(canvas_h)
    canvas_h = math.floor(canvas_h / zoom)  # in base pixels from here on
    line_px = 14.0
    head = _fitted_lines(title, LEGEND_PANEL_PX[0] - 22) if title else []
    tile_um = geometry.tile_size_l0 * geometry.mpp
    foot = _wrap(legend_words(scale))
    if tile_score == "max":
        foot += _wrap(["tile score: the maximum of its anomaly map"])
    if scale.basis == "slide":
        foot += _wrap(
            [
                f"class Anomalous (tiles.csv, GeoJSON): score ≥ {scale.threshold:.3g}, "
                "the model's training 99th percentile"
            ]
        )
    foot += [
        f"one cell = one tile, {tile_um:.0f} µm",
        f"({geometry.tile_size_l0:.0f} level-0 px)",
        "transparent: no tile scored",
        "(background or no tissue)",
    ]
    width, min_h = LEGEND_PANEL_PX
    top_px = 14 + line_px * (len(head) + 1) + 26
    bottom_px = 12 + line_px * len(foot) + 30
    height = max(canvas_h, min_h, math.ceil(top_px + bottom_px + 60))
    fig = Figure(figsize=(width / 100, height / 100), dpi=100 * zoom, facecolor="white")
    FigureCanvasAgg(fig)
    # Fixed pixel margins so the text keeps its size whatever the canvas height.
    top, bottom = 1 - top_px / height, bottom_px / height
    ax = fig.add_axes((14 / width, bottom, 22 / width, top - bottom))
    gradient = colormaps[scale.cmap](np.linspace(1.0, 0.0, 256))[:, None, :3]
    ax.imshow(gradient, aspect="auto", extent=(0, 1, 0, 1), interpolation="nearest")
    ax.set_xticks([])
    ax.yaxis.tick_right()
    ax.set_yticks([0.0, 0.5, 1.0])
    if scale.basis == "slide":
        ticks = [
            f"{scale.vmin:.3g}  this slide's\nmedian",
            f"{scale.vcenter:.3g}  this slide's\n99th percentile",
            f"{scale.vmax:.3g}+  high for\nthis slide",
        ]
    else:
        ticks = [
            f"{scale.vmin:.3g}  training median\n(like training tissue)",
            f"{scale.vcenter:.3g}  training\n99th percentile",
            f"{scale.vmax:.3g}+  anomalous",
        ]
    ax.set_yticklabels(ticks, fontsize=8)
    if head:
        fig.text(14 / width, 1 - 10 / height, "\n".join(head), fontsize=8, va="top", weight="bold")
    fig.text(
        14 / width,
        1 - (14 + line_px * len(head)) / height,
        scale_label(scale),
        fontsize=8,
        va="top",
    )
    fig.text(14 / width, 12 / height, "\n".join(foot), fontsize=8, va="bottom")
    return fig


def _with_panel(canvas_rgba: np.ndarray, panel: np.ndarray) -> np.ndarray:
    """The aligned canvas top-left, the legend panel to its right (transparent padding)."""
    h = max(canvas_rgba.shape[0], panel.shape[0])
    w = canvas_rgba.shape[1] + panel.shape[1]
    out = np.zeros((h, w, 4), np.uint8)
    out[: canvas_rgba.shape[0], : canvas_rgba.shape[1]] = canvas_rgba
    out[: panel.shape[0], canvas_rgba.shape[1] :] = panel
    return out


def _save_png(array: np.ndarray, path: Path, text: Mapping[str, str]) -> None:
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    for key, value in text.items():
        meta.add_text(key, value)
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG", pnginfo=meta)


def _nan_downsample2(grid: np.ndarray) -> np.ndarray:
    """2× coarser grid, each cell the mean of its finite children (NaN when none)."""
    rows, cols = grid.shape
    padded = np.full((rows + rows % 2, cols + cols % 2), np.nan, np.float32)
    padded[:rows, :cols] = grid
    blocks = padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2)
    finite = np.isfinite(blocks)
    count = finite.sum(axis=(1, 3))
    total = np.where(finite, blocks, 0).sum(axis=(1, 3), dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan).astype(np.float32)


#: At most this many pixels per tile side in the NGFF pixel-level map (a 64×64 tile map is
#: area-averaged to 16×16; smaller patch grids, 14×14 say, keep their own side).
PIXEL_MAP_PX = 16


def pixel_map_side(map_px: int) -> int:
    """Pixels per tile side of the NGFF pixel-level map for ``map_px``-square tile maps: the
    largest divisor of ``map_px`` not above :data:`PIXEL_MAP_PX` (exact area averages)."""
    return max(d for d in range(1, min(map_px, PIXEL_MAP_PX) + 1) if map_px % d == 0)


def _pixel_grid(geometry: SlideGeometry, grid_index: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """Tile maps (N, h, h) laid side by side: (rows·f, cols·f) float32, NaN where no tile."""
    n, h, w = maps.shape
    f = pixel_map_side(h)
    small = maps.astype(np.float32).reshape(n, f, h // f, f, w // f).mean(axis=(2, 4))
    grid = np.full((geometry.grid_rows * f, geometry.grid_cols * f), np.nan, np.float32)
    for (col, row), tile in zip(grid_index, small):
        grid[row * f : (row + 1) * f, col * f : (col + 1) * f] = tile
    return grid


def _write_ngff(
    path: Path,
    slide_name: str,
    geometry: SlideGeometry,
    coords: np.ndarray,
    grid_index: np.ndarray,
    scores: np.ndarray,
    maps: np.ndarray | None = None,
    scale: ColourScale | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> None:
    """The score grid as an OME-NGFF 0.5 (zarr v3) image: level "0" one pixel per cell
    (``scores``: the tiles' scores, the family's tile score).

    Physical units are slide micrometres; a pixel centre lies at ``index·scale + translation``
    (napari's convention), i.e. level-0 cell c is centred on [x, x+stride)'s middle. Level "1"
    (2× nan-mean) is added when the grid is at least 2×2. With square ``maps`` (N, m, m) and
    non-overlapping tiles, a sub-image ``pixel/`` (its own NGFF multiscales) holds the finer
    anomaly map, :func:`pixel_map_side` pixels per tile side.

    Display hints (``omero``: the window of the colour scale, labelled with its basis — the
    model's fixed training scale or this slide's own) let viewers show the scores on the same
    scale as the PNGs; ``attrs["wsi_anomaly"]`` records the provenance
    and lists the images in the group (``images``: path → what it is).
    """

    import zarr

    grid = np.full((geometry.grid_rows, geometry.grid_cols), np.nan, np.float32)
    inside = (
        (grid_index[:, 0] >= 0)
        & (grid_index[:, 0] < geometry.grid_cols)
        & (grid_index[:, 1] >= 0)
        & (grid_index[:, 1] < geometry.grid_rows)
    )
    grid[grid_index[inside, 1], grid_index[inside, 0]] = scores[inside]
    stride = float(geometry.stride_l0)
    origin = np.array(grid_origin(coords, grid_index, stride))
    levels = [grid]
    if min(grid.shape) >= 2:
        levels.append(_nan_downsample2(grid))

    def dataset(path: str, cell_l0: float) -> dict[str, Any]:
        """An OME-Zarr level of ``cell_l0``-px cells (level 0) from ``origin``, in µm."""
        centre = origin + cell_l0 / 2
        return {
            "path": path,
            "coordinateTransformations": [
                {"type": "scale", "scale": [cell_l0 * geometry.mpp] * 2},
                {
                    "type": "translation",
                    "translation": [
                        float(centre[1] * geometry.mpp),
                        float(centre[0] * geometry.mpp),
                    ],
                },
            ],
        }

    datasets = [dataset(str(i), stride * 2**i) for i in range(len(levels))]
    ome: dict[str, Any] = {
        "version": "0.5",
        "multiscales": [
            {
                "name": f"{slide_name} tile anomaly score",
                "axes": [
                    {"name": "y", "type": "space", "unit": "micrometer"},
                    {"name": "x", "type": "space", "unit": "micrometer"},
                ],
                "datasets": datasets,
                "type": "mean",
                "metadata": {"description": "level 1: mean of the 2x2 cells that have a tile"},
            }
        ],
    }
    if scale is not None:
        basis = "this slide's scale" if scale.basis == "slide" else "fixed training scale"
        ome["omero"] = {
            "name": f"{slide_name} anomaly score ({basis})",
            "channels": [
                {
                    "label": f"anomaly score ({basis})",
                    "active": True,
                    "color": "FF0000",
                    "window": {
                        "start": float(scale.vmin),
                        "end": float(scale.vmax),
                        "min": float(scale.vmin),
                        "max": float(scale.vmax),
                    },
                }
            ],
            "rdefs": {"model": "color"},
        }
    images = {".": "tile anomaly score, one pixel per grid cell"}
    if (provenance or {}).get("tile_score") == "max":
        images["."] = "tile anomaly score (its anomaly map's maximum), one pixel per grid cell"

    with atomic_path(path) as tmp:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        group.attrs["ome"] = ome
        for i, level in enumerate(levels):
            chunks = tuple(max(1, min(n, 512)) for n in level.shape)
            array = group.create_array(
                str(i),
                shape=level.shape,
                chunks=chunks,
                dtype="float32",
                fill_value=np.nan,
                dimension_names=["y", "x"],
            )
            array[...] = level
        fine = (
            maps is not None
            and len(maps) == len(grid_index)
            and abs(geometry.stride_l0 - geometry.tile_size_l0) < 1e-6
            and maps.ndim == 3
            and maps.shape[1] == maps.shape[2]
            and maps.shape[1] > 0
        )
        if fine:
            assert maps is not None
            side = pixel_map_side(maps.shape[1])
            pixel = _pixel_grid(geometry, grid_index, np.asarray(maps))
            px_l0 = stride / side
            sub = group.create_group("pixel")
            sub.attrs["ome"] = {
                "version": "0.5",
                "multiscales": [
                    {
                        "name": f"{slide_name} pixel anomaly map",
                        "axes": ome["multiscales"][0]["axes"],
                        "datasets": [dataset("0", px_l0)],
                    }
                ],
            }
            sub.create_array(
                "0",
                shape=pixel.shape,
                dtype="float32",
                fill_value=np.nan,
                chunks=tuple(max(1, min(n, 1024)) for n in pixel.shape),
                dimension_names=["y", "x"],
            )[...] = pixel
            images["pixel"] = (
                f"pixel-level anomaly map, {side} pixels per tile side "
                "(its own OME-NGFF multiscales image)"
            )
        group.attrs["wsi_anomaly"] = {**(provenance or {}), "images": images}


def model_short_id(provenance: Mapping[str, Any] | None) -> str:
    """The first 8 hex digits of the model's sha256 ("nomodel" when unknown): the tag that
    tells two models' tiles apart where only names survive (QuPath measurements)."""
    sha = str((provenance or {}).get("model_sha256") or "")
    return sha[:8] if sha else "nomodel"


def tile_uuid(slide_name: str, x: int, y: int, model_sha256: str = "") -> str:
    """The deterministic id of a tile: the same model, slide and coordinates give the same
    UUID, so two models' tiles of one slide never share an id."""
    key = f"wsi-anomaly:{model_sha256}:{slide_name}:{int(x)}:{int(y)}"
    return str(uuid.uuid5(uuid.NAMESPACE_URL, key))


def qupath_measurement_names(provenance: Mapping[str, Any] | None) -> dict[str, str]:
    """The tile measurements' names in ``tiles.geojson``: each carries the short model id."""
    mid = model_short_id(provenance)
    return {key: f"{key} [{mid}]" for key in ("anomaly_score", "anomaly_max", "anomaly_threshold")}


def _write_geojson(
    path: Path,
    slide_name: str,
    geometry: SlideGeometry,
    coords: np.ndarray,
    scores: np.ndarray,
    max_scores: np.ndarray,
    scale: ColourScale,
    provenance: Mapping[str, Any] | None = None,
    qc: TileQC | None = None,
    headline: np.ndarray | None = None,
) -> None:
    """QuPath-ready tiles (QuPath ≥ 0.4): level-0 square polygons, scores as measurements,
    locked (so a click in QuPath does not move them).

    QuPath keeps a feature's id, name, classification and measurements but drops the
    collection's ``properties``, so what tells models apart is on every tile: the id is unique
    per model and slide, the name and the measurement names carry the short model id
    (:func:`model_short_id`), and the model's threshold is a measurement. The collection's
    ``properties`` still record the full provenance (model sha256, colour scale…) for other
    readers. Tiles whose score (``headline``: ``scores`` or ``max_scores``, the family's tile
    score; ``scores`` when not given) is at or above the training 99th percentile
    (``scale.threshold``, the model's, also on a slide colour scale) are classified
    "Anomalous"; a non-finite score is left out of the measurements (JSON has no NaN).

    With ``qc``, each tile's QC measurements are added (``qc_<name>``) with its flag bits
    (``qc_flags``); a flagged tile is classified ``QC: <first flag>`` in the flag's colour,
    instead of "Anomalous" for an artifact (an artifact is not a finding), not for a tile
    only at the tissue border.
    """
    provenance = dict(provenance or {})
    names = qupath_measurement_names(provenance)
    sha = str(provenance.get("model_sha256") or "")
    slide_key = str(provenance.get("slide_fingerprint") or slide_name)
    label = " ".join(
        str(v) for v in (provenance.get("model_name"), model_short_id(provenance)) if v
    )
    side = float(geometry.tile_size_l0)
    side = int(side) if side.is_integer() else side
    red = [int(v) for v in scale.to_rgb(np.array([scale.vmax]))[0]]
    features = []
    qc_classes = first_flags(qc.flags) if qc is not None else None
    ranked = (scores if headline is None else headline).tolist()
    for i, ((x, y), score, top, value) in enumerate(
        zip(coords.tolist(), scores.tolist(), max_scores.tolist(), ranked)
    ):
        measurements = {
            names[key]: float(v)
            for key, v in (
                ("anomaly_score", score),
                ("anomaly_max", top),
                ("anomaly_threshold", scale.threshold),
            )
            if math.isfinite(v)
        }
        if qc is not None:
            measurements.update(qc.measurements(i))
        properties: dict[str, Any] = {
            "objectType": "tile",
            "name": label,
            "isLocked": True,
            "measurements": measurements,
        }
        if math.isfinite(value) and value >= scale.threshold:
            properties["classification"] = {"name": "Anomalous", "color": red}
        first = qc_classes[i] if qc_classes is not None else None
        # An artifact is not a finding: its class wins. A tile only at the tissue border
        # keeps "Anomalous" when it is.
        if first is not None and (first[0] != "border" or "classification" not in properties):
            name, colour = first
            properties["classification"] = {"name": f"QC: {name}", "color": list(colour)}
        features.append(
            {
                "type": "Feature",
                "id": tile_uuid(slide_key, x, y, sha),
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [
                        [[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]
                    ],
                },
                "properties": properties,
            }
        )
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(
            {
                "type": "FeatureCollection",
                "properties": {"wsi_anomaly": provenance},
                "features": features,
            },
            f,
            allow_nan=False,
            separators=(",", ":"),
        )


TILE_TABLE_FIELDS = ("x", "y", "width", "height", "score", "max", "tissue_fraction", "class")


def _write_tile_table(
    path: Path,
    geometry: SlideGeometry,
    coords: np.ndarray,
    scores: np.ndarray,
    max_scores: np.ndarray,
    scale: ColourScale,
    tissue_fraction: np.ndarray | None,
    qc: TileQC | None = None,
    headline: np.ndarray | None = None,
) -> None:
    """``tiles.csv``: one row per tile — level-0 x, y, width, height (px), score (the map's
    mean), max (its peak), tissue fraction and class ("Anomalous" when the tile's score,
    ``headline`` — ``scores`` or ``max_scores``, the family's tile score; ``scores`` when not
    given — is at or above the model's ``scale.threshold``, else empty); with ``qc`` also
    ``qc_flags`` (the flag names, ``;``-separated) and ``qc_<name>`` per measurement."""
    import csv

    side = float(geometry.tile_size_l0)
    side_text = str(int(side)) if side.is_integer() else f"{side:g}"
    fractions = (
        np.full(len(coords), np.nan)
        if tissue_fraction is None
        else np.asarray(tissue_fraction, np.float64)
    )
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        qc_header = [] if qc is None else ["qc_flags", *(f"qc_{n}" for n in qc.names)]
        qc_cells = [] if qc is None else qc.table_cells()
        writer.writerow([*TILE_TABLE_FIELDS, *qc_header])
        ranked = (scores if headline is None else headline).tolist()
        for i, ((x, y), score, top, frac, value) in enumerate(
            zip(coords.tolist(), scores.tolist(), max_scores.tolist(), fractions.tolist(), ranked)
        ):
            anomalous = math.isfinite(value) and value >= scale.threshold
            writer.writerow(
                [
                    x,
                    y,
                    side_text,
                    side_text,
                    _num(score),
                    _num(top),
                    _num(frac),
                    "Anomalous" if anomalous else "",
                    *(qc_cells[i] if qc_cells else []),
                ]
            )


def _num(value: float) -> str:
    return f"{value:.6g}" if math.isfinite(value) else ""


def _write_gallery(
    path: Path,
    top_tiles: list[tuple[int, np.ndarray]],
    coords: np.ndarray,
    scores: np.ndarray,
    max_scores: np.ndarray,
    geometry: SlideGeometry,
    tile_score: str = "mean",
) -> None:
    """The most anomalous tiles in a grid, captioned with level-0 (x, y) and both values, the
    tile's score (``tile_score``) first."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(top_tiles)
    cols = min(5, max(n, 1))
    rows = max(1, math.ceil(n / cols))
    fig = Figure(
        figsize=(2.4 * cols, 2.8 * rows + 0.3), dpi=100, facecolor="white", layout="constrained"
    )
    FigureCanvasAgg(fig)
    if n == 0:
        fig.text(0.5, 0.5, "no tiles scored", ha="center", va="center")
    for rank, (index, tile) in enumerate(top_tiles):
        ax = fig.add_subplot(rows, cols, rank + 1)
        ax.imshow(np.asarray(tile)[..., :3], interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        x, y = (int(v) for v in coords[index])
        values = f"score {scores[index]:.3g} · max {max_scores[index]:.3g}"
        if tile_score == "max":
            values = f"max {max_scores[index]:.3g} · mean {scores[index]:.3g}"
        ax.set_title(f"#{rank + 1}  x={x}, y={y}\n{values}", fontsize=8)
    tile_um = geometry.tile_size_l0 * geometry.mpp
    fig.suptitle(f"most anomalous tiles ({tile_um:.0f} µm; level-0 px coordinates)", fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
