"""`heatmap` end to end: outputs, skip/overwrite, crash recovery, --skip-errors, dask cluster."""

import csv
import json
import os

import numpy as np
import pytest
from conftest import CMU_SVS, needs_cmu

from wsi_anomaly.cli import main
from wsi_anomaly.errors import CorruptSlideError
from wsi_anomaly.pipeline import HeatmapSettings, find_slides, process_slide, run_cohort
from wsi_anomaly.score import ScoreBatch
from wsi_anomaly.slide.synthetic import write_synthetic_slide
from wsi_anomaly.tiles import TileStore

OUTPUTS = (
    "heatmap.png",
    "overlay.png",
    "thumbnail.png",
    "heatmap.ome.zarr",
    "tiles.geojson",
    "tiles.csv",
    "top_tiles.png",
    "summary.json",
    "tiles.zarr",
)


@pytest.fixture(scope="module")
def mini_slides(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cohort")
    a = write_synthetic_slide(folder / "a.tif", width=1280, height=1024, mpp=0.5, seed=5)
    b = write_synthetic_slide(folder / "b.tif", width=1024, height=1280, mpp=0.5, seed=6)
    return folder, a, b


def settings(**kw):
    return HeatmapSettings(device="cpu", batch_size=8, progress=False, **kw)


def test_one_slide_all_outputs(mini_slides, tiny_model, tmp_path):
    _, a, _ = mini_slides
    summary = process_slide(a.path, tmp_path, tiny_model, settings())
    out = tmp_path / "a.tif"
    for name in OUTPUTS:
        assert (out / name).exists(), name
    assert not list(tmp_path.glob(".*partial*"))
    store = TileStore(out / "tiles.zarr")
    assert np.isfinite(store.scores).all() and len(store.scores) == summary["n_tiles"] > 0
    assert (store.max_scores >= store.scores).all()
    assert store.attrs["model"]["model_sha256"] == summary["model"]["model_sha256"]
    saved = json.loads((out / "summary.json").read_text())
    for key in (
        "actual_mpp",
        "mpp_source",
        "level",
        "n_tiles",
        "score_quantiles",
        "timings_s",
        "tiles_per_s",
        "model",
        "software_version",
        "tissue_fraction_slide",
    ):
        assert key in saved, key
    assert saved["actual_mpp"] == pytest.approx(0.5, rel=1e-3)
    # Outputs point to the final files, not into the temporary folder they were built in.
    assert saved["outputs"] and all(
        os.path.exists(p) and ".partial" not in p for p in saved["outputs"].values()
    )
    assert saved["package_versions"]["torch"] and saved["command"]
    features = json.loads((out / "tiles.geojson").read_text())["features"]
    assert len(features) == summary["n_tiles"]


def test_rerun_skips_and_overwrite_redoes(mini_slides, tiny_model, tmp_path):
    _, a, _ = mini_slides
    first = process_slide(a.path, tmp_path, tiny_model, settings())
    again = process_slide(a.path, tmp_path, tiny_model, settings())
    assert again["status"] == "skipped (done)"
    redone = process_slide(a.path, tmp_path, tiny_model, settings(overwrite=True))
    assert redone["status"] == "ok"
    np.testing.assert_allclose(redone["score_mean"], first["score_mean"], rtol=1e-5)


def test_crash_then_rerun_completes_with_same_scores(
    mini_slides, tiny_model, tmp_path, monkeypatch
):
    _, a, _ = mini_slides
    clean = process_slide(a.path, tmp_path / "clean", tiny_model, settings())

    import wsi_anomaly.pipeline.render as pipeline

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "render_slide_outputs", crash)
    with pytest.raises(KeyboardInterrupt):
        process_slide(a.path, tmp_path / "run", tiny_model, settings())
    assert not (tmp_path / "run" / "a.tif").exists()  # nothing that looks finished
    monkeypatch.undo()
    resumed = process_slide(a.path, tmp_path / "run", tiny_model, settings())
    np.testing.assert_allclose(
        TileStore(tmp_path / "run" / "a.tif" / "tiles.zarr").scores,
        TileStore(tmp_path / "clean" / "a.tif" / "tiles.zarr").scores,
        rtol=1e-5,
    )
    assert resumed["n_tiles"] == clean["n_tiles"]


