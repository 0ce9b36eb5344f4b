"""Synthetic whole-slide images with known ground truth, for tests, the demo and benchmarks.

A synthetic slide is a pyramidal, tiled, JPEG-compressed RGB TIFF that OpenSlide opens with its
``generic-tiff`` reader: every pyramid level is a main IFD (level 0 first, each next level
``level_downsample`` times smaller), tiles are ``tile_px`` × ``tile_px``, and the level-0 resolution
is stored as XResolution/YResolution in pixels per centimetre with ResolutionUnit = CENTIMETER, which
OpenSlide reports as ``openslide.mpp-x``/``openslide.mpp-y``.

What is drawn where is decided analytically by a :class:`SyntheticLayout` in level-0 pixel
coordinates (x to the right, y down), so any tile of any level can be rendered on its own and the
ground truth of any region is exact:

* ``0`` background: near-white glass with slight noise;
* ``1`` stroma: sparse pink (eosin) fibrous streaks with few small elongated nuclei;
* ``2`` tumour: dense purple (haematoxylin) tissue crowded with large nuclei;
* ``3`` anomaly: an optional axis-aligned box of blood-red haemorrhage (packed red blood cells).

Rendering never holds a whole level in memory: each class has a small periodic texture patch per
pyramid level (generated once with FFT-filtered noise at that level's own scale), and a tile is
filled by slicing the patches at the tile's position modulo the period and picking, per pixel, the
patch of that pixel's label. Tiles are JPEG-encoded as they are rendered and streamed to tifffile as
encoded bytes (one core renders and encodes a few thousand tiles per second).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, cast

import imagecodecs
import numpy as np
import tifffile

from wsi_anomaly.errors import InvalidInputError
from wsi_anomaly.outputs import atomic_path

__all__ = [
    "TissueLabel",
    "SyntheticLayout",
    "SyntheticSlide",
    "default_layout",
    "write_synthetic_slide",
]

log = logging.getLogger(__name__)


class TissueLabel(IntEnum):
    """Ground-truth label of a pixel of a synthetic slide."""

    BACKGROUND = 0
    STROMA = 1
    TUMOUR = 2
    ANOMALY = 3


N_LABELS = len(TissueLabel)

# Pyramid levels are added until the smallest one is at most this many pixels on its longer side.
_LOWEST_LEVEL_MAX_PX = 1024
# Period of the texture patches, in pixels of the level they are drawn for. Not a multiple of the
# usual 256-px tile stride, so neighbouring tiles of one class show different texture crops.
_TEXTURE_PERIOD_PX = 1000
# Smoothing scales below this (in pixels of the level) are unresolvable: clamp them and fade the
# field towards its mean instead, so coarse levels look like averaged finer ones.
_MIN_FEATURE_PX = 0.5

# Optical densities (per unit stain concentration) of the stains, for R, G, B (Beer-Lambert).
_OD_HAEMATOXYLIN = np.array([0.65, 0.70, 0.29])
_OD_EOSIN = np.array([0.10, 0.90, 0.30])
_OD_BLOOD = np.array([0.25, 2.00, 1.60])

# Wavy tissue outline: normalised ellipse radius² is perturbed by (amplitude, frequency) terms.
_WAVE_TERMS = ((0.12, 5.0, 4.0), (0.05, 11.0, 13.0))
_WAVE_REACH = sum(term[0] for term in _WAVE_TERMS)
_GOLDEN_ANGLE = 2.399963229728653

Ellipse = tuple[float, float, float, float]


# --------------------------------------------------------------------------------------------
# Layout: analytic regions in level-0 pixels
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticLayout:
    """Where tissue, tumour and the anomaly are, in level-0 pixels.

    Attributes:
        width: slide width, level-0 px.
        height: slide height, level-0 px.
        tissue_ellipses: ``(cx, cy, rx, ry)`` ellipses (centre and radii, level-0 px) whose union
            is the tissue. Tissue not covered by a tumour ellipse is stroma.
        tumour_ellipses: ``(cx, cy, rx, ry)`` ellipses marking tumour; only their part inside the
            tissue counts.
        anomaly_box: ``(x0, y0, w, h)`` level-0 px, or ``None``. Pixels whose centre lies in
            ``[x0, x0 + w) × [y0, y0 + h)`` are anomaly, whatever is under them.
        boundary_wave: amplitude of the wavy outline of every ellipse, relative to the default
            (``0`` gives exact ellipses).
    """

    width: int
    height: int
    tissue_ellipses: tuple[Ellipse, ...] = ()
    tumour_ellipses: tuple[Ellipse, ...] = ()
    anomaly_box: tuple[int, int, int, int] | None = None
    boundary_wave: float = 1.0

    def __post_init__(self) -> None:
        if int(self.width) < 1 or int(self.height) < 1:
            raise InvalidInputError(
                f"synthetic layout size must be positive, got {self.width}×{self.height} px"
            )
        object.__setattr__(self, "width", int(self.width))
        object.__setattr__(self, "height", int(self.height))
        for name in ("tissue_ellipses", "tumour_ellipses"):
            ellipses = tuple(tuple(float(v) for v in e) for e in getattr(self, name))
            for e in ellipses:
                if len(e) != 4 or e[2] <= 0 or e[3] <= 0:
                    raise InvalidInputError(
                        f"{name} entries must be (cx, cy, rx, ry) with positive radii, got {e}"
                    )
            object.__setattr__(self, name, ellipses)
        if self.anomaly_box is not None:
            box = tuple(int(v) for v in self.anomaly_box)
            if len(box) != 4 or box[2] <= 0 or box[3] <= 0:
                raise InvalidInputError(
                    f"anomaly_box must be (x0, y0, w, h) with positive w and h, got {self.anomaly_box}"
                )
            object.__setattr__(self, "anomaly_box", box)
        if self.boundary_wave < 0:
            raise InvalidInputError(f"boundary_wave must be ≥ 0, got {self.boundary_wave}")

    def labels(self, x0: float, y0: float, w: int, h: int, downsample: float = 1.0) -> np.ndarray:
        """Label image of a region, sampled at pixel centres.

        Args:
            x0, y0: top-left corner of the region, level-0 px.
            w, h: size of the output, in output pixels.
            downsample: level-0 px per output pixel. Output pixel ``(i, j)`` (row ``j``, column
                ``i``) is the label at level-0 point ``(x0 + (i + 0.5) * downsample,
                y0 + (j + 0.5) * downsample)``.

        Returns:
            ``uint8`` array of shape ``(h, w)`` with :class:`TissueLabel` values. Points outside
            the slide are labelled like any other point (normally background).
        """
        if downsample <= 0:
            raise InvalidInputError(f"downsample must be > 0, got {downsample}")
        xs = x0 + (np.arange(int(w), dtype=np.float64) + 0.5) * downsample
        ys = y0 + (np.arange(int(h), dtype=np.float64) + 0.5) * downsample
        return self._labels_on_grid(xs, ys)

    def _labels_on_grid(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Labels at the grid ``ys × xs`` (both ascending, level-0 px) → ``uint8 (len(ys), len(xs))``."""
        out = np.zeros((ys.size, xs.size), dtype=np.uint8)
        tissue = self._union(self.tissue_ellipses, xs, ys, salt=0)
        if tissue is not None:
            out[tissue] = TissueLabel.STROMA
            tumour = self._union(self.tumour_ellipses, xs, ys, salt=1)
            if tumour is not None:
                out[tumour & tissue] = TissueLabel.TUMOUR
        if self.anomaly_box is not None:
            bx, by, bw, bh = self.anomaly_box
            c0, c1 = np.searchsorted(xs, (bx, bx + bw), side="left")
            r0, r1 = np.searchsorted(ys, (by, by + bh), side="left")
            out[r0:r1, c0:c1] = TissueLabel.ANOMALY
        return out

    def _union(
        self, ellipses: Sequence[Ellipse], xs: np.ndarray, ys: np.ndarray, salt: int
    ) -> np.ndarray | None:
        """Union of wavy ellipses on the grid, or ``None`` when none of them reaches it."""
        mask: np.ndarray | None = None
        reach = math.sqrt(1.0 + self.boundary_wave * _WAVE_REACH)
        for index, (cx, cy, rx, ry) in enumerate(ellipses):
            # Only the grid block inside the (wave-enlarged) bounding box can be inside.
            c0, c1 = np.searchsorted(xs, (cx - reach * rx, cx + reach * rx))
            r0, r1 = np.searchsorted(ys, (cy - reach * ry, cy + reach * ry))
            if c0 >= c1 or r0 >= r1:
                continue
            u = (xs[c0:c1] - cx) / rx
            v = (ys[r0:r1] - cy) / ry
            dist2 = v[:, None] ** 2 + u[None, :] ** 2
            if self.boundary_wave > 0:
                for term, (amplitude, freq_u, freq_v) in enumerate(_WAVE_TERMS):
                    phase = _GOLDEN_ANGLE * (7 * index + 3 * term + 11 * salt)
                    dist2 += (self.boundary_wave * amplitude) * (
                        np.sin(freq_v * v + 2.0 * phase)[:, None]
                        * np.sin(freq_u * u + phase)[None, :]
                    )
            if mask is None:
                mask = np.zeros((ys.size, xs.size), dtype=bool)
            mask[r0:r1, c0:c1] |= dist2 < 1.0
        return mask

    def label_fractions(
        self, coords_xy: np.ndarray, tile_size_l0: float, samples_per_side: int = 16
    ) -> np.ndarray:
        """Fraction of each label inside square tiles, from a regular sampling of each tile.

        Args:
            coords_xy: ``(N, 2)`` top-left corners ``(x, y)`` of the tiles, level-0 px.
            tile_size_l0: tile side, level-0 px.
            samples_per_side: the tile is sampled at ``samples_per_side²`` pixel centres.

        Returns:
            ``float32 (N, 4)``: column ``k`` is the fraction of samples with label ``k``
            (see :class:`TissueLabel`); rows sum to 1.
        """
        coords = np.asarray(coords_xy, dtype=np.float64).reshape(-1, 2)
        step = float(tile_size_l0) / samples_per_side
        fractions = np.zeros((coords.shape[0], N_LABELS), dtype=np.float32)
        for row, (x, y) in enumerate(coords):
            counts = np.bincount(
                self.labels(x, y, samples_per_side, samples_per_side, step).ravel(),
                minlength=N_LABELS,
            )
            fractions[row] = counts / counts.sum()
        return fractions


