"""Tests for the synthetic whole-slide generator (small slides, CPU, a few seconds)."""

from __future__ import annotations

import math

import numpy as np
import openslide
import pytest

from wsi_anomaly.errors import InvalidInputError
from wsi_anomaly.slide import synthetic
from wsi_anomaly.slide.synthetic import (
    SyntheticLayout,
    TissueLabel,
    default_layout,
    pyramid_levels,
    write_synthetic_slide,
)

# 1024×768 with 256-px tiles: full tiles only in x, a partial last row in y.
KNOWN_LAYOUT = SyntheticLayout(
    width=1024,
    height=768,
    tissue_ellipses=((512.0, 384.0, 420.0, 320.0),),
    tumour_ellipses=((380.0, 384.0, 140.0, 140.0),),
    anomaly_box=(720, 300, 128, 128),
    boundary_wave=0.0,
)
TUMOUR_WINDOW = (332, 336, 96, 96)  # (x, y, w, h) level-0 px, well inside the tumour disc
STROMA_WINDOW = (560, 520, 96, 96)  # inside the tissue, away from tumour and anomaly
ANOMALY_WINDOW = (736, 316, 96, 96)
BACKGROUND_WINDOW = (0, 0, 64, 64)


def _read_rgb(
    slide: openslide.OpenSlide, window: tuple[int, int, int, int], level: int = 0
) -> np.ndarray:
    x, y, w, h = window
    return np.asarray(slide.read_region((x, y), level, (w, h)))[..., :3].astype(np.float64)


def _saturation(rgb: np.ndarray) -> np.ndarray:
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)
    return np.where(high > 0, (high - low) / np.maximum(high, 1e-9), 0.0)


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    path = tmp_path_factory.mktemp("synthetic") / "known.tif"
    info = write_synthetic_slide(path, 1024, 768, mpp=0.5, layout=KNOWN_LAYOUT, seed=3)
    with openslide.OpenSlide(path) as slide:
        yield info, slide


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    path = tmp_path_factory.mktemp("synthetic") / "pyramid.tif"
    info = write_synthetic_slide(path, 3000, 2000, mpp=0.25, seed=1)
    with openslide.OpenSlide(path) as slide:
        yield info, slide


def test_known_layout_windows_have_the_expected_labels():
    # Guards the colour tests below: each window must be a single class.
    for window, label in [
        (TUMOUR_WINDOW, TissueLabel.TUMOUR),
        (STROMA_WINDOW, TissueLabel.STROMA),
        (ANOMALY_WINDOW, TissueLabel.ANOMALY),
        (BACKGROUND_WINDOW, TissueLabel.BACKGROUND),
    ]:
        x, y, w, h = window
        assert np.all(KNOWN_LAYOUT.labels(x, y, w, h) == label), window


def test_openslide_opens_small_slide_with_partial_edge_tiles(tmp_path):
    path = tmp_path / "small.tif"
    info = write_synthetic_slide(path, 600, 500, mpp=0.5, seed=0)
    assert path.exists()
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob(".*partial"))
    with openslide.OpenSlide(path) as slide:
        assert slide.properties[openslide.PROPERTY_NAME_VENDOR] == "generic-tiff"
        assert slide.dimensions == (600, 500)
        assert slide.level_count == 1
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(0.5)
        assert slide.properties["tiff.ResolutionUnit"] == "centimeter"
        assert float(slide.properties["tiff.XResolution"]) == pytest.approx(20000.0)
        assert slide.properties["openslide.level[0].tile-width"] == "256"
        # The bottom-right partial tile holds rendered content, not padding.
        corner = _read_rgb(slide, (600 - 40, 500 - 40, 40, 40))
        assert corner.mean() > 200
    assert (info.width, info.height, info.mpp) == (600, 500, 0.5)
    assert info.level_dimensions == ((600, 500),)


def test_pyramid_levels_are_main_ifds_openslide_reads(pyramid):
    info, slide = pyramid
    assert slide.level_count == 2
    assert slide.level_dimensions == ((3000, 2000), (750, 500))
    assert slide.level_downsamples == pytest.approx((1.0, 4.0))
    assert info.level_dimensions == slide.level_dimensions
    assert info.level_downsamples == (1, 4)
    assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25)


