"""The per-slide tile store: one zarr v3 group (wsi.md §4).

Layout::

    tiles.zarr/
      tiles            uint8   (N, T, T, 3)  compressed, small inner chunks inside large shards
      coords           int64   (N, 2)        level-0 top-left (x, y)
      grid_index       int32   (N, 2)        (col, row) in the slide's tile grid
      tissue_fraction  float32 (N,)
      scores           float32 (N,)          written by the scorer: each tile's map mean
      max_scores       float32 (N,)          written by the scorer: each tile's map peak
      maps             float16 (N, m, m)     optional, written by the scorer (m: the model's map side)
      qc_values        float32 (N, K)        tissue QC measurements (attrs["qc"]["names"])
      qc_flags         uint16  (N,)          QC flag bits (bit k ⇔ attrs["qc"]["flags"][k])
      attrs["wsi_anomaly"] = provenance (slide, fingerprint, mpp and source, level, tile size,
                             stride, tissue settings, software version, complete = True);
                             once scored, the model's identity (``model``) and which of
                             the two scores is the tiles' score (``tile_score``: "mean" or
                             "max"; absent: "mean")

A store is written under a temporary name and renamed when complete, so an interrupted run
never leaves something that looks finished.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from .. import __version__
from ..errors import InputNotFoundError, InvalidInputError, OutputExistsError
from ..outputs import commit_dir, leftover_work, working_name

if TYPE_CHECKING:
    from ..slide.grid import TileGrid

log = logging.getLogger(__name__)

ATTRS_KEY = "wsi_anomaly"
STORE_FORMAT = 1
#: Tiles per inner chunk and per shard file: a 70k×70k slide (~30 000 tissue tiles at 0.25 mpp)
#: becomes ~120 shard files, and reading one tile decodes at most CHUNK_TILES tiles.
CHUNK_TILES = 16
SHARD_TILES = 256


def zarr_array(group: zarr.Group, name: str) -> zarr.Array:
    """The array ``name`` of ``group`` (a group member may also be a group)."""
    member = group[name]
    if not isinstance(member, zarr.Array):
        raise TypeError(f"{name!r} is a zarr group, not an array")
    return member


def _compressor() -> BloscCodec:
    # lz4 at a low level: RGB tissue compresses only modestly whatever the codec, and the tiler
    # must keep up with direct JPEG decoding (thousands of tiles/s), so speed wins over ratio.
    return BloscCodec(cname="lz4", clevel=1, shuffle="noshuffle")


def _create_tiles_array(
    root: zarr.Group, n_tiles: int, tile_px: int, chunk: int, shard: int
) -> zarr.Array:
    return root.create_array(
        "tiles",
        shape=(n_tiles, tile_px, tile_px, 3),
        dtype="uint8",
        chunks=(chunk, tile_px, tile_px, 3),
        shards=(shard, tile_px, tile_px, 3),
        compressors=_compressor(),
        dimension_names=("tile", "y", "x", "rgb"),
        # Tiles are never all-zero: skip zarr's per-chunk "is it empty?" comparison.
        config={"write_empty_chunks": True},
    )


class ShardEncoder:
    """Encodes whole shards of a ``tiles`` array byte for byte as zarr does, minus its copies.

    zarr's sharded write copies every inner chunk into a fresh array and then joins the
    compressed chunks into one more buffer; for 50 MB of tiles that costs as much CPU as the
    compression itself. A complete shard is simple to lay out (zarr v3 sharding, index at the
    end): the compressed inner chunks one after another, then per chunk (offset, length) as
    little-endian uint64, then the crc32c of that index. :func:`shard_encoder` checks once per
    process, on a small array, that this gives exactly zarr's bytes before it is used.
    """

    def __init__(self, chunk_tiles: int):
        import google_crc32c
        from numcodecs import Blosc

        codec = _compressor()
        shuffle = {
            "noshuffle": Blosc.NOSHUFFLE,
            "shuffle": Blosc.SHUFFLE,
            "bitshuffle": Blosc.BITSHUFFLE,
        }[codec.shuffle.value]
        self.blosc = Blosc(
            cname=codec.cname.value,
            clevel=codec.clevel,
            shuffle=shuffle,
            blocksize=codec.blocksize,
            typesize=1,
        )
        self.crc32c = google_crc32c.value
        self.chunk_tiles = chunk_tiles

    def encode(self, shard: np.ndarray) -> list[bytes]:
        """The shard's bytes as a list of parts, to be written one after another."""
        shard = np.ascontiguousarray(shard)
        n_chunks, rest = divmod(len(shard), self.chunk_tiles)
        if rest:
            raise ValueError("a shard must hold a whole number of chunks")
        parts: list[bytes] = []
        index = np.empty((n_chunks, 2), "<u8")
        offset = 0
        for k in range(n_chunks):
            part = self.blosc.encode(shard[k * self.chunk_tiles : (k + 1) * self.chunk_tiles])
            index[k] = (offset, len(part))
            offset += len(part)
            parts.append(part)
        index_bytes = index.tobytes()
        parts += [index_bytes, np.array([self.crc32c(index_bytes)], "<u4").tobytes()]
        return parts