def default_layout(
    width: int,
    height: int,
    seed: int = 0,
    anomaly_box: tuple[int, int, int, int] | None = None,
) -> SyntheticLayout:
    """A plausible layout scaled to the slide: one large tissue piece with two lobes, a tumour.

    The main piece covers roughly the central 55–65 % of each side; two smaller lobes overlap its
    rim (irregular outline); one large and one small tumour region lie well inside the main piece,
    so that stroma surrounds them.

    Args:
        width, height: slide size, level-0 px.
        seed: seeds the random placement.
        anomaly_box: optional ``(x0, y0, w, h)`` in level-0 px, passed through to the layout.
    """
    rng = np.random.default_rng([seed, 0x5EED])
    W, H = float(width), float(height)
    cx = W * (0.5 + rng.uniform(-0.04, 0.04))
    cy = H * (0.5 + rng.uniform(-0.04, 0.04))
    rx = W * rng.uniform(0.27, 0.31)
    ry = H * rng.uniform(0.27, 0.31)
    tissue: list[Ellipse] = [(cx, cy, rx, ry)]
    base_angle = rng.uniform(0.0, 2.0 * math.pi)
    for k in range(2):
        angle = base_angle + k * math.pi + rng.uniform(-0.6, 0.6)
        lrx = W * rng.uniform(0.10, 0.14)
        lry = H * rng.uniform(0.10, 0.14)
        lx = float(np.clip(cx + 0.9 * rx * math.cos(angle), 1.2 * lrx, W - 1.2 * lrx))
        ly = float(np.clip(cy + 0.9 * ry * math.sin(angle), 1.2 * lry, H - 1.2 * lry))
        tissue.append((lx, ly, lrx, lry))
    angle = rng.uniform(0.0, 2.0 * math.pi)
    tumour: list[Ellipse] = [
        (cx + 0.20 * rx * math.cos(angle), cy + 0.20 * ry * math.sin(angle), 0.50 * rx, 0.48 * ry),
        (cx - 0.55 * rx * math.cos(angle), cy - 0.55 * ry * math.sin(angle), 0.16 * rx, 0.17 * ry),
    ]
    return SyntheticLayout(
        width=int(width),
        height=int(height),
        tissue_ellipses=tuple(tissue),
        tumour_ellipses=tuple(tumour),
        anomaly_box=anomaly_box,
    )