def test_skip_errors_records_corrupt_slide(mini_slides, tiny_model, tmp_path):
    folder, a, _ = mini_slides
    cohort = tmp_path / "slides"
    cohort.mkdir()
    (cohort / "a.tif").write_bytes(a.path.read_bytes())
    (cohort / "broken.tif").write_bytes(a.path.read_bytes()[:5000])
    out = tmp_path / "results"
    with pytest.raises(CorruptSlideError):
        run_cohort([cohort], out, tiny_model, settings())
    rows = run_cohort([cohort], out, tiny_model, settings(), skip_errors=True)
    status = {r["slide"]: r["status"] for r in rows}
    assert status == {"a.tif": "skipped (done)", "broken.tif": "failed"} or status == {
        "a.tif": "ok",
        "broken.tif": "failed",
    }
    table = {r["slide"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert table["broken.tif"]["status"] == "failed" and table["broken.tif"]["error"]
    assert table["a.tif"]["status"] in ("ok", "skipped (done)")
    assert (out / "a.tif" / "summary.json").is_file() and not (out / "broken.tif").exists()


def test_local_dask_cluster_one_task_per_slide(mini_slides, tiny_model, tmp_path):
    folder, _, _ = mini_slides
    rows = run_cohort([str(folder / "*.tif")], tmp_path, tiny_model, settings(), workers=2)
    assert sorted(r["slide"] for r in rows) == ["a.tif", "b.tif"]
    assert all(r["status"] == "ok" for r in rows)
    assert (tmp_path / "b.tif" / "heatmap.png").is_file()


def test_find_slides_inputs(mini_slides, tmp_path):
    folder, a, b = mini_slides
    assert find_slides([folder]) == [a.path, b.path]
    assert find_slides([str(folder / "a*.tif"), a.path]) == [a.path]


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


@pytest.fixture
def nested_cohort(tmp_path):
    root = tmp_path / "cohort"
    slides = [
        _touch(root / "top.svs"),
        _touch(root / "site1" / "p1" / "s1.svs"),
        _touch(root / "site2" / "s2.ndpi"),
    ]
    for hidden in (
        root / ".snapshot" / "old.svs",
        root / "results" / "copy.svs",
        root / "site1" / ".a.svs.partial" / "x.svs",
        root / "site2" / "tiles.zarr" / "y.tif",
        root / "site2" / "notes.txt",
    ):
        _touch(hidden)
    return root, slides


def test_discover_recursive_skips_hidden_and_results_folders(nested_cohort):
    root, (top, s1, s2) = nested_cohort
    assert find_slides([root]) == [top]  # the default stays one level deep
    found = find_slides([root], recursive=True, skip=[root / "results"])
    assert found == [s1, s2, top]  # sorted by path
    assert find_slides([root, root / "site1", s1], recursive=True, skip=[root / "results"]) == [
        s1,
        s2,
        top,
    ]
    # a folder named on the command line is searched even when hidden
    assert find_slides([root / ".snapshot"], recursive=True) == [root / ".snapshot" / "old.svs"]


def test_discover_follows_a_link_loop_once(nested_cohort):
    root, slides = nested_cohort
    (root / "site2" / "loop").symlink_to(root, target_is_directory=True)
    found = find_slides([root], recursive=True, skip=[root / "results"])
    assert found == sorted(slides)


def test_glob_double_star_matches_any_depth(nested_cohort):
    root, (top, s1, _) = nested_cohort
    found = find_slides([str(root / "**" / "*.svs")], skip=[root / "results"])
    assert found == [s1, top]
    assert find_slides([str(root / "*" / "**" / "s1.svs")]) == [s1]
    # no ** → one level, as before
    assert find_slides([str(root / "*.svs")]) == [top]


def test_glob_under_a_hidden_folder_named_in_the_pattern(tmp_path):
    slide = _touch(tmp_path / ".data" / "cohort" / "sub" / "a.svs")
    assert find_slides([str(tmp_path / ".data" / "cohort" / "**" / "*.svs")]) == [slide]


def test_cohort_recursive_skips_its_own_results(mini_slides, tiny_model, tmp_path):
    _, a, _ = mini_slides
    root = tmp_path / "cohort"
    (root / "site").mkdir(parents=True)
    (root / "site" / "a.tif").symlink_to(a.path)
    out = root / "results"
    rows = run_cohort([root], out, tiny_model, settings(), recursive=True)
    assert [r["slide"] for r in rows] == ["a.tif"] and rows[0]["status"] == "ok"
    (out / "stray.tif").symlink_to(a.path)  # a slide inside the results folder is not entered
    rows = run_cohort([root], out, tiny_model, settings(), recursive=True)
    assert [r["slide"] for r in rows] == ["a.tif"] and rows[0]["status"] == "skipped (done)"


def test_cli_heatmap_and_bad_input(mini_slides, tiny_model, tmp_path, capsys):
    _, a, _ = mini_slides
    code = main(
        [
            "heatmap",
            str(a.path),
            "--model",
            str(tiny_model),
            "--out",
            str(tmp_path),
            "--device",
            "cpu",
            "-q",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0 and "1 of 1 slides done" in out
    code = main(
        ["heatmap", str(a.path), "--model", str(tmp_path / "none.pt"), "--out", str(tmp_path)]
    )
    out, err = capsys.readouterr()
    assert code != 0 and "not found" in err and "Traceback" not in err


@needs_cmu
def test_heatmap_on_real_svs(tiny_model, tmp_path):
    summary = process_slide(CMU_SVS, tmp_path, tiny_model, settings())
    assert summary["mpp_source"] == "openslide" and summary["n_tiles"] > 10
    assert (tmp_path / CMU_SVS.name / "overlay.png").is_file()


def test_keep_maps_gives_pixel_level_ngff(mini_slides, tiny_model, tmp_path):
    import zarr

    _, a, _ = mini_slides
    summary = process_slide(a.path, tmp_path, tiny_model, settings(keep_maps=True))
    out = tmp_path / "a.tif"
    store = TileStore(out / "tiles.zarr")
    maps = np.asarray(store.root["maps"][:], np.float32)
    assert maps.shape == (summary["n_tiles"], 64, 64) and np.isfinite(maps).all()
    np.testing.assert_allclose(maps.mean(axis=(1, 2)), store.scores, rtol=1e-2, atol=1e-4)
    ngff = zarr.open_group(str(out / "heatmap.ome.zarr"), mode="r")
    pixel = ngff["pixel"]
    assert pixel.attrs["ome"]["version"] == "0.5"
    fine = np.asarray(pixel["0"][:])
    coarse = np.asarray(ngff["0"][:])
    assert fine.shape == (coarse.shape[0] * 16, coarse.shape[1] * 16)
    col, row = (int(v) for v in store.grid_index[0])
    np.testing.assert_allclose(
        np.nanmean(fine[row * 16 : (row + 1) * 16, col * 16 : (col + 1) * 16]),
        coarse[row, col],
        rtol=1e-2,
        atol=1e-4,
    )


class _FakeScorer:
    """Scores a tile by its first pixel, through a one-loop ``score_batches``."""

    def __init__(self, batch_size):
        self.batch_size = batch_size
        self.batches = []

    def score_batches(self, batches, keep_maps=False):
        for tiles in batches:
            self.batches.append(len(tiles))
            first = tiles[:, 0, 0, 0].astype(np.float32)
            maps = np.repeat(first[:, None, None], 64, 1).repeat(64, 2) if keep_maps else None
            yield ScoreBatch(first, first + 1, maps)


class _Sink:
    def __init__(self):
        self.writes = []

    def write_scores(self, start, mean, peak, maps):
        self.writes.append((start, mean.copy(), peak.copy(), None if maps is None else maps.copy()))


@pytest.mark.parametrize("batch_size", [3, 5, 8, 64])
def test_batches_span_shards_and_scores_land_on_their_shard(batch_size):
    """Model batches of the scorer's size cross shard boundaries (a GPU batch may be larger
    than a shard); each shard's scores are written once, at its own offset."""
    from wsi_anomaly.pipeline.slide_run import _score_shards

    shard_sizes = [4, 4, 4, 2]
    tiles = np.zeros((sum(shard_sizes), 2, 2, 3), np.uint8)
    tiles[:, 0, 0, 0] = np.arange(len(tiles))
    shards, start = [], 0
    for n in shard_sizes:
        shards.append((start, tiles[start : start + n]))
        start += n
    scorer, sink, timing = _FakeScorer(batch_size), _Sink(), {}
    _score_shards(scorer, iter(shards), sink, HeatmapSettings(keep_maps=True), timing)
    full, rest = divmod(len(tiles), batch_size)
    assert scorer.batches == [batch_size] * full + ([rest] if rest else [])
    assert [w[0] for w in sink.writes] == [0, 4, 8, 12]
    for (start, mean, peak, maps), (s, shard) in zip(sink.writes, shards):
        assert start == s
        np.testing.assert_array_equal(mean, shard[:, 0, 0, 0])
        np.testing.assert_array_equal(peak, mean + 1)
        assert maps.shape == (len(shard), 64, 64) and (maps[:, 5, 7] == mean).all()
    assert timing["model_s"] >= 0


def test_rerun_with_another_batch_size_reuses_the_result(mini_slides, tiny_model, tmp_path):
    _, a, _ = mini_slides
    first = process_slide(a.path, tmp_path, tiny_model, settings())
    saved = json.loads((tmp_path / "a.tif" / "summary.json").read_text())
    assert saved["batch_size"] == 8 and saved["batch_size_choice"]["setting"] == 8
    assert saved["compile"] == "off"
    auto = HeatmapSettings(device="cpu", progress=False)  # batch size auto: 32 on a CPU
    again = process_slide(a.path, tmp_path, tiny_model, auto)
    assert again["status"] == "skipped (done)" and again["n_tiles"] == first["n_tiles"]


def test_settings_are_checked():
    from wsi_anomaly.errors import InvalidInputError

    assert HeatmapSettings().batch_size == "auto" and HeatmapSettings().compile == "off"
    with pytest.raises(InvalidInputError, match="--batch-size"):
        HeatmapSettings(batch_size=0)
    with pytest.raises(InvalidInputError, match="--compile"):
        HeatmapSettings(compile="fastest")
    with pytest.raises(InvalidInputError, match="--scale"):
        HeatmapSettings(scale="auto")
    with pytest.raises(InvalidInputError, match="--alpha"):
        HeatmapSettings(alpha=1.5)


def test_slide_scale_is_labelled_and_changes_the_identity(mini_slides, tiny_model, tmp_path):
    from wsi_anomaly.pipeline import display_settings, scoring_settings

    # how scores are drawn is the display part of the identity, not the scoring part
    assert display_settings(settings()) != display_settings(settings(scale="slide"))
    assert display_settings(settings()) != display_settings(settings(alpha=0.8))
    assert scoring_settings(settings(), None) == scoring_settings(settings(alpha=0.8), None)
    _, a, _ = mini_slides
    fixed = process_slide(a.path, tmp_path, tiny_model, settings())
    fixed_png = (tmp_path / "a.tif" / "heatmap.png").read_bytes()
    fixed_csv = (tmp_path / "a.tif" / "tiles.csv").read_text()
    from wsi_anomaly.errors import OutputExistsError

    with pytest.raises(OutputExistsError, match="settings differ: stride_px"):  # not reused
        process_slide(a.path, tmp_path, tiny_model, settings(scale="slide", stride_px=128))
    own = process_slide(
        a.path, tmp_path, tiny_model, settings(scale="slide", alpha=0.8, overwrite=True)
    )
    assert own["status"] == "ok"
    saved = json.loads((tmp_path / "a.tif" / "summary.json").read_text())
    assert saved["identity"]["display"]["scale"] == "slide"
    assert saved["identity"]["display"]["alpha"] == 0.8
    cs, was = saved["colour_scale"], fixed["colour_scale"]
    assert cs["basis"] == "slide" and was["basis"] == "training"
    assert cs["vmin"] == pytest.approx(saved["score_quantiles"]["0.5"], rel=1e-5)
    assert (cs["vmin"], cs["vcenter"]) != (was["vmin"], was["vcenter"])
    # the Anomalous class keeps the model's threshold
    assert cs["anomalous_at"] == pytest.approx(was["vcenter"])
    assert saved["fraction_anomalous"] == fixed["fraction_anomalous"]
    assert (tmp_path / "a.tif" / "tiles.csv").read_text() == fixed_csv
    assert (tmp_path / "a.tif" / "heatmap.png").read_bytes() != fixed_png


def test_a_run_opens_each_slide_once_and_reads_the_model_once(
    mini_slides, tiny_model, tmp_path, monkeypatch
):
    from pathlib import Path

    from wsi_anomaly import loaded_model
    from wsi_anomaly.slide import reader

    folder, a, b = mini_slides
    opened, hashed, read = [], [], []
    real_init, real_hash, real_read = (
        reader.Slide.__init__,
        loaded_model.sha256_file,
        loaded_model.read_model,
    )

    def counting_init(self, path, *args, **kwargs):
        opened.append(Path(path).name)
        real_init(self, path, *args, **kwargs)

    monkeypatch.setattr(reader.Slide, "__init__", counting_init)
    monkeypatch.setattr(loaded_model, "sha256_file", lambda p: hashed.append(p) or real_hash(p))
    monkeypatch.setattr(loaded_model, "read_model", lambda p: read.append(p) or real_read(p))
    loaded_model._cached.cache_clear()
    loaded_model._cached_sha256.cache_clear()
    rows = run_cohort([a.path, b.path], tmp_path, tiny_model, settings())
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert sorted(opened) == ["a.tif", "b.tif"]
    assert len(hashed) == 1 and len(read) == 1
    opened.clear()
    again = run_cohort([a.path, b.path], tmp_path, tiny_model, settings())
    assert [r["status"] for r in again] == ["skipped (done)"] * 2
    assert opened == []  # a finished slide is recognised from its file, not opened
    assert len(hashed) == 1
    summary = json.loads((tmp_path / "a.tif" / "summary.json").read_text())
    assert summary["model"]["model_sha256"] == real_hash(tiny_model)
    assert summary["identity"]["model_sha256"] == summary["model"]["model_sha256"]
