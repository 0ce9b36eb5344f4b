"""The tile grid at a target resolution (wsi.md §2 and §4).

Coordinates are level-0 pixels, top-left corner, (x, y) with x to the right and y down — what
OpenSlide and QuPath use. A tile is ``tile_px`` pixels at the *actual* mpp, which equals the
target within 5 % or is reached by reading a larger region of a finer level and resizing it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import InvalidInputError
from .reader import LevelInfo

#: A level whose mpp is within this relative distance of the target is read as is.
MPP_TOLERANCE = 0.05


@dataclass(frozen=True)
class ReadPlan:
    """How one tile is read: ``read_px`` level pixels square, resized to ``tile_px`` if needed."""

    target_mpp: float
    actual_mpp: float
    level: int
    level_mpp: float
    level_downsample: float
    tile_px: int
    stride_px: int
    read_px: int
    read_stride_px: int

    @property
    def resize(self) -> bool:
        return self.read_px != self.tile_px

    @property
    def tile_size_l0(self) -> float:
        """Side of one tile in level-0 pixels."""
        return self.read_px * self.level_downsample

    @property
    def stride_l0(self) -> float:
        return self.read_stride_px * self.level_downsample

    def to_dict(self) -> dict:
        return asdict(self)


def _level_mpp(level: LevelInfo) -> float:
    if level.mpp is None:
        raise InvalidInputError(
            f"level {level.index} has no known resolution (µm/px); tiles need the slide's mpp"
        )
    return level.mpp


def plan_read(
    levels: Sequence[LevelInfo], target_mpp: float, tile_px: int = 256, stride_px: int | None = None
) -> ReadPlan:
    """Choose the level and read size for tiles of ``tile_px`` at ``target_mpp`` (µm/px).

    The level is the one whose mpp is closest at or below the target (a level a hair coarser
    than the target, within tolerance, counts as at the target).
    """
    if tile_px < 8:
        raise InvalidInputError(f"--tile-px {tile_px} is too small (use at least 8, typically 256)")
    stride_px = tile_px if stride_px is None else stride_px
    if not 0 < stride_px:
        raise InvalidInputError(f"--stride {stride_px} must be positive")
    if target_mpp <= 0:
        raise InvalidInputError(f"--mpp {target_mpp} must be positive")
    candidates = [lv for lv in levels if _level_mpp(lv) <= target_mpp * (1 + MPP_TOLERANCE)]
    if not candidates:
        raise InvalidInputError(
            f"target {target_mpp:g} µm/px is finer than the slide's level 0 ({levels[0].mpp:.3f} "
            f"µm/px); choose --mpp ≥ {levels[0].mpp:.3f}"
        )
    level = max(candidates, key=_level_mpp)
    level_mpp = _level_mpp(level)
    if abs(level_mpp - target_mpp) <= MPP_TOLERANCE * target_mpp:
        read_px, read_stride = tile_px, stride_px
    else:
        scale = target_mpp / level_mpp
        read_px = int(round(tile_px * scale))
        read_stride = max(1, int(round(stride_px * scale)))
    return ReadPlan(
        target_mpp=target_mpp,
        actual_mpp=level_mpp * read_px / tile_px,
        level=level.index,
        level_mpp=level_mpp,
        level_downsample=level.downsample,
        tile_px=tile_px,
        stride_px=stride_px,
        read_px=read_px,
        read_stride_px=read_stride,
    )


@dataclass
class TileGrid:
    """All cells of the grid (row-major) or a selection of them.

    ``coords`` (N, 2) int64 level-0 top-left (x, y); ``level_xy`` (N, 2) int64 top-left in the
    read level's pixels; ``grid_index`` (N, 2) int32 (col, row); ``tissue_fraction`` (N,) float32.
    """

    plan: ReadPlan
    cols: int
    rows: int
    coords: np.ndarray
    level_xy: np.ndarray
    grid_index: np.ndarray
    tissue_fraction: np.ndarray

    def __len__(self) -> int:
        return len(self.coords)

    def select(self, keep: np.ndarray) -> TileGrid:
        return TileGrid(
            self.plan,
            self.cols,
            self.rows,
            self.coords[keep],
            self.level_xy[keep],
            self.grid_index[keep],
            self.tissue_fraction[keep],
        )


def make_grid(plan: ReadPlan, level_size: tuple[int, int]) -> TileGrid:
    """Every tile that fits wholly inside the read level, in row-major order."""
    lw, lh = level_size
    cols = max(0, (lw - plan.read_px) // plan.read_stride_px + 1) if lw >= plan.read_px else 0
    rows = max(0, (lh - plan.read_px) // plan.read_stride_px + 1) if lh >= plan.read_px else 0
    gy, gx = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    grid_index = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.int32)
    level_xy = grid_index.astype(np.int64) * plan.read_stride_px
    coords = np.rint(level_xy * plan.level_downsample).astype(np.int64)
    zeros = np.zeros(len(coords), np.float32)
    return TileGrid(plan, cols, rows, coords, level_xy, grid_index, zeros)


def box_fractions(
    mask: np.ndarray, downsample: float, coords: np.ndarray, size_l0: float
) -> np.ndarray:
    """Fraction of ``mask`` that is true inside each square box.

    Args:
        mask: (H, W) bool at ``downsample`` level-0 pixels per mask pixel.
        coords: (N, 2) level-0 top-left (x, y) of the boxes; ``size_l0`` their side.
    Returns:
        (N,) float32 in [0, 1].
    """
    if len(coords) == 0:
        return np.zeros(0, np.float32)
    h, w = mask.shape
    integral = np.zeros((h + 1, w + 1), np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask.astype(np.int64), axis=0), axis=1)
    x0 = np.clip(np.rint(coords[:, 0] / downsample).astype(np.int64), 0, w)
    y0 = np.clip(np.rint(coords[:, 1] / downsample).astype(np.int64), 0, h)
    side = max(1, int(math.ceil(size_l0 / downsample - 1e-9)))
    x1, y1 = np.clip(x0 + side, 0, w), np.clip(y0 + side, 0, h)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return (inside / area).astype(np.float32)
