"""Tile datasets for torch: a tile store (read lazily) or a folder of image files.

Both yield float32 tensors (3, T, T) in [0, 1]; model-specific normalisation happens in the
model package. Neither holds all tiles in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import ConcatDataset, Dataset

from ..errors import InputNotFoundError, InvalidInputError
from .store import TileStore

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 → (3, H, W) float32 in [0, 1]."""
    rgb = np.ascontiguousarray(rgb)
    if not rgb.flags.writeable:  # PIL hands out read-only buffers; torch wants to own memory
        rgb = rgb.copy()
    return torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)


class ZarrTileDataset(Dataset):
    """Tiles of one tile store. The zarr group is opened lazily in each worker process."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        store = TileStore(self.path)  # validates: complete, right layout
        self.n = len(store)
        self.tile_px = store.tile_px
        self.mpp = store.mpp
        self.coords = store.coords
        self._store: TileStore | None = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        if self._store is None:
            self._store = TileStore(self.path)
        return to_tensor(np.asarray(self._store.tiles[index]))

    def __getstate__(self):  # never pickle an open store into a worker
        state = dict(self.__dict__)
        state["_store"] = None
        return state


def find_images(root: str | Path) -> list[Path]:
    """Image files under ``root`` (recursively), sorted for determinism."""
    root = Path(root)
    if not root.exists():
        raise InputNotFoundError(f"tile folder not found: {root}")
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def image_to_rgb(im: Image.Image) -> np.ndarray:
    """Any PIL image as (H, W, 3) uint8 RGB, keeping its tones.

    16- and 32-bit grey (``I;16*``, ``I``) are scaled from their full range, not clipped;
    float (``F``) images are taken as [0, 1] (or [0, 255] when larger values occur); an alpha
    channel (RGBA, LA, palette transparency) is composited over white, like slide background;
    CMYK, YCbCr, LAB, palette and 1-bit images go through PIL's own conversion.
    """
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        grey = np.asarray(im).astype(np.float64)
        top = 65535.0 if mode.startswith("I;16") or grey.max(initial=0) <= 65535 else grey.max()
        return _grey_to_rgb(grey / top)
    if mode == "F":
        grey = np.asarray(im, dtype=np.float64)
        top = 1.0 if np.nanmax(grey, initial=0) <= 1.0 else 255.0
        return _grey_to_rgb(np.nan_to_num(grey) / top)
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:] / 255.0
        rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return np.asarray(im.convert("RGB"))


def _grey_to_rgb(unit: np.ndarray) -> np.ndarray:
    grey = np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def read_image_rgb(path: Path) -> np.ndarray:
    """Decode an image file completely into (H, W, 3) uint8 RGB.

    Raises OSError/ValueError for a file that cannot be decoded to the end (a truncated file
    with a good header included: PIL's LOAD_TRUNCATED_IMAGES stays off).
    """
    try:
        with Image.open(path) as im:
            im.load()
            return image_to_rgb(im)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        if path.suffix.lower() not in (".tif", ".tiff"):
            raise
    # TIFFs PIL cannot decode (e.g. 16-bit RGB): tifffile reads them.
    import tifffile

    return array_to_rgb(tifffile.imread(path))


def array_to_rgb(array: np.ndarray) -> np.ndarray:
    """An image array (H, W[, C]) of any integer or float dtype as (H, W, 3) uint8 RGB."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # planar (C, H, W)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"not an RGB or grey image: shape {array.shape}")
    if np.issubdtype(a.dtype, np.integer):
        unit = a.astype(np.float64) / float(np.iinfo(a.dtype).max)
    else:
        af = np.nan_to_num(a.astype(np.float64))
        unit = af if af.max(initial=0) <= 1.0 else af / 255.0
    if a.shape[-1] in (2, 4):  # grey+alpha, RGBA: over white
        alpha = unit[..., -1:]
        unit = unit[..., :-1] * alpha + (1.0 - alpha)
    if unit.shape[-1] == 1:
        unit = np.repeat(unit, 3, axis=-1)
    return np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)


