"""Per-slide outputs: pixel alignment, QuPath GeoJSON, OME-NGFF, fixed colours, atomic writes."""

from __future__ import annotations

import json
import math
import os
import uuid

import numpy as np
import pytest
import zarr
from PIL import Image

from wsi_anomaly.stitch import (
    ColourScale,
    DisplaySettings,
    SlideGeometry,
    SlideOutputs,
    display_geometry,
    qupath_measurement_names,
    render_slide_outputs,
)

SCALE = ColourScale(vmin=0.2, vcenter=0.5, vmax=0.9)
OUTPUTS = {
    "heatmap.png",
    "overlay.png",
    "thumbnail.png",
    "heatmap.ome.zarr",
    "tiles.geojson",
    "tiles.csv",
    "top_tiles.png",
}
HOT = {(3, 2), (4, 2), (3, 3), (4, 3)}  # (col, row): the anomalous square
SKIPPED = {(0, 0), (10, 7), (6, 5)}  # cells without a scored tile
TISSUE_L0 = (640, 320, 2560, 1600)  # x0, y0, x1, y1 of the tissue rectangle


def synthetic_slide(width=3000, height=2200, stride=256.0, hot_score=1.5, seed=0, shared=None):
    """The pieces of a SlideOutputs: every grid cell but SKIPPED scored, HOT ones high.

    ``shared`` = ((col, row), score) forces one cell's score (for cross-slide colour checks).
    """
    rng = np.random.default_rng(seed)
    cols, rows = int((width - stride) // stride + 1), int((height - stride) // stride + 1)
    geometry = SlideGeometry(
        width,
        height,
        mpp=0.5,
        tile_size_l0=stride,
        stride_l0=stride,
        grid_cols=cols,
        grid_rows=rows,
    )
    cells = [(c, r) for r in range(rows) for c in range(cols) if (c, r) not in SKIPPED]
    grid_index = np.array(cells, np.int32)
    coords = np.rint(grid_index * stride).astype(np.int64)  # as slide/grid.py lays them
    scores = rng.uniform(0.1, 0.3, len(cells)).astype(np.float32)
    for i, cell in enumerate(cells):
        if cell in HOT:
            scores[i] = hot_score
        if shared is not None and cell == shared[0]:
            scores[i] = shared[1]
    # Thumbnail and mask a fraction of a pixel short of the slide, as OpenSlide returns them.
    thumbnail = np.full((height // 16, width // 16, 3), 235, np.uint8)
    x0, y0, x1, y1 = TISSUE_L0
    thumbnail[y0 // 16 : y1 // 16, x0 // 16 : x1 // 16] = (200, 120, 180)
    mask = np.zeros((height // 32, width // 32), bool)
    mask[y0 // 32 : y1 // 32, x0 // 32 : x1 // 32] = True
    order = np.argsort(-scores)[:6]
    top = [(int(i), rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for i in order]
    return dict(
        slide_name=f"slide{seed}",
        geometry=geometry,
        coords=coords,
        grid_index=grid_index,
        scores=scores,
        max_scores=scores * 2 + 0.1,
        thumbnail=thumbnail,
        thumbnail_downsample=16.0,
        tissue_mask=mask,
        mask_downsample=32.0,
        scale=SCALE,
        top_tiles=top,
    )


def draw(out, max_px: int = 2048, alpha: float = 0.5, **pieces) -> dict[str, str]:
    """The outputs of a :class:`SlideOutputs` of ``pieces`` drawn at ``max_px`` and ``alpha``."""
    display = DisplaySettings(max_px=max_px, alpha=alpha)
    return render_slide_outputs(out, SlideOutputs(**pieces, display=display))


def read_png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGBA"))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("slide")
    inputs = synthetic_slide()
    paths = draw(out, max_px=512, **inputs)
    return out, inputs, paths


def test_display_geometry_rule():
    # 70k slide, 512 px cells at level 0: 14 px per cell, canvas ≤ 2048, whole slide covered
    big = SlideGeometry(70000, 60000, 0.25, 512.0, 512.0, 136, 117)
    d, (w, h) = display_geometry(big, 2048)
    assert d == pytest.approx(512 / 14) and max(w, h) <= 2048
    assert (w - 1) * d < 70000 <= w * d and (h - 1) * d < 60000 <= h * d
    # a small slide is never upsampled
    small = SlideGeometry(1000, 800, 0.5, 256.0, 256.0, 3, 3)
    assert display_geometry(small, 2048) == (1.0, (1000, 800))
    # cells below one pixel: d = longest side / max_px
    assert display_geometry(big, 100) == (700.0, (100, 86))


def test_heatmap_lines_up_with_slide(written):
    out, inputs, paths = written
    geometry, coords, grid_index = inputs["geometry"], inputs["coords"], inputs["grid_index"]
    d, (w, h) = display_geometry(geometry, 512)
    k = geometry.stride_l0 / d
    assert k == round(k) and max(w, h) <= 512
    # bottom-right canvas pixel contains the slide's bottom-right level-0 pixel
    assert (w - 1) * d < geometry.width <= w * d and (h - 1) * d < geometry.height <= h * d

    heat = read_png(paths["heatmap"])
    assert Image.open(paths["heatmap"]).text == {
        "display_downsample": repr(d),
        "canvas_px": f"{w}x{h}",
    }
    canvas = heat[:h, :w]
    hot = (canvas[..., 3] == 255) & (canvas[..., 0] > 150) & (canvas[..., 2] < 100)
    ys, xs = np.nonzero(hot)
    # every hot pixel maps back (via d) into the level-0 cell of a hot tile ...
    cells = {
        (int(c), int(r))
        for c, r in zip((xs + 0.5) * d // geometry.stride_l0, (ys + 0.5) * d // geometry.stride_l0)
    }
    assert cells == HOT
    # ... and the hot cells are filled completely: crisp k×k squares at round(x / d)
    assert hot.sum() == len(HOT) * k * k
    hot_xy = coords[[tuple(c) in HOT for c in grid_index.tolist()]]
    assert xs.min() == round(hot_xy[:, 0].min() / d) and ys.min() == round(hot_xy[:, 1].min() / d)
    assert xs.max() + 1 == round((hot_xy[:, 0].max() + geometry.stride_l0) / d)
    assert ys.max() + 1 == round((hot_xy[:, 1].max() + geometry.stride_l0) / d)
    # cells without a tile, and the strip right of the grid, are transparent
    for col, row in SKIPPED:
        assert canvas[int((row + 0.5) * k), int((col + 0.5) * k), 3] == 0
    assert (canvas[:, math.ceil(geometry.grid_cols * k) :, 3] == 0).all()
    # legend panel to the right, not over the aligned canvas
    assert heat.shape[1] > w and (heat[:, w:, 3] == 255).all()


def test_overlay_and_thumbnail_share_the_canvas(written):
    out, inputs, paths = written
    d, (w, h) = display_geometry(inputs["geometry"], 512)
    thumb = read_png(paths["thumbnail"])
    overlay = read_png(paths["overlay"])
    assert thumb.shape[:2] == (h, w)
    assert overlay.shape == read_png(paths["heatmap"]).shape and overlay.shape[1] > w
    assert Image.open(paths["overlay"]).text == Image.open(paths["thumbnail"]).text
    k = round(inputs["geometry"].stride_l0 / d)
    hot_px = (int(2.5 * k), int(3.5 * k))  # centre of cell (3, 2)
    skipped_px = (int(0.5 * k), int(0.5 * k))  # centre of cell (0, 0), no tile
    assert (overlay[skipped_px][:3] == thumb[skipped_px][:3]).all()  # background clear
    assert overlay[hot_px][0] > thumb[hot_px][0] - 60 and overlay[hot_px][2] < thumb[hot_px][2]

    # the tissue contour sits on the tissue rectangle's edges (level-0 → canvas via d)
    green = (thumb[..., 1] > 150) & (thumb[..., 0] < 60) & (thumb[..., 2] < 60)
    ys, xs = np.nonzero(green)
    assert len(xs) > 0
    x0, y0, x1, y1 = (v / d for v in TISSUE_L0)
    near_edge = (
        (np.abs(xs + 0.5 - x0) <= 2)
        | (np.abs(xs + 0.5 - x1) <= 2)
        | (np.abs(ys + 0.5 - y0) <= 2)
        | (np.abs(ys + 0.5 - y1) <= 2)
    )
    assert near_edge.all()
    for edge, values in ((x0, xs), (x1, xs), (y0, ys), (y1, ys)):
        assert (np.abs(values + 0.5 - edge) <= 2).any()
    # the thumbnail's own tissue colour lands in the same place
    cy, cx = int((y0 + y1) / 2), int((x0 + x1) / 2)
    assert tuple(thumb[cy, cx, :3]) == (200, 120, 180)
    assert tuple(thumb[int(y0) - 4, cx, :3]) == (235, 235, 235)


def test_hot_tiles_geojson_at_their_coords(written):
    out, inputs, paths = written
    features = json.loads(open(paths["geojson"]).read())["features"]
    s = inputs["geometry"].tile_size_l0
    anomalous = {}
    for f in features:
        if "classification" in f["properties"]:
            assert f["properties"]["classification"]["name"] == "Anomalous"
            anomalous[tuple(f["geometry"]["coordinates"][0][0])] = f
    expected = {
        tuple(xy)
        for xy, cell in zip(inputs["coords"].tolist(), inputs["grid_index"].tolist())
        if tuple(cell) in HOT
    }
    assert set(anomalous) == expected
    for (x, y), f in anomalous.items():
        assert f["geometry"]["coordinates"] == [
            [[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]
        ]
        score_name = qupath_measurement_names(None)["anomaly_score"]
        assert f["properties"]["measurements"][score_name] == pytest.approx(1.5)


def test_geojson_follows_qupath_rules(tmp_path):
    inputs = synthetic_slide(seed=3)
    inputs["scores"][5] = np.nan  # a failed tile must not produce NaN in JSON
    paths = draw(tmp_path, max_px=256, **inputs)

    def no_constants(name):
        raise AssertionError(f"non-JSON constant {name}")

    doc = json.loads(open(paths["geojson"]).read(), parse_constant=no_constants)
    assert doc["type"] == "FeatureCollection"
    features = doc["features"]
    assert len(features) == len(inputs["coords"])
    ids = [f["id"] for f in features]
    assert len(set(ids)) == len(ids)
    for f in features:
        assert f["type"] == "Feature" and str(uuid.UUID(f["id"])) == f["id"]
        assert f["geometry"]["type"] == "Polygon"
        ring = f["geometry"]["coordinates"][0]
        assert len(ring) == 5 and ring[0] == ring[-1]
        props = f["properties"]
        assert props["objectType"] == "tile"
        assert isinstance(props["measurements"], dict)
        assert all(
            isinstance(v, float) and math.isfinite(v) for v in props["measurements"].values()
        )
        if "classification" in props:
            cls = props["classification"]
            assert cls["name"] and len(cls["color"]) == 3
            assert all(isinstance(c, int) and 0 <= c <= 255 for c in cls["color"])
    assert (
        qupath_measurement_names(None)["anomaly_score"]
        not in (features[5]["properties"]["measurements"])
    )
    # ids are deterministic: the same slide written again gives the same ids
    again = draw(tmp_path, max_px=256, **inputs)
    assert [f["id"] for f in json.loads(open(again["geojson"]).read())["features"]] == ids


def test_two_models_tiles_can_be_told_apart_in_qupath(tmp_path):
    """QuPath drops the collection's properties: the model must show on every tile."""
    inputs = synthetic_slide(seed=3)
    docs = []
    for sha in ("a" * 64, "b" * 64):
        prov = {"model_sha256": sha, "model_name": "haloae", "slide_fingerprint": "f00"}
        paths = draw(tmp_path / sha[0], max_px=256, provenance=prov, **inputs)
        docs.append(json.loads(open(paths["geojson"]).read())["features"])
    ids = [{f["id"] for f in features} for features in docs]
    assert len(ids[0]) == len(docs[0]) and not ids[0] & ids[1]
    for features, tag in zip(docs, ("aaaaaaaa", "bbbbbbbb")):
        for f in features:
            props = f["properties"]
            assert props["name"] == f"haloae {tag}"
            assert set(props["measurements"]) <= {
                f"anomaly_score [{tag}]",
                f"anomaly_max [{tag}]",
                f"anomaly_threshold [{tag}]",
            }
            assert props["measurements"][f"anomaly_threshold [{tag}]"] == pytest.approx(
                inputs["scale"].threshold
            )


def test_ngff_score_grid(written):
    out, inputs, paths = written
    geometry = inputs["geometry"]
    group = zarr.open_group(paths["ngff"], mode="r")
    ome = group.attrs["ome"]
    assert ome["version"] == "0.5"
    (ms,) = ome["multiscales"]
    assert [(a["name"], a["type"], a["unit"]) for a in ms["axes"]] == [
        ("y", "space", "micrometer"),
        ("x", "space", "micrometer"),
    ]
    cell_um = geometry.stride_l0 * geometry.mpp
    level0 = ms["datasets"][0]
    assert level0["path"] == "0"
    scale_t, translation_t = level0["coordinateTransformations"]
    assert scale_t == {"type": "scale", "scale": [cell_um, cell_um]}
    # pixel centre = index·scale + translation = the cell centre in slide micrometres
    assert translation_t == {"type": "translation", "translation": [cell_um / 2, cell_um / 2]}

    grid = group["0"][...]
    assert grid.shape == (geometry.grid_rows, geometry.grid_cols) and grid.dtype == np.float32
    assert tuple(group["0"].metadata.dimension_names) == ("y", "x")
    for col, row in SKIPPED:
        assert np.isnan(grid[row, col])
    cols, rows = inputs["grid_index"].T
    np.testing.assert_array_equal(grid[rows, cols], inputs["scores"])
    assert np.isfinite(grid).sum() == len(inputs["scores"])

    # level 1: 2× coarser, mean over the cells that have a tile, centres shifted accordingly
    level1 = ms["datasets"][1]
    assert level1["coordinateTransformations"][0]["scale"] == [2 * cell_um, 2 * cell_um]
    assert level1["coordinateTransformations"][1]["translation"] == [cell_um, cell_um]
    coarse = group["1"][...]
    assert coarse.shape == (math.ceil(geometry.grid_rows / 2), math.ceil(geometry.grid_cols / 2))
    assert coarse[0, 0] == pytest.approx(np.nanmean(grid[:2, :2]))  # (0, 0) has no tile
    assert coarse[1, 1] == pytest.approx(grid[2:4, 2:4].mean())
    assert coarse[3, 5] == pytest.approx(grid[6, 10])  # odd edge; (10, 7) has no tile


def test_same_score_same_colour_on_two_slides(tmp_path):
    shared = ((7, 1), 0.7)
    a = synthetic_slide(seed=1, shared=shared)
    b = synthetic_slide(width=5000, height=1800, stride=512.0, hot_score=4.0, seed=2, shared=shared)
    colours = []
    for name, inputs, max_px in (("a", a, 512), ("b", b, 300)):
        out = tmp_path / name
        out.mkdir()
        paths = draw(out, max_px=max_px, **inputs)
        d, _ = display_geometry(inputs["geometry"], max_px)
        stride = inputs["geometry"].stride_l0
        px = (int((1.5 * stride) / d), int((7.5 * stride) / d))
        colours.append(read_png(paths["heatmap"])[px])
    assert (colours[0] == colours[1]).all() and colours[0][3] == 255
    assert (colours[0][:3] == SCALE.to_rgb(np.array([0.7], np.float32))[0]).all()


def test_no_temporary_files_left_and_rewrite(tmp_path):
    inputs = synthetic_slide(seed=4)
    paths = draw(tmp_path, max_px=128, **inputs)
    assert set(os.listdir(tmp_path)) == OUTPUTS
    assert {os.path.basename(p) for p in paths.values()} == OUTPUTS
    inputs["scores"][:] = 0.25  # a re-run replaces every output, the zarr directory included
    draw(tmp_path, max_px=128, **inputs)
    assert set(os.listdir(tmp_path)) == OUTPUTS
    grid = zarr.open_group(str(tmp_path / "heatmap.ome.zarr"), mode="r")["0"][...]
    assert np.nanmax(grid) == pytest.approx(0.25)


def test_no_tissue_slide_still_writes_every_output(tmp_path):
    inputs = synthetic_slide(seed=5)
    for key in ("coords", "grid_index"):
        inputs[key] = inputs[key][:0]
    for key in ("scores", "max_scores"):
        inputs[key] = inputs[key][:0]
    inputs["top_tiles"] = []
    paths = draw(tmp_path, max_px=128, **inputs)
    assert set(os.listdir(tmp_path)) == OUTPUTS
    _, (w, h) = display_geometry(inputs["geometry"], 128)
    assert (read_png(paths["heatmap"])[:h, :w, 3] == 0).all()
    doc = json.loads(open(paths["geojson"]).read())
    assert doc["type"] == "FeatureCollection" and doc["features"] == []
    assert (
        open(paths["tiles_csv"]).read().strip()
        == "x,y,width,height,score,max,tissue_fraction,class"
    )
    assert np.isnan(zarr.open_group(paths["ngff"], mode="r")["0"][...]).all()


def test_tile_table_geojson_lock_and_provenance(tmp_path):
    import csv as _csv
    import json as _json

    import zarr

    geometry = SlideGeometry(
        width=1024, height=512, mpp=0.5, tile_size_l0=256, stride_l0=256, grid_cols=4, grid_rows=2
    )
    coords = np.array([[0, 0], [256, 0], [512, 256]], np.int64)
    grid_index = coords // 256
    scores = np.array([0.1, 0.9, np.nan], np.float32)
    scale = ColourScale(vmin=0.0, vcenter=0.5, vmax=1.0, cmap="coolwarm")
    provenance = {"model_sha256": "abc123", "slide_fingerprint": "f00"}
    outputs = render_slide_outputs(
        tmp_path,
        SlideOutputs(
            slide_name="s.tif",
            geometry=geometry,
            coords=coords,
            grid_index=grid_index,
            scores=scores,
            max_scores=scores + 0.05,
            thumbnail=np.full((64, 128, 3), 255, np.uint8),
            thumbnail_downsample=8.0,
            tissue_mask=np.ones((64, 128), bool),
            mask_downsample=8.0,
            scale=scale,
            top_tiles=[],
            tissue_fraction=np.array([1.0, 0.75, 0.5]),
            provenance=provenance,
        ),
    )
    rows = list(_csv.DictReader(open(outputs["tiles_csv"])))
    assert [(r["x"], r["y"], r["width"], r["class"]) for r in rows] == [
        ("0", "0", "256", ""),
        ("256", "0", "256", "Anomalous"),
        ("512", "256", "256", ""),
    ]
    assert float(rows[1]["score"]) == pytest.approx(0.9) and rows[1]["tissue_fraction"] == "0.75"
    assert rows[2]["score"] == ""  # no score: empty, not "nan"
    doc = _json.loads(open(outputs["geojson"]).read())
    assert doc["properties"]["wsi_anomaly"]["model_sha256"] == "abc123"
    assert all(f["properties"]["isLocked"] is True for f in doc["features"])
    attrs = zarr.open_group(outputs["ngff"], mode="r").attrs
    assert attrs["wsi_anomaly"]["model_sha256"] == "abc123"
    assert "." in attrs["wsi_anomaly"]["images"]
    window = attrs["ome"]["omero"]["channels"][0]["window"]
    assert (window["start"], window["end"]) == (0.0, 1.0)


# -- --scale slide, --alpha, the title -----------------------------------------------------------
def test_slide_scale_mirrors_the_fixed_one_on_the_slides_percentiles():
    from wsi_anomaly.stitch import colour_scale, slide_colour_scale

    scores = np.random.default_rng(3).gamma(2.0, 0.1, 500).astype(np.float32)
    scores[:3] = np.nan  # ignored
    own = slide_colour_scale(scores, SCALE)
    finite = scores[np.isfinite(scores)]
    quantiles = {"0.5": np.quantile(finite, 0.5), "0.99": np.quantile(finite, 0.99)}
    same = colour_scale({"score_quantiles": quantiles}, "mean", SCALE.cmap)
    assert (own.vmin, own.vcenter, own.vmax) == pytest.approx((same.vmin, same.vcenter, same.vmax))
    assert own.basis == "slide" and same.basis == "training"
    # the "Anomalous" class stays on the model's threshold
    assert own.anomalous_at == SCALE.vcenter and own.threshold == SCALE.threshold == 0.5
    assert ColourScale.from_dict(
        {"vmin": 0, "vcenter": 1, "vmax": 2, "basis": "slide", "anomalous_at": 0.5}
    ) == ColourScale(0.0, 1.0, 2.0, basis="slide", anomalous_at=0.5)


def test_slide_scale_pictures_differ_and_are_labelled(written, tmp_path):
    from wsi_anomaly.stitch import legend_words, scale_label, slide_colour_scale

    out, inputs, paths = written
    own = slide_colour_scale(inputs["scores"], SCALE)
    slide_paths = draw(tmp_path, max_px=512, **{**inputs, "scale": own})
    d, (w, h) = display_geometry(inputs["geometry"], 512)
    fixed_png, slide_png = read_png(paths["heatmap"]), read_png(slide_paths["heatmap"])
    assert fixed_png.shape == slide_png.shape
    assert not (fixed_png[:h, :w] == slide_png[:h, :w]).all()  # other colours on the canvas
    assert not (fixed_png[:, w:] == slide_png[:, w:]).all()  # another legend
    assert "slide" in scale_label(own) and "fixed" in scale_label(SCALE)
    assert "this slide's tiles" in legend_words(own)[-1]
    assert "training tiles" in legend_words(SCALE)[-1]
    omero = zarr.open_group(slide_paths["ngff"], mode="r").attrs["ome"]["omero"]
    assert "this slide's scale" in omero["channels"][0]["label"]
    assert omero["channels"][0]["window"]["end"] == pytest.approx(own.vmax)
    fixed_omero = zarr.open_group(paths["ngff"], mode="r").attrs["ome"]["omero"]
    assert "fixed training scale" in fixed_omero["channels"][0]["label"]
    # the class is the model's, not the picture's: the same tiles are Anomalous either way
    with open(paths["tiles_csv"]) as a, open(slide_paths["tiles_csv"]) as b:
        assert a.read() == b.read()
    classes = [
        [f["properties"].get("classification", {}).get("name") for f in json.load(f)["features"]]
        for f in (open(paths["geojson"]), open(slide_paths["geojson"]))
    ]
    assert classes[0] == classes[1] and "Anomalous" in classes[0]


def test_alpha_sets_the_overlay_blend(written, tmp_path):
    out, inputs, paths = written
    d, (w, h) = display_geometry(inputs["geometry"], 512)
    heat = read_png(paths["heatmap"])[:h, :w]
    thumb = read_png(paths["thumbnail"])
    opaque = read_png(draw(tmp_path, max_px=512, alpha=1.0, **inputs)["overlay"])
    painted = heat[..., 3] == 255
    assert (opaque[:h, :w][painted][:, :3] == heat[painted][:, :3]).all()
    clear = read_png(draw(tmp_path / "clear", max_px=512, alpha=0.0, **inputs)["overlay"])
    slide_px = ~(thumb[..., :3] == (0, 200, 0)).all(axis=-1)  # not the tissue contour
    assert (np.abs(clear[:h, :w, :3].astype(int) - thumb[..., :3])[slide_px] <= 1).all()
    with pytest.raises(ValueError, match="alpha"):
        draw(tmp_path / "bad", max_px=512, alpha=1.5, **inputs)


def test_title_names_slide_and_model(written, tmp_path):
    from wsi_anomaly.stitch import figure_title

    provenance = {"model_file": "model.pt", "model_name": "haloae", "model_sha256": "ab" * 32}
    title = figure_title("slide0", provenance)
    assert title == "slide0 · model model.pt (haloae, sha256 abababababab)"
    assert figure_title("s", {}) == "s · model unknown model"
    out, inputs, paths = written
    d, (w, h) = display_geometry(inputs["geometry"], 512)
    titled = draw(tmp_path, max_px=512, provenance=provenance, **inputs)
    for name in ("heatmap", "overlay"):
        a, b = read_png(paths[name]), read_png(titled[name])
        assert (a[:h, :w] == b[:h, :w]).all()  # the canvas is untouched
        assert not (a[:40, w:] == b[:40, w:]).all()  # the title sits atop the panel


def test_tile_score_max_colours_classes_and_grids_by_the_peak(tmp_path):
    """A family that ranks tiles by their map's maximum: the peaks are coloured, put in the
    NGFF grid and classed; tiles.csv and the GeoJSON keep the mean as ``score`` beside them."""
    import csv as _csv

    inputs = synthetic_slide()
    means = inputs["scores"]
    hot = np.array([tuple(c) in HOT for c in inputs["grid_index"].tolist()])
    # the peaks order tiles otherwise than the means: the HOT tiles (high means) have low peaks,
    # a few tiles with low means have the high ones
    peaks = np.full(len(means), 0.3, np.float32)
    peaks[hot] = 0.35
    high_peak = np.flatnonzero(~hot)[:5]
    peaks[high_peak] = 1.5
    inputs = {**inputs, "max_scores": peaks}
    paths = draw(tmp_path, max_px=512, tile_score="max", **inputs)

    rows = list(_csv.DictReader(open(paths["tiles_csv"])))
    classed = np.array([r["class"] == "Anomalous" for r in rows])
    assert (classed == (peaks >= SCALE.threshold)).all() and classed.sum() == len(high_peak)
    assert not classed[hot].any()  # high means, but their peaks are below the threshold
    np.testing.assert_allclose([float(r["score"]) for r in rows], means, rtol=1e-5)
    np.testing.assert_allclose([float(r["max"]) for r in rows], peaks, rtol=1e-5)

    doc = json.loads(open(paths["geojson"]).read())
    geo_classed = np.array(["classification" in f["properties"] for f in doc["features"]])
    assert (geo_classed == classed).all()
    names = qupath_measurement_names(None)
    first = doc["features"][int(high_peak[0])]["properties"]["measurements"]
    assert first[names["anomaly_max"]] == pytest.approx(1.5)
    assert first[names["anomaly_score"]] == pytest.approx(float(means[high_peak[0]]))

    grid = zarr.open_group(paths["ngff"], mode="r")["0"][...]
    col, row = inputs["grid_index"][:, 0], inputs["grid_index"][:, 1]
    np.testing.assert_allclose(grid[row, col], peaks)

    # the heatmap paints each cell in its peak's colour
    d, (w, h) = display_geometry(inputs["geometry"], 512)
    k = inputs["geometry"].stride_l0 / d
    heat = read_png(paths["heatmap"])[:h, :w]
    for i in (int(high_peak[0]), int(np.flatnonzero(hot)[0])):
        c, r = inputs["grid_index"][i]
        pixel = heat[int((r + 0.5) * k), int((c + 0.5) * k), :3]
        assert tuple(pixel) == tuple(SCALE.to_rgb(np.array([peaks[i]]))[0])

    # the same pieces on the mean: the HOT tiles are the anomalous ones, as before
    by_mean = draw(tmp_path / "mean", max_px=512, **inputs)
    mean_rows = list(_csv.DictReader(open(by_mean["tiles_csv"])))
    assert [r["class"] == "Anomalous" for r in mean_rows] == hot.tolist()
    with pytest.raises(ValueError, match="tile_score"):
        draw(tmp_path / "bad", max_px=512, tile_score="median", **inputs)


def test_recorded_tile_score_defaults_to_the_mean_and_refuses_others():
    from wsi_anomaly.errors import InvalidInputError
    from wsi_anomaly.stitch import recorded_tile_score

    assert recorded_tile_score({}) == "mean" and recorded_tile_score(None) == "mean"
    assert recorded_tile_score({"tile_score": "max"}) == "max"
    with pytest.raises(InvalidInputError, match="summary.json.*'p95'"):
        recorded_tile_score({"tile_score": "p95"}, "summary.json")
