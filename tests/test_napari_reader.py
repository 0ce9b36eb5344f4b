"""The napari reader puts the slide, its heatmap and its tiles in one coordinate system."""

import json

import numpy as np
import pytest

napari = pytest.importorskip("napari", reason="napari is not installed (pip install '.[napari]')")

from wsi_anomaly.napari_reader import get_reader  # noqa: E402
from wsi_anomaly.slide import Slide  # noqa: E402
from wsi_anomaly.stitch import (  # noqa: E402
    ColourScale,
    SlideGeometry,
    SlideOutputs,
    render_slide_outputs,
)

TILE = 256
HOT = (3, 2)  # (column, row) of the one anomalous tile
QC_TILE = (5, 4)  # (column, row) of the one blurred tile


@pytest.fixture(scope="module")
def results(small_slide, tmp_path_factory):
    """A results folder for ``small_slide`` with one known anomalous tile."""
    folder = tmp_path_factory.mktemp("napari") / "small.tif"
    folder.mkdir()
    mpp = 0.5
    cols, rows = 2048 // TILE, 1536 // TILE
    grid_index = np.array([(c, r) for r in range(rows) for c in range(cols)], np.int64)
    coords = grid_index * TILE
    scores = np.full(len(coords), 0.2, np.float32)
    hot = int(np.flatnonzero((grid_index == HOT).all(axis=1))[0])
    scores[hot] = 0.95
    scale = ColourScale(vmin=0.0, vcenter=0.5, vmax=1.0)
    geometry = SlideGeometry(
        width=2048,
        height=1536,
        mpp=mpp,
        tile_size_l0=TILE,
        stride_l0=TILE,
        grid_cols=cols,
        grid_rows=rows,
    )
    render_slide_outputs(
        folder,
        SlideOutputs(
            slide_name="small.tif",
            geometry=geometry,
            coords=coords,
            grid_index=grid_index,
            scores=scores,
            max_scores=scores,
            thumbnail=np.full((96, 128, 3), 200, np.uint8),
            thumbnail_downsample=16.0,
            tissue_mask=np.ones((96, 128), bool),
            mask_downsample=16.0,
            scale=scale,
            top_tiles=[],
            tissue_fraction=np.ones(len(coords)),
        ),
    )
    # The QC flags of every tile: one known blurred tile.
    from wsi_anomaly.quality import write_qc_labels
    from wsi_anomaly.slide.qc import FLAG_NAMES

    flags = np.zeros(len(coords), np.uint16)
    flags[int(np.flatnonzero((grid_index == QC_TILE).all(axis=1))[0])] = 1 << FLAG_NAMES.index(
        "blur"
    )
    write_qc_labels(folder / "heatmap.ome.zarr", (rows, cols), grid_index, flags)
    (folder / "summary.json").write_text(
        json.dumps(
            {
                "slide": "small.tif",
                "slide_path": str(small_slide.path),
                "level0_mpp": mpp,
                "colour_scale": {"vmin": 0.0, "vcenter": 0.5, "vmax": 1.0, "cmap": "coolwarm"},
            }
        )
    )
    return folder, mpp


def test_reader_claims_results_folders_only(results, tmp_path):
    folder, _ = results
    assert get_reader(str(folder)) is not None
    assert get_reader(str(folder / "heatmap.ome.zarr")) is not None
    assert get_reader(str(tmp_path)) is None


def test_known_anomalous_square_lands_on_its_pixels(results):
    import npe2
    from napari.components import ViewerModel

    folder, mpp = results
    npe2.PluginManager.instance().discover()  # as napari does at start-up: finds our manifest
    viewer = ViewerModel()
    viewer.open(str(folder), plugin="wsi-anomaly")
    layers = {layer.name: layer for layer in viewer.layers}
    assert set(layers) >= {"small.tif", "small.tif anomaly score", "small.tif tiles"}
    heat, slide_layer = layers["small.tif anomaly score"], layers["small.tif"]
    assert heat.contrast_limits == [0.0, 1.0]

    def world(x_px: float, y_px: float) -> tuple[float, float]:
        return (y_px * mpp, x_px * mpp)  # level-0 pixel position → µm (napari: y, x)

    x0, y0 = HOT[0] * TILE, HOT[1] * TILE
    assert heat.get_value(world(x0 + TILE / 2, y0 + TILE / 2), world=True) == pytest.approx(0.95)
    # Just inside each edge of the hot tile, and just outside.
    for x, y in ((x0 + 4, y0 + 4), (x0 + TILE - 4, y0 + TILE - 4)):
        assert heat.get_value(world(x, y), world=True) == pytest.approx(0.95), (x, y)
    for x, y in ((x0 - 4, y0 + 100), (x0 + 100, y0 - 4), (x0 + TILE + 4, y0 + 100)):
        assert heat.get_value(world(x, y), world=True) == pytest.approx(0.2), (x, y)
    # The slide layer maps the same world point to the same level-0 pixel.
    data_yx = slide_layer.world_to_data(world(x0 + 100.5, y0 + 50.5))
    assert np.allclose(data_yx[:2], (y0 + 50, x0 + 100), atol=0.51)
    level0 = slide_layer.data[0] if slide_layer.multiscale else slide_layer.data
    with Slide(slide_layer.metadata["slide_path"]) as slide:
        expected = slide.read_level(0, x0 + 100, y0 + 50, 1, 1)[0, 0]
    assert np.array_equal(np.asarray(level0[y0 + 50, x0 + 100]), expected)
    # The tiles layer (labels on the tile grid) carries the scores, the hot one in its place.
    tiles = layers["small.tif tiles"]
    assert tiles._type_string == "labels" and not tiles.visible
    tiles.visible = True  # napari reports no value for a hidden layer
    label = tiles.get_value(world(x0 + TILE / 2, y0 + TILE / 2), world=True)
    row = tiles.features[tiles.features["index"] == label].iloc[0]
    assert row["anomaly_score"] == pytest.approx(0.95) and row["class"] == "Anomalous"
    for x, y in ((x0 + 2, y0 + 2), (x0 + TILE - 2, y0 + TILE - 2)):
        assert tiles.get_value(world(x, y), world=True) == label
    assert tiles.get_value(world(x0 - 2, y0 + 2), world=True) != label
    # Every layer is in micrometres, as its scale is.
    for layer in viewer.layers:
        assert [str(u) for u in layer.units] == ["micrometer", "micrometer"], layer.name


