"""Open a whole-slide image and read pixels from it by level-0 coordinates.

A :class:`Slide` is a small object with explicit properties (levels, dimensions, mpp) and typed
errors. OpenSlide is the primary reader; tifffile covers what OpenSlide refuses (OME-TIFF, flat or
strip TIFF). When a level is a tiled TIFF page, tiles are decoded straight from the file (one
``pread`` + libjpeg-turbo through imagecodecs), which is several times faster than OpenSlide's
``read_region`` and pixel-identical to it — that identity is checked on one tile when the slide is
opened, and the fast path is used only when it holds.

Readers are opened inside the process that uses them: pass paths between workers, never slides.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ..errors import CorruptSlideError, InputNotFoundError, ResolutionError, UnsupportedSlideError
from ..outputs import os_errors_as_user_errors
from .resolution import Resolution, resolve_resolution

if TYPE_CHECKING:
    import openslide

log = logging.getLogger(__name__)

#: Background colour used outside the image and where a slide has transparent pixels.
BACKGROUND_RGB = 255


@dataclass(frozen=True)
class LevelInfo:
    """One pyramid level. ``downsample`` is relative to level 0; ``mpp`` in µm per pixel."""

    index: int
    width: int
    height: int
    downsample: float
    mpp: float | None  # None when the slide's resolution is unknown (``require_mpp=False``)


class _TiledPage:
    """Decode the tiles of one tiled TIFF page directly, with a small LRU cache.

    RGB JPEG tiles are decoded by libjpeg-turbo through imagecodecs with the arguments tifffile
    would use (``_direct_jpeg_args``); other compressions go through tifffile. A request for
    exactly one whole RGB JPEG tile with an output array given (the tiler at a level's native
    resolution when its grid falls on the TIFF tiles) is decoded straight into that array: no
    cache, no copy.

    Thread-safe: file reads use ``os.pread`` on a shared descriptor; imagecodecs releases the GIL.
    """

    def __init__(self, page: Any, fd: int, file_size: int, cache_tiles: int = 64):
        self.page = page
        self.fd = fd
        self.width = int(page.imagewidth)
        self.height = int(page.imagelength)
        self.tile_w = int(page.tilewidth)
        self.tile_h = int(page.tilelength)
        self.tiles_across = math.ceil(self.width / self.tile_w)
        self.offsets = page.dataoffsets
        self.counts = page.databytecounts
        self.jpegtables = page.jpegtables
        self._decode = page.decode
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_tiles = cache_tiles
        self._lock = threading.Lock()
        self._jpeg_args = _direct_jpeg_args(page)
        ends = [o + c for o, c in zip(self.offsets, self.counts) if c]
        if ends and max(ends) > file_size:
            raise CorruptSlideError("tile data runs past the end of the file (truncated slide?)")

    @staticmethod
    def usable(page: Any) -> bool:
        return (
            page.is_tiled
            and page.bitspersample == 8
            and page.samplesperpixel in (1, 3, 4)
            and int(page.planarconfig) == 1  # contiguous samples
            and page.imagedepth == 1
        )

    def _tile(self, index: int) -> np.ndarray:
        with self._lock:
            cached = self._cache.get(index)
            if cached is not None:
                self._cache.move_to_end(index)
                return cached
        count = int(self.counts[index])
        if self._jpeg_args is not None:  # RGB JPEG: libjpeg-turbo directly, as in _decode_into
            tile = self._decode_into(index, np.empty((self.tile_h, self.tile_w, 3), np.uint8))
        elif count == 0:  # sparse TIFF: a tile that was never written is background
            tile = np.full((self.tile_h, self.tile_w, 3), BACKGROUND_RGB, np.uint8)
        else:
            data = os.pread(self.fd, count, int(self.offsets[index]))
            if len(data) != count:
                raise CorruptSlideError(f"tile {index} is cut short (truncated slide?)")
            try:
                segment, _, _ = self._decode(data, index, jpegtables=self.jpegtables)
            except Exception as exc:  # imagecodecs raises its own error types per codec
                raise CorruptSlideError(f"tile {index} cannot be decoded: {exc}") from exc
            if segment is None:
                raise CorruptSlideError(f"tile {index} cannot be decoded")
            tile = _to_rgb(np.asarray(segment).reshape(self.tile_h, self.tile_w, -1))
        with self._lock:
            self._cache[index] = tile
            if len(self._cache) > self._cache_tiles:
                self._cache.popitem(last=False)
        return tile

    def _decode_into(self, index: int, out: np.ndarray) -> np.ndarray:
        count = int(self.counts[index])
        if count == 0:
            out[...] = BACKGROUND_RGB
            return out
        data = os.pread(self.fd, count, int(self.offsets[index]))
        if len(data) != count:
            raise CorruptSlideError(f"tile {index} is cut short (truncated slide?)")
        assert self._jpeg_args is not None  # only RGB JPEG tiles are decoded into an array
        import imagecodecs

        try:
            imagecodecs.jpeg_decode(data, out=out, **self._jpeg_args)
        except Exception as exc:  # imagecodecs raises its own error types
            raise CorruptSlideError(f"tile {index} cannot be decoded: {exc}") from exc
        return out

    def read(self, x: int, y: int, w: int, h: int, out: np.ndarray | None = None) -> np.ndarray:
        """Pixels [y, y+h) × [x, x+w) of this page as (h, w, 3) uint8; outside is background.

        ``out``, if given, is filled in place and returned.
        """
        if (
            out is not None
            and self._jpeg_args is not None
            and w == self.tile_w
            and h == self.tile_h
            and x % w == 0
            and y % h == 0
            and x >= 0
            and y >= 0
            and x + w <= self.width
            and y + h <= self.height
            and out.shape == (h, w, 3)
            and out.dtype == np.uint8
            and out.flags.c_contiguous
        ):
            return self._decode_into((y // h) * self.tiles_across + x // w, out)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, self.width), min(y + h, self.height)
        if out is None:
            out = np.empty((h, w, 3), np.uint8)
        if not (x0 == x and y0 == y and x1 == x + w and y1 == y + h):
            out[...] = BACKGROUND_RGB  # only regions reaching outside the image need a fill
        if x0 >= x1 or y0 >= y1:
            return out
        for ty in range(y0 // self.tile_h, (y1 - 1) // self.tile_h + 1):
            for tx in range(x0 // self.tile_w, (x1 - 1) // self.tile_w + 1):
                tile = self._tile(ty * self.tiles_across + tx)
                ox, oy = tx * self.tile_w, ty * self.tile_h
                sx0, sy0 = max(x0, ox), max(y0, oy)
                sx1, sy1 = min(x1, ox + self.tile_w), min(y1, oy + self.tile_h)
                out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = tile[
                    sy0 - oy : sy1 - oy, sx0 - ox : sx1 - ox
                ]
        return out


def _direct_jpeg_args(page: Any) -> dict | None:
    """``imagecodecs.jpeg_decode`` arguments that decode one tile of ``page`` exactly as tifffile
    does, or None when the page is not 8-bit 3-sample JPEG (then tiles go through tifffile)."""
    try:
        from tifffile.tifffile import jpeg_decode_colorspace

        if (
            int(page.compression) != 7
            or page.samplesperpixel != 3
            or page.extrasamples
            or int(page.planarconfig) != 1
            or page.bitspersample != 8
        ):
            return None
        colorspace, outcolorspace = jpeg_decode_colorspace(
            int(page.photometric), int(page.planarconfig), page.extrasamples, page.is_jfif
        )
    except Exception:  # an older or newer tifffile without this helper: use its decode
        return None
    return {
        "tables": page.jpegtables,
        "colorspace": colorspace,
        "outcolorspace": outcolorspace,
        "shape": (int(page.tilelength), int(page.tilewidth)),
    }


def _into(out: np.ndarray | None, pixels: np.ndarray) -> np.ndarray:
    if out is None:
        return pixels
    out[...] = pixels
    return out


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    """(H, W, C) uint8 with C in 1/3/4 → (H, W, 3); alpha is composited onto white."""
    if arr.ndim == 2:
        arr = arr[..., None]
    c = arr.shape[-1]
    if c == 3:
        return np.ascontiguousarray(arr)
    if c == 1:
        return np.repeat(arr, 3, axis=-1)
    if c == 4:
        rgb = arr[..., :3].astype(np.float32)
        alpha = arr[..., 3:4].astype(np.float32) / 255.0
        return (rgb * alpha + BACKGROUND_RGB * (1.0 - alpha) + 0.5).astype(np.uint8)
    raise UnsupportedSlideError(f"{c}-channel images are not brightfield RGB slides")


class Slide:
    """A whole-slide image opened for reading.

    Args:
        path: the slide file (for MRXS, the ``.mrxs`` index file).
        override_mpp: the user's level-0 µm/px; wins over the metadata.
        require_mpp: when False, a slide without resolution metadata still opens (to describe
            it): ``resolution`` is None, level ``mpp`` values are None and :attr:`mpp` raises.

    Raises:
        InputNotFoundError, UnsupportedSlideError, CorruptSlideError, ResolutionError.
    """

    def __init__(
        self, path: str | Path, override_mpp: float | None = None, require_mpp: bool = True
    ):
        self.path = Path(path)
        self.name = self.path.name
        if not self.path.exists():
            if self.path.is_symlink():
                raise InputNotFoundError(
                    f"{self.path} is a symbolic link that leads nowhere (broken, or a loop)"
                )
            raise InputNotFoundError(f"slide not found: {self.path}")
        if self.path.is_dir():
            raise UnsupportedSlideError(f"{self.path} is a folder, not a slide file")
        self._osr: openslide.OpenSlide | None = None
        self._tiff: Any = None  # tifffile.TiffFile; its pages are used as duck-typed objects
        self._fd: int | None = None
        self._pages: dict[int, _TiledPage] = {}
        self._zarr_levels: dict[int, Any] = {}
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        self.resolution: Resolution | None = None
        self._resolution_error: ResolutionError | None = None
        try:
            self.resolution = resolve_resolution(self.properties, self.name, override_mpp)
        except ResolutionError as exc:
            if require_mpp or override_mpp is not None:
                self.close()
                raise
            self._resolution_error = exc
        base_mpp = self.resolution.mpp if self.resolution is not None else None
        self.levels = tuple(
            LevelInfo(i, w, h, ds, None if base_mpp is None else base_mpp * ds)
            for i, ((w, h), ds) in enumerate(zip(self._dims, self._downsamples))
        )

    # -- opening -----------------------------------------------------------------------------
    def _open(self) -> None:
        import openslide

        file_size = self.path.stat().st_size
        if file_size == 0:
            raise UnsupportedSlideError(f"{self.path} is empty, not a slide")
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError:
            self._osr = None
        except openslide.OpenSlideError as exc:
            if _is_dicom(self.path):
                raise UnsupportedSlideError(
                    f"{self.path}: a DICOM file OpenSlide cannot read as a whole-slide image "
                    f"({exc}); OpenSlide reads VL Whole Slide Microscopy Image series stored "
                    "uncompressed, as JPEG or as JPEG 2000 (RGB), every file of the series in one "
                    "folder — convert other encodings, or export a pyramidal TIFF"
                ) from exc
            raise CorruptSlideError(
                f"{self.path}: OpenSlide cannot read it ({exc}); the file is damaged or truncated"
            ) from exc
        if self._osr is not None:
            self.backend = "openslide"
            self.format = self._osr.properties.get("openslide.vendor", "unknown")
            self.properties = dict(self._osr.properties)
            self._dims = [(int(w), int(h)) for w, h in self._osr.level_dimensions]
            self._downsamples = [float(d) for d in self._osr.level_downsamples]
            self.associated_images = tuple(sorted(self._osr.associated_images.keys()))
            self._attach_tiff_fast_path(file_size)
        else:
            self._open_tifffile(file_size)

    def _attach_tiff_fast_path(self, file_size: int) -> None:
        """Map OpenSlide levels to tiled TIFF pages for direct decoding, when the format allows."""
        if self.format not in ("aperio", "generic-tiff"):
            return
        import tifffile

        try:
            self._tiff = tifffile.TiffFile(str(self.path))
            self._fd = os.open(self.path, os.O_RDONLY)
            candidates = [p for p in self._tiff.pages if _TiledPage.usable(p)]
            for level, (w, h) in enumerate(self._dims):
                match = [p for p in candidates if (p.imagewidth, p.imagelength) == (w, h)]
                if len(match) == 1:
                    self._pages[level] = _TiledPage(match[0], self._fd, file_size)
        except CorruptSlideError as exc:
            raise CorruptSlideError(f"{self.path}: {exc}") from exc
        except Exception as exc:  # the fast path is an optimisation; OpenSlide still works
            log.debug("direct TIFF decoding unavailable for %s: %s", self.path, exc)
            self._pages.clear()
            return
        # Use the fast path only where it reproduces OpenSlide's pixels exactly.
        assert self._osr is not None  # called once OpenSlide has opened the slide
        for level, page in list(self._pages.items()):
            # A tile from the middle of the level: more likely tissue than a corner.
            x = (page.width // 2 // page.tile_w) * page.tile_w
            y = (page.height // 2 // page.tile_h) * page.tile_h
            w, h = min(page.tile_w, page.width - x), min(page.tile_h, page.height - y)
            ds = self._downsamples[level]
            try:
                ref = _to_rgb(
                    np.asarray(self._osr.read_region((int(x * ds), int(y * ds)), level, (w, h)))
                )
                ours = page.read(x, y, w, h)
                # The same tile through the decode-into-the-caller's-array path.
                direct = page.read(x, y, w, h, np.empty((h, w, 3), np.uint8))
            except Exception as exc:
                raise CorruptSlideError(
                    f"{self.path}: pixel data cannot be decoded ({exc})"
                ) from exc
            if ds != round(ds) or not np.array_equal(ref, ours) or not np.array_equal(ref, direct):
                log.debug(
                    "level %d of %s: direct decode differs from OpenSlide; not used",
                    level,
                    self.path,
                )
                del self._pages[level]

    def _open_tifffile(self, file_size: int) -> None:
        import tifffile

        try:
            # tifffile logs its own complaints about broken files; the error below says it all.
            logging.getLogger("tifffile").setLevel(logging.CRITICAL)
            self._tiff = tifffile.TiffFile(str(self.path))
            series = self._tiff.series[0]
        except Exception as exc:
            with self.path.open("rb") as fh:
                magic = fh.read(4)
            if magic in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
                raise CorruptSlideError(
                    f"{self.path} is a TIFF-based file that cannot be read ({exc}); it is "
                    "damaged or truncated — copy it again from the source"
                ) from exc
            if _is_dicom(self.path):
                raise UnsupportedSlideError(
                    f"{self.path}: a DICOM file, but not a whole-slide image OpenSlide can read "
                    "(it reads tiled VL Whole Slide Microscopy Image series; a single DICOM "
                    "image of another kind is not a slide)"
                ) from exc
            raise UnsupportedSlideError(
                f"{self.path} is not a slide OpenSlide or tifffile can read "
                f"(supported: SVS, NDPI, MRXS, SCN, VMS, BIF, DICOM, tiled/flat/OME TIFF)"
            ) from exc
        levels = list(series.levels)
        base = levels[0]
        axes = base.axes.replace("S", "C")
        if not (axes.startswith("YX") and axes in ("YX", "YXC")) or base.dtype != np.uint8:
            raise UnsupportedSlideError(
                f"{self.path}: a {base.dtype} image with axes {base.axes} is not an 8-bit RGB "
                "brightfield slide"
            )
        self.backend = "tifffile"
        self.format = "ome-tiff" if self._tiff.is_ome else "tiff"
        self._fd = os.open(self.path, os.O_RDONLY)
        self._dims = [(int(lv.shape[1]), int(lv.shape[0])) for lv in levels]
        self._downsamples = [self._dims[0][0] / w for (w, _) in self._dims]
        self.associated_images = tuple(
            f"series{i}" for i in range(1, len(self._tiff.series)) if self._tiff.series[i].ndim >= 2
        )
        page0 = base.keyframe
        self.properties = _tiff_properties(page0)
        # A truncated file is damaged, whatever else it lacks (its metadata may look fine, or
        # lack the resolution): check the directory chain and every level's data lie inside
        # the file first.
        if _ifd_chain_broken(self.path, file_size):
            raise CorruptSlideError(
                f"{self.path}: its TIFF directories point past the end of the file; it is "
                "truncated or damaged — copy it again from the source"
            )
        for lv in levels:
            for page in lv.pages:
                ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts) if c]
                if ends and max(ends) > file_size:
                    raise CorruptSlideError(
                        f"{self.path}: image data runs past the end of the file; it is "
                        "truncated — copy it again from the source"
                    )
        for i, lv in enumerate(levels):
            page = lv.keyframe
            if len(lv.pages) == 1 and _TiledPage.usable(page):
                try:
                    self._pages[i] = _TiledPage(page, self._fd, file_size)
                except CorruptSlideError as exc:
                    raise CorruptSlideError(f"{self.path}: {exc}") from exc
            else:
                import zarr

                self._zarr_levels[i] = zarr.open(lv.aszarr(), mode="r")
        try:  # a truncated strip/flat TIFF fails here rather than half-way through tiling
            self.read_level(len(levels) - 1, 0, 0, 1, 1)
        except CorruptSlideError:
            raise
        except Exception as exc:
            raise CorruptSlideError(f"{self.path}: pixel data cannot be decoded ({exc})") from exc

    # -- properties --------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in pixels."""
        return self._dims[0]

    @property
    def mpp(self) -> float:
        """Level-0 µm per pixel (raises :class:`ResolutionError` when unknown)."""
        return self.known_resolution().mpp

    def known_resolution(self) -> Resolution:
        """The slide's resolution (raises :class:`ResolutionError` when unknown)."""
        if self.resolution is None:
            assert self._resolution_error is not None
            raise self._resolution_error
        return self.resolution

    @property
    def objective_power(self) -> float | None:
        value = self.properties.get("openslide.objective-power")
        try:
            return float(value) if value is not None else None
        except ValueError:
            return None

    @property
    def fast_levels(self) -> tuple[int, ...]:
        """Levels read by direct tile decoding."""
        return tuple(sorted(self._pages))

    def fingerprint(self) -> str:
        """The slide file's content fingerprint (:func:`slide_fingerprint`)."""
        return slide_fingerprint(self.path)

    # -- pixels ------------------------------------------------------------------------------
    def read_level(
        self, level: int, x: int, y: int, w: int, h: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Pixels of ``level`` at *level* coordinates [y, y+h) × [x, x+w): (h, w, 3) uint8 RGB.

        ``out``, an (h, w, 3) uint8 array, receives the pixels when given (saves a copy).
        """
        try:
            if level in self._pages:
                return self._pages[level].read(x, y, w, h, out)
            if level in self._zarr_levels:
                arr = self._zarr_levels[level]
                region = np.full((h, w, 3), BACKGROUND_RGB, np.uint8)
                lw, lh = self._dims[level]
                x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
                if x0 < x1 and y0 < y1:
                    region[y0 - y : y1 - y, x0 - x : x1 - x] = _to_rgb(
                        np.asarray(arr[y0:y1, x0:x1])
                    )
                return _into(out, region)
            ds = self._downsamples[level]
            assert self._osr is not None  # levels not read from the TIFF are OpenSlide's
            image = self._osr.read_region((int(round(x * ds)), int(round(y * ds))), level, (w, h))
            return _into(out, _to_rgb(np.asarray(image)))
        except CorruptSlideError as exc:
            raise CorruptSlideError(f"{self.path}: level {level} at ({x}, {y}): {exc}") from exc
        except Exception as exc:
            import openslide

            if isinstance(exc, (openslide.OpenSlideError, OSError, ValueError, RuntimeError)):
                raise CorruptSlideError(
                    f"{self.path}: cannot read level {level} at ({x}, {y}): {exc} "
                    "(damaged or truncated slide?)"
                ) from exc
            raise

    def read_region(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray:
        """Like OpenSlide's ``read_region``: level-0 origin, size in ``level`` pixels; RGB out."""
        ds = self._downsamples[level]
        return self.read_level(level, int(math.floor(x0 / ds)), int(math.floor(y0 / ds)), w, h)

    def thumbnail(
        self, max_px: int = 2048, mpp: float | None = None, block_px: int = 4096
    ) -> tuple[np.ndarray, float]:
        """A thumbnail whose longer side is at most ``max_px``, streamed block by block.

        With ``mpp`` (µm per thumbnail pixel), the thumbnail is no finer than that either.

        Returns ``(image, downsample)``: thumbnail pixel (i, j) covers level-0 pixels
        [j·d, (j+1)·d) × [i·d, (i+1)·d) with ``d = downsample`` (box average of those pixels).
        Memory is bounded by one block of ``block_px``² pixels, whatever the slide size.
        """
        # Coarsest level that is still at least as detailed as the thumbnail.
        w0, h0 = self.dimensions
        min_downsample = max(max(w0, h0) / max_px, (mpp / self.mpp) if mpp else 1.0)
        level = 0
        for lv in self.levels:
            if lv.downsample <= min_downsample and lv.downsample == round(lv.downsample):
                level = lv.index
        lw, lh = self._dims[level]
        factor = max(1, math.ceil(min_downsample / self._downsamples[level] - 1e-6))
        step = max(factor, (block_px // factor) * factor)
        tw, th = math.ceil(lw / factor), math.ceil(lh / factor)
        thumb = np.empty((th, tw, 3), np.uint8)
        for y in range(0, lh, step):
            for x in range(0, lw, step):
                bw, bh = min(step, lw - x), min(step, lh - y)
                block = self.read_level(level, x, y, bw, bh)
                small = np.asarray(Image.fromarray(block).reduce(factor)) if factor > 1 else block
                thumb[
                    y // factor : y // factor + small.shape[0],
                    x // factor : x // factor + small.shape[1],
                ] = small
        return thumb, factor * self._downsamples[level]

    def associated_image(self, name: str) -> np.ndarray:
        """An associated image (label, macro, thumbnail…) as RGB."""
        if self._osr is not None:
            return _to_rgb(np.asarray(self._osr.associated_images[name]))
        index = int(name.removeprefix("series"))
        return _to_rgb(np.asarray(self._tiff.series[index].asarray()))

    # -- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        if self._osr is not None:
            self._osr.close()
            self._osr = None
        if self._tiff is not None:
            self._tiff.close()
            self._tiff = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        mpp = f"{self.resolution.mpp:.3f} mpp" if self.resolution is not None else "mpp unknown"
        return f"Slide({self.name!r}, {w}×{h}, {len(self.levels)} levels, {mpp})"


def _tiff_properties(page: Any) -> dict[str, str]:
    """OpenSlide-style ``tiff.*`` properties from a tifffile page, for the mpp chain."""
    props: dict[str, str] = {}
    tags = page.tags
    unit = tags.get("ResolutionUnit")
    if unit is not None:
        props["tiff.ResolutionUnit"] = {1: "none", 2: "inch", 3: "centimeter"}.get(
            int(unit.value), "none"
        )
    for name in ("XResolution", "YResolution"):
        tag = tags.get(name)
        if tag is not None:
            num, den = tag.value
            if den:
                props[f"tiff.{name}"] = str(num / den)
    desc = tags.get("ImageDescription")
    if desc is not None:
        props["tiff.ImageDescription"] = str(desc.value)[:2000]
        if "<OME" in str(desc.value):
            mpp = _ome_mpp(str(desc.value))
            if mpp is not None:
                props["openslide.mpp-x"], props["openslide.mpp-y"] = str(mpp[0]), str(mpp[1])
    return props


def _ome_mpp(xml: str) -> tuple[float, float] | None:
    """PhysicalSizeX/Y of the first OME image, converted to µm."""
    import re

    scale = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4}
    out = []
    for axis in ("X", "Y"):
        m = re.search(rf'PhysicalSize{axis}="([0-9.eE+-]+)"', xml)
        if not m:
            return None
        u = re.search(rf'PhysicalSize{axis}Unit="([^"]+)"', xml)
        out.append(float(m.group(1)) * scale.get(u.group(1) if u else "µm", 1.0))
    return out[0], out[1]


def _ifd_chain_broken(path: Path, file_size: int, max_ifds: int = 100_000) -> bool:
    """True when a TIFF's chain of image directories points outside the file (truncation)."""
    import struct

    with path.open("rb") as fh:
        head = fh.read(16)
        if len(head) < 8 or head[:2] not in (b"II", b"MM"):
            return False
        bo = "<" if head[:2] == b"II" else ">"
        big = struct.unpack(bo + "H", head[2:4])[0] == 43
        count_fmt, entry_size, off_fmt = ("Q", 20, "Q") if big else ("H", 12, "I")
        offset = (
            struct.unpack(bo + "Q", head[8:16])[0] if big else struct.unpack(bo + "I", head[4:8])[0]
        )
        seen: set[int] = set()
        while offset and len(seen) < max_ifds:
            if offset in seen:
                return False  # a loop: tifffile's problem to report, not truncation
            seen.add(offset)
            count_size = struct.calcsize(count_fmt)
            if offset + count_size > file_size:
                return True
            fh.seek(offset)
            (count,) = struct.unpack(bo + count_fmt, fh.read(count_size))
            next_at = offset + count_size + count * entry_size
            off_size = struct.calcsize(off_fmt)
            if next_at + off_size > file_size:
                return True
            fh.seek(next_at)
            (offset,) = struct.unpack(bo + off_fmt, fh.read(off_size))
    return False


def _is_dicom(path: Path) -> bool:
    """DICOM Part 10 files carry "DICM" after a 128-byte preamble."""
    try:
        with path.open("rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def slide_fingerprint(path: str | Path) -> str:
    """A content fingerprint of a slide file, without opening it as a slide: sha256 over the
    size and the first and last MiB of the file.

    Raises:
        InputNotFoundError, UnsupportedSlideError (a folder), as :class:`Slide` does.
    """
    path = Path(path)
    if not path.exists():
        if path.is_symlink():
            raise InputNotFoundError(
                f"{path} is a symbolic link that leads nowhere (broken, or a loop)"
            )
        raise InputNotFoundError(f"slide not found: {path}")
    if path.is_dir():
        raise UnsupportedSlideError(f"{path} is a folder, not a slide file")
    with os_errors_as_user_errors(path):
        size = path.stat().st_size
        h = hashlib.sha256(str(size).encode())
        with path.open("rb") as fh:
            h.update(fh.read(1 << 20))
            if size > (1 << 20):
                fh.seek(max(size - (1 << 20), 1 << 20))
                h.update(fh.read())
    return h.hexdigest()


def open_slide(path: str | Path, override_mpp: float | None = None) -> Slide:
    """Open ``path`` as a :class:`Slide` (see its docstring for the errors)."""
    return Slide(path, override_mpp=override_mpp)
