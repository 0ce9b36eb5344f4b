"""Pictures readable at their native size: legend text at least 2 % of the picture's height,
titles inside the picture, a tissue outline that shows, colour bars on `score --maps`."""

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image

from wsi_anomaly.stitch import (
    CONTOUR_SHARE,
    MIN_TEXT_SHARE,
    ColourScale,
    SlideGeometry,
    _legend_figure,
    colour_bar_figure,
    figure_title,
    save_map_png,
    tissue_outline,
)

SCALE = ColourScale(vmin=0.0123, vcenter=0.0456, vmax=0.0789)
GEOMETRY = SlideGeometry(70000, 60000, 0.25, 512.0, 512.0, 136, 117)
LONG_TITLE = figure_title(
    "TCGA-A7-A0CE-01Z-00-DX1.0A3C4F5B-1234-4E1A-9B3C-0123456789AB.svs",
    {
        "model_file": "haloae_breast_normal_cohort2026_ft_imagenet_long_schedule_v12.pt",
        "model_name": "haloae",
        "model_sha256": "ab" * 32,
    },
)


def _texts(fig):
    texts = list(fig.texts)
    for ax in fig.axes:
        texts += list(ax.get_yticklabels()) + list(ax.get_xticklabels())
    return [t for t in texts if t.get_text()]


def _check_readable(fig, picture_h):
    """Every text of ``fig`` is at least MIN_TEXT_SHARE of ``picture_h`` tall and lies inside
    the figure."""
    renderer = fig.canvas.get_renderer()
    width, height = fig.canvas.get_width_height()
    assert height >= 1
    for text in _texts(fig):
        size_px = text.get_fontsize() * fig.dpi / 72
        assert size_px >= MIN_TEXT_SHARE * picture_h, (text.get_text(), size_px, picture_h)
        box = text.get_window_extent(renderer)
        assert box.x0 >= 0 and box.x1 <= width, (text.get_text(), box, width)
        assert box.y0 >= 0 and box.y1 <= height, (text.get_text(), box, height)


@pytest.mark.parametrize("canvas_h", [200, 480, 1200, 2308])
def test_legend_text_is_two_percent_of_the_picture(canvas_h):
    fig = _legend_figure(SCALE, GEOMETRY, canvas_h, LONG_TITLE)
    fig.canvas.draw()
    panel_h = fig.canvas.get_width_height()[1]
    picture_h = max(canvas_h, panel_h)  # the panel sits beside the canvas
    assert panel_h <= max(canvas_h, 480) + 2  # the panel does not make the picture taller
    _check_readable(fig, picture_h)


def test_a_long_model_name_is_wrapped_inside_the_panel():
    fig = _legend_figure(SCALE, GEOMETRY, 600, LONG_TITLE)
    fig.canvas.draw()
    title = fig.texts[0]
    assert "v12.pt" in title.get_text().replace("\n", "")  # wrapped, not cut
    renderer = fig.canvas.get_renderer()
    assert title.get_window_extent(renderer).x1 <= fig.canvas.get_width_height()[0]
    boxes = [t.get_window_extent(renderer) for t in _texts(fig)]
    for i, a in enumerate(boxes):  # no text runs into another
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b), (a, b)


@pytest.mark.parametrize("shape", [(300, 400), (1500, 2000), (3000, 1000)])
def test_tissue_outline_is_wide_enough_to_see(shape):
    tissue = np.zeros(shape, bool)
    h, w = shape
    tissue[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = True
    outline = tissue_outline(tissue)
    assert not (outline & ~tissue).any()  # never over the background
    expected = max(2, round(CONTOUR_SHARE * max(shape)))
    row = outline[h // 2]
    assert row[w // 4 : w // 4 + expected].all() and not row[w // 4 + expected + 1]
    assert row.sum() == 2 * expected


def test_score_maps_have_a_colour_bar(tmp_path):
    size = 256
    score_map = np.linspace(0.0, 0.1, 64 * 64, dtype=np.float32).reshape(64, 64)
    image = np.full((size, size, 3), 200, np.uint8)
    path = tmp_path / "m.png"
    save_map_png(score_map, SCALE, path, size=size, image=image)
    png = np.asarray(Image.open(path).convert("RGB"))
    assert png.shape[0] == size and png.shape[1] > 2 * size
    bar = png[:, 2 * size :]
    red_top = (np.asarray(colormaps[SCALE.cmap](1.0)[:3]) * 255).astype(int)
    blue_bottom = (np.asarray(colormaps[SCALE.cmap](0.0)[:3]) * 255).astype(int)
    # the bar's column: its topmost coloured pixel is the map's top colour, its lowest the bottom
    coloured = (bar.astype(int).sum(axis=-1) < 700).sum(axis=0)
    columns = np.nonzero(coloured > 0.7 * size)[0]  # the bar and its frame
    column = bar[:, int(np.median(columns))].astype(int)
    rows = np.nonzero(column.sum(axis=-1) < 700)[0]
    assert len(rows) > 0.7 * size
    # a few pixels in from the frame line
    assert np.abs(column[rows[3]] - red_top).max() <= 30, column[rows[3]]
    assert np.abs(column[rows[-4]] - blue_bottom).max() <= 30, column[rows[-4]]
    fig = colour_bar_figure(SCALE, size)
    _check_readable(fig, size)
    labels = " ".join(t.get_text() for t in _texts(fig))
    assert "0.0123" in labels and "0.0456" in labels and "median" in labels