def test_layers_say_which_tile_score_they_show(results, tmp_path):
    import shutil

    from wsi_anomaly.napari_reader import read_results

    folder, _ = results
    layers = {kwargs["name"]: kwargs for _, kwargs, _ in read_results(str(folder))}
    # a summary that records no tile score: the map's mean, as results had before
    assert layers["small.tif tiles"]["metadata"]["tile_score"] == "mean"
    copy = tmp_path / "small.tif"
    shutil.copytree(folder, copy)
    summary = json.loads((copy / "summary.json").read_text())
    (copy / "summary.json").write_text(json.dumps({**summary, "tile_score": "max"}))
    layers = {kwargs["name"]: kwargs for _, kwargs, _ in read_results(str(copy))}
    assert "small.tif anomaly score (map max)" in layers
    assert layers["small.tif tiles"]["metadata"]["tile_score"] == "max"


@pytest.fixture
def fresh_napari_settings(monkeypatch):
    """napari settings of this test only (nothing read from or saved to the user's file)."""
    import napari.settings as napari_settings

    settings = napari_settings.NapariSettings(config_path=None)
    monkeypatch.setattr(napari_settings, "_SETTINGS", settings)
    return settings


def _names(viewer):
    return {layer.name for layer in viewer.layers}


def test_napari_opens_a_results_folder_with_no_choice_to_make(results, fresh_napari_settings):
    """napari's own open path (plugin=None), as `napari results/<slide>/` takes it."""
    import npe2
    from napari.components import ViewerModel

    from wsi_anomaly.napari_reader import MARKER_NAME, prefer_for_results_folders
    from wsi_anomaly.outputs import mark_owned
    from wsi_anomaly.pipeline import RESULT_KIND

    folder, _ = results
    mark_owned(folder, RESULT_KIND)  # as heatmap marks every results folder
    assert MARKER_NAME == ".wsi-anomaly" and (folder / MARKER_NAME).is_file()
    npe2.PluginManager.instance().discover()
    expected = {"small.tif", "small.tif anomaly score", "small.tif tiles"}

    # The marker file is claimed by this reader alone: no choice, with or without preferences.
    viewer = ViewerModel()
    viewer.open(str(folder / MARKER_NAME), plugin=None)
    assert _names(viewer) >= expected

    # The folder: with the preference recorded, napari picks this reader by itself.
    added = prefer_for_results_folders(fresh_napari_settings)
    assert added and all(
        fresh_napari_settings.plugins.extension2reader[p] == "wsi-anomaly" for p in added
    )
    assert prefer_for_results_folders(fresh_napari_settings) == []  # idempotent
    viewer = ViewerModel()
    viewer.open(str(folder), plugin=None)
    assert _names(viewer) >= expected
    assert not any(layer.name.endswith(".png") for layer in viewer.layers)  # not a PNG stack


def test_other_folders_keep_napari_s_choice(tmp_path, fresh_napari_settings):
    from napari.components import ViewerModel

    from wsi_anomaly.napari_reader import get_reader, prefer_for_results_folders

    prefer_for_results_folders(fresh_napari_settings)
    plain = tmp_path / "images"
    plain.mkdir()
    Image = pytest.importorskip("PIL.Image")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(plain / "a.png")
    assert get_reader(str(plain)) is None
    viewer = ViewerModel()
    viewer.open(str(plain), plugin="napari")  # napari's own reader still reads it
    assert len(viewer.layers) == 1


def test_napari_setup_command_records_the_preference(fresh_napari_settings, capsys):
    from wsi_anomaly.cli import main

    assert main(["napari-setup"]) == 0
    assert "with the wsi-anomaly reader" in capsys.readouterr().out
    prefs = fresh_napari_settings.plugins.extension2reader
    assert prefs["*.svs/"] == "wsi-anomaly" and prefs["*.ndpi-*/"] == "wsi-anomaly"


def test_qc_flags_layer_marks_the_flagged_tile(results):
    import npe2
    from napari.components import ViewerModel

    from wsi_anomaly.slide.qc import FLAG_NAMES

    folder, mpp = results
    npe2.PluginManager.instance().discover()
    viewer = ViewerModel()
    viewer.open(str(folder), plugin="wsi-anomaly")
    layer = {lay.name: lay for lay in viewer.layers}["small.tif QC flags"]
    assert not layer.visible  # shown on demand
    layer.visible = True
    x0, y0 = QC_TILE[0] * TILE, QC_TILE[1] * TILE
    inside = ((y0 + TILE / 2) * mpp, (x0 + TILE / 2) * mpp)
    outside = ((y0 + TILE / 2) * mpp, (x0 - TILE / 2) * mpp)
    assert layer.get_value(inside, world=True) == FLAG_NAMES.index("blur") + 1
    assert layer.get_value(outside, world=True) == 0
