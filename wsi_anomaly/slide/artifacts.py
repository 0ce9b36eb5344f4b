"""Synthetic slide artifacts drawn onto tiles, to test and measure quality control.

Each function returns a new (T, T, 3) uint8 tile: ``blur`` (Gaussian, out of focus), ``pen``
(a marker stroke of one ink colour, transmissive like real ink), ``fold`` (a shifted copy of
the tissue laid over itself), ``fold_flap`` (a flap of tissue turned over along a
straight line onto its neighbour, leaving bare glass where it came from) and ``bubble`` (the
bright rim of an air bubble).
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


def _layer_od(rgb: np.ndarray, glass: np.ndarray) -> np.ndarray:
    """Optical density (summed over RGB) of a layer relative to bare glass."""
    return -np.log(np.clip(rgb / glass, 1 / 255, 1)).sum(axis=-1)


def fold(
    tile: np.ndarray,
    rng: np.random.Generator,
    darken: float = 0.85,
    glass_rgb: tuple[int, int, int] = (242, 242, 242),
) -> np.ndarray:
    """Tissue folded onto itself over part of the tile: on a band covering about half of the
    tile, a shifted copy of the tissue lies over it. Light crosses both layers (transmissions
    relative to the bare glass ``glass_rgb`` multiply) and where both hold tissue the stack is
    darker still (``darken``: thicker, compressed); glass under glass stays glass."""
    size = tile.shape[0]
    shift = rng.integers(size // 8, size // 3, 2) * rng.choice([-1, 1], 2)
    shifted = np.roll(tile, tuple(int(s) for s in shift), axis=(0, 1)).astype(np.float32)
    glass = np.array(glass_rgb, np.float32)
    folded = tile.astype(np.float32) * np.minimum(shifted / glass, 1)
    both = (_layer_od(shifted, glass) > 0.3) & (_layer_od(tile.astype(np.float32), glass) > 0.3)
    folded[both] *= darken
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


def fold_flap(
    tile: np.ndarray,
    rng: np.random.Generator,
    darken: float = 0.9,
    glass_rgb: tuple[int, int, int] = (242, 242, 242),
) -> np.ndarray:
    """A flap of tissue folded over along a straight line, as happens when a section is laid
    on the slide: the tissue on one side of the line, up to a flap width of 20–40 % of the tile,
    is turned over (mirrored across the line) onto the tissue on the other side. Light crosses
    both layers there (transmissions multiply) and the doubled tissue is a little darker still
    (``darken``: thicker, compressed); where the flap came from is bare glass (``glass_rgb``).
    Unlike :func:`fold`, the second layer is a mirrored copy, nothing wraps around the tile's
    edges, and glass is never darkened."""
    size = tile.shape[0]
    theta = rng.uniform(0, 2 * np.pi)
    normal = np.array([np.sin(theta), np.cos(theta)])  # (row, column)
    offset = rng.uniform(-0.15, 0.15) * size
    width = rng.uniform(0.2, 0.4) * size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    u = (yy - size / 2) * normal[0] + (xx - size / 2) * normal[1] - offset
    # The destination (−width < u < 0) sees the tissue mirrored from u' = −u.
    src_y = yy - 2 * u * normal[0]
    src_x = xx - 2 * u * normal[1]
    flap = np.stack(
        [
            ndimage.map_coordinates(
                tile[..., c].astype(np.float32), [src_y, src_x], order=1, mode="mirror"
            )
            for c in range(3)
        ],
        axis=-1,
    )
    out = tile.astype(np.float32)
    under = (u > -width) & (u < 0)
    source = (u >= 0) & (u < width)
    # Transmission of the flap relative to bare glass (the slide's white): light crosses the
    # glass once whatever lies on it.
    glass = np.array(glass_rgb, np.float32)
    doubled = out * np.minimum(flap / glass, 1)
    # Only where both layers hold tissue is the stack thicker than one section.
    both = (_layer_od(flap, glass) > 0.3) & (_layer_od(out, glass) > 0.3)
    doubled[both] *= darken
    out[under] = doubled[under]
    out[source] = glass
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