# --------------------------------------------------------------------------------------------
# Textures: one periodic patch per class per pyramid level
# --------------------------------------------------------------------------------------------


class _FieldMaker:
    """Periodic random fields on a ``P × P`` grid drawn at ``um_per_px`` micrometres per pixel.

    Sizes are given in micrometres, so every pyramid level draws the same physical structures at
    its own resolution.
    """

    def __init__(self, rng: np.random.Generator, period_px: int, um_per_px: float) -> None:
        self.rng = rng
        self.period = period_px
        self.um_per_px = um_per_px
        self._fy = np.fft.fftfreq(period_px)[:, None]
        self._fx = np.fft.rfftfreq(period_px)[None, :]

    def _fft(self, field: np.ndarray) -> np.ndarray:
        return np.fft.rfft2(field)

    def _ifft(self, spectrum: np.ndarray) -> np.ndarray:
        return np.fft.irfft2(spectrum, s=(self.period, self.period))

    def _smooth_noise(
        self, sigma_um: float, sigma_across_um: float | None = None, theta: float = 0.0
    ) -> tuple[np.ndarray, float]:
        """Unit-variance Gaussian-filtered white noise, and how much of its contrast survives.

        ``sigma_um`` is the filter std along direction ``theta`` (radians from the x axis),
        ``sigma_across_um`` across it (default: isotropic).
        """
        across = sigma_um if sigma_across_um is None else sigma_across_um
        s_along = sigma_um / self.um_per_px
        s_across = across / self.um_per_px
        contrast = min(1.0, min(s_along, s_across) / _MIN_FEATURE_PX)
        s_along, s_across = max(s_along, _MIN_FEATURE_PX), max(s_across, _MIN_FEATURE_PX)
        f_along = self._fx * math.cos(theta) + self._fy * math.sin(theta)
        f_across = -self._fx * math.sin(theta) + self._fy * math.cos(theta)
        transfer = np.exp(-2.0 * math.pi**2 * (s_along**2 * f_along**2 + s_across**2 * f_across**2))
        white = self.rng.standard_normal((self.period, self.period))
        field = self._ifft(self._fft(white) * transfer)
        field /= max(float(field.std()), 1e-12)
        return field, contrast

    def noise(self, sigma_um: float) -> np.ndarray:
        """Zero-mean smooth noise of unit std (less where finer than a pixel)."""
        field, contrast = self._smooth_noise(sigma_um)
        return field * contrast

    def ridges(
        self, sigma_along_um: float, sigma_across_um: float, theta: float, width: float
    ) -> np.ndarray:
        """Fibre-like streaks along ``theta`` in ``[0, 1]``: the zero crossings of anisotropic noise."""
        field, contrast = self._smooth_noise(sigma_along_um, sigma_across_um, theta)
        streaks = np.exp(-((field / width) ** 2))
        mean = 1.0 / math.sqrt(1.0 + 2.0 / width**2)  # E[exp(-n²/w²)] for n ~ N(0, 1)
        return mean + (streaks - mean) * contrast

    def blobs(self, kinds: Sequence[tuple[float, float, float, float]]) -> np.ndarray:
        """Coverage in ``[0, 1]`` of randomly placed elliptical blobs (nuclei, cells).

        Each kind is ``(area_per_blob_um2, a_um, b_um, theta)``: on average one blob per
        ``area_per_blob_um2``, semi-axes ``a_um``, ``b_um``, orientation ``theta`` radians. Blob
        centres are Poisson counts per pixel, so the cost does not depend on the level's scale;
        sub-pixel blobs keep their area, so the mean coverage is the same on every level.
        """
        spectrum = np.zeros((self.period, self.period // 2 + 1), dtype=np.complex128)
        px_area_um2 = self.um_per_px**2
        for area_per_blob_um2, a_um, b_um, theta in kinds:
            counts = self.rng.poisson(px_area_um2 / area_per_blob_um2, (self.period, self.period))
            kernel = self._ellipse_kernel(a_um / self.um_per_px, b_um / self.um_per_px, theta)
            spectrum += self._fft(counts.astype(np.float64)) * self._fft(kernel)
        return np.clip(self._ifft(spectrum), 0.0, 1.0)

    def _ellipse_kernel(self, a_px: float, b_px: float, theta: float) -> np.ndarray:
        """Antialiased filled ellipse centred on pixel (0, 0) of the periodic grid, area π·a·b px²."""
        half = min(int(math.ceil(max(a_px, b_px))) + 1, (self.period - 1) // 2)
        supersample = 4
        offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
        grid = (np.arange(-half, half + 1)[:, None] + offsets[None, :]).ravel()
        x, y = grid[None, :], grid[:, None]
        u = x * math.cos(theta) + y * math.sin(theta)
        v = -x * math.sin(theta) + y * math.cos(theta)
        inside = ((u / a_px) ** 2 + (v / b_px) ** 2 <= 1.0).astype(np.float64)
        side = 2 * half + 1
        small = inside.reshape(side, supersample, side, supersample).mean(axis=(1, 3))
        area = math.pi * a_px * b_px
        if small.sum() > 0:
            small *= area / small.sum()
        else:
            small[half, half] = area
        kernel = np.zeros((self.period, self.period))
        index = np.arange(-half, half + 1) % self.period
        kernel[np.ix_(index, index)] = small
        return kernel


def _stains_to_rgb(stains: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Beer-Lambert mix of stain concentration fields → ``uint8 (P, P, 3)`` RGB."""
    optical_density = sum(conc[..., None] * od for conc, od in stains)
    rgb = 255.0 * np.exp(-optical_density)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _background_texture(fields: _FieldMaker) -> np.ndarray:
    grey = 240.0 + 1.5 * fields.noise(0.5) + 1.0 * fields.noise(20.0)
    rgb = np.stack([grey, grey, grey + 1.0], axis=-1)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _stroma_texture(fields: _FieldMaker) -> np.ndarray:
    theta = fields.rng.uniform(0.0, math.pi)
    density = 0.5 + 0.5 * np.tanh(1.5 * fields.noise(30.0))  # loose vs dense stroma
    mix = 0.5 + 0.5 * np.tanh(1.5 * fields.noise(40.0))  # fibres bend between two directions
    fibres = mix * fields.ridges(15.0, 1.5, theta, 0.3) + (1.0 - mix) * fields.ridges(
        15.0, 1.5, theta + 0.4, 0.3
    )
    eosin = 0.20 + 0.30 * density + 0.80 * fibres * density + 0.03 * fields.noise(1.0)
    nuclei = fields.blobs([(1250.0, 3.5, 1.25, theta), (1250.0, 3.5, 1.25, theta + 0.4)])
    chromatin = 1.0 + 0.2 * fields.noise(0.6)
    haematoxylin = 0.04 + 1.0 * nuclei * chromatin
    eosin = eosin * (1.0 - 0.5 * nuclei)
    return _stains_to_rgb([(haematoxylin, _OD_HAEMATOXYLIN), (eosin, _OD_EOSIN)])


def _tumour_texture(fields: _FieldMaker) -> np.ndarray:
    eosin = 0.30 + 0.06 * fields.noise(4.0)
    haematoxylin = 0.32 + 0.05 * fields.noise(10.0)
    kinds = [
        (700.0, 1.1 * radius, 0.9 * radius, theta)
        for radius in (3.0, 3.75, 4.5)
        for theta in (0.0, 1.05, 2.1)
    ]
    nuclei = fields.blobs(kinds)
    chromatin = 1.0 + 0.3 * fields.noise(0.75)
    haematoxylin = haematoxylin + 1.1 * nuclei * chromatin
    eosin = eosin * (1.0 - 0.6 * nuclei)
    return _stains_to_rgb([(haematoxylin, _OD_HAEMATOXYLIN), (eosin, _OD_EOSIN)])


def _anomaly_texture(fields: _FieldMaker) -> np.ndarray:
    cells = fields.blobs([(50.0, 3.5, 3.5, 0.0)])  # packed red blood cells
    blood = 0.35 + 0.06 * fields.noise(5.0) + 0.70 * cells
    eosin = np.full_like(blood, 0.1)
    return _stains_to_rgb([(blood, _OD_BLOOD), (eosin, _OD_EOSIN)])


_TEXTURE_BUILDERS: dict[TissueLabel, Callable[[_FieldMaker], np.ndarray]] = {
    TissueLabel.BACKGROUND: _background_texture,
    TissueLabel.STROMA: _stroma_texture,
    TissueLabel.TUMOUR: _tumour_texture,
    TissueLabel.ANOMALY: _anomaly_texture,
}


class _LevelRenderer:
    """Renders tiles of one pyramid level from the layout and per-class periodic patches."""

    def __init__(
        self,
        layout: SyntheticLayout,
        downsample: int,
        level_size: tuple[int, int],
        um_per_px_l0: float,
        seed: int,
        tile_px: int,
        labels_needed: Sequence[TissueLabel],
    ) -> None:
        self.layout = layout
        self.downsample = downsample
        self.tile_px = tile_px
        # Small slides need no full-size period; a multiple of 32 keeps FFT sizes friendly.
        self.period = min(_TEXTURE_PERIOD_PX, 32 * math.ceil(max(level_size) / 32))
        # Patches are extended by one tile so that every tile is a plain slice, never a wrap.
        wrap = np.arange(self.period + tile_px) % self.period
        self.patches: dict[int, np.ndarray] = {}
        for label in labels_needed:
            rng = np.random.default_rng([seed, downsample, int(label)])
            fields = _FieldMaker(rng, self.period, um_per_px_l0 * downsample)
            patch = _TEXTURE_BUILDERS[label](fields)
            self.patches[int(label)] = np.ascontiguousarray(patch[wrap][:, wrap])

    def tile(self, x_px: int, y_px: int) -> np.ndarray:
        """The full ``(tile_px, tile_px, 3)`` uint8 tile whose top-left is level pixel ``(x_px, y_px)``.

        Tiles that extend past the level's edge are rendered in full (the content continues), so
        JPEG blocks at the edge are not polluted by padding.
        """
        t, d = self.tile_px, self.downsample
        labels = self.layout.labels(x_px * d, y_px * d, t, t, d)
        ox, oy = x_px % self.period, y_px % self.period
        window = (slice(oy, oy + t), slice(ox, ox + t))
        lowest, highest = int(labels.min()), int(labels.max())
        out = np.array(self.patches[lowest][window], order="C")
        for label in range(lowest + 1, highest + 1):
            mask = labels == label
            if label in self.patches and mask.any():
                out[mask] = self.patches[label][window][mask]
        return out


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticSlide:
    """A synthetic slide on disk and the layout that defines its ground truth.

    Attributes:
        path: the TIFF file.
        width, height: level-0 size, px.
        mpp: level-0 microns per pixel the content was drawn at; written to the resolution tags
            only when ``has_resolution``.
        layout: the regions, level-0 px.
        level_downsamples: exact downsample of each pyramid level (level-0 px per level px);
            level ``k`` pixel ``(i, j)`` covers level-0 ``[i·d, (i+1)·d) × [j·d, (j+1)·d)``.
        level_dimensions: ``(width, height)`` of each level, px.
        has_resolution: whether the resolution tags hold the mpp (otherwise they are the
            placeholder 1/1 with ResolutionUnit=NONE).
    """

    path: Path
    width: int
    height: int
    mpp: float
    layout: SyntheticLayout
    level_downsamples: tuple[int, ...] = (1,)
    level_dimensions: tuple[tuple[int, int], ...] = ()
    has_resolution: bool = True

    def ground_truth(self, downsample: float) -> np.ndarray:
        """Label image of the whole slide at ``downsample`` level-0 px per pixel.

        Returns ``uint8 (ceil(height / downsample), ceil(width / downsample))`` with
        :class:`TissueLabel` values, sampled at pixel centres. Memory is one byte per output
        pixel: use a coarse downsample for large slides.
        """
        w = math.ceil(self.width / downsample)
        h = math.ceil(self.height / downsample)
        return self.layout.labels(0.0, 0.0, w, h, downsample)

    def tile_labels(
        self, coords_xy: np.ndarray, tile_size_l0: float, samples_per_side: int = 16
    ) -> np.ndarray:
        """Per-tile label fractions: ``float32 (N, 4)``, column ``k`` = fraction of label ``k``.

        ``coords_xy`` are ``(N, 2)`` top-left corners in level-0 px and ``tile_size_l0`` the tile
        side in level-0 px. Column :attr:`TissueLabel.TUMOUR` (2) is the tumour fraction and
        :attr:`TissueLabel.ANOMALY` (3) the anomaly fraction. Computed from
        ``samples_per_side²`` pixel-centre samples per tile.
        """
        return self.layout.label_fractions(coords_xy, tile_size_l0, samples_per_side)


def pyramid_levels(
    width: int, height: int, level_downsample: int = 4
) -> list[tuple[int, tuple[int, int]]]:
    """Downsample and ``(width, height)`` of every pyramid level, level 0 first.

    Levels are added, each ``level_downsample`` times smaller (sizes rounded up), until the
    longer side is at most 1024 px.
    """
    levels = [(1, (int(width), int(height)))]
    while max(levels[-1][1]) > _LOWEST_LEVEL_MAX_PX:
        d = levels[-1][0] * level_downsample
        levels.append((d, (math.ceil(width / d), math.ceil(height / d))))
    return levels


def _counting(items: Iterator[bytes], bar: Any) -> Iterator[bytes]:
    """Pass ``items`` through, advancing the tqdm ``bar`` by one per item."""
    for item in items:
        bar.update(1)
        yield item


def write_synthetic_slide(
    path: str | os.PathLike[str],
    width: int = 4096,
    height: int = 4096,
    mpp: float = 0.5,
    layout: SyntheticLayout | None = None,
    seed: int = 0,
    tile_px: int = 256,
    jpeg_quality: int = 85,
    level_downsample: int = 4,
    with_resolution: bool = True,
    all_background: bool = False,
    progress: bool = False,
) -> SyntheticSlide:
    """Write a synthetic pyramidal JPEG TIFF that OpenSlide opens as ``generic-tiff``.

    Memory stays bounded (texture patches plus a few tiles) whatever the slide size. The file is
    written under a temporary name in the same folder and renamed when complete.

    Args:
        path: output ``.tif`` path; its folder is created if missing; an existing file is replaced.
        width, height: level-0 size, px.
        mpp: level-0 microns per pixel; sets the resolution tags and the physical scale of the
            drawn structures (nuclei are ~6–9 µm across whatever the mpp).
        layout: regions in level-0 px; default :func:`default_layout` ``(width, height, seed)``.
        seed: seeds the layout (when defaulted) and the textures; same seed → same bytes.
        tile_px: TIFF tile side, px (multiple of 16).
        jpeg_quality: JPEG quality, 1–100 (YCbCr, 2×2 chroma subsampling).
        level_downsample: size ratio between successive pyramid levels (integer ≥ 2).
        with_resolution: write XResolution/YResolution (px per cm) and ResolutionUnit=CENTIMETER.
            ``False`` gives a slide without mpp: tifffile always writes the baseline tags, so they
            hold the placeholder 1/1 with ResolutionUnit=NONE, and OpenSlide reports no
            ``openslide.mpp-x``/``-y``.
        all_background: draw only glass (no tissue, no anomaly); ``layout`` must then be ``None``.
        progress: show a tqdm progress bar over tiles.

    Returns:
        The :class:`SyntheticSlide` describing the file and its ground truth.
    """
    path = Path(path)
    if int(width) < 1 or int(height) < 1:
        raise InvalidInputError(f"synthetic slide size must be positive, got {width}×{height} px")
    if not (math.isfinite(mpp) and mpp > 0):
        # Implausible but positive values are allowed: tests of the mpp checks need such slides.
        raise InvalidInputError(f"mpp must be a positive number of µm per pixel, got {mpp}")
    if tile_px < 16 or tile_px % 16:
        raise InvalidInputError(f"tile_px must be a positive multiple of 16, got {tile_px}")
    if not 1 <= jpeg_quality <= 100:
        raise InvalidInputError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    if int(level_downsample) != level_downsample or level_downsample < 2:
        raise InvalidInputError(f"level_downsample must be an integer ≥ 2, got {level_downsample}")
    width, height, level_downsample = int(width), int(height), int(level_downsample)
    if all_background:
        if layout is not None:
            raise InvalidInputError("give either all_background=True or a layout, not both")
        layout = SyntheticLayout(width, height)
    elif layout is None:
        layout = default_layout(width, height, seed=seed)
    elif (layout.width, layout.height) != (width, height):
        raise InvalidInputError(
            f"layout is {layout.width}×{layout.height} px but the slide is {width}×{height} px"
        )
    labels_needed = [TissueLabel.BACKGROUND]
    if layout.tissue_ellipses:
        labels_needed.append(TissueLabel.STROMA)
        if layout.tumour_ellipses:
            labels_needed.append(TissueLabel.TUMOUR)
    if layout.anomaly_box is not None:
        labels_needed.append(TissueLabel.ANOMALY)

    levels = pyramid_levels(width, height, level_downsample)
    tiles_per_level = [math.ceil(w / tile_px) * math.ceil(h / tile_px) for _, (w, h) in levels]
    # Classic TIFF offsets are 32-bit; JPEG is far below raw size, but keep ample headroom.
    bigtiff = width * height * 3 > 2**31
    jpeg_args: dict[str, Any] = {
        "level": jpeg_quality,
        "colorspace": "RGB",
        "outcolorspace": "YCBCR",
        "subsampling": (2, 2),
    }

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(tiles_per_level), unit="tile", desc=f"synthetic {path.name}")
    log.info(
        "writing synthetic slide %s: %d×%d px, %d levels, %d tiles, mpp %s, seed %d",
        path,
        width,
        height,
        len(levels),
        sum(tiles_per_level),
        mpp if with_resolution else "not written",
        seed,
    )
    started = time.perf_counter()
    try:
        with atomic_path(path) as partial, tifffile.TiffWriter(partial, bigtiff=bigtiff) as tiff:
            for level, (downsample, (level_w, level_h)) in enumerate(levels):
                renderer = _LevelRenderer(
                    layout, downsample, (level_w, level_h), mpp, seed, tile_px, labels_needed
                )

                def encode(origin: tuple[int, int], renderer: _LevelRenderer = renderer) -> bytes:
                    # bytes: a bytearray comes back only when an ``out`` buffer is passed
                    return cast(bytes, imagecodecs.jpeg_encode(renderer.tile(*origin), **jpeg_args))

                origins = (
                    (x, y) for y in range(0, level_h, tile_px) for x in range(0, level_w, tile_px)
                )
                encoded: Iterator[bytes] = map(encode, origins)
                if bar is not None:
                    encoded = _counting(encoded, bar)
                px_per_cm = 1e4 / (mpp * downsample)
                tiff.write(
                    encoded,
                    shape=(level_h, level_w, 3),
                    dtype=np.uint8,
                    photometric="rgb",
                    tile=(tile_px, tile_px),
                    compression="jpeg",
                    compressionargs={"level": jpeg_quality},
                    subsampling=(2, 2),
                    resolution=(px_per_cm, px_per_cm) if with_resolution else None,
                    resolutionunit="CENTIMETER" if with_resolution else None,
                    subfiletype=0 if level == 0 else tifffile.FILETYPE.REDUCEDIMAGE,
                    description=f"wsi-anomaly synthetic slide, seed {seed}" if level == 0 else None,
                    software="wsi-anomaly",
                    metadata=None,
                )
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - started
    log.info(
        "wrote %s in %.1f s (%.0f tiles/s)",
        path,
        seconds,
        sum(tiles_per_level) / max(seconds, 1e-9),
    )
    return SyntheticSlide(
        path=path,
        width=width,
        height=height,
        mpp=float(mpp),
        layout=layout,
        level_downsamples=tuple(d for d, _ in levels),
        level_dimensions=tuple(size for _, size in levels),
        has_resolution=bool(with_resolution),
    )
