"""Tile datasets for torch: a tile store (read lazily) or a folder of image files.

Both yield float32 tensors (3, T, T) in [0, 1]; model-specific normalisation happens in the
model package. Neither holds all tiles in memory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

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
        return to_tensor(self._store.tiles[index])

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


class ImageFolderDataset(Dataset):
    """Image files found recursively under a folder (or given as a list), resized to ``tile_px``.

    Unreadable files and files smaller than ``tile_px`` on either side are skipped with a
    warning that counts them; an error is raised when nothing usable remains.
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
                f"no images in {self.root} (looked for {', '.join(IMAGE_SUFFIXES)}, recursively)")
        self.files: list[Path] = []
        unreadable, small = [], []
        for path in candidates:
            try:
                with Image.open(path) as im:
                    w, h = im.size
            except (UnidentifiedImageError, OSError, ValueError):
                unreadable.append(path)
                continue
            if min(w, h) < tile_px:
                small.append(path)
                continue
            self.files.append(path)
        if unreadable:
            log.warning("%s: skipped %d unreadable image(s), e.g. %s", self.root, len(unreadable),
                        unreadable[0].name)
        if small:
            log.warning("%s: skipped %d image(s) smaller than %d px, e.g. %s", self.root,
                        len(small), tile_px, small[0].name)
        if not self.files:
            raise InvalidInputError(
                f"no usable images in {self.root}: {len(unreadable)} unreadable, {len(small)} "
                f"smaller than the {tile_px} px tile size")
        self.skipped = {"unreadable": len(unreadable), "too_small": len(small)}

    def __len__(self) -> int:
        return len(self.files)

    def load_rgb(self, index: int) -> np.ndarray:
        with Image.open(self.files[index]) as im:
            im = im.convert("RGB")
            if im.size != (self.tile_px, self.tile_px):
                im = im.resize((self.tile_px, self.tile_px), Image.Resampling.BILINEAR,
                               reducing_gap=None)
            return np.asarray(im)

    def __getitem__(self, index: int) -> torch.Tensor:
        return to_tensor(self.load_rgb(index))


def open_tiles(path: str | Path, tile_px: int = 256) -> Dataset:
    """A dataset for ``train --tiles``/``score``: a tile store or a folder of images."""
    path = Path(path)
    if TileStore.is_store(path) or path.suffix == ".zarr":
        return ZarrTileDataset(path)
    return ImageFolderDataset(path, tile_px)