def test_pyramid_level_rule():
    assert [size for _, size in pyramid_levels(1024, 768)] == [(1024, 768)]
    assert [size for _, size in pyramid_levels(2048, 1536)] == [(2048, 1536), (512, 384)]
    assert [d for d, _ in pyramid_levels(40_000, 40_000)] == [1, 4, 16, 64]
    assert pyramid_levels(70_000, 30_000, level_downsample=2)[-1][1][0] <= 1024


def test_non_round_mpp_round_trips_through_openslide(tmp_path):
    write_synthetic_slide(tmp_path / "odd.tif", 300, 200, mpp=0.2427)
    with openslide.OpenSlide(tmp_path / "odd.tif") as slide:
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(
            0.2427, rel=1e-6
        )


def test_without_resolution_openslide_reports_no_mpp(tmp_path):
    info = write_synthetic_slide(tmp_path / "nores.tif", 600, 500, with_resolution=False)
    assert not info.has_resolution
    with openslide.OpenSlide(info.path) as slide:
        assert openslide.PROPERTY_NAME_MPP_X not in slide.properties
        assert openslide.PROPERTY_NAME_MPP_Y not in slide.properties
        # tifffile always writes the baseline tags; unit "none" means no physical size.
        assert slide.properties.get("tiff.ResolutionUnit", "none") == "none"


def test_tumour_is_darker_and_more_purple_than_stroma(known):
    _, slide = known
    tumour = _read_rgb(slide, TUMOUR_WINDOW).reshape(-1, 3).mean(axis=0)
    stroma = _read_rgb(slide, STROMA_WINDOW).reshape(-1, 3).mean(axis=0)
    assert tumour.mean() < stroma.mean() - 20  # darker
    # Purple (haematoxylin) has more blue than red; pink (eosin) more red than blue.
    assert tumour[2] - tumour[0] > stroma[2] - stroma[0] + 15
    assert stroma[0] > stroma[1] + 20  # pink: red well above green


def test_background_is_near_white(known):
    _, slide = known
    background = _read_rgb(slide, BACKGROUND_WINDOW)
    assert np.all(background.reshape(-1, 3).mean(axis=0) > 230)
    assert background.std() < 6
    assert _saturation(background).mean() < 0.03


def test_anomaly_box_has_a_third_distinct_texture(known):
    _, slide = known
    means = {
        name: _read_rgb(slide, window).reshape(-1, 3).mean(axis=0)
        for name, window in [
            ("anomaly", ANOMALY_WINDOW),
            ("tumour", TUMOUR_WINDOW),
            ("stroma", STROMA_WINDOW),
        ]
    }
    red, green, blue = means["anomaly"]
    assert red > green + 80 and red > blue + 60  # blood red
    for other in ("tumour", "stroma"):
        assert np.abs(means["anomaly"] - means[other]).max() > 50


def test_labels_agree_with_rendered_pixels_level0(known):
    info, slide = known
    rgb = _read_rgb(slide, (0, 0, info.width, info.height))
    tissue_label = info.ground_truth(1.0) > 0
    saturation = _saturation(rgb)
    assert saturation[tissue_label].mean() > saturation[~tissue_label].mean() + 0.15
    tissue_pixels = saturation > 0.08
    agreement = (tissue_pixels == tissue_label).mean()
    assert agreement > 0.97


def test_labels_agree_with_rendered_pixels_on_a_reduced_level(pyramid):
    info, slide = pyramid
    w, h = slide.level_dimensions[1]
    rgb = _read_rgb(slide, (0, 0, w, h), level=1)
    truth = info.ground_truth(info.level_downsamples[1])
    assert truth.shape == (h, w)
    for label in (TissueLabel.BACKGROUND, TissueLabel.STROMA, TissueLabel.TUMOUR):
        assert (truth == label).sum() > 1000
    tissue_pixels = _saturation(rgb) > 0.08
    assert (tissue_pixels == (truth > 0)).mean() > 0.97
    # Tumour is darker than stroma at this level too.
    grey = rgb.mean(axis=-1)
    assert grey[truth == TissueLabel.TUMOUR].mean() < grey[truth == TissueLabel.STROMA].mean() - 15


