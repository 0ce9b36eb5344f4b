"""The model family decides a tile's score on slides: PatchCore's tiles are ranked, coloured and
classed by their map's maximum, against the calibration's quantiles of maxima, and the results
record it so that re-drawing, the viewer and the napari reader (which do not load the model)
do the same; HaloAE's stay on the map's mean."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
import zarr

from wsi_anomaly.cli import main
from wsi_anomaly.config import load_config
from wsi_anomaly.models.calibration import Calibration
from wsi_anomaly.models.registry import FAMILIES
from wsi_anomaly.pipeline import HeatmapSettings, process_slide
from wsi_anomaly.stitch import TILE_SCORES
from wsi_anomaly.tiles import TileStore


def settings(**kw):
    return HeatmapSettings(device="cpu", batch_size=8, progress=False, **kw)


def copied_results(patchcore_results, tmp_path):
    """A copy of the fitted PatchCore's results root (tests change it) and its slide folder."""
    source_root, source, _ = patchcore_results
    root = tmp_path / "results"
    shutil.copytree(source_root, root)
    return root, root / source.name


def forbid_scoring(monkeypatch) -> None:
    """Any tile scored from here on fails the test."""
    from wsi_anomaly.pipeline import slide_run

    def refuse(*args, **kwargs):
        raise AssertionError("a tile was scored")

    monkeypatch.setattr(slide_run, "_score_shards", refuse)


def read_classes(folder) -> np.ndarray:
    with open(folder / "tiles.csv", newline="") as fh:
        return np.array([row["class"] == "Anomalous" for row in csv.DictReader(fh)])


def read_column(folder, name: str) -> np.ndarray:
    with open(folder / "tiles.csv", newline="") as fh:
        return np.array([float(row[name]) for row in csv.DictReader(fh)])


def score_grid(folder) -> np.ndarray:
    return np.asarray(zarr.open_group(str(folder / "heatmap.ome.zarr"), mode="r")["0"][...])


def at_tiles(grid: np.ndarray, store: TileStore) -> np.ndarray:
    col, row = store.grid_index[:, 0], store.grid_index[:, 1]
    return grid[row, col]


def test_every_family_names_one_of_its_two_values():
    for name in FAMILIES:
        family = FAMILIES[name]
        assert family.tile_score in TILE_SCORES, name
        if family.has_maps:  # the headline of its score names
            assert family.tile_score == family.score_names[0], name
    assert FAMILIES["patchcore"].tile_score == "max"
    assert FAMILIES["haloae"].tile_score == "mean"


@pytest.fixture(scope="module")
def patchcore_model(small_store, tmp_path_factory):
    """A tiny PatchCore (random backbone) fitted on the small slide's tiles, its calibration
    set so that mean and max class the slide's tiles differently: the threshold of maxima at
    the normal tiles' median maximum (about half the tiles above it), the threshold of means
    above any tile's maximum (no tile above it by its mean, as the mean never exceeds the max).
    """
    from wsi_anomaly.tiles.dataset import ZarrTileDataset
    from wsi_anomaly.training import train_model

    folder = tmp_path_factory.mktemp("patchcore-tile-score")
    config = load_config(
        "patchcore_fast",
        {
            "model": {"backbone_weights": "random"},
            "patchcore": {
                "target_dim": 32,
                "coreset_budget": 64,
                "projection_dim": 16,
                "image_px": 64,
            },
            "train": {"workers": 0, "calibration_tiles": 16},
        },
    )
    fitted = folder / "fitted.pt"
    train_model(
        ZarrTileDataset(small_store), config, fitted, device="cpu", tile_mpp=0.5, progress=False
    )
    ckpt = torch.load(fitted, weights_only=True)
    cal = ckpt["calibration"]
    peaks = cal["max_score_quantiles"]
    peaks["0.99"] = peaks["0.5"]
    cal["score_quantiles"]["0.99"] = 1000.0 * max(peaks["1"], 1.0)
    out = folder / "patchcore.pt"
    torch.save(ckpt, out)
    return out


@pytest.fixture(scope="module")
def patchcore_results(patchcore_model, small_slide, tmp_path_factory):
    root = tmp_path_factory.mktemp("patchcore-results") / "results"
    summary = process_slide(small_slide.path, root, patchcore_model, settings())
    return root, root / small_slide.path.name, summary