@cache
def shard_encoder(chunk_tiles: int) -> ShardEncoder | None:
    """A :class:`ShardEncoder` when its bytes equal zarr's here (checked once), else None."""
    try:
        encoder = ShardEncoder(chunk_tiles)
        tile_px, shard = 8, 4 * chunk_tiles
        tiles = np.random.default_rng(0).integers(0, 256, (shard, tile_px, tile_px, 3), np.uint8)
        tiles[: shard // 2] //= 16  # some compressible, some not
        written: dict = {}
        root = zarr.open_group(zarr.storage.MemoryStore(written), mode="w", zarr_format=3)
        array = _create_tiles_array(root, shard, tile_px, chunk_tiles, shard)
        array[:] = tiles
        expected = written[f"tiles/{array.metadata.encode_chunk_key((0, 0, 0, 0))}"].to_bytes()
        if b"".join(encoder.encode(tiles)) == expected:
            return encoder
        log.debug("direct shard encoding differs from zarr's; zarr writes every shard")
    except Exception as exc:  # another zarr or numcodecs: zarr's own write path still works
        log.debug("direct shard encoding unavailable: %s", exc)
    return None


def temporary_path(final: Path) -> Path:
    """A new, unique working name for a store at ``final`` (no other run ever uses it)."""
    return working_name(final)


def is_tile_store(path: Path) -> bool:
    """True when ``path`` is a tile store this tool wrote (complete or not): its ``zarr.json``
    carries the store's provenance attributes."""
    meta = Path(path) / "zarr.json"
    if Path(path).is_symlink() or not meta.is_file():
        return False
    try:
        attrs = json.loads(meta.read_text(encoding="utf-8")).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return False
    return (
        isinstance(attrs, dict)
        and isinstance(attrs.get(ATTRS_KEY), dict)
        and attrs[ATTRS_KEY].get("format") == STORE_FORMAT
    )


def prepare_output(path: Path, overwrite: bool) -> Path:
    """Refuse an existing output unless ``overwrite`` *and* it is a tile store this tool wrote.
    Returns a new, unique working path to build the store in; nothing is created or removed
    here (what interrupted runs left is cleared by the holder of the output's lock)."""
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it")
        if not is_tile_store(path):
            raise OutputExistsError(
                f"{path} exists and is not a tile store written by "
                "wsi-anomaly; refusing to replace it (choose another --out)"
            )
    return temporary_path(path)


class TileStoreWriter:
    """Streams tiles into a new store; memory is bounded by one shard of tiles.

    Use as a context manager: on success the store is marked complete and renamed into place;
    on error the partial store is removed.
    """

    def __init__(
        self,
        path: str | Path,
        n_tiles: int,
        tile_px: int,
        coords: np.ndarray,
        grid_index: np.ndarray,
        tissue_fraction: np.ndarray,
        attrs: dict[str, Any],
        overwrite: bool = False,
        work: Path | None = None,
    ):
        self.path = Path(path)
        checked = prepare_output(self.path, overwrite)
        self.tmp = Path(work) if work is not None else checked
        self.n_tiles = n_tiles
        self.tile_px = tile_px
        self._aborted = False
        self._qc_pending = False
        try:
            self._create(n_tiles, tile_px, coords, grid_index, tissue_fraction, attrs)
        except BaseException:  # Ctrl-C included: nothing half-made stays behind
            self.abort()
            raise

    def _create(
        self,
        n_tiles: int,
        tile_px: int,
        coords: np.ndarray,
        grid_index: np.ndarray,
        tissue_fraction: np.ndarray,
        attrs: dict[str, Any],
    ) -> None:
        root = zarr.open_group(str(self.tmp), mode="w", zarr_format=3)
        shard = max(1, min(SHARD_TILES, n_tiles))
        chunk = min(CHUNK_TILES, shard)
        shard -= shard % chunk
        self.shard_tiles = shard
        self.tiles = _create_tiles_array(root, n_tiles, tile_px, chunk, shard)
        self._encoder = shard_encoder(chunk)
        root.create_array(
            "coords", data=np.asarray(coords, np.int64).reshape(-1, 2), chunks=(max(1, n_tiles), 2)
        )
        root.create_array(
            "grid_index",
            data=np.asarray(grid_index, np.int32).reshape(-1, 2),
            chunks=(max(1, n_tiles), 2),
        )
        root.create_array(
            "tissue_fraction",
            data=np.asarray(tissue_fraction, np.float32),
            chunks=(max(1, n_tiles),),
        )
        self.attrs = {
            "format": STORE_FORMAT,
            "software_version": __version__,
            "complete": False,
            **attrs,
        }
        root.attrs[ATTRS_KEY] = self.attrs
        self.root = root

    @classmethod
    def for_tiles(
        cls,
        path: str | Path,
        kept: TileGrid,
        attrs: dict[str, Any],
        overwrite: bool = False,
        work: Path | None = None,
    ) -> TileStoreWriter:
        """A writer for the tiles ``kept`` of a slide's grid (their level-0 coordinates, grid
        positions and tissue fractions), at the grid's tile size."""
        return cls(
            path,
            len(kept),
            kept.plan.tile_px,
            kept.coords,
            kept.grid_index,
            kept.tissue_fraction,
            attrs,
            overwrite=overwrite,
            work=work,
        )

    def create_scores(self, keep_maps: bool = False, map_px: int = 64) -> None:
        """Add the arrays the scorer fills: ``scores``/``max_scores`` (N,), ``maps`` (N, m, m)
        with ``m = map_px``, the side of the model's maps."""
        create_score_arrays(self.root, self.n_tiles, self.shard_tiles, keep_maps, map_px)

    def write_scores(
        self, start: int, mean: np.ndarray, peak: np.ndarray, maps: np.ndarray | None = None
    ) -> None:
        write_score_arrays(self.root, start, mean, peak, maps)

    def create_qc(self, qc: dict[str, Any]) -> None:
        """Give the store QC arrays (see :func:`create_qc_arrays`); ``qc`` is recorded in the
        attrs. The arrays are made by the first :meth:`write_qc` — all rows in one call, as
        the tiler writes them, cost one write per array — or NaN-filled by :meth:`close`."""
        self.attrs["qc"] = qc
        self._qc_pending = True

    def write_qc(self, start: int, values: np.ndarray, flags: np.ndarray) -> None:
        if self._qc_pending:
            self._qc_pending = False
            if start == 0 and len(flags) == self.n_tiles:
                create_qc_arrays(self.root, self.n_tiles, self.attrs["qc"], values, flags)
                return
            create_qc_arrays(self.root, self.n_tiles, self.attrs["qc"])
        write_qc_arrays(self.root, start, values, flags)

    def write(self, start: int, tiles: np.ndarray) -> None:
        """Write tiles [start, start + len(tiles)); callers pass whole shards for speed.

        A whole shard is encoded here and written as one file (under a temporary name, then
        renamed, as zarr does); anything else goes through zarr.
        """
        if self._aborted:
            raise RuntimeError(f"{self.path}: the store was abandoned")
        shard = self.shard_tiles
        if (
            self._encoder is None
            or start % shard
            or len(tiles) != shard
            or tiles.shape[1:] != self.tiles.shape[1:]
        ):
            self.tiles[start : start + len(tiles)] = tiles
            return
        key = self.tiles.metadata.encode_chunk_key((start // shard, 0, 0, 0))
        path = self.tmp / "tiles" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
        try:
            with open(part, "wb", buffering=0) as fh:
                for data in self._encoder.encode(tiles):
                    view = memoryview(data)
                    while view:
                        view = view[fh.write(view) :]
            os.replace(part, path)
        except BaseException:
            part.unlink(missing_ok=True)
            raise

    def close(self, extra_attrs: dict[str, Any] | None = None) -> None:
        if self._qc_pending:  # QC asked for, no row written: the arrays, NaN
            self._qc_pending = False
            create_qc_arrays(self.root, self.n_tiles, self.attrs["qc"])
        attrs = {**self.attrs, **(extra_attrs or {}), "complete": True}
        self.root.attrs[ATTRS_KEY] = attrs
        commit_dir(self.tmp, self.path)

    def abort(self) -> None:
        """Remove the unfinished store. Writes still in flight on other threads (the run was
        interrupted while waiting for them) are refused from now on; one that was already
        under way may recreate a folder, so removal is retried until the folder stays gone."""
        self._aborted = True
        deadline = time.monotonic() + 10.0
        while True:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if not self.tmp.exists() or time.monotonic() > deadline:
                return
            time.sleep(0.05)

    def __enter__(self) -> TileStoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def create_score_arrays(
    root: zarr.Group, n_tiles: int, chunk: int, keep_maps: bool, map_px: int = 64
) -> None:
    """(Re)create the score arrays of a store, filled with NaN until scored."""
    chunk = max(1, min(chunk, n_tiles))
    for name in ("scores", "max_scores"):
        root.create_array(
            name,
            shape=(n_tiles,),
            dtype="float32",
            chunks=(chunk,),
            fill_value=float("nan"),
            overwrite=True,
        )
    if keep_maps:
        root.create_array(
            "maps",
            shape=(n_tiles, map_px, map_px),
            dtype="float16",
            chunks=(min(chunk, 64), map_px, map_px),
            fill_value=float("nan"),
            compressors=_compressor(),
            overwrite=True,
        )


def write_score_arrays(
    root: zarr.Group, start: int, mean: np.ndarray, peak: np.ndarray, maps: np.ndarray | None = None
) -> None:
    stop = start + len(mean)
    zarr_array(root, "scores")[start:stop] = np.asarray(mean, np.float32)
    zarr_array(root, "max_scores")[start:stop] = np.asarray(peak, np.float32)
    if maps is not None and "maps" in root:
        zarr_array(root, "maps")[start:stop] = np.asarray(maps, np.float16)


def create_qc_arrays(
    root: zarr.Group,
    n_tiles: int,
    qc: dict[str, Any],
    values: np.ndarray | None = None,
    flags: np.ndarray | None = None,
) -> None:
    """(Re)create ``qc_values`` (N, K) float32 and ``qc_flags`` (N,) uint16 — holding
    ``values`` and ``flags`` when given, else NaN and 0 until measured; ``qc["names"]`` names
    the K columns. One chunk each (N × K floats are small): they are written once for the
    whole slide and read whole."""
    chunk, k = max(1, n_tiles), len(qc["names"])
    if values is None or flags is None:
        values = np.full((n_tiles, k), np.nan, np.float32)
        flags = np.zeros(n_tiles, np.uint16)
    values = np.asarray(values, np.float32).reshape(n_tiles, k)
    flags = np.asarray(flags, np.uint16).reshape(n_tiles)
    for name, data in (("qc_values", values), ("qc_flags", flags)):
        fill = float("nan") if name == "qc_values" else 0
        root.create_array(
            name, data=data, chunks=(chunk, *data.shape[1:]), fill_value=fill, overwrite=True
        )


def write_qc_arrays(root: zarr.Group, start: int, values: np.ndarray, flags: np.ndarray) -> None:
    stop = start + len(flags)
    zarr_array(root, "qc_values")[start:stop] = np.asarray(values, np.float32)
    zarr_array(root, "qc_flags")[start:stop] = np.asarray(flags, np.uint16)


class TileStore:
    """A finished tile store opened for reading (tiles are read lazily, shard by shard)."""

    def __init__(self, path: str | Path, mode: Literal["r", "r+"] = "r"):
        self.path = Path(path)
        if not self.path.exists():
            left = leftover_work(self.path)
            if left:
                raise InvalidInputError(
                    f"{self.path} was never completed (an interrupted run left "
                    f"{left[0].name}); run the tiler again"
                )
            raise InputNotFoundError(f"tile store not found: {self.path}")
        try:
            self.root = zarr.open_group(str(self.path), mode=mode)
            self.attrs: dict[str, Any] = dict(cast(dict[str, Any], self.root.attrs[ATTRS_KEY]))
            self.tiles = zarr_array(self.root, "tiles")
        except Exception as exc:
            raise InvalidInputError(f"{self.path} is not a wsi-anomaly tile store ({exc})") from exc
        if not self.attrs.get("complete"):
            raise InvalidInputError(f"{self.path} is incomplete (interrupted run); tile it again")
        self.coords = np.asarray(zarr_array(self.root, "coords")[:])
        self.grid_index = np.asarray(zarr_array(self.root, "grid_index")[:])
        self.tissue_fraction = np.asarray(zarr_array(self.root, "tissue_fraction")[:])

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

    def reset_scores(self, keep_maps: bool = False, map_px: int = 64) -> None:
        """(Re)create empty score arrays to score this store again (opened with ``mode="r+"``);
        ``map_px``: the side of the model's maps."""
        create_score_arrays(self.root, len(self), self.shard_tiles, keep_maps, map_px)

    def write_scores(
        self, start: int, mean: np.ndarray, peak: np.ndarray, maps: np.ndarray | None = None
    ) -> None:
        write_score_arrays(self.root, start, mean, peak, maps)

    def set_model(self, identity: dict[str, Any], tile_score: str = "mean") -> None:
        """Record which model wrote the scores (its path, sha256, backbone) and which of them
        is the tiles' score (its family's ``tile_score``)."""
        self.attrs = {**self.attrs, "model": identity, "tile_score": tile_score}
        self.root.attrs[ATTRS_KEY] = self.attrs

    @property
    def model(self) -> dict[str, Any] | None:
        """Identity of the model whose scores the store holds, if scored."""
        return self.attrs.get("model")

    @property
    def qc(self) -> dict[str, Any] | None:
        """The QC record (``names``, ``flags``, ``settings``) when the store has QC arrays
        (stores written before QC existed have none)."""
        qc = self.attrs.get("qc")
        return qc if isinstance(qc, dict) and "qc_values" in self.root else None

    @property
    def qc_values(self) -> np.ndarray | None:
        """(N, K) float32 QC measurements, columns ``qc["names"]``; None without QC."""
        return np.asarray(zarr_array(self.root, "qc_values")[:]) if self.qc else None

    @property
    def qc_flags(self) -> np.ndarray | None:
        """(N,) uint16 QC flag bits, bit k ⇔ ``qc["flags"][k]``; None without QC."""
        return np.asarray(zarr_array(self.root, "qc_flags")[:]) if self.qc else None

    def reset_qc(self, qc: dict[str, Any]) -> None:
        """(Re)create the QC arrays to measure this store again (opened with ``mode="r+"``)."""
        create_qc_arrays(self.root, len(self), qc)
        self.attrs = {**self.attrs, "qc": qc}
        self.root.attrs[ATTRS_KEY] = self.attrs

    def write_qc(self, start: int, values: np.ndarray, flags: np.ndarray) -> None:
        write_qc_arrays(self.root, start, values, flags)

    @property
    def maps(self) -> np.ndarray | None:
        """Per-tile anomaly maps (N, m, m) when kept (m: the model's map side)."""
        return np.asarray(zarr_array(self.root, "maps")[:]) if "maps" in self.root else None

    @property
    def scores(self) -> np.ndarray | None:
        """Per-tile mean anomaly scores (N,) when the store has been scored."""
        return np.asarray(zarr_array(self.root, "scores")[:]) if "scores" in self.root else None

    @property
    def max_scores(self) -> np.ndarray | None:
        return (
            np.asarray(zarr_array(self.root, "max_scores")[:])
            if "max_scores" in self.root
            else None
        )

    @staticmethod
    def is_store(path: str | Path) -> bool:
        p = Path(path)
        return p.is_dir() and (p / "zarr.json").is_file()
