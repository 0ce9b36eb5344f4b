"""Tile coordinates for other tools: one ``coords`` HDF5 file per tool's reading convention.

Every file holds one dataset ``coords`` (N, 2) int64 — the level-0 top-left (x, y) of each
tile, as in the tile store — but the attributes beside it mean different things to each tool,
so one file cannot tell all three how to cut the same square once the tiling resamples:

* **TRIDENT** (``<folder>/trident/patches/<stem>_patches.h5``): ``patch_size`` is the side at
  the *target* resolution and the level-0 side is ``round(patch_size × level0_magnification /
  target_magnification)``; TRIDENT picks the level and resizes to ``patch_size`` itself.
* **CLAM** (``<folder>/clam/patches/<stem>.h5``, ``Whole_Slide_Bag_FP``): it reads
  ``read_region(coord, patch_level, (patch_size, patch_size))`` — ``patch_size`` is in pixels
  *of* ``patch_level``. The file names the level the tiler read and the read size there; the
  resize to the target side (``target_patch_size`` attribute, CLAM's own option of that name,
  or the feature extractor's transform) is the reader's.
* **wsinfer** (``<folder>/wsinfer/patches/<stem>.h5``): it accepts only ``patch_level`` 0 and
  reads ``patch_size`` level-0 pixels, resized to its model's input. The file gives the tile's
  level-0 side; when that side is not a whole number of level-0 pixels (a pyramid level with a
  fractional downsample) the tiling cannot be expressed and no file is written.

Each file also carries the provenance attributes (``target_mpp``, ``actual_mpp``, ``level0_mpp``,
``patch_size_level0``, ``overlap``, ``name``). Needs h5py (``pip install 'wsi-anomaly[export]'``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InvalidInputError
from ..outputs import atomic_path
from .store import TileStore

#: The tools a coordinate file is written for, in the order they are reported.
COORD_TOOLS = ("trident", "clam", "wsinfer")

#: A level-0 side this close to a whole number of pixels is that number (float downsamples).
WHOLE_PX_TOLERANCE = 1e-3


@dataclass
class CoordsExport:
    """What :func:`write_coords_files` did: the file written per tool, or why not."""

    written: dict[str, Path] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """One line per tool, for the command line."""
        out = [f"{tool} coordinates → {path}" for tool, path in self.written.items()]
        out += [f"{tool}: no coordinate file: {why}" for tool, why in self.refused.items()]
        return out


def coords_path(folder: str | Path, tool: str, stem: str) -> Path:
    """Where ``tool`` looks for the coordinates of slide ``stem`` under ``folder``."""
    name = f"{stem}_patches.h5" if tool == "trident" else f"{stem}.h5"
    return Path(folder) / tool / "patches" / name


def _tiling(store: TileStore) -> dict:
    a = store.attrs
    tile_px = int(a["tile_px"])
    read_px = int(a.get("read_px") or tile_px)
    stride_px = int(a.get("stride_px") or tile_px)
    return {
        "tile_px": tile_px,
        "read_px": read_px,
        "level": int(a["level"]),
        "side_l0": float(a["tile_size_l0"]),
        "target_mpp": float(a["target_mpp"]),
        "actual_mpp": float(a["actual_mpp"]),
        "level0_mpp": float(a["level0_mpp"]),
        "overlap": max(0, tile_px - stride_px),
        "name": str(a.get("slide_name", "")),
    }


def coords_attributes(store: TileStore, tool: str) -> dict:
    """The ``coords`` attributes that make ``tool`` read exactly the store's tiles.

    Raises:
        InvalidInputError: ``tool`` cannot express this tiling (the message says why).
    """
    t = _tiling(store)
    side_l0 = round(t["side_l0"])
    common = {
        "target_mpp": t["target_mpp"],
        "actual_mpp": t["actual_mpp"],
        "level0_mpp": t["level0_mpp"],
        "patch_size_level0": side_l0,
        "overlap": t["overlap"],
        "name": t["name"],
    }
    if tool == "trident":
        # TRIDENT's level-0 side is round(patch_size × src_mag / dst_mag): magnifications as
        # 10 / mpp keep that ratio the tiler's own (actual_mpp / level0_mpp = side_l0 / tile_px).
        level0_mag = 10.0 / t["level0_mpp"]
        target_mag = level0_mag * t["tile_px"] / t["side_l0"]
        if round(t["tile_px"] * level0_mag / target_mag) != side_l0:
            raise InvalidInputError(
                f"TRIDENT's magnification ratio cannot give a {t['side_l0']:g}-px level-0 side"
            )
        return {
            **common,
            "patch_size": t["tile_px"],
            "level0_magnification": level0_mag,
            "target_magnification": target_mag,
        }
    if tool == "clam":
        return {
            **common,
            "patch_level": t["level"],
            "patch_size": t["read_px"],
            "target_patch_size": t["tile_px"],
        }
    if tool == "wsinfer":
        if abs(t["side_l0"] - side_l0) > WHOLE_PX_TOLERANCE:
            raise InvalidInputError(
                f"wsinfer reads only whole level-0 pixels (patch_level 0) and this tile is "
                f"{t['side_l0']:.3f} level-0 px wide"
            )
        return {**common, "patch_level": 0, "patch_size": side_l0}
    raise InvalidInputError(f"no coordinate convention for {tool!r}; one of {COORD_TOOLS}")


def require_h5py():
    try:
        import h5py
    except ImportError:
        raise InvalidInputError(
            "writing coords .h5 files needs h5py: pip install 'wsi-anomaly[export]'"
        ) from None
    return h5py


def write_coords_h5(store: TileStore, path: str | Path, tool: str = "trident") -> Path:
    """Write the store's coordinates as ``tool`` reads them, at ``path`` (atomically).

    Raises:
        InvalidInputError: h5py is missing, or ``tool`` cannot express this tiling.
    """
    attrs = coords_attributes(store, tool)
    h5py = require_h5py()
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        coords = f.create_dataset("coords", data=np.asarray(store.coords, np.int64))
        for key, value in attrs.items():
            coords.attrs[key] = value
    return Path(path)


def write_coords_files(
    store: TileStore, folder: str | Path, tools: tuple[str, ...] = COORD_TOOLS
) -> CoordsExport:
    """Write one coordinate file per tool under ``folder`` (see :func:`coords_path`); a tool
    that cannot express the tiling gets no file and a reason in ``refused``."""
    require_h5py()  # one clear error before any file when h5py is missing
    stem = Path(str(store.attrs.get("slide_name") or "slide")).stem
    result = CoordsExport()
    for tool in tools:
        try:
            result.written[tool] = write_coords_h5(store, coords_path(folder, tool, stem), tool)
        except InvalidInputError as exc:
            result.refused[tool] = str(exc)
    return result