def test_patchcore_slide_tiles_are_classed_by_the_map_maximum(patchcore_model, patchcore_results):
    from wsi_anomaly.loaded_model import load_model

    root, folder, summary = patchcore_results
    calibration = load_model(patchcore_model).calibration
    by_max = calibration.threshold("max")
    store = TileStore(folder / "tiles.zarr")
    means, peaks = store.scores, store.max_scores
    assert np.isfinite(peaks).all() and (peaks >= means).all()

    # the class follows the peak and the calibration's threshold of peaks ...
    classes = read_classes(folder)
    assert (classes == (peaks >= by_max)).all()
    assert 0 < classes.sum() < len(classes)
    # ... where the mean would have classed no tile
    assert not (means >= calibration.threshold("mean")).any()
    saved = json.loads((folder / "summary.json").read_text())
    assert saved["tile_score"] == summary["tile_score"] == "max"
    assert store.attrs["tile_score"] == "max"
    assert saved["fraction_anomalous"] == pytest.approx(float(np.mean(peaks >= by_max)))
    assert saved["score_max"] == pytest.approx(float(peaks.max()))
    assert saved["score_median"] == pytest.approx(float(np.median(peaks)))
    assert saved["colour_scale"]["vcenter"] == pytest.approx(by_max)
    assert saved["model_colour_scale"]["vcenter"] == pytest.approx(by_max)
    # the NGFF score grid holds the peaks; tiles.csv keeps the mean beside them
    np.testing.assert_allclose(at_tiles(score_grid(folder), store), peaks, rtol=1e-6)
    np.testing.assert_allclose(read_column(folder, "score"), means, rtol=1e-5)
    np.testing.assert_allclose(read_column(folder, "max"), peaks, rtol=1e-5)
    geojson = json.loads((folder / "tiles.geojson").read_text())
    assert geojson["properties"]["wsi_anomaly"]["tile_score"] == "max"
    names = [f["properties"].get("classification", {}).get("name") for f in geojson["features"]]
    # (a QC class, for an artifact, takes the place of "Anomalous")
    unflagged = [i for i, name in enumerate(names) if name in (None, "Anomalous")]
    assert len(unflagged) > len(names) // 2
    assert [names[i] == "Anomalous" for i in unflagged] == classes[unflagged].tolist()
    # the cohort table says which score its statistics are of
    from wsi_anomaly.pipeline.cohort import SUMMARY_FIELDS, _row

    assert "tile_score" in SUMMARY_FIELDS and _row(summary)["tile_score"] == "max"


def test_patchcore_redraw_keeps_the_map_maximum(patchcore_model, patchcore_results, tmp_path):
    """``render`` re-draws without the model (moved away) and ranks, colours and classes by the
    recorded tile score; the viewer and the napari reader read it too."""
    root, folder = copied_results(patchcore_results, tmp_path)
    classes = read_classes(folder)
    before = json.loads((folder / "summary.json").read_text())
    model_path = before["model"]["model_path"]
    hidden = tmp_path / "hidden.pt"
    shutil.move(model_path, hidden)
    try:
        assert main(["render", str(folder), "--cmap", "viridis", "-q"]) == 0
    finally:
        shutil.move(hidden, model_path)
    after = json.loads((folder / "summary.json").read_text())
    assert after["tile_score"] == "max" and after["colour_scale"]["cmap"] == "viridis"
    assert after["fraction_anomalous"] == pytest.approx(before["fraction_anomalous"])
    assert after["score_max"] == pytest.approx(before["score_max"])
    assert (read_classes(folder) == classes).all()
    store = TileStore(folder / "tiles.zarr")
    np.testing.assert_allclose(at_tiles(score_grid(folder), store), store.max_scores)

    # the slide's own scale: its percentiles of the peaks, the model's threshold of peaks
    assert main(["render", str(folder), "--scale", "slide", "-q"]) == 0
    own = json.loads((folder / "summary.json").read_text())["colour_scale"]
    assert own["vmin"] == pytest.approx(float(np.median(store.max_scores)))
    assert own["anomalous_at"] == pytest.approx(before["colour_scale"]["vcenter"])
    assert (read_classes(folder) == classes).all()

    from wsi_anomaly.viewer.results import ResultsFolder

    entry = ResultsFolder(root).slide(folder.name)
    assert entry is not None and entry.viewable
    tiles = entry.tiles()
    assert tiles.tile_score == "max"
    np.testing.assert_array_equal(tiles.top(3), np.argsort(-store.max_scores, kind="stable")[:3])
    from wsi_anomaly.viewer.pages import slide_page
    from wsi_anomaly.viewer.results import cell_overlay_rgba

    # the overlay colours each cell by its peak, one pixel per cell
    rgba = cell_overlay_rgba(tiles, entry.scale, max_px=max(tiles.grid_rows, tiles.grid_cols))
    for i in (int(np.argmax(store.max_scores)), int(np.argmin(store.max_scores))):
        col, row = tiles.grid_index[i]
        expected = entry.scale.to_rgb(np.array([store.max_scores[i]]))[0]
        assert tuple(rgba[row, col, :3]) == tuple(expected)
    assert "score (map max) ≥" in slide_page(entry, True, None)


