import numpy as np

from wsi_anomaly.slide import Slide
from wsi_anomaly.slide.tissue import TissueSettings, detect_tissue, pen_mark_mask
from wsi_anomaly.tiles.tiler import tissue_mask


def test_tissue_found_where_the_layout_puts_it(small_slide):
    with Slide(small_slide.path) as s:
        tm = tissue_mask(s, TissueSettings(thumbnail_max_px=512))
    truth = small_slide.ground_truth(tm.downsample)[: tm.mask.shape[0], : tm.mask.shape[1]] > 0
    agree = (tm.mask == truth).mean()
    assert agree > 0.9, agree
    assert 0.05 < tm.tissue_fraction < 0.95


def test_blank_slide_has_no_tissue(blank_slide):
    with Slide(blank_slide.path) as s:
        tm = tissue_mask(s, TissueSettings())
    assert not tm.mask.any()


def test_pen_marks_are_not_tissue():
    rgb = np.full((200, 200, 3), 240, np.uint8)
    rgb[20:180, 20:100] = (200, 120, 180)  # pink tissue
    rgb[20:180, 120:180] = (40, 160, 60)  # green marker
    mask, _ = detect_tissue(rgb, mpp_thumb=8.0)
    assert mask[100, 60] and not mask[100, 150]
    assert pen_mark_mask(rgb)[100, 150] and not pen_mark_mask(rgb)[100, 60]
