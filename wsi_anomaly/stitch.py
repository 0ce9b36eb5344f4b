"""Scores → pictures, on a fixed colour scale.

The colour scale is derived from the model's *training* score distribution (stored in the
checkpoint), never from the scores being drawn, so the same score has the same colour on every
slide and in every run. Diverging ``coolwarm`` by default, as in the HaloAE paper: blue at the
training median (tissue like the training tissue), white at the training 99th percentile, red at
twice that distance above it (anomalous).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class ColourScale:
    """A fixed piecewise-linear map from score to [0, 1] (then to a colour map)."""

    vmin: float
    vcenter: float
    vmax: float
    cmap: str = "coolwarm"

    def normalise(self, scores: np.ndarray) -> np.ndarray:
        s = np.asarray(scores, np.float64)
        low = 0.5 * (s - self.vmin) / max(self.vcenter - self.vmin, 1e-12)
        high = 0.5 + 0.5 * (s - self.vcenter) / max(self.vmax - self.vcenter, 1e-12)
        return np.clip(np.where(s <= self.vcenter, low, high), 0.0, 1.0)

    def to_rgb(self, scores: np.ndarray) -> np.ndarray:
        """Scores (any shape) → uint8 RGB of the same shape + (3,)."""
        from matplotlib import colormaps

        rgba = colormaps[self.cmap](self.normalise(scores))
        return (rgba[..., :3] * 255 + 0.5).astype(np.uint8)


def colour_scale(calibration: Mapping[str, Any], which: str = "mean", cmap: str = "coolwarm"
                 ) -> ColourScale:
    """The fixed scale of a model: training median → blue, 99th percentile → white.

    ``which`` picks the tile-mean (``"mean"``) or tile-max (``"max"``, for pixel maps) scores.
    """
    q = calibration["score_quantiles" if which == "mean" else "max_score_quantiles"]
    median, p99 = float(q["0.5"]), float(q["0.99"])
    spread = max(p99 - median, 1e-6)
    return ColourScale(median, median + spread, median + 3 * spread, cmap)


def save_map_png(score_map: np.ndarray, scale: ColourScale, path: str | Path, size: int,
                 image: np.ndarray | None = None, alpha: float = 0.5) -> None:
    """An anomaly map (h × w) as a ``size``² PNG, blended over ``image`` when given.

    Written under a temporary name and renamed.
    """
    rgb = scale.to_rgb(score_map)
    heat = np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BILINEAR))
    if image is not None:
        heat = (alpha * heat + (1 - alpha) * image[..., :3]).astype(np.uint8)
        heat = np.concatenate([image[..., :3], heat], axis=1)
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.partial.png")
    Image.fromarray(heat).save(tmp)
    os.replace(tmp, path)