def test_heatmap_rerun_with_other_display_settings_redraws_by_the_maximum(
    patchcore_model, patchcore_results, small_slide, tmp_path, monkeypatch
):
    root, folder = copied_results(patchcore_results, tmp_path)
    before = patchcore_results[2]
    classes = read_classes(folder)
    forbid_scoring(monkeypatch)
    summary = process_slide(small_slide.path, root, patchcore_model, settings(cmap="magma"))
    assert summary["status"] == "redrawn" and summary["tile_score"] == "max"
    assert summary["fraction_anomalous"] == pytest.approx(before["fraction_anomalous"])
    assert summary["colour_scale"]["vcenter"] == pytest.approx(before["colour_scale"]["vcenter"])
    assert (read_classes(folder) == classes).all()


def test_results_that_record_no_tile_score_are_of_the_mean(patchcore_results, tmp_path):
    from wsi_anomaly.viewer.results import ResultsFolder

    root, folder = copied_results(patchcore_results, tmp_path)
    summary = json.loads((folder / "summary.json").read_text())
    del summary["tile_score"]
    (folder / "summary.json").write_text(json.dumps(summary))
    tiles = ResultsFolder(root).slide(folder.name).tiles()  # type: ignore[union-attr]
    assert tiles.tile_score == "mean"
    np.testing.assert_array_equal(tiles.headline, tiles.scores)

    summary["tile_score"] = "p95"
    (folder / "summary.json").write_text(json.dumps(summary))
    assert not ResultsFolder(root).slide(folder.name).viewable  # type: ignore[union-attr]
    code = main(["render", str(folder), "--cmap", "magma", "-q"])
    assert code == 2


def test_older_results_of_a_max_family_are_redrawn_by_the_maximum(
    patchcore_model, patchcore_results, small_slide, tmp_path, monkeypatch
):
    """Results that record no tile score were ranked by the mean: a re-run with the same
    settings re-draws them by the family's maximum, scoring no tile."""
    root, folder = copied_results(patchcore_results, tmp_path)
    before = patchcore_results[2]
    classes = read_classes(folder)
    summary = json.loads((folder / "summary.json").read_text())
    del summary["tile_score"]
    summary["fraction_anomalous"] = 0.0  # what ranking by the mean gave this calibration
    (folder / "summary.json").write_text(json.dumps(summary))
    forbid_scoring(monkeypatch)
    again = process_slide(small_slide.path, root, patchcore_model, settings())
    assert again["status"] == "redrawn" and again["tile_score"] == "max"
    assert before["fraction_anomalous"] > 0
    assert again["fraction_anomalous"] == pytest.approx(before["fraction_anomalous"])
    assert (read_classes(folder) == classes).all()
    # now recorded: the next re-run is reused as it is
    assert process_slide(small_slide.path, root, patchcore_model, settings())["status"] == (
        "skipped (done)"
    )


def test_haloae_tiles_stay_on_the_map_mean(tiny_model, small_slide, tmp_path):
    root = tmp_path / "results"
    summary = process_slide(small_slide.path, root, tiny_model, settings())
    folder = root / small_slide.path.name
    store = TileStore(folder / "tiles.zarr")
    calibration = Calibration.from_dict(torch.load(tiny_model, weights_only=True)["calibration"])
    by_mean = calibration.threshold("mean")
    assert summary["tile_score"] == "mean" and store.attrs["tile_score"] == "mean"
    assert (read_classes(folder) == (store.scores >= by_mean)).all()
    assert summary["fraction_anomalous"] == pytest.approx(float(np.mean(store.scores >= by_mean)))
    np.testing.assert_allclose(at_tiles(score_grid(folder), store), store.scores, rtol=1e-6)
    assert summary["colour_scale"]["vcenter"] == pytest.approx(by_mean)
