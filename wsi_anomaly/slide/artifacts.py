"""Synthetic slide artifacts drawn onto tiles, to test and measure quality control.

Each function returns a new (T, T, 3) uint8 tile: ``blur`` (Gaussian, out of focus), ``pen``
(a marker stroke of one ink colour, transmissive like real ink), ``fold`` (a darkened, shifted
copy of the tissue laid over itself) and ``bubble`` (the bright rim of an air bubble).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: Marker inks as transmitted colours (RGB, 0–255): the tissue is seen through them.
INK_RGB: dict[str, tuple[int, int, int]] = {
    "green": (40, 160, 70),
    "blue": (45, 70, 190),
    "black": (25, 25, 30),
    "red": (215, 30, 35),
}


def blur(tile: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur of ``sigma_px`` pixels (each channel)."""
    out = ndimage.gaussian_filter(tile.astype(np.float32), (sigma_px, sigma_px, 0))
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _stroke_mask(size: int, rng: np.random.Generator, width_px: float) -> np.ndarray:
    """A smooth curved band crossing a ``size``² tile, ``width_px`` wide."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    offset = rng.uniform(-0.25, 0.25) * size
    bend = rng.uniform(-0.3, 0.3) / size
    u = (xx - size / 2) * np.cos(angle) + (yy - size / 2) * np.sin(angle)
    v = -(xx - size / 2) * np.sin(angle) + (yy - size / 2) * np.cos(angle)
    return np.abs(v - offset - bend * u * u) < width_px / 2


def pen(tile: np.ndarray, ink: str, rng: np.random.Generator, width_px: float = 40) -> np.ndarray:
    """A marker stroke of ``ink`` (a key of :data:`INK_RGB`) across the tile."""
    mask = _stroke_mask(tile.shape[0], rng, width_px)
    colour = np.array(INK_RGB[ink], np.float32) / 255
    inked = tile.astype(np.float32) * colour
    # Marker ink is dense: most of the light is the ink's colour, a little the tissue's.
    inked = 0.85 * 255 * colour + 0.15 * inked
    out = tile.astype(np.float32)
    out[mask] = inked[mask]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def fold(tile: np.ndarray, rng: np.random.Generator, darken: float = 0.85) -> np.ndarray:
    """Tissue folded onto itself over part of the tile: the tile multiplied (transmission) by a
    shifted copy of itself and darkened, on a band covering about half of the tile."""
    size = tile.shape[0]
    shift = rng.integers(size // 8, size // 3, 2) * rng.choice([-1, 1], 2)
    shifted = np.roll(tile, tuple(int(s) for s in shift), axis=(0, 1)).astype(np.float32)
    folded = tile.astype(np.float32) * (shifted / 255) * darken
    band = _stroke_mask(size, rng, size * rng.uniform(0.5, 0.7))
    out = tile.astype(np.float32)
    out[band] = folded[band]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def bubble(tile: np.ndarray, rng: np.random.Generator, rim_px: float = 5) -> np.ndarray:
    """The bright rim of an air bubble: a near-white ring ``rim_px`` wide, its centre inside
    the tile."""
    size = tile.shape[0]
    radius = rng.uniform(0.25, 0.45) * size
    cy, cx = rng.uniform(0.3, 0.7, 2) * size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    r = np.hypot(yy - cy, xx - cx)
    rim = np.clip(1 - np.abs(r - radius) / (rim_px / 2), 0, 1)[..., None]
    out = tile.astype(np.float32) * (1 - rim) + 245 * rim
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
