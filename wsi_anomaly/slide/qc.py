"""Per-tile tissue quality control: artifacts that are not anomalies.

Classical, HistoQC-style measurements on the tiles the tiler has already decoded (the slide is
never read a second time), vectorised over a batch of tiles:

* ``focus``: a scale ratio — the energy of the Laplacian at the tile's resolution over that at
  a 4× coarser scale. Dense and sparse tissue give similar values; blur removes the fine scale
  first, so slightly out-of-focus tiles have a low ratio whatever their content.
* ``sharpness``: the Laplacian energy at the tile's resolution over the tile's grey variance
  (its contrast): low on strongly blurred tiles, where both scales of ``focus`` are gone.
* ``pen_green``, ``pen_blue``, ``pen_black``, ``pen_red``: fraction of the tile's pixels in a
  marker-ink colour class (HSV hue, saturation and value windows outside H&E's pink→purple,
  precomputed into one colour lookup table).
* ``fold``: fraction of the tissue whose optical density (summed over RGB, averaged over
  16-px blocks) is about twice the slide's median density of tissue of the same stain colour
  (:func:`colour_reference_od`, from the thumbnail): two layers of tissue, whose densities add
  while their hue stays (dense epithelium is dense too, but bluer than the stroma it borders).
* ``fold_step``: the largest step in mean density across a straight line with tissue on both
  sides, in units of the slide's median density of tissue of the denser side's colour: the
  edge of a fold, where a second layer of tissue starts over tissue that continues underneath.
* ``bubble``: the longest circular arc covered continuously by thin bright lines, in tile sides
  (:func:`arc_lengths`): bubble rims and coverslip edges, told from the short, irregular bright
  gaps between fibres by their shape.
* ``brightness``: mean grey level of the tile (0–1): over- and under-exposure.
* ``stain_od``: mean optical density of the tissue pixels: faint staining.
* ``border_um``: distance from the tile's centre to the nearest background of the tissue mask,
  µm (computed once per slide from the mask, not from the tile).

Each flag compares one or two measurements with a threshold of :class:`QCSettings`, loaded from a YAML
preset (``qc_default``) and validated. Flags are bits of a ``uint16``: bit ``k`` is
``FLAG_NAMES[k]``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage, sparse, spatial

from ..errors import InputNotFoundError, InvalidInputError

#: The measurements, in the column order of ``qc_values``.
VALUE_NAMES = (
    "focus",
    "sharpness",
    "pen_green",
    "pen_blue",
    "pen_black",
    "pen_red",
    "fold",
    "fold_step",
    "bubble",
    "brightness",
    "stain_od",
    "border_um",
)
_COL = {name: k for k, name in enumerate(VALUE_NAMES)}
#: The flags, in bit order of ``qc_flags`` (bit k set ⇔ FLAG_NAMES[k]).
FLAG_NAMES = (
    "blur",
    "pen_green",
    "pen_blue",
    "pen_black",
    "pen_red",
    "fold",
    "bubble",
    "overexposed",
    "underexposed",
    "faint",
    "border",
)
#: One display colour per flag (RGB), for the QC picture, QuPath classes and viewers.
FLAG_COLOURS: dict[str, tuple[int, int, int]] = {
    "blur": (255, 140, 0),
    "pen_green": (0, 170, 0),
    "pen_blue": (30, 60, 255),
    "pen_black": (40, 40, 40),
    "pen_red": (230, 0, 0),
    "fold": (150, 0, 200),
    "bubble": (0, 200, 220),
    "overexposed": (255, 230, 0),
    "underexposed": (120, 70, 20),
    "faint": (255, 120, 200),
    "border": (128, 128, 128),
}
#: Flags that make a tile unusable for the cohort verdict (``border`` marks where tissue ends,
#: not an artifact: it counts separately).
ARTIFACT_FLAGS = tuple(name for name in FLAG_NAMES if name != "border")

#: The preset shipped with the package (``configs/qc_default.yaml``).
DEFAULT_PRESET = "qc_default"
PRESET_DIR = Path(__file__).resolve().parents[1] / "configs"


@dataclass(frozen=True)
class QCSettings:
    """Thresholds of the QC flags (see the preset ``configs/qc_default.yaml`` for their
    meaning). A threshold of 0 disables its flag (``min_focus``, ``border_um``…)."""

    #: blur: ``focus`` below this (fine/coarse Laplacian energy ratio), or ``sharpness``
    #: below ``min_sharpness`` (Laplacian energy over grey variance).
    min_focus: float = 0.032
    min_sharpness: float = 0.06
    #: pen: fraction of the tile's pixels in an ink colour class at or above this.
    max_pen: float = 0.08
    #: ink colour classes: minimum saturation of coloured ink; hue windows in [0, 1).
    pen_min_saturation: float = 0.3
    pen_green_hue: tuple[float, float] = (0.2, 0.5)
    pen_blue_hue: tuple[float, float] = (0.52, 0.68)
    pen_red_hue: tuple[float, float] = (0.985, 0.03)
    pen_red_min_saturation: float = 0.6
    #: black ink: value (max of RGB) below this with low saturation.
    pen_black_max_value: float = 0.2
    #: fold: tissue optical density (sum over RGB) at least ``fold_od_ratio`` × the slide's
    #: median density of tissue of the same stain colour (:func:`colour_reference_od`), on at
    #: least ``max_fold`` of the tissue pixels …
    fold_od_ratio: float = 2.0
    max_fold: float = 0.14
    #: … or a straight edge across which the mean density of strips ``fold_step_width`` (of the
    #: tile side) wide steps up by at least ``max_fold_step`` × the slide's median density of
    #: tissue of the denser strip's colour.
    fold_step_width: float = 0.2
    max_fold_step: float = 1.2
    #: bubble/coverslip edge: thin bright lines (brighter than both sides by ``bubble_contrast``,
    #: grey at least ``bubble_min_grey``) that follow a circle continuously (see
    #: :func:`arc_lengths`: ``bubble_fit_px`` at half resolution, ``bubble_inliers``,
    #: ``bubble_fill``) along at least ``max_bubble`` tile sides.
    bubble_contrast: float = 0.08
    bubble_min_grey: float = 0.6
    bubble_fit_px: float = 1.5
    bubble_inliers: float = 0.1
    bubble_fill: float = 0.5
    max_bubble: float = 0.55
    #: exposure: mean grey level of the tile above / below these.
    max_brightness: float = 0.92
    min_brightness: float = 0.25
    #: faint staining: mean optical density of the tissue pixels below this.
    min_stain_od: float = 0.25
    #: tissue border: tile centre closer than this to background, µm.
    border_um: float = 64.0
    #: what makes a slide "check" / "fail": the fraction of tissue tiles with any artifact flag.
    check_artifact_fraction: float = 0.1
    fail_artifact_fraction: float = 0.3
    #: … or the fraction of one artifact class alone.
    check_class_fraction: float = 0.05
    fail_class_fraction: float = 0.2

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> QCSettings:
        for f in fields(self):
            value = getattr(self, f.name)
            parts = value if isinstance(value, tuple) else (value,)
            for v in parts:
                if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                    raise InvalidInputError(f"QC setting {f.name} must be a number, got {value!r}")
                if v < 0:
                    raise InvalidInputError(f"QC setting {f.name} must be 0 or more, got {v}")
            if f.name.endswith("_hue"):
                if len(parts) != 2 or not all(0 <= v <= 1 for v in parts):
                    raise InvalidInputError(
                        f"QC setting {f.name} must be two hues between 0 and 1, got {value!r}"
                    )
        for name in (
            "max_pen",
            "max_fold",
            "fold_step_width",
            "bubble_inliers",
            "bubble_fill",
            "max_brightness",
            "min_brightness",
            "pen_min_saturation",
            "pen_red_min_saturation",
            "pen_black_max_value",
            "bubble_min_grey",
            "check_artifact_fraction",
            "fail_artifact_fraction",
            "check_class_fraction",
            "fail_class_fraction",
        ):
            if getattr(self, name) > 1:
                raise InvalidInputError(f"QC setting {name} must be between 0 and 1")
        if self.min_brightness >= self.max_brightness:
            raise InvalidInputError("QC setting min_brightness must be below max_brightness")
        if self.check_artifact_fraction > self.fail_artifact_fraction:
            raise InvalidInputError("QC check_artifact_fraction must not exceed the fail one")
        if self.check_class_fraction > self.fail_class_fraction:
            raise InvalidInputError("QC check_class_fraction must not exceed the fail one")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "QC settings") -> QCSettings:
        if not isinstance(data, Mapping):
            raise InvalidInputError(f"{where}: must be a mapping of QC settings")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise InvalidInputError(
                f"{where}: unknown QC setting {unknown[0]!r} (known: {', '.join(known)})"
            )
        values: dict[str, Any] = {}
        for key, value in data.items():
            if isinstance(getattr(cls(), key), tuple):
                if not isinstance(value, list | tuple):
                    raise InvalidInputError(f"{where}: {key} must be a list of two numbers")
                value = tuple(value)
            values[key] = value
        return dataclasses.replace(cls(), **values)


def load_qc_settings(name_or_path: str | None = None) -> QCSettings:
    """The QC settings of a preset name (``qc_default``) or a YAML file; the shipped preset when
    None. Values missing from the file keep the defaults."""
    from ..config import read_yaml

    name = name_or_path or DEFAULT_PRESET
    path = Path(name)
    if not path.is_file():
        candidates = [PRESET_DIR / name, PRESET_DIR / f"{name}.yaml"]
        found = next((c for c in candidates if c.is_file() and c.stem.startswith("qc")), None)
        if found is None:
            presets = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("qc*.yaml")))
            raise InputNotFoundError(
                f"QC config {name!r} not found (a YAML file, or a preset: {presets})"
            )
        path = found
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise InvalidInputError(f"{path}: a QC config file must be a mapping")
    data = data.get("qc", data)
    return QCSettings.from_dict(data, str(path))


# -- measurements --------------------------------------------------------------------------------
def _hsv(r: np.ndarray, g: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 R, G, B planes in [0, 1] → hue, saturation, value, each in [0, 1]."""
    v = np.maximum(np.maximum(r, g), b)
    c = v - np.minimum(np.minimum(r, g), b)
    s = c / np.maximum(v, np.float32(1e-6))
    cz = np.maximum(c, np.float32(1e-6))
    h = np.where(
        v == r, ((g - b) / cz) % 6.0, np.where(v == g, (b - r) / cz + 2.0, (r - g) / cz + 4.0)
    )
    h = np.where(c > 0, h * np.float32(1 / 6), np.float32(0))
    return h, s, v


