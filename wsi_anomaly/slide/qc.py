"""Per-tile tissue quality control: artifacts that are not anomalies.

Classical, HistoQC-style measurements on the tiles the tiler has already decoded (the slide is
never read a second time), vectorised over a batch of tiles:

* ``focus``: a scale ratio — the energy of the Laplacian at the tile's resolution over that at
  a 4× coarser scale. Dense and sparse tissue give similar values; blur removes the fine scale
  first, so slightly out-of-focus tiles have a low ratio whatever their content.
* ``sharpness``: the Laplacian energy at the tile's resolution over the tile's grey variance
  (its contrast): low on strongly blurred tiles, where both scales of ``focus`` are gone.
* ``pen_green``, ``pen_blue``, ``pen_black``, ``pen_red``: fraction of the tile's pixels in a
  marker-ink colour class (HSV hue, saturation and value windows outside H&E's pink→purple).
* ``fold``: fraction of tissue pixels whose optical density (summed over RGB, averaged over
  ~20 px) exceeds a multiple of the slide's median tissue density (:func:`reference_od`, from
  the thumbnail): doubled, thick tissue.
* ``bubble``: fraction of pixels on thin bright lines (brighter than both neighbours a few
  pixels away, across or along): bubble rims and coverslip edges.
* ``brightness``: mean grey level of the tile (0–1): over- and under-exposure.
* ``stain_od``: mean optical density of the tissue pixels: faint staining.
* ``border_um``: distance from the tile's centre to the nearest background of the tissue mask,
  µm (computed once per slide from the mask, not from the tile).

Each flag compares one measurement with a threshold of :class:`QCSettings`, loaded from a YAML
preset (``qc_default``) and validated. Flags are bits of a ``uint16``: bit ``k`` is
``FLAG_NAMES[k]``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

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
    #: fold: tissue optical density (sum over RGB) above ``fold_od_ratio`` × the slide's median
    #: tissue density (:func:`reference_od`), on at least ``max_fold`` of the tissue pixels.
    fold_od_ratio: float = 2.5
    max_fold: float = 0.45
    #: bubble/coverslip edge: thin bright lines (white top-hat of the grey image above
    #: ``bubble_contrast``) on at least ``max_bubble`` of the pixels.
    bubble_contrast: float = 0.1
    bubble_min_grey: float = 0.9
    max_bubble: float = 0.1
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
            "max_bubble",
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


def _line_response(grey: np.ndarray, d: int) -> np.ndarray:
    """How much brighter each pixel of (n, h, w) images is than both of its neighbours ``d``
    pixels away, across or along (the larger of the two): high on thin bright lines, low on
    wide bright areas and on edges."""
    out = np.zeros_like(grey)
    c = grey[:, d:-d, d:-d]
    across = np.minimum(c - grey[:, d:-d, : -2 * d], c - grey[:, d:-d, 2 * d :])
    along = np.minimum(c - grey[:, : -2 * d, d:-d], c - grey[:, 2 * d :, d:-d])
    out[:, d:-d, d:-d] = np.maximum(across, along)
    return out


#: Colour and density measurements use every SAMPLE_STEP-th pixel of each row and column.
SAMPLE_STEP = 4


def measure_tiles(
    tiles: np.ndarray, settings: QCSettings | None = None, reference: float = float("nan")
) -> np.ndarray:
    """QC measurements of (n, T, T, 3) uint8 RGB tiles → (n, K) float32, columns
    :data:`VALUE_NAMES` (``border_um`` is NaN here: see :func:`border_distance_um`).
    ``reference``: the slide's median tissue density (:func:`reference_od`; NaN → 1).

    Colour classes and densities are measured on every 4th pixel (marker strokes, folds and
    bubble rims are several pixels wide); focus at the tiles' own resolution (on every 4th
    row) against a 4× coarser scale.
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
    sample = np.ascontiguousarray(tiles[:, step // 2 :: step, step // 2 :: step, :3])
    scale = np.float32(1 / 255)
    r, g, b = (sample[..., k].astype(np.float32) * scale for k in range(3))
    grey = np.float32(0.299) * r + np.float32(0.587) * g + np.float32(0.114) * b
    h, s, v = _hsv(r, g, b)
    # Optical density summed over R, G, B: −log of the product of the transmissions.
    floor = np.float32(1 / 255)
    od = -np.log(np.maximum(r, floor) * np.maximum(g, floor) * np.maximum(b, floor))
    coloured = s >= settings.pen_min_saturation
    green = coloured & _in_hue(h, settings.pen_green_hue)
    blue = coloured & _in_hue(h, settings.pen_blue_hue)
    red = (s >= settings.pen_red_min_saturation) & _in_hue(h, settings.pen_red_hue) & (v > 0.4)
    black = (v < settings.pen_black_max_value) & (s < 0.5)
    tissue = (od > 0.3) & ~black & ~green & ~blue & ~red

    n_px = np.float32(h.shape[1] * h.shape[2])

    def count(mask: np.ndarray) -> np.ndarray:
        return np.count_nonzero(mask.reshape(n, -1), axis=1).astype(np.float32)

    def mean(mask: np.ndarray) -> np.ndarray:
        return count(mask) / n_px

    n_tissue = np.maximum(count(tissue), 1)
    out[:, _COL["pen_green"]] = mean(green)
    out[:, _COL["pen_blue"]] = mean(blue)
    out[:, _COL["pen_black"]] = mean(black)
    out[:, _COL["pen_red"]] = mean(red)
    # Folds: a dark patch, not a dark nucleus — the density averaged over 5×5 sampled pixels
    # (20 px of the tile, larger than a nucleus).
    od_smooth = ndimage.uniform_filter(od, size=(1, 5, 5))
    fold_od = settings.fold_od_ratio * (reference if math.isfinite(reference) else 1.0)
    out[:, _COL["fold"]] = count(tissue & (od_smooth > fold_od)) / n_tissue
    lines = (_line_response(grey, 2) > settings.bubble_contrast) & (grey > settings.bubble_min_grey)
    out[:, _COL["bubble"]] = mean(lines)
    out[:, _COL["brightness"]] = grey.reshape(n, -1).mean(axis=1)
    out[:, _COL["stain_od"]] = (
        np.einsum("ni,ni->n", od.reshape(n, -1), tissue.reshape(n, -1).astype(np.float32))
        / n_tissue
    )
    # Full-resolution Laplacian on every 4th row (rows 1, 5, 9…, with the rows above and below).
    rows = tiles.shape[1] // 4 * 4
    triples = tiles[:, :rows, :, 1].reshape(n, rows // 4, 4, -1)[:, :, :3].astype(np.int16)
    fine = _laplacian_energy_rows(triples)
    coarse = _laplacian_energy(np.ascontiguousarray(sample[..., 1]).astype(np.int16))
    out[:, _COL["focus"]] = np.where(coarse > 1.0, fine / np.maximum(coarse, 1.0), np.nan)
    contrast = sample[..., 1].reshape(n, -1).astype(np.float32).var(axis=1)
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
    # Pad with background so the slide's own edge counts as a border.
    dist = ndimage.distance_transform_edt(np.pad(np.asarray(mask, bool), 1))[1:-1, 1:-1]
    centre = (coords + tile_l0 / 2) / downsample
    j = np.clip(centre[:, 0].astype(np.int64), 0, mask.shape[1] - 1)
    i = np.clip(centre[:, 1].astype(np.int64), 0, mask.shape[0] - 1)
    return (dist[i, j] * downsample * level0_mpp).astype(np.float32)


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
            "fold": col["fold"] >= settings.max_fold if settings.max_fold else None,
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
            flags |= hit.astype(np.uint16) << k
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


def reference_od(thumbnail: np.ndarray, mask: np.ndarray) -> float:
    """Median optical density (summed over RGB) of a thumbnail's tissue pixels: the slide's
    staining level (NaN without tissue). Folds are judged against it."""
    if not np.any(mask):
        return float("nan")
    rgb = np.asarray(thumbnail)[..., :3][np.asarray(mask, bool)].astype(np.float32) / 255
    return float(np.median(-np.log(np.maximum(rgb, 1 / 255)).sum(axis=-1)))


def qc_record(settings: QCSettings, reference: float = float("nan")) -> dict[str, Any]:
    """What a tile store records of its QC: the column names of ``qc_values``, the bit names
    of ``qc_flags``, the settings and the slide's reference density (None when unknown)."""
    return {
        "names": list(VALUE_NAMES),
        "flags": list(FLAG_NAMES),
        "settings": settings.to_dict(),
        "reference_od": reference if math.isfinite(reference) else None,
    }


def tissue_border_um(tissue: Any, level0_mpp: float, coords: np.ndarray, tile_l0: float):
    """:func:`border_distance_um` of a :class:`~wsi_anomaly.slide.tissue.TissueMask`."""
    return border_distance_um(tissue.mask, tissue.downsample, level0_mpp, coords, tile_l0)


class TileQCMeter:
    """Measures and flags a slide's tiles shard by shard as they stream past.

    ``border_um`` (N,): each tile's distance to the tissue border (:func:`border_distance_um`).
    Calling the meter with ``(start, tiles)`` returns that shard's ``(values, flags)``.
    """

    def __init__(
        self, settings: QCSettings, border_um: np.ndarray, reference: float = float("nan")
    ):
        self.settings = settings
        self.reference = reference
        self.border_um = np.asarray(border_um, np.float32)
        self.seconds = 0.0

    def __call__(self, start: int, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import time

        t0 = time.perf_counter()
        values = measure_tiles(tiles, self.settings, self.reference)
        values[:, _COL["border_um"]] = self.border_um[start : start + len(tiles)]
        flags = flag_tiles(values, self.settings)
        self.seconds += time.perf_counter() - t0
        return values, flags
