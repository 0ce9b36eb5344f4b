"""MVTec metrics: hand-computed AUPRO, a brute-force PRO curve, raw (never flipped) AUROCs."""

import math

import numpy as np
import pytest

from wsi_anomaly.mvtec.metrics import (
    aupro,
    image_auroc,
    paper_protocol_mask,
    partial_area,
    pixel_auroc,
    pro_curve,
    resize_map,
)


def hand_case(tie: bool = False):
    """Two images, two defect regions (2 px and 1 px), 10 normal pixels.

    Thresholds from high to low (FPR over 10 normal pixels, PRO averaged over 2 regions):
      0.9 region A half covered → (0.0, 0.25)
      0.8 a normal pixel        → (0.1, 0.25)
      0.7 region B covered      → (0.1, 0.75)
      0.6 a normal pixel        → (0.2, 0.75)   [tie=True: region A's 2nd pixel also 0.6 → (0.2, 1.0)]
      0.5 region A covered      → (0.2, 1.0)
      0.4 a normal pixel        → (0.3, 1.0)
      0.1 the 7 other normals   → (1.0, 1.0)
    """
    mask = np.zeros((2, 4), bool)
    mask[0, 0] = mask[0, 1] = True  # region A
    mask[1, 3] = True  # region B (not 8-connected to A)
    scores = np.array([[0.9, 0.6 if tie else 0.5, 0.1, 0.1], [0.8, 0.6, 0.4, 0.7]])
    return [mask, np.zeros((1, 5), bool)], [scores, np.full((1, 5), 0.1)]


def test_aupro_hand_computed():
    masks, maps = hand_case()
    # Area to 0.3: 0.1·0.25 + 0.1·0.75 + 0.1·1.0 = 0.2 → / 0.3
    assert aupro(masks, maps) == pytest.approx(0.2 / 0.3)
    # Limit inside a flat segment: 0.025 + 0.075 + 0.05·1.0 = 0.15 → / 0.25
    assert aupro(masks, maps, fpr_limit=0.25) == pytest.approx(0.6)


def test_aupro_interpolates_at_the_limit_on_a_sloped_segment():
    masks, maps = hand_case(tie=True)
    fpr, pro = pro_curve(masks, maps)
    # The tie makes one diagonal step (0.1, 0.75) → (0.2, 1.0), not two.
    np.testing.assert_allclose(fpr, [0, 0, 0.1, 0.1, 0.2, 0.3, 1, 1])
    np.testing.assert_allclose(pro, [0, 0.25, 0.25, 0.75, 1, 1, 1, 1])
    # To 0.15: 0.025 + 0.05·(0.75 + 0.875)/2, PRO at 0.15 interpolated to 0.875.
    assert aupro(masks, maps, fpr_limit=0.15) == pytest.approx((0.025 + 0.040625) / 0.15)
    assert aupro(masks, maps) == pytest.approx((0.025 + 0.0875 + 0.1) / 0.3)


def test_regions_are_eight_connected():
    mask = np.zeros((3, 3), bool)
    mask[0, 0] = mask[1, 1] = mask[1, 2] = True  # (0,0) touches (1,1) only diagonally
    scores = np.zeros((3, 3))
    scores[0, 0] = 1.0
    fpr, pro = pro_curve([mask], [scores])
    # One 3-px region → PRO 1/3 at the top threshold (4-connectivity would give (1 + 0) / 2).
    assert (fpr[1], pro[1]) == (0.0, pytest.approx(1 / 3))


def brute_force_aupro(masks, maps, limit):
    from scipy import ndimage

    regions = []
    for m, s in zip(masks, maps):
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        regions += [s[lab == k] for k in range(1, n + 1)]
    normal = np.concatenate([s[~m] for m, s in zip(masks, maps)])
    points = [(0.0, 0.0)]
    for t in np.unique(np.concatenate([s.ravel() for s in maps]))[::-1]:
        points.append(((normal >= t).mean(), np.mean([(r >= t).mean() for r in regions])))
    points.append((1.0, 1.0))
    x, y = np.array(points).T
    keep = x <= limit
    area = np.trapezoid(y[keep], x[keep])
    j = np.argmax(x > limit)
    y_at = y[j - 1] + (y[j] - y[j - 1]) * (limit - x[j - 1]) / (x[j] - x[j - 1])
    return (area + (limit - x[j - 1]) * (y[j - 1] + y_at) / 2) / limit


def test_aupro_matches_a_brute_force_threshold_sweep():
    rng = np.random.default_rng(0)
    masks, maps = [], []
    for _ in range(4):
        m = np.zeros((20, 24), bool)
        for _ in range(rng.integers(0, 3)):
            y, x = rng.integers(0, 16, size=2)
            m[y : y + rng.integers(1, 5), x : x + rng.integers(1, 7)] = True
        s = rng.random((20, 24)).round(2) + 0.4 * m  # rounded: many ties
        masks.append(m)
        maps.append(s)
    assert any(m.any() for m in masks)
    assert aupro(masks, maps) == pytest.approx(brute_force_aupro(masks, maps, 0.3), abs=1e-9)


def test_aupro_bounds_and_degenerate_cases():
    masks, _ = hand_case()
    perfect = [m.astype(float) for m in masks]
    assert aupro(masks, perfect) == pytest.approx(1.0)
    assert aupro(masks, [1.0 - p for p in perfect]) == pytest.approx(0.0)
    assert math.isnan(aupro([np.zeros((4, 4), bool)], [np.zeros((4, 4))]))  # no defect region
    with pytest.raises(ValueError):
        aupro(masks, [p[:, :1] for p in perfect])
    assert partial_area(np.array([0, 1.0]), np.array([0, 1.0]), 0.5) == pytest.approx(0.125)


def test_image_auroc_is_never_flipped():
    labels = np.array([0, 0, 1, 1])
    assert image_auroc(labels, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert image_auroc(labels, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0  # reported as is
    assert image_auroc(labels, np.array([0.1, 0.5, 0.5, 0.9])) == pytest.approx(0.875)
    assert math.isnan(image_auroc(np.array([1, 1]), np.array([0.1, 0.2])))


def test_pixel_auroc_over_all_pixels():
    masks = [np.array([[True, False], [False, False]]), np.zeros((1, 3), bool)]
    maps = [np.array([[0.9, 0.1], [0.5, 0.2]]), np.array([[0.3, 0.95, 0.0]])]
    # 1 positive (0.9) vs 6 negatives; one negative (0.95) above it → 5/6.
    assert pixel_auroc(masks, maps) == pytest.approx(5 / 6)


def test_resizing_for_native_and_paper_protocols():
    small = np.arange(16, dtype=np.float32).reshape(4, 4)
    big = resize_map(small, (8, 12))
    assert big.shape == (8, 12) and big.dtype == np.float32
    assert big.min() >= small.min() and big.max() <= small.max()
    mask = np.zeros((1024, 1024), bool)
    mask[500:502, :] = True  # a 2-px line: bilinear 8× downsampling keeps it (> 0)
    paper = paper_protocol_mask(mask)
    assert paper.shape == (128, 128) and paper.any() and paper.sum() <= 3 * 128