def _in_hue(h: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    lo, hi = window
    return (h >= lo) & (h <= hi) if lo <= hi else (h >= lo) | (h <= hi)


#: Ink classes as bits of the colour lookup table.
_GREEN, _BLUE, _BLACK, _RED = 1, 2, 4, 8
#: Bits of each colour channel kept by the lookup table (64 levels per channel).
_LUT_BITS = 6


@functools.lru_cache(maxsize=8)
def _ink_lut(settings: QCSettings) -> np.ndarray:
    """Ink class bits of every colour quantised to 6 bits per channel: one table lookup per
    pixel instead of an HSV conversion (262 144 entries, computed once per settings)."""
    levels = 1 << _LUT_BITS
    centre = (np.arange(levels, dtype=np.float32) + 0.5) / levels
    r, g, b = np.meshgrid(centre, centre, centre, indexing="ij")
    h, s, v = _hsv(r, g, b)
    coloured = s >= settings.pen_min_saturation
    lut = np.zeros(r.shape, np.uint8)
    lut |= (coloured & _in_hue(h, settings.pen_green_hue)).astype(np.uint8) * _GREEN
    lut |= (coloured & _in_hue(h, settings.pen_blue_hue)).astype(np.uint8) * _BLUE
    lut |= ((v < settings.pen_black_max_value) & (s < 0.5)).astype(np.uint8) * _BLACK
    red = (s >= settings.pen_red_min_saturation) & _in_hue(h, settings.pen_red_hue) & (v > 0.4)
    lut |= red.astype(np.uint8) * _RED
    return lut.ravel()


#: Optical density of each 8-bit channel value, −log(transmission) (floor 1/255).
_OD_LUT = (-np.log(np.maximum(np.arange(256, dtype=np.float32), 1) / 255)).astype(np.float32)


def _laplacian_energy(grey: np.ndarray, step: int = 1) -> np.ndarray:
    """Mean squared 4-neighbour Laplacian of (n, h, w) int16 images on every ``step``-th
    interior row (every row's neighbours are used, so the Laplacian is the full-resolution one)."""
    c = grey[:, 1:-1:step, 1:-1]
    up, down = grey[:, 0:-2:step, 1:-1], grey[:, 2::step, 1:-1]
    lap = 4 * c - up - down - grey[:, 1:-1:step, :-2] - grey[:, 1:-1:step, 2:]
    lap = lap.reshape(len(grey), -1).astype(np.float32)
    return np.einsum("ni,ni->n", lap, lap) / max(lap.shape[1], 1)


def _laplacian_energy_rows(rows: np.ndarray) -> np.ndarray:
    """Mean squared 4-neighbour Laplacian of the middle rows of (n, m, 3, w) int16 row
    triples (above, centre, below), interior columns."""
    up, c, down = rows[:, :, 0], rows[:, :, 1], rows[:, :, 2]
    lap = 4 * c[..., 1:-1] - up[..., 1:-1] - down[..., 1:-1] - c[..., :-2] - c[..., 2:]
    lap = lap.reshape(len(rows), -1).astype(np.float32)
    return np.einsum("ni,ni->n", lap, lap) / max(lap.shape[1], 1)


def _bright_lines(grey: np.ndarray, d: int, contrast: int, min_grey: int) -> np.ndarray:
    """Thin bright lines of (n, h, w) uint8 images, as a bool map: pixels brighter than
    ``min_grey`` that exceed both of their neighbours ``d`` pixels away on either side by more
    than ``contrast``, in at least one of four directions (across, along and both diagonals):
    any orientation of thin line, not wide bright areas nor edges. The ``d``-px frame is False.

    A pixel passes in a direction when it exceeds the brighter of that direction's two
    neighbours, so one minimum over the four directions' maxima decides (in uint8, no signed
    copy of the images)."""
    out = np.zeros(grey.shape, bool)
    c = grey[:, d:-d, d:-d]
    # The bar to clear: the brighter neighbour, in the direction where it is dimmest.
    bar = np.maximum(grey[:, d:-d, : -2 * d], grey[:, d:-d, 2 * d :])
    for a, b in (
        (grey[:, : -2 * d, d:-d], grey[:, 2 * d :, d:-d]),
        (grey[:, : -2 * d, : -2 * d], grey[:, 2 * d :, 2 * d :]),
        (grey[:, : -2 * d, 2 * d :], grey[:, 2 * d :, : -2 * d]),
    ):
        np.minimum(bar, np.maximum(a, b), out=bar)
    # c − contrast > bar, without wrapping below 0: c ≤ contrast never passes.
    lifted = np.maximum(c, np.uint8(min(contrast, 255))) - np.uint8(min(contrast, 255))
    out[:, d:-d, d:-d] = (lifted > bar) & (c > min_grey)
    return out


#: 8-connected components within each image of a (n, h, w) stack, never across images.
_PLANE = np.zeros((3, 3, 3), bool)
_PLANE[1] = True
_SQUARE = np.ones((3, 3), bool)


#: The refits of a line's circle: on its pixels within these multiples of ``fit_px`` of the
#: previous circle, in turn. Narrowing in small steps from a wide band lets the circle move
#: onto a rim that fibre gaps have joined into a larger line, before the band is too narrow to
#: reach it.
_REFITS = (8.0, 4.0, 8 / 3, 4 / 3, 1.0)

#: Angular bins of an arc's coverage of its circle.
_ARC_BINS = 32


def arc_lengths(
    lines: np.ndarray,
    fit_px: float,
    min_inliers: float,
    fill: float = 0.5,
    min_length: float = 0.0,
) -> np.ndarray:
    """Longest circular arc among the line pixels of each (n, h, w) bool image, in image sides
    (arcs shorter than ``min_length`` sides may read 0: lines too short to hold one are not
    fitted).

    Each connected line (8-connected, at least a quarter of the image side and ``fill`` ×
    ``min_length`` sides in pixels) gets a circle fitted by algebraic least squares (Kåsa),
    refitted five times on the pixels ever closer to the previous circle (within 8, 4, 8/3, 4/3
    and 1 × ``fit_px`` in turn), so that a rim joined to other lines (gaps between fibres
    crossing it) still finds its own circle. The circle is split into 32 sectors; a sector is
    covered when its pixels within ``fit_px`` of the circle are at least ``fill`` × what a
    continuous 1-px line through the sector would leave (short, broken lines that happen to
    touch a circle do not cover it) and at least two thirds of the line's pixels in the
    twice-as-wide band beside the ring (a blob or a dense texture puts twice as many there as
    on the ring). A line is an arc when at least
    ``min_inliers`` of its pixels lie within ``fit_px`` of its circle and the radius is between
    a tenth of the image side and three sides; its length is the covered angle × the radius.
    All components of all images are fitted at once (per-line sums by one sparse product per
    fit, and ``np.bincount``).
    """
    n, size = len(lines), lines.shape[-1]
    out = np.zeros(n, np.float32)
    lines = np.asarray(lines, bool)
    if not (lines[:, 0].any() or lines[:, -1].any()):
        # With every image's first and last rows empty, stacked images touch nowhere: one 2-d
        # labelling of the stack (faster than the 3-d one with a per-plane structure).
        labels, n_all = ndimage.label(lines.reshape(-1, lines.shape[-1]), _SQUARE)
    else:
        labels, n_all = ndimage.label(lines, _PLANE)
    if n_all == 0:
        return out
    flat = labels.ravel()
    # The line pixels only (a small part of the image), found on the 1-byte map.
    on = np.flatnonzero(lines)
    label_on = flat[on]
    size_all = np.bincount(label_on, minlength=n_all + 1)
    # A line shorter than fill × min_length image sides cannot cover an arc that long.
    fit_all = size_all >= size * max(0.25, fill * min_length)
    fit_all[0] = False
    if not fit_all.any():
        return out
    # Only the pixels of lines long enough to be fitted, renumbered 1…n_lab, and of those every
    # other one on a checkerboard: lines are 2–3 px thick, so circles and sector coverage are
    # unchanged at half the arithmetic (counts are doubled back below).
    h, w = lines.shape[1:]
    renumber = np.where(fit_all, np.cumsum(fit_all), 0)
    lab = renumber[label_on]
    # Fitted lines first (a small part of the line pixels on H&E), then the checkerboard.
    fitted = np.flatnonzero(lab)
    on, lab = on[fitted], lab[fitted]
    zr, rest = np.divmod(on, h * w)
    yi, xi = np.divmod(rest, w)
    keep = np.flatnonzero((yi + xi) & 1 == 0)
    n_lab = int(fit_all.sum())
    # Line by line (a stable radix sort of small labels), so that each line's pixels are one
    # run and the per-line sums below are one sparse product whose weights are set in place.
    keep = keep[
        np.argsort(lab[keep].astype(np.uint16 if n_lab < 2**16 else np.int64), kind="stable")
    ]
    z, yi, xi, lab = zr[keep], yi[keep], xi[keep], lab[keep]
    per_line = np.bincount(lab, minlength=n_lab + 1)
    count = 2 * per_line.astype(np.float64)
    fit = np.ones(n_lab + 1, bool)
    fit[0] = False
    y, x = yi.astype(np.float64), xi.astype(np.float64)
    r2 = x * x + y * y
    # Per line, the sums of the Kåsa fit's moments: one sparse product (line × pixel) per fit.
    # Coordinates are integers and weights 0 or 1, so the sums are exact in any order (below
    # 2**53: images up to about 1500 px a side).
    moments = np.stack([x * x, x * y, y * y, x, y, np.ones_like(x), x * r2, y * r2, r2], 1)
    members = sparse.csr_array(
        (np.ones(len(lab)), np.arange(len(lab)), np.concatenate([[0], np.cumsum(per_line)])),
        shape=(n_lab + 1, len(lab)),
    )
    cx = cy = radius = np.zeros(n_lab + 1)
    dist = np.zeros_like(x)
    for tolerance in (None, *(t * fit_px for t in _REFITS)):
        if tolerance is not None:
            members.data = (dist < tolerance).astype(np.float64)
        sxx, sxy, syy, sx, sy, sn, sxr, syr, sr = (members @ moments).T
        normal = np.stack(
            [
                np.stack([sxx, sxy, sx], -1),
                np.stack([sxy, syy, sy], -1),
                np.stack([sx, sy, sn], -1),
            ],
            -2,
        )[fit]
        rhs = -np.stack([sxr, syr, sr], -1)[fit]
        coef = np.zeros((n_lab + 1, 3))
        ok = np.abs(np.linalg.det(normal)) > 1e-9
        coef_fit = np.zeros((len(normal), 3))
        coef_fit[ok] = np.linalg.solve(normal[ok], rhs[ok, :, None])[..., 0]
        coef[fit] = coef_fit
        cx, cy = -coef[:, 0] / 2, -coef[:, 1] / 2
        radius = np.sqrt(np.maximum(cx * cx + cy * cy - coef[:, 2], 0))
        # Each line's circle repeated over its run of pixels (faster than indexing by label).
        dx, dy = x - np.repeat(cx, per_line), y - np.repeat(cy, per_line)
        dist = np.sqrt(dx * dx + dy * dy)  # (np.hypot is 4× slower)
        dist -= np.repeat(radius, per_line)
        np.abs(dist, out=dist)
    # Angles only of the pixels on the ring or in the band on either side of it (fit_px to
    # 3·fit_px away: twice the ring's width): a rim stands out from the band; a blob or a
    # dense texture fills it as much as the ring.
    near = np.flatnonzero(dist < 3 * fit_px)
    inlier = dist[near] < fit_px
    lab_near = lab[near]
    n_in = 2 * np.bincount(lab_near[inlier], minlength=n_lab + 1).astype(np.float64)
    angle = np.arctan2(y[near] - cy[lab_near], x[near] - cx[lab_near])
    sector = ((angle + np.pi) * (_ARC_BINS / (2 * np.pi))).astype(np.int64) % _ARC_BINS
    bins = lab_near * _ARC_BINS + sector
    per_sector = np.bincount(bins[inlier], minlength=(n_lab + 1) * _ARC_BINS)
    per_beside = np.bincount(bins[~inlier], minlength=(n_lab + 1) * _ARC_BINS)
    need = np.maximum(fill * np.pi * radius / _ARC_BINS, 1)  # half: on the checkerboard
    covered = (per_sector.reshape(n_lab + 1, _ARC_BINS) >= need[:, None]) & (
        2 * per_beside <= 3 * per_sector
    ).reshape(n_lab + 1, _ARC_BINS)
    coverage = covered.sum(axis=1) / _ARC_BINS
    arc = fit & (n_in >= min_inliers * count) & (radius > size / 10) & (radius < 3 * size)
    length = np.where(arc, coverage * 2 * np.pi * radius / size, 0.0)
    image = np.zeros(n_lab + 1, np.int64)
    image[lab] = z
    np.maximum.at(out, image[1:], length[1:].astype(np.float32))
    return out


@functools.lru_cache(maxsize=4)
def _step_strips(grid: int, width: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of strips ``width`` (of the tile side) wide on either side of straight lines
    (24 directions × 15 offsets) on a ``grid``² block map: (L, grid²) float32 each."""
    yy, xx = (np.mgrid[0:grid, 0:grid] + 0.5) / grid - 0.5
    near, far = [], []
    for theta in np.linspace(0, 2 * np.pi, 24, endpoint=False):
        u = xx * np.cos(theta) + yy * np.sin(theta)
        for c in np.linspace(-0.35, 0.35, 15):
            near.append((u > c) & (u < c + width))
            far.append((u < c) & (u > c - width))
    a, b = (np.array(m, np.float32).reshape(len(m), -1) for m in (near, far))
    keep = (a.sum(1) >= 0.6 * width * grid * grid) & (b.sum(1) >= 0.6 * width * grid * grid)
    return a[keep], b[keep]


#: The density map of the fold-edge search: the tile in _STEP_GRID² blocks.
_STEP_GRID = 16


def _block_sums(
    od_rgb: tuple[np.ndarray, np.ndarray, np.ndarray], tissue: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int] | None:
    """Per-channel optical density summed over the tissue of each block of a
    :data:`_STEP_GRID`² grid of (n, h, w) maps: (n, grid², 3) sums, (n, grid²) tissue pixels,
    and the pixels of a block; None when the maps are smaller than the grid."""
    n, h, w = tissue.shape
    grid = _STEP_GRID
    k = min(h, w) // grid
    if k == 0:
        return None
    t = tissue[:, : grid * k, : grid * k].astype(np.float32)
    # Block sums as two small matrix products (much faster than a 5-d reshape-sum).
    pool = np.kron(np.eye(grid, dtype=np.float32), np.ones((1, k), np.float32))
    cover = (pool @ t @ pool.T).reshape(n, -1)
    sums = np.stack(
        [(pool @ (c[:, : grid * k, : grid * k] * t) @ pool.T).reshape(n, -1) for c in od_rgb],
        axis=-1,
    )
    return sums, cover, k * k


def _doubled_fraction(
    sums: np.ndarray, cover: np.ndarray, block_px: int, table: np.ndarray, ratio: float
) -> np.ndarray:
    """Fraction of the tissue in blocks (:func:`_block_sums`; blocks at least half tissue)
    whose mean density is at least ``ratio`` × ``table`` at the block's stain colour."""
    dens = sums.sum(axis=-1) / np.maximum(cover, 1)
    single = table[_colour_bins(sums[..., 0], sums[..., 1], sums[..., 2])]
    doubled = (cover >= 0.5 * block_px) & (dens >= np.float32(ratio) * single)
    return (cover * doubled).sum(axis=1) / np.maximum(cover.sum(axis=1), 1)


def _fold_step(
    sums: np.ndarray, cover: np.ndarray, block_px: int, table: np.ndarray, width: float
) -> np.ndarray:
    """Largest step in mean optical density across a straight line of block density sums
    (:func:`_block_sums`), over tissue on both sides, in units of the slide's median density
    of tissue of the denser side's stain colour (``table``, :func:`colour_reference_od`): the
    edge of a fold, where the tissue underneath continues and a second layer of the same
    tissue adds its whole density (dense epithelium beside stroma steps up too, but to its own
    colour's density: no more than one of its own layers)."""
    near, far = _step_strips(_STEP_GRID, width)
    c_near, c_far = cover @ near.T, cover @ far.T
    full = np.float32(0.7 * block_px)
    ok = (c_near >= full * near.sum(1)) & (c_far >= full * far.sum(1))
    channels = np.ascontiguousarray(sums.transpose(0, 2, 1))  # (n, 3, grid²)
    s_near = channels @ near.T  # (n, 3, lines)
    s_far = channels @ far.T
    step = s_near.sum(1) / np.maximum(c_near, 1) - s_far.sum(1) / np.maximum(c_far, 1)
    single = table[_colour_bins(s_near[:, 0], s_near[:, 1], s_near[:, 2])]
    return np.where(ok, step / single, 0).max(axis=1).astype(np.float32)


#: Colour and density measurements use every SAMPLE_STEP-th pixel of each row and column;
#: bubble rims every BUBBLE_STEP-th.
SAMPLE_STEP = 4
BUBBLE_STEP = 2


def measure_tiles(
    tiles: np.ndarray,
    settings: QCSettings | None = None,
    reference: float = float("nan"),
    colour_reference: np.ndarray | None = None,
) -> np.ndarray:
    """QC measurements of (n, T, T, 3) uint8 RGB tiles → (n, K) float32, columns
    :data:`VALUE_NAMES` (``border_um`` is NaN here: see :func:`border_distance_um`).
    ``reference``: the slide's median tissue density (:func:`reference_od`; NaN → 1);
    ``colour_reference``: its median density per stain colour (:func:`colour_reference_od`;
    None or empty → ``reference`` for every colour).

    Colour classes and densities are measured on every 4th pixel (marker strokes and folds are
    several pixels wide), bubble rims on every 2nd; focus at the tiles' own resolution (on
    every 4th row) against a 4× coarser scale.
    """
    settings = settings or QCSettings()
    tiles = np.asarray(tiles)
    if tiles.ndim != 4 or tiles.shape[-1] < 3:
        raise ValueError(f"tiles must be (n, T, T, 3), got {tiles.shape}")
    n = len(tiles)
    out = np.full((n, len(VALUE_NAMES)), np.nan, np.float32)
    if n == 0:
        return out
    step = SAMPLE_STEP
    # Each channel copied on its own: three strided copies of one byte per pixel are cheaper
    # than one of three, and every use below then reads contiguous memory.
    r, g, b = (
        np.ascontiguousarray(tiles[:, step // 2 :: step, step // 2 :: step, c]) for c in range(3)
    )
    shift = 8 - _LUT_BITS
    key = (r.astype(np.int32) >> shift) << (2 * _LUT_BITS)
    key |= (g.astype(np.int32) >> shift) << _LUT_BITS
    key |= b.astype(np.int32) >> shift
    ink = np.take(_ink_lut(settings), key)  # (np.take: faster than indexing)
    # Optical density summed over R, G, B: −log of the product of the transmissions.
    od_rgb = (np.take(_OD_LUT, r), np.take(_OD_LUT, g), np.take(_OD_LUT, b))
    od = od_rgb[0] + od_rgb[1] + od_rgb[2]
    grey = (r * np.float32(0.299 / 255) + g * np.float32(0.587 / 255)) + b * np.float32(0.114 / 255)
    tissue = (od > 0.3) & (ink == 0)

    n_px = np.float32(r.shape[1] * r.shape[2])
    flat_ink = ink.reshape(n, -1)

    def count(mask: np.ndarray) -> np.ndarray:
        return np.count_nonzero(mask.reshape(n, -1), axis=1).astype(np.float32)

    n_tissue = np.maximum(count(tissue), 1)
    for name, bit in (
        ("pen_green", _GREEN),
        ("pen_blue", _BLUE),
        ("pen_black", _BLACK),
        ("pen_red", _RED),
    ):
        out[:, _COL[name]] = np.count_nonzero(flat_ink & bit, axis=1) / n_px
    # Folds: two layers of tissue, whose densities add — tissue about twice as dense as the
    # slide's own tissue of the same stain colour (a doubled layer keeps its hue; nuclei-dense
    # epithelium is dense but bluer than stroma), in blocks of 4×4 sampled pixels (16 px of
    # the tile, larger than a nucleus) ...
    table = _colour_table(colour_reference, reference)
    blocks = _block_sums(od_rgb, tissue) if settings.max_fold or settings.max_fold_step else None
    if blocks is not None and settings.max_fold:
        out[:, _COL["fold"]] = _doubled_fraction(*blocks, table, settings.fold_od_ratio)
    # ... or a straight edge across which the density steps up by a whole layer of tissue.
    # (A threshold of 0 turns its flag off and skips its measurement: NaN.)
    if blocks is not None and settings.max_fold_step:
        out[:, _COL["fold_step"]] = _fold_step(*blocks, table, settings.fold_step_width)
    # Bubble rims: long thin bright lines that follow a circle, on every 2nd pixel.
    if settings.max_bubble:
        bstep = BUBBLE_STEP
        half = tiles[:, bstep // 2 :: bstep, bstep // 2 :: bstep, 1]
        lines = _bright_lines(
            np.ascontiguousarray(half, np.uint8),
            2,
            round(255 * settings.bubble_contrast),
            round(255 * settings.bubble_min_grey),
        )
        out[:, _COL["bubble"]] = arc_lengths(
            lines,
            settings.bubble_fit_px,
            settings.bubble_inliers,
            settings.bubble_fill,
            settings.max_bubble,
        )
    out[:, _COL["brightness"]] = grey.reshape(n, -1).mean(axis=1)
    out[:, _COL["stain_od"]] = (
        np.einsum("ni,ni->n", od.reshape(n, -1), tissue.reshape(n, -1).astype(np.float32))
        / n_tissue
    )
    # Full-resolution Laplacian on every 4th row (rows 1, 5, 9…, with the rows above and below).
    rows = tiles.shape[1] // 4 * 4
    triples = tiles[:, :rows, :, 1].reshape(n, rows // 4, 4, -1)[:, :, :3].astype(np.int16)
    fine = _laplacian_energy_rows(triples)
    coarse = _laplacian_energy(g.astype(np.int16))
    out[:, _COL["focus"]] = np.where(coarse > 1.0, fine / np.maximum(coarse, 1.0), np.nan)
    contrast = g.reshape(n, -1).astype(np.float32).var(axis=1)
    out[:, _COL["sharpness"]] = np.where(contrast > 1.0, fine / np.maximum(contrast, 1.0), np.nan)
    return out


def border_distance_um(
    mask: np.ndarray, downsample: float, level0_mpp: float, coords: np.ndarray, tile_l0: float
) -> np.ndarray:
    """Distance (µm) from each tile's centre to the nearest background pixel of a tissue mask.

    ``mask`` (h, w) bool, pixel (i, j) covering level-0 [j·d, (j+1)·d) × [i·d, (i+1)·d) with
    ``d = downsample``; ``coords`` (N, 2) level-0 top-left (x, y); ``tile_l0`` the tile side in
    level-0 px. A centre outside the mask counts as 0.
    """
    coords = np.asarray(coords, np.float64).reshape(-1, 2)
    if len(coords) == 0 or mask.size == 0:
        return np.zeros(len(coords), np.float32)
    mask = np.asarray(mask, bool)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return np.zeros(len(coords), np.float32)
    # Everything outside the tissue's bounding box is background, so the box padded with one
    # ring of background (which also makes the slide's own edge a border) gives the exact
    # distances. Only the tile centres need one, so rather than a distance transform of every
    # mask pixel (a whole-mask pass per slide), each centre on tissue asks a k-d tree of the
    # background pixels beside tissue: the background pixel nearest to a tissue pixel always
    # has a tissue pixel as a 4-neighbour (a step towards the tissue pixel would be nearer
    # otherwise), so the distances are those of the transform, to the bit.
    top, left = int(rows[0]), int(cols[0])
    box = np.pad(mask[top : int(rows[-1]) + 1, left : int(cols[-1]) + 1], 1)
    centre = (coords + tile_l0 / 2) / downsample
    j = np.clip(centre[:, 0].astype(np.int64), 0, mask.shape[1] - 1) - left + 1
    i = np.clip(centre[:, 1].astype(np.int64), 0, mask.shape[0] - 1) - top + 1
    inside = (i >= 1) & (i < box.shape[0] - 1) & (j >= 1) & (j < box.shape[1] - 1)
    inside[inside] = box[i[inside], j[inside]]
    out = np.zeros(len(coords), np.float64)
    if inside.any():
        # The background pixels with a tissue 4-neighbour (a dilation by the cross).
        shore = np.argwhere(ndimage.binary_dilation(box) & ~box).astype(np.float64)
        query = np.stack([i[inside], j[inside]], axis=1).astype(np.float64)
        out[inside] = spatial.cKDTree(shore).query(query)[0]
    return (out * downsample * level0_mpp).astype(np.float32)


def flag_tiles(values: np.ndarray, settings: QCSettings | None = None) -> np.ndarray:
    """(n, K) measurements (columns :data:`VALUE_NAMES`) → (n,) uint16 flag bits
    (bit k ⇔ :data:`FLAG_NAMES` [k]). A NaN measurement raises no flag."""
    settings = settings or QCSettings()
    v = np.asarray(values, np.float32).reshape(-1, len(VALUE_NAMES))
    col = {name: v[:, k] for k, name in enumerate(VALUE_NAMES)}
    with np.errstate(invalid="ignore"):
        tests = {
            "blur": (col["focus"] < settings.min_focus)
            | (col["sharpness"] < settings.min_sharpness),
            "pen_green": col["pen_green"] >= settings.max_pen if settings.max_pen else None,
            "pen_blue": col["pen_blue"] >= settings.max_pen if settings.max_pen else None,
            "pen_black": col["pen_black"] >= settings.max_pen if settings.max_pen else None,
            "pen_red": col["pen_red"] >= settings.max_pen if settings.max_pen else None,
            "fold": (col["fold"] >= settings.max_fold if settings.max_fold else False)
            | (col["fold_step"] >= settings.max_fold_step if settings.max_fold_step else False),
            "bubble": col["bubble"] >= settings.max_bubble if settings.max_bubble else None,
            "overexposed": col["brightness"] > settings.max_brightness,
            "underexposed": col["brightness"] < settings.min_brightness,
            "faint": col["stain_od"] < settings.min_stain_od,
            "border": col["border_um"] < settings.border_um,
        }
    flags = np.zeros(len(v), np.uint16)
    for k, name in enumerate(FLAG_NAMES):
        hit = tests[name]
        if hit is not None:
            flags |= np.asarray(hit, bool).astype(np.uint16) << k
    return flags


def flag_masks(flags: np.ndarray) -> dict[str, np.ndarray]:
    """(n,) flag bits → per-flag (n,) bool arrays, in :data:`FLAG_NAMES` order."""
    flags = np.asarray(flags, np.uint16)
    return {name: (flags >> k & 1).astype(bool) for k, name in enumerate(FLAG_NAMES)}


def flag_labels(flags: np.ndarray) -> list[str]:
    """Each tile's flags as text, e.g. ``"blur;pen_blue"`` (empty when clean)."""
    masks = flag_masks(flags)
    return [
        ";".join(name for name in FLAG_NAMES if masks[name][i])
        for i in range(len(np.asarray(flags)))
    ]


def first_flags(flags: np.ndarray) -> list[tuple[str, tuple[int, int, int]] | None]:
    """Per tile, its first flag in :data:`FLAG_NAMES` order (artifacts before ``border``) and
    the flag's colour; None for a clean tile."""
    out: list[tuple[str, tuple[int, int, int]] | None] = []
    for bits in np.asarray(flags, np.uint16).tolist():
        k = (bits & -bits).bit_length() - 1 if bits else -1
        out.append((FLAG_NAMES[k], FLAG_COLOURS[FLAG_NAMES[k]]) if k >= 0 else None)
    return out


def artifact_mask(flags: np.ndarray) -> np.ndarray:
    """(n,) bool: tiles with any artifact flag (every flag but ``border``)."""
    bits = sum(1 << FLAG_NAMES.index(name) for name in ARTIFACT_FLAGS)
    return (np.asarray(flags, np.uint16) & np.uint16(bits)) != 0


@dataclass
class TileQC:
    """QC of a slide's tiles: ``values`` (N, K) float32 (columns ``names``), ``flags`` (N,)
    uint16 (bits ``flag_names``) and the settings that made them."""

    values: np.ndarray
    flags: np.ndarray
    settings: QCSettings
    names: tuple[str, ...] = VALUE_NAMES
    flag_names: tuple[str, ...] = FLAG_NAMES

    def measurements(self, i: int) -> dict[str, float]:
        """Tile ``i``'s measurements as ``qc_<name>`` (finite ones) and its ``qc_flags`` bits,
        for QuPath."""
        out = {
            f"qc_{n}": float(v)
            for n, v in zip(self.names, self.values[i].tolist())
            if math.isfinite(v)
        }
        out["qc_flags"] = float(self.flags[i])
        return out

    def table_cells(self) -> list[list[str]]:
        """Per tile: its flag names (``;``-separated) and each measurement, as text."""
        labels = flag_labels(self.flags)
        return [
            [label, *(f"{v:.6g}" if math.isfinite(v) else "" for v in row)]
            for label, row in zip(labels, self.values.tolist())
        ]

    def fractions(self, among: np.ndarray | None = None) -> dict[str, float]:
        """Fraction of tiles per flag and for ``any_artifact`` (of ``among``, a bool mask)."""
        flags = self.flags if among is None else self.flags[among]
        n = max(len(flags), 1)
        out = {name: float(mask.sum() / n) for name, mask in flag_masks(flags).items()}
        out["any_artifact"] = float(artifact_mask(flags).sum() / n)
        return out


def slide_verdict(fractions: Mapping[str, float], settings: QCSettings) -> tuple[str, list[str]]:
    """``pass``, ``check`` or ``fail`` for a slide from its per-flag tile fractions, and why."""
    reasons: list[str] = []
    verdict = "pass"

    def worse(level: str, reason: str) -> None:
        nonlocal verdict
        reasons.append(reason)
        if level == "fail" or verdict == "pass":
            verdict = level

    total = fractions.get("any_artifact", 0.0)
    if total >= settings.fail_artifact_fraction:
        worse("fail", f"artifacts on {total:.0%} of tissue tiles")
    elif total >= settings.check_artifact_fraction:
        worse("check", f"artifacts on {total:.0%} of tissue tiles")
    for name in ARTIFACT_FLAGS:
        f = fractions.get(name, 0.0)
        if f >= settings.fail_class_fraction:
            worse("fail", f"{name} {f:.0%}")
        elif f >= settings.check_class_fraction:
            worse("check", f"{name} {f:.0%}")
    return verdict, reasons


#: Stain colours of :func:`colour_reference_od`: the hue of a pixel's optical density — the
#: direction of its (R, G, B) densities once their grey part (the mean) is taken away, which
#: neither a second layer of the same stain (it scales) nor a grey loss of light (it adds
#: the same to every channel) moves — in this many bins of the circle.
_COLOUR_BINS = 36
#: Thumbnail pixels a colour bin needs for its own median (others take the nearest bin's).
_MIN_BIN_PIXELS = 50
#: Thumbnail tissue pixels the per-colour medians are taken from, at most (about).
_MAX_REFERENCE_PIXELS = 400_000
#: Unit axes of the plane perpendicular to grey in (R, G, B) density space: (1, −1, 0)/√2 and
#: (1, 1, −2)/√6.
_CHROMA_U = np.float32(1 / math.sqrt(2))
_CHROMA_V = np.float32(1 / math.sqrt(6))


def _colour_bins(od_r: np.ndarray, od_g: np.ndarray, od_b: np.ndarray) -> np.ndarray:
    """Colour bin (0 … _COLOUR_BINS − 1) of each pixel from its per-channel optical densities
    (any common scale)."""
    u = (od_r - od_g) * _CHROMA_U
    v = (od_r + od_g - 2 * od_b) * _CHROMA_V
    angle = np.arctan2(v, u)
    k = ((angle + np.float32(np.pi)) * np.float32(_COLOUR_BINS / (2 * np.pi))).astype(np.int32)
    return np.minimum(k, _COLOUR_BINS - 1)


def colour_reference_od(thumbnail: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Median optical density (summed over RGB) of a thumbnail's tissue per stain colour
    (:data:`_COLOUR_BINS` bins of the hue of the density, :func:`_colour_bins`; bins with
    too few pixels take the nearest populated bin's value): the density of one layer of this
    slide's tissue of each colour, which folds are judged against. Empty without tissue."""
    rgb = np.asarray(thumbnail)[..., :3][np.asarray(mask, bool)]
    # Medians need no more than a few hundred thousand pixels: an evenly spread subset of a
    # large thumbnail's tissue keeps the memory small.
    rgb = rgb[:: max(1, len(rgb) // _MAX_REFERENCE_PIXELS)]
    od = _OD_LUT[rgb]
    dens = od.sum(axis=-1)
    on = dens > 0.3
    if np.count_nonzero(on) < _MIN_BIN_PIXELS:
        return np.zeros(0, np.float32)
    od, dens = od[on], dens[on]
    bins = _colour_bins(od[:, 0], od[:, 1], od[:, 2])
    order = np.argsort(bins, kind="stable")
    bins, dens = bins[order], dens[order]
    edges = np.searchsorted(bins, np.arange(_COLOUR_BINS + 1))
    table = np.full(_COLOUR_BINS, np.nan, np.float32)
    for k in np.nonzero(np.diff(edges) >= _MIN_BIN_PIXELS)[0]:
        table[k] = np.median(dens[edges[k] : edges[k + 1]])
    filled = np.nonzero(np.isfinite(table))[0]
    if len(filled) == 0:
        return np.full(_COLOUR_BINS, np.median(dens), np.float32)
    # Empty bins take the nearest filled one's value, around the circle.
    every = np.arange(_COLOUR_BINS)
    gap = np.abs(every[:, None] - filled[None, :])
    gap = np.minimum(gap, _COLOUR_BINS - gap)
    return table[filled[np.argmin(gap, axis=1)]].astype(np.float32)


def _colour_table(colour_reference: np.ndarray | None, reference: float) -> np.ndarray:
    if colour_reference is not None and len(colour_reference) == _COLOUR_BINS:
        return np.asarray(colour_reference, np.float32)
    return np.full(_COLOUR_BINS, reference if math.isfinite(reference) else 1.0, np.float32)


def reference_od(thumbnail: np.ndarray, mask: np.ndarray) -> float:
    """Median optical density (summed over RGB) of a thumbnail's tissue pixels: the slide's
    staining level (NaN without tissue). Folds are judged against it where the density per
    stain colour (:func:`colour_reference_od`) is unknown."""
    if not np.any(mask):
        return float("nan")
    rgb = np.asarray(thumbnail)[..., :3][np.asarray(mask, bool)].astype(np.float32) / 255
    return float(np.median(-np.log(np.maximum(rgb, 1 / 255)).sum(axis=-1)))


def qc_record(
    settings: QCSettings,
    reference: float = float("nan"),
    colour_reference: np.ndarray | None = None,
) -> dict[str, Any]:
    """What a tile store records of its QC: the column names of ``qc_values``, the bit names
    of ``qc_flags``, the settings, the slide's reference density (None when unknown) and its
    reference density per stain colour (``colour_reference_od``, a list; None when unknown)."""
    return {
        "names": list(VALUE_NAMES),
        "flags": list(FLAG_NAMES),
        "settings": settings.to_dict(),
        "reference_od": reference if math.isfinite(reference) else None,
        "colour_reference_od": (
            [float(v) for v in colour_reference]
            if colour_reference is not None and len(colour_reference)
            else None
        ),
    }


def stored_colour_reference(record: Mapping[str, Any] | None) -> np.ndarray | None:
    """The per-colour reference density of a store's QC record (None when it has none)."""
    values = (record or {}).get("colour_reference_od")
    if not isinstance(values, list) or len(values) != _COLOUR_BINS:
        return None
    table = np.asarray(values, np.float32)
    return table if np.isfinite(table).all() else None


def tissue_border_um(tissue: Any, level0_mpp: float, coords: np.ndarray, tile_l0: float):
    """:func:`border_distance_um` of a :class:`~wsi_anomaly.slide.tissue.TissueMask`."""
    return border_distance_um(tissue.mask, tissue.downsample, level0_mpp, coords, tile_l0)


class TileQCMeter:
    """Measures and flags a slide's tiles shard by shard as they stream past.

    ``border_um`` (N,): each tile's distance to the tissue border (:func:`border_distance_um`).
    Calling the meter with ``(start, tiles)`` returns that shard's ``(values, flags)``; tiles
    already passed to :meth:`measure` (by the decoding threads, as each part of a shard is
    decoded) are not measured again.
    """

    def __init__(
        self,
        settings: QCSettings,
        border_um: np.ndarray,
        reference: float = float("nan"),
        colour_reference: np.ndarray | None = None,
    ):
        self.settings = settings
        self.reference = reference
        self.colour_reference = colour_reference
        self.border_um = np.asarray(border_um, np.float32)
        self.values = np.full((len(self.border_um), len(VALUE_NAMES)), np.nan, np.float32)
        self._measured = np.zeros(len(self.border_um), bool)
        #: wall time spent measuring, summed over the threads that measured
        self.seconds = 0.0
        #: CPU time of the same (each thread's own, :func:`time.thread_time`): what QC costs
        #: whatever else the machine is doing
        self.cpu_seconds = 0.0

    def measure(self, start: int, tiles: np.ndarray) -> None:
        """Measure tiles ``start…start+len(tiles)`` and keep their values. Safe to call from
        several threads at once on disjoint ranges."""
        t0, c0 = time.perf_counter(), time.thread_time()
        stop = start + len(tiles)
        self.values[start:stop] = measure_tiles(
            tiles, self.settings, self.reference, self.colour_reference
        )
        self._measured[start:stop] = True
        # Float adds under the GIL.
        self.cpu_seconds += time.thread_time() - c0
        self.seconds += time.perf_counter() - t0

    def record(self) -> dict[str, Any]:
        """The store's QC record of this meter (:func:`qc_record`)."""
        return qc_record(self.settings, self.reference, self.colour_reference)

    def ensure_measured(self, start: int, tiles: np.ndarray) -> None:
        """Measure tiles ``start…start+len(tiles)`` unless :meth:`measure` already did."""
        if not self._measured[start : start + len(tiles)].all():
            self.measure(start, tiles)

    def __call__(self, start: int, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """This shard's ``(values, flags)``, measuring its tiles first when needed."""
        self.ensure_measured(start, tiles)
        return self._flagged(start, start + len(tiles))

    def results(self) -> tuple[np.ndarray, np.ndarray]:
        """Every tile's ``(values, flags)`` at once, (N, K) float32 and (N,) uint16: one pass
        for a whole slide instead of one per shard.

        Raises:
            RuntimeError when some tile was never measured (a caller's bug, not a user's).
        """
        if not self._measured.all():
            missing = int((~self._measured).sum())
            raise RuntimeError(f"{missing} of {len(self._measured)} tiles were never measured")
        return self._flagged(0, len(self._measured))

    def _flagged(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        t0, c0 = time.perf_counter(), time.thread_time()
        values = self.values[start:stop].copy()
        values[:, _COL["border_um"]] = self.border_um[start:stop]
        flags = flag_tiles(values, self.settings)
        self.cpu_seconds += time.thread_time() - c0
        self.seconds += time.perf_counter() - t0
        return values, flags