class ImageFolderDataset(Dataset):
    """Image files found recursively under a folder (or given as a list), resized to ``tile_px``.

    Every file is decoded once up front, so that files that cannot be decoded to the end
    (truncated, damaged) are skipped and counted here rather than failing a long run later; so
    are files smaller than ``tile_px`` on either side. An error is raised when nothing usable
    remains. Any PIL mode (16-bit, grey, RGBA, CMYK, palette…) is converted to RGB keeping its
    tones (:func:`image_to_rgb`).
    """

    def __init__(self, root: str | Path | list[Path], tile_px: int = 256):
        if isinstance(root, list):  # an explicit list of files
            candidates = [Path(p) for p in root]
            self.root = candidates[0].parent if candidates else Path(".")
        else:
            self.root = Path(root)
            candidates = find_images(self.root)
        self.tile_px = tile_px
        if not candidates:
            raise InvalidInputError(
                f"no images in {self.root} (looked for {', '.join(IMAGE_SUFFIXES)}, recursively)"
            )
        self.files: list[Path] = []
        unreadable, small = [], []
        for path in candidates:
            try:
                h, w = read_image_rgb(path).shape[:2]
            except (
                UnidentifiedImageError,
                OSError,
                ValueError,
                SyntaxError,
                Image.DecompressionBombError,
            ):
                unreadable.append(path)
                continue
            if min(w, h) < tile_px:
                small.append(path)
                continue
            self.files.append(path)
        if unreadable:
            log.warning(
                "%s: skipped %d unreadable image(s), e.g. %s",
                self.root,
                len(unreadable),
                unreadable[0].name,
            )
        if small:
            log.warning(
                "%s: skipped %d image(s) smaller than %d px, e.g. %s",
                self.root,
                len(small),
                tile_px,
                small[0].name,
            )
        if not self.files:
            raise InvalidInputError(
                f"no usable images in {self.root}: {len(unreadable)} unreadable, {len(small)} "
                f"smaller than the {tile_px} px tile size"
            )
        self.skipped = {"unreadable": len(unreadable), "too_small": len(small)}

    def __len__(self) -> int:
        return len(self.files)

    def load_rgb(self, index: int) -> np.ndarray:
        rgb = read_image_rgb(self.files[index])
        if rgb.shape[:2] != (self.tile_px, self.tile_px):
            im = Image.fromarray(rgb).resize(
                (self.tile_px, self.tile_px), Image.Resampling.BILINEAR, reducing_gap=None
            )
            rgb = np.asarray(im)
        return rgb

    def __getitem__(self, index: int) -> torch.Tensor:
        return to_tensor(self.load_rgb(index))


def open_tiles(path: str | Path, tile_px: int = 256) -> Dataset:
    """A dataset for ``train --tiles``/``score``: a tile store or a folder of images."""
    path = Path(path)
    if TileStore.is_store(path) or path.suffix == ".zarr":
        return ZarrTileDataset(path)
    return ImageFolderDataset(path, tile_px)


def open_training_tiles(
    paths: Sequence[str | Path], tile_px: int = 256, mpp: float | None = None
) -> tuple[Any, float | None]:
    """One map-style dataset (with a length) over tile stores and/or image folders, and the tiles' µm/px: ``mpp`` when
    given, else the stores' own (which must agree), else None (with a warning)."""
    parts = [open_tiles(p, tile_px) for p in paths]
    if not parts:
        raise InvalidInputError("no tiles given: name tile stores or folders of images")
    store_mpps = [d.mpp for d in parts if isinstance(d, ZarrTileDataset)]
    if store_mpps and max(store_mpps) > 1.05 * min(store_mpps):
        raise InvalidInputError(
            f"tile stores at different resolutions ({', '.join(f'{m:.3f}' for m in store_mpps)} "
            "µm/px); train on tiles of one resolution"
        )
    tile_mpp = mpp if mpp is not None else (store_mpps[0] if store_mpps else None)
    if tile_mpp is None:
        log.warning(
            "tile resolution unknown: pass --mpp so heatmaps tile slides at the training "
            "resolution (assuming nothing for now)"
        )
    dataset = parts[0] if len(parts) == 1 else ConcatDataset(parts)
    return dataset, tile_mpp
