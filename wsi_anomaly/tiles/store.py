"""The per-slide tile store: one zarr v3 group (wsi.md §4).

Layout::

    tiles.zarr/
      tiles            uint8   (N, T, T, 3)  compressed, small inner chunks inside large shards
      coords           int64   (N, 2)        level-0 top-left (x, y)
      grid_index       int32   (N, 2)        (col, row) in the slide's tile grid
      tissue_fraction  float32 (N,)
      scores           float32 (N,)          written by the scorer
      maps             float16 (N, 64, 64)   optional, written by the scorer
      attrs["wsi_anomaly"] = provenance (slide, fingerprint, mpp and source, level, tile size,
                             stride, tissue settings, software version, complete = True)

A store is written under a temporary name and renamed when complete, so an interrupted run
never leaves something that looks finished.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from .. import __version__
from ..errors import InputNotFoundError, InvalidInputError, OutputExistsError

log = logging.getLogger(__name__)

ATTRS_KEY = "wsi_anomaly"
STORE_FORMAT = 1
#: Tiles per inner chunk and per shard file: a 70k×70k slide (~30 000 tissue tiles at 0.25 mpp)
#: becomes ~120 shard files, and reading one tile decodes at most CHUNK_TILES tiles.
CHUNK_TILES = 16
SHARD_TILES = 256


def _compressor() -> BloscCodec:
    # lz4 at a low level: RGB tissue compresses only modestly whatever the codec, and the tiler
    # must keep up with direct JPEG decoding (thousands of tiles/s), so speed wins over ratio.
    return BloscCodec(cname="lz4", clevel=1, shuffle="noshuffle")


def temporary_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.partial")


def prepare_output(path: Path, overwrite: bool) -> Path:
    """Refuse an existing output unless ``overwrite``; clear stale partial output. Returns tmp path."""
    if path.exists():
        if not overwrite:
            raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it")
    tmp = temporary_path(path)
    if tmp.exists():
        log.info("removing partial output of an interrupted run: %s", tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def commit_output(tmp: Path, final: Path) -> None:
    """Atomically move a finished output into place, replacing any previous one."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


class TileStoreWriter:
    """Streams tiles into a new store; memory is bounded by one shard of tiles.

    Use as a context manager: on success the store is marked complete and renamed into place;
    on error the partial store is removed.
    """

    def __init__(self, path: str | Path, n_tiles: int, tile_px: int, coords: np.ndarray,
                 grid_index: np.ndarray, tissue_fraction: np.ndarray, attrs: dict[str, Any],
                 overwrite: bool = False):
        self.path = Path(path)
        self.tmp = prepare_output(self.path, overwrite)
        self.n_tiles = n_tiles
        self.tile_px = tile_px
        root = zarr.open_group(str(self.tmp), mode="w", zarr_format=3)
        shard = max(1, min(SHARD_TILES, n_tiles))
        chunk = min(CHUNK_TILES, shard)
        shard -= shard % chunk
        self.shard_tiles = shard
        self.tiles = root.create_array(
            "tiles", shape=(n_tiles, tile_px, tile_px, 3), dtype="uint8",
            chunks=(chunk, tile_px, tile_px, 3), shards=(shard, tile_px, tile_px, 3),
            compressors=_compressor(), dimension_names=("tile", "y", "x", "rgb"),
            # Tiles are never all-zero: skip zarr's per-chunk "is it empty?" comparison.
            config={"write_empty_chunks": True})
        root.create_array("coords", data=np.asarray(coords, np.int64).reshape(-1, 2),
                          chunks=(max(1, n_tiles), 2))
        root.create_array("grid_index", data=np.asarray(grid_index, np.int32).reshape(-1, 2),
                          chunks=(max(1, n_tiles), 2))
        root.create_array("tissue_fraction", data=np.asarray(tissue_fraction, np.float32),
                          chunks=(max(1, n_tiles),))
        self.attrs = {"format": STORE_FORMAT, "software_version": __version__, "complete": False,
                      **attrs}
        root.attrs[ATTRS_KEY] = self.attrs
        self.root = root

    def create_scores(self, keep_maps: bool = False, map_px: int = 64) -> None:
        """Add the arrays the scorer fills: ``scores``/``max_scores`` (N,), ``maps`` (N, 64, 64)."""
        create_score_arrays(self.root, self.n_tiles, self.shard_tiles, keep_maps, map_px)

    def write_scores(self, start: int, mean: np.ndarray, peak: np.ndarray,
                     maps: np.ndarray | None = None) -> None:
        write_score_arrays(self.root, start, mean, peak, maps)

    def write(self, start: int, tiles: np.ndarray) -> None:
        """Write tiles [start, start + len(tiles)); callers pass whole shards for speed."""
        self.tiles[start:start + len(tiles)] = tiles

    def close(self, extra_attrs: dict[str, Any] | None = None) -> None:
        attrs = {**self.attrs, **(extra_attrs or {}), "complete": True}
        self.root.attrs[ATTRS_KEY] = attrs
        commit_output(self.tmp, self.path)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "TileStoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def create_score_arrays(root: zarr.Group, n_tiles: int, chunk: int, keep_maps: bool,
                        map_px: int = 64) -> None:
    """(Re)create the score arrays of a store, filled with NaN until scored."""
    chunk = max(1, min(chunk, n_tiles))
    for name in ("scores", "max_scores"):
        root.create_array(name, shape=(n_tiles,), dtype="float32", chunks=(chunk,),
                          fill_value=float("nan"), overwrite=True)
    if keep_maps:
        root.create_array("maps", shape=(n_tiles, map_px, map_px), dtype="float16",
                          chunks=(min(chunk, 64), map_px, map_px), fill_value=float("nan"),
                          compressors=_compressor(), overwrite=True)


