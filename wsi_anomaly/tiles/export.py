"""Tile coordinates for other tools: the ``coords`` HDF5 file CLAM- and TRIDENT-style feature
extractors read.

One dataset ``coords`` (N, 2) int64 — the level-0 top-left (x, y) of each tile, as in the tile
store — with attributes that say how to cut the patches again: ``patch_size`` (px at the target
resolution), ``patch_size_level0`` (the same side in level-0 px), ``patch_level`` (the pyramid
level read), ``target_mpp`` / ``actual_mpp`` / ``level0_mpp`` (µm/px), ``level0_magnification``
and ``target_magnification`` (≈ 10 / mpp), ``overlap`` (px at the target resolution) and
``name`` (the slide). Needs h5py (``pip install 'wsi-anomaly[export]'``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InvalidInputError
from ..outputs import atomic_path
from .store import TileStore


def write_coords_h5(store: TileStore, path: str | Path) -> Path:
    """Write the tile store's coordinates as a ``coords`` HDF5 file at ``path`` (atomically)."""
    try:
        import h5py
    except ImportError:
        raise InvalidInputError(
            "writing coords .h5 files needs h5py: pip install 'wsi-anomaly[export]'"
        ) from None
    a = store.attrs
    tile_px = int(a["tile_px"])
    stride_px = int(a.get("stride_px") or tile_px)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        coords = f.create_dataset("coords", data=np.asarray(store.coords, np.int64))
        coords.attrs["patch_size"] = tile_px
        coords.attrs["patch_size_level0"] = int(round(float(a["tile_size_l0"])))
        coords.attrs["patch_level"] = int(a["level"])
        coords.attrs["target_mpp"] = float(a["target_mpp"])
        coords.attrs["actual_mpp"] = float(a["actual_mpp"])
        coords.attrs["level0_mpp"] = float(a["level0_mpp"])
        coords.attrs["level0_magnification"] = 10.0 / float(a["level0_mpp"])
        coords.attrs["target_magnification"] = 10.0 / float(a["actual_mpp"])
        coords.attrs["overlap"] = max(0, tile_px - stride_px)
        coords.attrs["name"] = str(a.get("slide_name", ""))
    return Path(path)
