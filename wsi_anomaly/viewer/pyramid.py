"""Deep-zoom tiles of the original slide, and a bounded cache of encoded tiles.

The zoom grid is the one bokeh's tile renderer asks for: at zoom ``z`` the world is ``2**z ×
2**z`` tiles of ``TILE_PX`` pixels, with ``z = max_zoom`` at level-0 resolution, so a tile at
zoom ``z`` covers ``TILE_PX · 2**(max_zoom - z)`` level-0 pixels a side. Tiles are read with
:meth:`Slide.read_level` from the finest pyramid level that is not finer than needed (or from a
thumbnail kept in memory at low zoom, so a slide without a pyramid still opens quickly) and
encoded as JPEG.
"""

from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image

TILE_PX = 256
#: Longest side of the in-memory thumbnail that serves the coarse zoom levels.
THUMBNAIL_PX = 2048
JPEG_QUALITY = 80


class TileCache:
    """A thread-safe LRU of encoded tiles, bounded by the bytes it holds."""

    def __init__(self, max_bytes: int = 64 << 20):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: tuple, value: bytes) -> None:
        if len(value) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._items[key] = value
            self._bytes += len(value)
            while self._bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)


def max_zoom_for(width: int, height: int) -> int:
    """The zoom at which one tile pixel is one level-0 pixel and the world covers the slide."""
    return max(0, math.ceil(math.log2(max(width, height, 1) / TILE_PX)))


class SlidePyramid:
    """Tiles of one slide on the zoom grid. Opens the slide lazily; thread-safe."""

    def __init__(self, path: Path, mpp: float | None = None):
        self.path = Path(path)
        self._mpp = mpp
        self._slide = None
        self._thumb: np.ndarray | None = None
        self._thumb_ds = math.inf
        self._lock = threading.Lock()
        self._blank: bytes | None = None

    def _open(self):
        if self._slide is None:
            from ..slide import Slide

            self._slide = Slide(self.path, override_mpp=self._mpp, require_mpp=False)
        return self._slide

    @property
    def dimensions(self) -> tuple[int, int]:
        with self._lock:
            return self._open().dimensions

    @property
    def max_zoom(self) -> int:
        return max_zoom_for(*self.dimensions)

    def tile(self, z: int, x: int, y: int) -> bytes | None:
        """JPEG bytes of tile (z, x, y) (``y`` counted from the top); None when it is not on the
        grid. Tiles beyond the slide's edge are white."""
        with self._lock:
            slide = self._open()
            w0, h0 = slide.dimensions
            zmax = max_zoom_for(w0, h0)
            if not (0 <= z <= zmax and 0 <= x < 2**z and 0 <= y < 2**z):
                return None
            ds = 2 ** (zmax - z)  # level-0 px per tile px
            x0, y0, side = x * TILE_PX * ds, y * TILE_PX * ds, TILE_PX * ds
            if x0 >= w0 or y0 >= h0:
                return self._blank_tile()
            pixels = self._read(slide, x0, y0, side, ds)
        return _jpeg(pixels)

    def _read(self, slide, x0: int, y0: int, side: int, ds: int) -> np.ndarray:
        """(TILE_PX, TILE_PX, 3) uint8 of level-0 square [x0, x0+side)² at ``ds`` px per px."""
        if ds >= self._thumbnail(slide):
            return self._from_thumbnail(x0, y0, side)
        level = max(
            (lv for lv in slide.levels if lv.downsample <= ds * (1 + 1e-9)),
            key=lambda lv: lv.downsample,
        )
        lds = level.downsample
        lx, ly = math.floor(x0 / lds), math.floor(y0 / lds)
        n = max(1, round(side / lds))
        region = slide.read_level(level.index, lx, ly, n, n)
        if n == TILE_PX:
            return region
        image = Image.fromarray(region)
        factor = n / TILE_PX
        if factor == int(factor):
            return np.asarray(image.reduce(int(factor)))
        return np.asarray(image.resize((TILE_PX, TILE_PX), Image.Resampling.BOX))

    def _thumbnail(self, slide) -> float:
        """The downsample of the in-memory thumbnail, building it on first use."""
        if self._thumb is None:
            self._thumb, self._thumb_ds = slide.thumbnail(THUMBNAIL_PX)
        return self._thumb_ds

    def _from_thumbnail(self, x0: int, y0: int, side: int) -> np.ndarray:
        assert self._thumb is not None
        d = self._thumb_ds
        th, tw = self._thumb.shape[:2]
        box = (x0 / d, y0 / d, (x0 + side) / d, (y0 + side) / d)
        # Pad with white where the box reaches past the thumbnail (the slide's edge).
        pad_w = max(0, math.ceil(box[2]) - tw)
        pad_h = max(0, math.ceil(box[3]) - th)
        thumb = self._thumb
        if pad_w or pad_h:
            x_lo, y_lo = int(box[0]), int(box[1])
            crop = thumb[y_lo:, x_lo:]
            crop = np.pad(crop, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=255)
            box = (box[0] - x_lo, box[1] - y_lo, box[2] - x_lo, box[3] - y_lo)
            thumb = crop
        image = Image.fromarray(np.ascontiguousarray(thumb))
        return np.asarray(image.resize((TILE_PX, TILE_PX), Image.Resampling.BILINEAR, box=box))

    def _blank_tile(self) -> bytes:
        if self._blank is None:
            self._blank = _jpeg(np.full((TILE_PX, TILE_PX, 3), 255, np.uint8))
        return self._blank

    def close(self) -> None:
        with self._lock:
            if self._slide is not None:
                self._slide.close()
                self._slide = None


def _jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def png_bytes(rgba: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgba).save(buffer, format="PNG", optimize=False, compress_level=3)
    return buffer.getvalue()
