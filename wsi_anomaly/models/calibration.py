"""A model's calibration: the distribution of its scores on normal tissue.

Every family's checkpoint holds one :class:`Calibration`: quantiles of the tile scores and of the
tile maxima of normal tiles (held out of training when there are enough), how many tiles they
come from, and the family's own extras (HaloAE's mean map of the training tiles, …). It makes
scores comparable across slides and decides the "Anomalous" threshold
(:meth:`Calibration.threshold`), so the colour scale only draws what the model decided.

In a checkpoint it is stored as plain data (:meth:`Calibration.to_dict`, tensors, floats, str),
so the file loads with ``torch.load(weights_only=True)``; :meth:`Calibration.from_dict` also
reads the older layout whose extras (``mean_map``) sat beside the quantiles.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

#: Quantiles of the normal tiles' scores saved in every checkpoint's calibration.
SCORE_QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)
#: The quantile of normal scores at and above which a tile is "Anomalous".
THRESHOLD_QUANTILE = "0.99"
#: Keys of the older layout that are not extras.
_COMMON = (
    "n_tiles",
    "score_quantiles",
    "max_score_quantiles",
    "score_mean",
    "score_std",
    "scale_source",
    "in_sample",
    "holdout",
    "extras",
)


def _quantiles(values: np.ndarray, what: str) -> dict[str, float]:
    """``{"0.5": value, …}`` of :data:`SCORE_QUANTILES`; ``ValueError`` when not finite."""
    if len(values) == 0:
        raise ValueError(f"no {what} to calibrate on")
    out = {f"{q:g}": float(np.quantile(values, q)) for q in SCORE_QUANTILES}
    bad = [k for k, v in out.items() if not math.isfinite(v)]
    if bad or not np.isfinite(values).all():
        n_bad = int((~np.isfinite(values)).sum())
        raise ValueError(
            f"the model gives non-finite {what} on {n_bad} of {len(values)} normal tiles; "
            "its calibration would be meaningless (lower the learning rate or check the inputs)"
        )
    return out


@dataclass(frozen=True)
class Calibration:
    """Scores of normal tiles, the threshold they set, and the family's extras."""

    #: Quantile (``"0.5"``, ``"0.99"``, …) → tile score.
    score_quantiles: dict[str, float]
    #: Quantile → tile maximum (the map's peak; the score itself without maps).
    max_score_quantiles: dict[str, float]
    n_tiles: int = 0
    score_mean: float = math.nan
    score_std: float = math.nan
    #: Where the quantiles come from ("held-out normal tiles", "training tiles (in-sample)").
    scale_source: str = ""
    #: The in-sample quantiles when the scale comes from held-out tiles.
    in_sample: dict[str, Any] | None = None
    #: How many tiles were held out of training, from which sources.
    holdout: dict[str, Any] | None = None
    #: What the family's :meth:`predict` needs besides the weights (tensors or plain values).
    extras: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_scores(
        cls, scores: torch.Tensor, maxima: torch.Tensor, extras: Mapping[str, Any] | None = None
    ) -> Calibration:
        """From ``N`` tile scores and ``N`` tile maxima of normal tiles; ``ValueError`` when any
        is not finite (a threshold from them would be meaningless)."""
        means = scores.detach().float().cpu().numpy().astype(np.float64).reshape(-1)
        peaks = maxima.detach().float().cpu().numpy().astype(np.float64).reshape(-1)
        return cls(
            score_quantiles=_quantiles(means, "scores"),
            max_score_quantiles=_quantiles(peaks, "tile maxima"),
            n_tiles=len(means),
            score_mean=float(means.mean()),
            score_std=float(means.std()),
            extras=dict(extras or {}),
        )

    def quantiles(self, which: str = "mean") -> dict[str, float]:
        """The tile-score (``"mean"``) or tile-maximum (``"max"``) quantiles."""
        return self.score_quantiles if which == "mean" else self.max_score_quantiles

    def threshold(self, which: str = "mean") -> float:
        """The score at and above which a tile is "Anomalous": the 99th percentile of normal
        tiles' scores (``which="max"``: of their maxima)."""
        return float(self.quantiles(which)[THRESHOLD_QUANTILE])

    def median(self, which: str = "mean") -> float:
        return float(self.quantiles(which)["0.5"])

    def with_scale(self, **changes: Any) -> Calibration:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint."""
        out: dict[str, Any] = {
            "n_tiles": int(self.n_tiles),
            "score_quantiles": dict(self.score_quantiles),
            "max_score_quantiles": dict(self.max_score_quantiles),
            "score_mean": float(self.score_mean),
            "score_std": float(self.score_std),
            "scale_source": self.scale_source,
            "extras": dict(self.extras),
        }
        if self.in_sample is not None:
            out["in_sample"] = self.in_sample
        if self.holdout is not None:
            out["holdout"] = self.holdout
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Calibration:
        """A checkpoint's calibration; ``ValueError`` naming what is missing or not finite."""
        if not isinstance(data, Mapping):
            raise ValueError("the calibration is not a mapping")
        quantiles = {}
        for key in ("score_quantiles", "max_score_quantiles"):
            raw = data.get(key, data.get("score_quantiles"))
            if not isinstance(raw, Mapping) or THRESHOLD_QUANTILE not in raw or "0.5" not in raw:
                raise ValueError(f"the calibration has no {key}")
            try:
                values = {str(k): float(v) for k, v in raw.items()}
            except (TypeError, ValueError):
                raise ValueError(f"the calibration's {key} are not numbers") from None
            if not all(math.isfinite(v) for v in values.values()):
                raise ValueError(f"the calibration's {key} are not finite")
            quantiles[key] = values
        extras = dict(data.get("extras") or {})
        # The older layout kept the family's extras (HaloAE's mean_map) beside the quantiles.
        extras.update({k: v for k, v in data.items() if k not in _COMMON and v is not None})
        return cls(
            score_quantiles=quantiles["score_quantiles"],
            max_score_quantiles=quantiles["max_score_quantiles"],
            n_tiles=int(data.get("n_tiles", 0)),
            score_mean=float(data.get("score_mean", math.nan)),
            score_std=float(data.get("score_std", math.nan)),
            scale_source=str(data.get("scale_source", "")),
            in_sample=data.get("in_sample"),
            holdout=data.get("holdout"),
            extras=extras,
        )