def write_score_arrays(root: zarr.Group, start: int, mean: np.ndarray, peak: np.ndarray,
                       maps: np.ndarray | None = None) -> None:
    stop = start + len(mean)
    root["scores"][start:stop] = np.asarray(mean, np.float32)
    root["max_scores"][start:stop] = np.asarray(peak, np.float32)
    if maps is not None and "maps" in root:
        root["maps"][start:stop] = np.asarray(maps, np.float16)


class TileStore:
    """A finished tile store opened for reading (tiles are read lazily, shard by shard)."""

    def __init__(self, path: str | Path, mode: str = "r"):
        self.path = Path(path)
        if not self.path.exists():
            if temporary_path(self.path).exists():
                raise InvalidInputError(
                    f"{self.path} was never completed (an interrupted run left "
                    f"{temporary_path(self.path).name}); run the tiler again")
            raise InputNotFoundError(f"tile store not found: {self.path}")
        try:
            self.root = zarr.open_group(str(self.path), mode=mode)
            self.attrs: dict[str, Any] = dict(self.root.attrs[ATTRS_KEY])
            self.tiles = self.root["tiles"]
        except Exception as exc:
            raise InvalidInputError(f"{self.path} is not a wsi-anomaly tile store ({exc})") from exc
        if not self.attrs.get("complete"):
            raise InvalidInputError(f"{self.path} is incomplete (interrupted run); tile it again")
        self.coords = np.asarray(self.root["coords"][:])
        self.grid_index = np.asarray(self.root["grid_index"][:])
        self.tissue_fraction = np.asarray(self.root["tissue_fraction"][:])

    def __len__(self) -> int:
        return int(self.tiles.shape[0])

    @property
    def tile_px(self) -> int:
        return int(self.tiles.shape[1])

    @property
    def mpp(self) -> float:
        """Actual µm per pixel of the tiles."""
        return float(self.attrs["actual_mpp"])

    @property
    def shard_tiles(self) -> int:
        return int(self.tiles.shards[0]) if self.tiles.shards else int(self.tiles.chunks[0])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tiles [start, stop) as (n, T, T, 3) uint8."""
        return np.asarray(self.tiles[start:stop])

    @property
    def scores(self) -> np.ndarray | None:
        """Per-tile mean anomaly scores (N,) when the store has been scored."""
        return np.asarray(self.root["scores"][:]) if "scores" in self.root else None

    @property
    def max_scores(self) -> np.ndarray | None:
        return np.asarray(self.root["max_scores"][:]) if "max_scores" in self.root else None

    @staticmethod
    def is_store(path: str | Path) -> bool:
        p = Path(path)
        return p.is_dir() and (p / "zarr.json").is_file()
