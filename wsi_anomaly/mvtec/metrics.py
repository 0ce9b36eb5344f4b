"""MVTec AD metrics, computed on raw scores (higher = more anomalous; labels are never flipped).

- :func:`image_auroc`: ROC-AUC of one score per image (scikit-learn).
- :func:`pixel_auroc`: ROC-AUC over every pixel of every test image, good images included.
- :func:`aupro`: area under the per-region-overlap (PRO) curve up to a false-positive rate of
  0.3, divided by 0.3 (Bergmann et al., IJCV 2021, the MVTec AD evaluation protocol):

  * ground-truth regions are the 8-connected components of each mask;
  * at a threshold ``t``, a region's overlap is the fraction of its pixels with score ≥ ``t``;
    PRO(t) is the mean overlap over all regions of all test images;
  * FPR(t) is the fraction of all normal pixels (good images included) with score ≥ ``t``;
  * every distinct score is a threshold, so the curve is exact; it runs from (0, 0) to (1, 1),
    is integrated with the trapezoid rule up to FPR 0.3, with the PRO value at exactly 0.3
    interpolated linearly between the neighbouring curve points.

- :func:`paper_protocol_mask`: the pixel protocol of the authors' scoring script (masks and maps
  resized bilinearly to 128×128, a mask pixel counting as defective when its resized value is
  above 0), reported separately and labelled as such.

Masks are boolean ``(H, W)`` arrays at their own resolution; maps are float ``(H, W)`` arrays of
the same shapes (see :func:`resize_map`), compared in their own precision (float32 at least).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from ..models.scoring import upsample_map

#: The FPR up to which AUPRO is integrated (the MVTec AD standard).
AUPRO_FPR_LIMIT = 0.3
#: The side of the pixel grid of the paper's scoring script.
PAPER_PIXEL_PX = 128
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


class NoCurveError(ValueError):
    """No defect region or no normal pixel: the PRO curve is undefined."""


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC of per-image ``scores`` (N,) against ``labels`` (N,) (1 = defective).

    ``nan`` when only one class is present. Never flipped: a value below 0.5 is reported as is.
    """
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"{labels.shape[0]} labels but {scores.shape[0]} scores")
    return _auroc(labels, scores)


def _auroc(truth: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC of ``scores`` against the bool ``truth``; ``nan`` when only one class is present."""
    if truth.all() or not truth.any():
        return math.nan
    return float(roc_auc_score(truth, scores))


def _flatten(
    masks: Sequence[np.ndarray], maps: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    if len(masks) != len(maps):
        raise ValueError(f"{len(masks)} masks but {len(maps)} maps")
    for i, (mask, score_map) in enumerate(zip(masks, maps)):
        if mask.shape != score_map.shape:
            raise ValueError(
                f"image {i}: mask {mask.shape} and map {score_map.shape} differ; "
                "resize the map to the mask first"
            )
    truth = np.concatenate([np.asarray(m, dtype=bool).ravel() for m in masks])
    dtype = np.result_type(*(np.asarray(m).dtype for m in maps), np.float32)  # float32 at least
    scores = np.concatenate([np.asarray(m, dtype=dtype).ravel() for m in maps])
    return truth, scores


def pixel_auroc(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray]) -> float:
    """ROC-AUC over all pixels: ``masks`` bool (H_i, W_i), ``maps`` float of the same shapes.

    ``nan`` when no pixel (or every pixel) is defective.
    """
    return _auroc(*_flatten(masks, maps))


def pro_curve(
    masks: Sequence[np.ndarray], maps: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """The exact PRO-vs-FPR curve, one point per distinct score, from (0, 0) to (1, 1).

    Returns ``(fpr, pro)``: two float64 arrays, FPR non-decreasing. Raises
    :class:`NoCurveError` when there is no defect region or no normal pixel, ``ValueError`` when
    a mask and its map differ in shape.
    """
    truth, scores = _flatten(masks, maps)
    # Per pixel: +1 normal pixel (FPR step) or +1/|region| (PRO step of its region).
    pro_step = np.zeros(truth.shape, dtype=np.float64)
    n_regions, start = 0, 0
    for mask in masks:
        regions, n = ndimage.label(np.asarray(mask, dtype=bool), structure=_EIGHT_CONNECTED)
        if n:
            sizes = np.bincount(regions.ravel())
            inverse = np.zeros(n + 1)
            inverse[1:] = 1.0 / sizes[1:]
            pro_step[start : start + regions.size] = inverse[regions.ravel()]
        n_regions += n
        start += regions.size
    normal = ~truth
    n_normal = int(normal.sum())
    if n_regions == 0 or n_normal == 0:
        raise NoCurveError("the PRO curve needs at least one defect region and one normal pixel")

    order = np.argsort(scores, kind="stable")[::-1]  # descending score: thresholds high → low
    sorted_scores = scores[order]
    fpr = np.cumsum(normal[order], dtype=np.float64) / n_normal
    pro = np.cumsum(pro_step[order]) / n_regions
    # One point per threshold: the last pixel of each run of equal scores.
    last_of_run = np.append(sorted_scores[1:] != sorted_scores[:-1], True)
    fpr = np.clip(fpr[last_of_run], 0.0, 1.0)
    pro = np.clip(pro[last_of_run], 0.0, 1.0)
    return np.concatenate([[0.0], fpr, [1.0]]), np.concatenate([[0.0], pro, [1.0]])


def partial_area(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under ``y(x)`` from ``x[0]`` to ``x_max`` (``x`` non-decreasing).

    When ``x_max`` falls between two points, ``y(x_max)`` is interpolated linearly between them.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = int(np.searchsorted(x, x_max, side="right"))  # points with x ≤ x_max
    if n == 0:
        return 0.0
    xs, ys = x[:n], y[:n]
    if xs[-1] < x_max and n < len(x):
        x0, y0, x1, y1 = x[n - 1], y[n - 1], x[n], y[n]
        xs = np.append(xs, x_max)
        ys = np.append(ys, y0 + (y1 - y0) * (x_max - x0) / (x1 - x0))
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))


def aupro(
    masks: Sequence[np.ndarray], maps: Sequence[np.ndarray], fpr_limit: float = AUPRO_FPR_LIMIT
) -> float:
    """Area under the PRO curve up to ``fpr_limit``, normalised by ``fpr_limit`` (in [0, 1]).

    ``nan`` without any defect region or normal pixel.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    try:
        fpr, pro = pro_curve(masks, maps)
    except NoCurveError:
        return math.nan
    return partial_area(fpr, pro, fpr_limit) / fpr_limit


def resize_map(score_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of one ``(h, w)`` map to ``shape`` ``(H, W)`` (half-pixel centres, no
    antialiasing — OpenCV's ``INTER_LINEAR``). Returns float32 ``(H, W)``."""
    tensor = torch.as_tensor(np.asarray(score_map, dtype=np.float32))[None]
    return upsample_map(tensor, (int(shape[0]), int(shape[1])))[0].numpy()


def paper_protocol_mask(mask: np.ndarray, size_px: int = PAPER_PIXEL_PX) -> np.ndarray:
    """A mask as the authors' scoring script saw it: bilinearly resized to ``size_px``² (no
    antialiasing), then every pixel above 0 defective. ``(H, W)`` bool → ``(size_px, size_px)``
    bool."""
    return resize_map(np.asarray(mask, dtype=np.float32), (size_px, size_px)) > 0
