"""Tissue quality control: each flag raised on its artifact and not on clean tissue."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_anomaly.errors import InputNotFoundError, InvalidInputError
from wsi_anomaly.slide import artifacts
from wsi_anomaly.slide.qc import (
    FLAG_NAMES,
    VALUE_NAMES,
    QCSettings,
    TileQCMeter,
    _bright_lines,
    arc_lengths,
    border_distance_um,
    colour_reference_od,
    flag_labels,
    flag_masks,
    flag_tiles,
    load_qc_settings,
    measure_tiles,
    reference_od,
    slide_verdict,
    stored_colour_reference,
)
from wsi_anomaly.tiles import TileStore


@pytest.fixture(scope="module")
def clean(small_store) -> np.ndarray:
    """Tissue tiles of the synthetic slide (sharp, H&E colours, no artifact)."""
    store = TileStore(small_store)
    return store.read(0, len(store))


@pytest.fixture(scope="module")
def slide_refs(small_store) -> tuple[float, np.ndarray | None]:
    """The synthetic slide's reference densities (overall, and per stain colour)."""
    store = TileStore(small_store)
    return store.qc["reference_od"], stored_colour_reference(store.qc)


def flags_of(
    tiles: np.ndarray, reference: float = 0.67, colour: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    return flag_masks(flag_tiles(measure_tiles(tiles, None, reference, colour)))


ARTIFACT_FLAGS = [name for name in FLAG_NAMES if name != "border"]


def test_clean_tissue_raises_no_artifact_flag(clean, slide_refs):
    flags = flags_of(clean, *slide_refs)
    for name in ARTIFACT_FLAGS:
        assert not flags[name].any(), name


@pytest.mark.parametrize("sigma", [1.0, 2.0, 4.0])
def test_blur_is_flagged(clean, sigma, slide_refs):
    blurred = np.stack([artifacts.blur(t, sigma) for t in clean])
    assert flags_of(blurred, *slide_refs)["blur"].all()
    assert not flags_of(clean, *slide_refs)["blur"].any()


@pytest.mark.parametrize("ink", ["green", "blue", "black", "red"])
def test_pen_ink_is_flagged_by_its_colour(clean, ink, slide_refs):
    rng = np.random.default_rng(0)
    inked = np.stack([artifacts.pen(t, ink, rng) for t in clean])
    flags = flags_of(inked, *slide_refs)
    assert flags[f"pen_{ink}"].all()
    others = [f"pen_{c}" for c in artifacts.INK_RGB if c != ink]
    assert not any(flags[o].any() for o in others)


def flat_tissue(rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """A uniformly stained, slightly noisy tissue tile and its optical density (the slide's
    reference staining)."""
    colour = np.array((200, 120, 170))
    tile = np.clip(colour + rng.normal(0, 6, (256, 256, 3)), 0, 255).astype(np.uint8)
    return tile, float(-np.log(colour / 255).sum())


def test_fold_is_flagged_against_the_slides_staining():
    rng = np.random.default_rng(1)
    tile, reference = flat_tissue(rng)
    folded = artifacts.fold(tile, rng, darken=0.5)
    assert not flags_of(tile[None], reference)["fold"].any()
    assert flags_of(folded[None], reference)["fold"].all()
    # The same tile on a slide whose own tissue is that dark is not a fold.
    assert not flags_of(folded[None], reference * 3)["fold"].any()


def test_a_second_layer_beside_its_single_layer_is_a_fold_denser_tissue_is_not():
    """Half of a tile at the slide's median density of its colour; the other half either
    twice as dense behind a straight edge (a second layer of the same tissue, ×0.9 where the
    layers overlap) or 1.7× as dense (tissue of the same colour, more densely stained)."""
    rng = np.random.default_rng(5)
    tile, reference = flat_tissue(rng)
    transmission = tile.astype(np.float32) / 255

    def right_half_od_times(factor: float, darken: float = 1.0) -> np.ndarray:
        out = transmission.copy()
        out[:, 128:] = out[:, 128:] ** factor * darken
        return np.clip(out * 255, 0, 255).astype(np.uint8)

    doubled = right_half_od_times(2.0, 0.9)
    denser = right_half_od_times(1.7)
    flags = flags_of(np.stack([tile, doubled, denser]), reference)["fold"]
    assert flags.tolist() == [False, True, False]


def test_fold_on_synthetic_tissue(clean, slide_refs):
    rng = np.random.default_rng(1)
    folded = np.stack([artifacts.fold(t, rng, darken=0.5) for t in clean])
    assert flags_of(folded, *slide_refs)["fold"].mean() >= 0.5
    assert not flags_of(clean, *slide_refs)["fold"].any()


def test_bubble_rims_are_flagged():
    rng = np.random.default_rng(2)
    tile, reference = flat_tissue(rng)
    foam = artifacts.bubble(tile, rng, rim_px=6)
    assert not flags_of(tile[None], reference)["bubble"].any()
    assert flags_of(foam[None], reference)["bubble"].all()


def test_a_flag_turned_off_skips_its_measurement():
    rng = np.random.default_rng(2)
    tile, reference = flat_tissue(rng)
    foam = artifacts.bubble(tile, rng, rim_px=6)
    off = QCSettings(max_bubble=0, max_fold_step=0)
    values = measure_tiles(foam[None], off, reference)
    assert np.isnan(values[0, VALUE_NAMES.index("bubble")])
    assert np.isnan(values[0, VALUE_NAMES.index("fold_step")])
    assert not flag_masks(flag_tiles(values, off))["bubble"].any()
    assert flags_of(foam[None], reference)["bubble"].all()


def test_short_bright_gaps_are_not_bubbles():
    """Bright gaps between fibres: as thin and as bright as a rim, but short and irregular."""
    rng = np.random.default_rng(5)
    tile, reference = flat_tissue(rng)
    gaps = tile.copy()
    for _ in range(40):
        y, x = rng.integers(10, 230, 2)
        angle = rng.uniform(0, np.pi)
        for t in range(int(rng.integers(8, 24))):
            yy, xx = int(y + t * np.sin(angle)), int(x + t * np.cos(angle))
            gaps[yy : yy + 3, xx : xx + 3] = 245
        angle += rng.uniform(-0.6, 0.6)
    values = measure_tiles(gaps[None], reference=reference)
    assert values[0, VALUE_NAMES.index("bubble")] < QCSettings().max_bubble / 2
    assert not flags_of(gaps[None], reference)["bubble"].any()


def test_arc_length_of_circles_lines_and_noise():
    yy, xx = np.mgrid[0:128, 0:128]
    ring = np.abs(np.hypot(yy - 64, xx - 60) - 40) < 1.2
    half_ring = ring & (xx < 60)
    straight = np.abs(yy - 0.3 * xx - 30) < 1.0
    noise = np.random.default_rng(0).random((128, 128)) < 0.08
    lengths = arc_lengths(np.stack([ring, half_ring, straight, noise]), 1.0, 0.6)
    # A full circle of radius 40 px is 2π·40/128 ≈ 1.96 image sides long; half of it ≈ 0.98.
    assert lengths[0] == pytest.approx(2 * np.pi * 40 / 128, rel=0.1)
    assert lengths[1] == pytest.approx(np.pi * 40 / 128, rel=0.15)
    # A straight line fits no circle of bounded radius; scattered pixels form no long line.
    assert lengths[2] == 0 and lengths[3] == 0


@pytest.mark.parametrize("contrast, min_grey", [(20, 153), (0, 0), (255, 0), (300, 100)])
def test_bright_lines_match_the_signed_definition(contrast, min_grey):
    """The uint8 line map is the signed one: brighter than ``min_grey`` and, in some
    direction, brighter than both neighbours 2 px away by more than ``contrast``."""
    rng = np.random.default_rng(7)
    grey = rng.integers(0, 256, (3, 40, 48), dtype=np.uint8)
    grey[0, 10:30, 20] = 255  # a vertical line on noise
    g = grey.astype(np.int32)
    d = 2
    c = g[:, d:-d, d:-d]
    pairs = [
        (g[:, d:-d, : -2 * d], g[:, d:-d, 2 * d :]),
        (g[:, : -2 * d, d:-d], g[:, 2 * d :, d:-d]),
        (g[:, : -2 * d, : -2 * d], g[:, 2 * d :, 2 * d :]),
        (g[:, : -2 * d, 2 * d :], g[:, 2 * d :, : -2 * d]),
    ]
    response = np.max([np.minimum(c - a, c - b) for a, b in pairs], axis=0)
    expected = np.zeros(grey.shape, bool)
    expected[:, d:-d, d:-d] = (response > contrast) & (c > min_grey)
    got = _bright_lines(grey, d, contrast, min_grey)
    assert got.dtype == bool
    np.testing.assert_array_equal(got, expected)
    if contrast == 20:
        assert got[0, 12:28, 20].all()


def test_arcs_of_stacked_images_never_join_across_images():
    """Lines of one image end at its last row and the next image's start at its first: each
    image keeps its own arcs, as when measured alone (and likewise when no line touches the
    first or last rows)."""
    yy, xx = np.mgrid[0:128, 0:128]
    low_arc = np.abs(np.hypot(yy - 127, xx - 64) - 50) < 1.2  # a half circle on the last row
    high_arc = np.abs(np.hypot(yy, xx - 64) - 50) < 1.2  # and one on the first row
    ring = np.abs(np.hypot(yy - 64, xx - 64) - 40) < 1.2
    for stack in (np.stack([low_arc, high_arc, ring]), np.stack([ring, ring & (xx < 64)])):
        alone = [arc_lengths(image[None], 1.5, 0.1, 0.7)[0] for image in stack]
        np.testing.assert_allclose(arc_lengths(stack, 1.5, 0.1, 0.7), alone)
        assert min(alone) > 0.5


def test_a_dense_texture_is_no_arc_but_a_rim_inside_one_is():
    """Bright lines on 40 % of the pixels join into one component that any circle crosses
    densely; the band beside the circle is as full as the ring, so nothing is covered."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:128, 0:128]
    texture = rng.random((4, 128, 128)) < 0.4
    ring = np.abs(np.hypot(yy - 64, xx - 64) - 40) < 1.2
    speckled_ring = ring | (rng.random((128, 128)) < 0.05)
    assert (arc_lengths(texture, 1.5, 0.1, 0.7) < QCSettings().max_bubble).all()
    assert arc_lengths(speckled_ring[None], 1.5, 0.1, 0.7)[0] > 1.5


def test_a_rim_joined_to_fibres_is_found_by_narrowing_in_small_steps(monkeypatch):
    """A ring whose right side is crossed by 40 fibre-like streaks is one line with them; its
    first circle is pulled towards the fibres. Refits that narrow from 8 × fit_px reach the
    ring; refits that start at 8/3 × fit_px stay on the fibres, which alone are
    no arc."""
    from skimage.draw import line

    import wsi_anomaly.slide.qc as qc

    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:128, 0:128]
    ring = np.abs(np.hypot(yy - 64, xx - 50) - 36) < 1.2
    fibres = np.zeros((128, 128), bool)
    for _ in range(40):
        y0, x0 = rng.integers(0, 128), rng.integers(60, 128)
        angle, length = np.pi / 2 + rng.uniform(-0.3, 0.3), rng.integers(15, 40)
        y1 = int(np.clip(y0 + length * np.sin(angle), 0, 127))
        x1 = int(np.clip(x0 + length * np.cos(angle), 0, 127))
        rows, cols = line(y0, x0, y1, x1)
        fibres[rows, cols] = fibres[rows, np.minimum(cols + 1, 127)] = True
    limit = QCSettings().max_bubble
    assert arc_lengths((ring | fibres)[None], 1.5, 0.1, 0.5)[0] > 1.0  # of 1.77 for the ring
    assert arc_lengths(fibres[None], 1.5, 0.1, 0.5)[0] < limit
    monkeypatch.setattr(qc, "_REFITS", (8 / 3, 4 / 3, 1.0))
    assert arc_lengths((ring | fibres)[None], 1.5, 0.1, 0.5)[0] < limit


def test_fold_edge_is_a_density_step_across_a_straight_line():
    rng = np.random.default_rng(3)
    tile, density = flat_tissue(rng)
    reference = 0.6 * density  # this tissue is denser than the slide's median
    # A second layer of the same tissue over the left 40 % of the tile: its density doubles.
    doubled = tile.copy()
    layer = tile[:, ::-1, :].astype(np.float32) / 255
    doubled[:, :100] = (tile[:, :100] * layer[:, :100]).astype(np.uint8)
    # The same density difference spread as a smooth gradient over the whole tile is no fold.
    ramp = np.linspace(0.75, 1.0, 256, dtype=np.float32)[None, :, None]
    graded = (tile * ramp).astype(np.uint8)
    step = VALUE_NAMES.index("fold_step")
    v_tile, v_doubled, v_graded = measure_tiles(
        np.stack([tile, doubled, graded]), reference=reference
    )
    assert v_doubled[step] >= QCSettings().max_fold_step
    assert v_tile[step] < 0.2 and v_graded[step] < QCSettings().max_fold_step
    # The edge alone (the dense-tissue measurement off: the ramp's dark end is 2.7 × this
    # slide's median density, which ``fold`` rightly calls thick).
    edge_only = QCSettings(max_fold=0)
    values = measure_tiles(np.stack([tile, doubled, graded]), edge_only, reference)
    flags = flag_masks(flag_tiles(values, edge_only))["fold"]
    assert flags.tolist() == [False, True, False]


def test_exposure_and_faint_staining(clean, slide_refs):
    tile = clean[:1].astype(np.float32)
    bright = np.clip(tile * 0.1 + 240, 0, 255).astype(np.uint8)
    dark = (tile * 0.15).astype(np.uint8)
    faint = np.clip(255 - (255 - tile) * 0.15, 0, 255).astype(np.uint8)
    assert flags_of(bright, *slide_refs)["overexposed"].all()
    assert flags_of(dark, *slide_refs)["underexposed"].all()
    assert flags_of(faint, *slide_refs)["faint"].all()
    normal = flags_of(clean[:1], *slide_refs)
    assert not (normal["overexposed"] | normal["underexposed"] | normal["faint"]).any()


def test_border_distance_and_flag():
    mask = np.zeros((20, 30), bool)
    mask[2:18, 2:28] = True
    # Mask pixels of 10 level-0 px at 0.5 µm/px (5 µm); tiles of 20 level-0 px.
    coords = np.array([[100, 80], [20, 20], [0, 0]])
    dist = border_distance_um(mask, 10.0, 0.5, coords, 20)
    assert dist[2] == 0  # centre on background
    assert dist[0] > dist[1] > 0
    values = np.full((3, len(VALUE_NAMES)), np.nan, np.float32)
    values[:, VALUE_NAMES.index("border_um")] = dist
    border = flag_masks(flag_tiles(values, QCSettings(border_um=float(dist[1]) + 1)))["border"]
    assert border.tolist() == [False, True, True]
    off = flag_masks(flag_tiles(values, QCSettings(border_um=0)))["border"]
    assert not off.any()


def test_border_distance_is_the_whole_masks_transform():
    """Measured on the tissue's bounding box, the distances are those of the whole mask: tissue
    in a corner, touching the slide's edge, or in pieces; centres on glass or off the slide
    read 0."""
    from scipy import ndimage

    rng = np.random.default_rng(5)
    masks = [np.zeros((40, 60), bool) for _ in range(3)]
    masks[0][25:40, 40:60] = True  # a corner, touching two slide edges
    masks[1][5:15, 10:20] = True  # two pieces
    masks[1][20:35, 30:55] = True
    masks[2] = ndimage.binary_opening(rng.random((40, 60)) < 0.6)
    coords = np.stack(np.meshgrid(np.arange(-20, 620, 7), np.arange(-20, 420, 7)), -1)
    coords = coords.reshape(-1, 2)
    for mask in masks:
        whole = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        centre = (coords + 5) / 10.0
        j = np.clip(centre[:, 0].astype(int), 0, mask.shape[1] - 1)
        i = np.clip(centre[:, 1].astype(int), 0, mask.shape[0] - 1)
        expected = (whole[i, j] * 10.0 * 0.5).astype(np.float32)
        np.testing.assert_array_equal(border_distance_um(mask, 10.0, 0.5, coords, 10), expected)
        assert (expected > 0).any() and (expected == 0).any()
    empty = border_distance_um(np.zeros((5, 5), bool), 10.0, 0.5, coords[:3], 10)
    assert empty.tolist() == [0, 0, 0]


def test_flag_labels_name_the_bits():
    flags = np.array([0, 1, 1 << FLAG_NAMES.index("pen_red") | 1], np.uint16)
    assert flag_labels(flags) == ["", "blur", "blur;pen_red"]


def test_verdict():
    settings = QCSettings()
    assert slide_verdict({"any_artifact": 0.0}, settings) == ("pass", [])
    verdict, reasons = slide_verdict({"any_artifact": 0.12, "blur": 0.06}, settings)
    assert verdict == "check" and any("blur" in r for r in reasons)
    verdict, _ = slide_verdict({"any_artifact": 0.5, "pen_blue": 0.5}, settings)
    assert verdict == "fail"


def test_preset_loads_and_overrides(tmp_path):
    default = load_qc_settings()
    assert default == load_qc_settings("qc_default")
    path = tmp_path / "mine.yaml"
    path.write_text("qc:\n  min_focus: 0.5\n  pen_blue_hue: [0.5, 0.7]\n", encoding="utf-8")
    mine = load_qc_settings(str(path))
    assert mine.min_focus == 0.5 and mine.pen_blue_hue == (0.5, 0.7)
    assert mine.max_pen == default.max_pen


@pytest.mark.parametrize(
    "text",
    [
        "qc:\n  min_focus: -1\n",
        "qc:\n  min_fokus: 0.1\n",
        "qc:\n  max_pen: 2\n",
        "qc:\n  min_focus: fast\n",
        "qc:\n  pen_red_hue: 0.5\n",
        "qc:\n  min_brightness: 0.9\n  max_brightness: 0.5\n",
        "- a list\n",
    ],
)
def test_bad_settings_are_one_clear_error(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InvalidInputError):
        load_qc_settings(str(path))


def test_unknown_preset():
    with pytest.raises(InputNotFoundError):
        load_qc_settings("no_such_preset")


def test_store_keeps_qc_beside_the_tiles(small_store):
    store = TileStore(small_store)
    assert store.qc is not None and store.qc["names"] == list(VALUE_NAMES)
    values, flags = store.qc_values, store.qc_flags
    assert values is not None and flags is not None
    assert values.shape == (len(store), len(VALUE_NAMES)) and flags.shape == (len(store),)
    assert np.isfinite(values).all()
    # The values are those of the stored tiles (same pixels, no second read of the slide).
    # Measured in the decoding threads, part by part: the same as all tiles measured at once.
    colour = stored_colour_reference(store.qc)
    assert colour is not None  # the slide's density per stain colour, for the fold measurement
    again = measure_tiles(store.read(0, len(store)), None, store.qc["reference_od"], colour)
    own = [k for k, name in enumerate(VALUE_NAMES) if name != "border_um"]
    np.testing.assert_allclose(values[:, own], again[:, own], rtol=1e-5, atol=1e-6)


def test_store_without_qc_still_reads(small_store, tmp_path):
    import shutil

    import zarr

    old = tmp_path / "old.zarr"
    shutil.copytree(small_store, old)
    root = zarr.open_group(str(old), mode="r+")
    attrs = dict(root.attrs["wsi_anomaly"])
    attrs.pop("qc")
    root.attrs["wsi_anomaly"] = attrs
    shutil.rmtree(old / "qc_values")
    shutil.rmtree(old / "qc_flags")
    store = TileStore(old)
    assert store.qc is None and store.qc_values is None and store.qc_flags is None
    assert len(store.read(0, 2)) == 2


def test_a_folded_flap_doubles_the_tissue_it_covers_and_bares_the_glass():
    rng = np.random.default_rng(4)
    tile, density = flat_tissue(rng)
    flapped = artifacts.fold_flap(tile, rng)
    od = -np.log(np.maximum(flapped.astype(np.float32), 1) / 255).sum(axis=-1)
    glass = np.all(flapped == 242, axis=-1).mean()
    # 20–40 % of the tile is bare glass, as much again carries two layers (~2× the density,
    # and a little more for the thicker stack); the rest is untouched.
    assert 0.1 < glass < 0.45
    doubled = (od > 1.8 * density).mean()
    assert abs(doubled - glass) < 0.1
    assert np.median(od[(od > 0.3) & (od < 1.5 * density)]) == pytest.approx(density, rel=0.1)
    # Over glass a flap is a single layer: glass is never darkened.
    blank = np.full((256, 256, 3), 242, np.uint8)
    assert (artifacts.fold_flap(blank, rng) == 242).all()


def two_tissues(rng: np.random.Generator) -> np.ndarray:
    """Pale pink stroma on the left, nuclei-dense purple epithelium (2.6 × its density) on
    the right, slightly noisy."""
    tile = np.empty((256, 256, 3), np.float32)
    tile[:, :128] = (225, 150, 200)
    tile[:, 128:] = (120, 80, 160)
    return np.clip(tile + rng.normal(0, 4, tile.shape), 0, 255).astype(np.uint8)


def test_colour_reference_is_each_stains_own_density():
    tile = two_tissues(np.random.default_rng(6))
    table = colour_reference_od(tile, np.ones(tile.shape[:2], bool))
    od = -np.log(np.maximum(tile.astype(np.float32), 1) / 255).sum(axis=-1)
    stroma, epithelium = np.median(od[:, :128]), np.median(od[:, 128:])
    values = np.unique(np.round(table, 1))
    # Each stain colour has its own single-layer density; colours not on the slide take the
    # nearest one's.
    assert values.min() == pytest.approx(stroma, abs=0.1)
    assert values.max() == pytest.approx(epithelium, abs=0.1)
    assert len(colour_reference_od(tile, np.zeros(tile.shape[:2], bool))) == 0


def test_a_second_layer_is_a_fold_and_dense_epithelium_is_not():
    rng = np.random.default_rng(7)
    tile = two_tissues(rng)
    colour = colour_reference_od(tile, np.ones(tile.shape[:2], bool))
    # A slide mostly of stroma: its median density is the stroma's.
    reference = reference_od(tile[:, :100], np.ones((256, 100), bool))
    # A second layer of stroma over the middle of the stroma (transmissions multiply; a
    # folded stack is a little darker still).
    folded = tile.astype(np.float32)
    folded[:, 32:96] *= tile[:, 32:96] / 242 * 0.9
    folded = np.clip(folded, 0, 255).astype(np.uint8)
    fold = VALUE_NAMES.index("fold")
    v_clean, v_folded = measure_tiles(np.stack([tile, folded]), None, reference, colour)
    # The second layer covers a quarter of the tissue.
    assert v_clean[fold] < 0.01 and 0.15 < v_folded[fold] <= 0.25
    assert flags_of(np.stack([tile, folded]), reference, colour)["fold"].tolist() == [False, True]
    # Judged against one density for the whole slide, the epithelium itself would look doubled.
    alone = measure_tiles(tile[None], None, reference)[0, fold]
    assert alone > QCSettings().max_fold
    # A threshold of 0 turns the flag off and skips the measurement.
    off = QCSettings(max_fold=0)
    values = measure_tiles(folded[None], off, reference, colour)
    assert np.isnan(values[0, fold]) and not flag_masks(flag_tiles(values, off))["fold"].any()


def test_meter_counts_its_own_cpu_time(clean, slide_refs):
    meter = TileQCMeter(QCSettings(), np.full(len(clean), 100.0), *slide_refs)
    meter.measure(0, clean)
    assert 0 < meter.cpu_seconds and 0 < meter.seconds
    # Flagging tiles already measured adds only the flagging, not a second measurement.
    before = meter.cpu_seconds
    values, flags = meter(0, clean)
    assert meter.cpu_seconds - before < before and len(flags) == len(clean)
    assert meter.record()["colour_reference_od"] == [float(v) for v in slide_refs[1]]


def test_a_shifted_fold_over_glass_leaves_glass():
    """Two layers only where both hold tissue: glass under glass stays glass, one layer of
    tissue over glass is that layer, not darker."""
    rng = np.random.default_rng(8)
    tile, density = flat_tissue(rng)
    tile[:, 128:] = 242  # the right half is bare glass
    folded = artifacts.fold(tile, rng)
    glass_both = (tile == 242).all(axis=-1) & (folded == 242).all(axis=-1)
    assert glass_both.mean() > 0.05  # some glass lies under glass and is left alone
    od = -np.log(np.maximum(folded.astype(np.float32), 1) / 242).sum(axis=-1)
    # Nowhere denser than two layers of the tissue, darkened for the stack.
    assert od.max() < 2 * density + 3 * -np.log(0.85) + 0.3
    assert (artifacts.fold(np.full((256, 256, 3), 242, np.uint8), rng) == 242).all()