def test_same_seed_same_bytes_other_seed_other_pixels(tmp_path):
    first = write_synthetic_slide(tmp_path / "a.tif", 600, 500, seed=7)
    second = write_synthetic_slide(tmp_path / "b.tif", 600, 500, seed=7)
    other = write_synthetic_slide(tmp_path / "c.tif", 600, 500, seed=8)
    assert first.layout == second.layout
    assert first.path.read_bytes() == second.path.read_bytes()
    window = (200, 150, 200, 200)
    with openslide.OpenSlide(first.path) as a, openslide.OpenSlide(other.path) as c:
        assert not np.array_equal(_read_rgb(a, window), _read_rgb(c, window))


def test_all_background_slide_is_blank(tmp_path):
    info = write_synthetic_slide(tmp_path / "blank.tif", 600, 500, all_background=True)
    assert not info.ground_truth(4.0).any()
    with openslide.OpenSlide(info.path) as slide:
        rgb = _read_rgb(slide, (0, 0, 600, 500))
    assert rgb.min() > 225
    assert _saturation(rgb).max() < 0.05


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken_encoder(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(synthetic.imagecodecs, "jpeg_encode", broken_encoder)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_synthetic_slide(tmp_path / "broken.tif", 600, 500)
    assert list(tmp_path.iterdir()) == []


def test_labels_sample_pixel_centres():
    layout = SyntheticLayout(200, 100, anomaly_box=(100, 50, 30, 20))
    full = layout.labels(0, 0, 200, 100)
    rows, cols = np.nonzero(full == TissueLabel.ANOMALY)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (50, 69, 100, 129)
    # Downsample 10: centres at 5, 15, ... ; x centres 105, 115, 125 fall in [100, 130).
    coarse = layout.labels(0, 0, 20, 10, downsample=10)
    rows, cols = np.nonzero(coarse == TissueLabel.ANOMALY)
    assert sorted(set(cols.tolist())) == [10, 11, 12]
    assert sorted(set(rows.tolist())) == [5, 6]


def test_tile_labels_fractions(known):
    info, _ = known
    coords = np.array([[332, 336], [0, 0], [720 - 64, 300]])  # tumour, glass, half in the box
    fractions = info.tile_labels(coords, tile_size_l0=128)
    assert fractions.shape == (3, 4)
    assert np.allclose(fractions.sum(axis=1), 1.0)
    assert fractions[0, TissueLabel.TUMOUR] == 1.0
    assert fractions[1, TissueLabel.BACKGROUND] == 1.0
    assert fractions[2, TissueLabel.ANOMALY] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("width", "height", "seed"), [(600, 500, 0), (4096, 3000, 1), (70_000, 40_000, 2)]
)
def test_default_layout_has_every_class_and_margins(width, height, seed):
    layout = default_layout(width, height, seed=seed)
    truth = layout.labels(0, 0, 200, 200, downsample=max(width, height) / 200)
    counts = np.bincount(truth.ravel(), minlength=4)
    assert counts[TissueLabel.STROMA] > counts[TissueLabel.TUMOUR] > 0
    assert counts[TissueLabel.ANOMALY] == 0
    corner = layout.labels(0, 0, width // 20, height // 20)  # the top-left corner is glass
    assert not corner.any()
    step = max(width, height) / 400
    edge = layout.labels(0, 0, math.ceil(width / step), math.ceil(height / step), downsample=step)
    assert not edge[[0, -1], :].any() and not edge[:, [0, -1]].any()


def test_invalid_arguments_are_rejected(tmp_path):
    with pytest.raises(InvalidInputError):
        write_synthetic_slide(tmp_path / "x.tif", 600, 500, layout=KNOWN_LAYOUT)
    with pytest.raises(InvalidInputError):
        write_synthetic_slide(
            tmp_path / "x.tif", 1024, 768, layout=KNOWN_LAYOUT, all_background=True
        )
    with pytest.raises(InvalidInputError):
        write_synthetic_slide(tmp_path / "x.tif", 600, 500, tile_px=100)
    with pytest.raises(InvalidInputError):
        SyntheticLayout(100, 100, tissue_ellipses=((50, 50, 0, 10),))
    assert not (tmp_path / "x.tif").exists()
