"""Level-0 resolution (microns per pixel): where it comes from and whether it is believable.

The chain (wsi.md §2): an explicit user override (``--slide-mpp`` or a cohort CSV) → OpenSlide's
``openslide.mpp-x/y`` → TIFF resolution tags with their unit → objective power (≈ 10 / power, with
a warning). Missing everywhere → an error that names the override.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidInputError, ResolutionError
from ..untrusted import read_csv

log = logging.getLogger(__name__)

#: Anything outside this range is a metadata error, not a microscope (µm per pixel).
MPP_MIN_EXCLUSIVE = 0.05
MPP_MAX = 20.0

_UM_PER_UNIT = {"centimeter": 1e4, "cm": 1e4, "inch": 25400.0, "millimeter": 1e3, "mm": 1e3}


@dataclass(frozen=True)
class Resolution:
    """Level-0 pixel size and the metadata that gave it."""

    mpp_x: float
    mpp_y: float
    source: str  # "override", "openslide", "tiff-tags", "objective-power"

    @property
    def mpp(self) -> float:
        """Mean of x and y pixel size, µm."""
        return (self.mpp_x + self.mpp_y) / 2.0


def check_plausible(mpp: float, what: str) -> float:
    """Return ``mpp`` or raise :class:`ResolutionError` when it cannot be a microscope's."""
    if not (mpp > MPP_MIN_EXCLUSIVE and mpp <= MPP_MAX):
        raise ResolutionError(
            f"{what}: implausible resolution {mpp:g} µm/px (expected {MPP_MIN_EXCLUSIVE} < mpp ≤ "
            f"{MPP_MAX:g}); pass the correct level-0 value with --slide-mpp"
        )
    return mpp


def _float(value: object) -> float | None:
    try:
        out = float(str(value).strip())
    except (TypeError, ValueError):
        return None
    return out if out > 0 else None


def _from_tiff_tags(props: Mapping[str, str]) -> tuple[float, float] | None:
    unit = str(props.get("tiff.ResolutionUnit", "")).strip().lower()
    xres, yres = _float(props.get("tiff.XResolution")), _float(props.get("tiff.YResolution"))
    if unit not in _UM_PER_UNIT or xres is None or yres is None:
        return None
    # Resolution tags are pixels per unit; some writers put 1 px/unit there as a placeholder.
    if xres <= 1 or yres <= 1:
        return None
    return _UM_PER_UNIT[unit] / xres, _UM_PER_UNIT[unit] / yres


def resolve_resolution(
    props: Mapping[str, str], slide_name: str, override_mpp: float | None = None
) -> Resolution:
    """Resolve the level-0 resolution of a slide from its properties.

    Args:
        props: OpenSlide-style properties (``openslide.mpp-x``, ``tiff.XResolution``, …).
        slide_name: used in messages.
        override_mpp: the user's value, µm/px; it wins over metadata because the user asked.
    """
    if override_mpp is not None:
        check_plausible(override_mpp, f"{slide_name} (--slide-mpp)")
        return Resolution(override_mpp, override_mpp, "override")

    mx, my = _float(props.get("openslide.mpp-x")), _float(props.get("openslide.mpp-y"))
    if mx is not None:
        res = Resolution(mx, my or mx, "openslide")
    elif (tags := _from_tiff_tags(props)) is not None:
        res = Resolution(tags[0], tags[1], "tiff-tags")
    elif (power := _float(props.get("openslide.objective-power"))) is not None:
        mpp = 10.0 / power
        log.warning(
            "%s: no pixel size in the metadata; estimating %.3f µm/px from objective power %gx "
            "(pass --slide-mpp to be exact)",
            slide_name,
            mpp,
            power,
        )
        res = Resolution(mpp, mpp, "objective-power")
    else:
        raise ResolutionError(
            f"{slide_name}: no resolution in the slide metadata (no mpp, resolution tags or "
            "objective power); pass its level-0 microns per pixel with --slide-mpp MPP "
            "(or a cohort CSV with --mpp-csv)"
        )
    check_plausible(res.mpp_x, slide_name)
    check_plausible(res.mpp_y, slide_name)
    return res


#: The first column's accepted names: ours, and TRIDENT's.
MPP_CSV_SLIDE_COLUMNS = ("slide", "wsi")


def load_mpp_csv(path: str | Path) -> dict[str, float]:
    """Read a cohort override file with columns ``slide,mpp`` (or TRIDENT's ``wsi,mpp``).

    ``slide`` may be a file name, a stem or a full path; lookups try all three.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"mpp CSV not found: {path}")
    fields, rows = read_csv(path, "mpp CSV")
    column = next((c for c in MPP_CSV_SLIDE_COLUMNS if c in fields), None)
    if column is None or "mpp" not in fields:
        raise InvalidInputError(
            f"{path}: an mpp CSV needs the header 'slide,mpp' or 'wsi,mpp'"
            + (f" (found {','.join(fields)[:80]!r})" if fields else "")
        )
    out: dict[str, float] = {}
    first_line: dict[str, int] = {}
    for lineno, row in rows:
        value = _float(row["mpp"])
        if value is None or not math.isfinite(value):
            raise InvalidInputError(f"{path}:{lineno}: mpp {row['mpp'][:40]!r} is not a number")
        slide = (row[column] or "").strip()
        if slide in out and out[slide] != value:
            raise InvalidInputError(
                f"{path}:{lineno}: slide {slide[:120]!r} is listed twice with different mpp "
                f"({out[slide]:g} on line {first_line[slide]}, {value:g} here); keep one"
            )
        first_line.setdefault(slide, lineno)
        out[slide] = value
    return out


def lookup_mpp(overrides: Mapping[str, float], slide_path: str | Path) -> float | None:
    """Find a slide's override by full path, file name or stem."""
    p = Path(slide_path)
    for key in (str(p), p.name, p.stem):
        if key in overrides:
            return overrides[key]
    return None
