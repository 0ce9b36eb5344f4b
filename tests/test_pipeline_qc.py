"""``heatmap --qc flag|exclude|off``: flags in every output, flagged tiles left unscored, QC
settings in a result's identity."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import zarr

from wsi_anomaly.cli import main
from wsi_anomaly.errors import OutputExistsError
from wsi_anomaly.pipeline import HeatmapSettings, process_slide
from wsi_anomaly.pipeline.slide_run import _score_shards
from wsi_anomaly.score import ScoreBatch
from wsi_anomaly.slide.qc import FLAG_NAMES, QCSettings, flag_masks
from wsi_anomaly.slide.synthetic import write_synthetic_slide
from wsi_anomaly.stitch import ColourScale
from wsi_anomaly.tiles import TileStore

#: Flags every tile whose centre is within 60 µm of the tissue's edge: some tiles, not all.
EDGE = QCSettings(border_um=60.0)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qcslides")
    return write_synthetic_slide(folder / "s.tif", width=1536, height=1280, mpp=0.5, seed=7)


def settings(**kw):
    return HeatmapSettings(device="cpu", batch_size=8, progress=False, **kw)


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_flag_puts_the_flags_in_every_output(slide, tiny_model, tmp_path):
    summary = process_slide(slide.path, tmp_path, tiny_model, settings(qc_settings=EDGE))
    out = tmp_path / slide.path.name
    store = TileStore(out / "tiles.zarr")
    flags = store.qc_flags
    assert flags is not None and 0 < (flags != 0).sum() < len(flags)
    assert np.isfinite(store.scores).all()  # flag scores every tile
    rows = read_csv(out / "tiles.csv")
    assert "qc_flags" in rows[0] and "qc_focus" in rows[0] and "qc_border_um" in rows[0]
    assert [bool(r["qc_flags"]) for r in rows] == (flags != 0).tolist()
    features = json.loads((out / "tiles.geojson").read_text())["features"]
    classes = [(f["properties"].get("classification") or {}).get("name") for f in features]
    anomalous = np.array([r["class"] == "Anomalous" for r in rows])
    border_only = flag_masks(flags)["border"] & ~anomalous  # an anomalous edge tile stays so
    assert classes.count("QC: border") == int(border_only.sum())
    assert classes.count("Anomalous") == int(anomalous.sum())
    assert all("qc_focus" in f["properties"]["measurements"] for f in features)
    labels = zarr.open_group(str(out / "heatmap.ome.zarr"), mode="r")
    assert labels["labels"].attrs["ome"]["labels"] == ["qc"]
    grid = np.asarray(labels["labels/qc/0"][:])
    assert (grid == FLAG_NAMES.index("border") + 1).sum() == int(flag_masks(flags)["border"].sum())
    qc = summary["qc"]
    assert qc["mode"] == "flag" and qc["n_excluded"] == 0
    assert qc["tile_fractions"]["border"] == pytest.approx((flags != 0).mean())
    assert summary["n_scored"] == summary["n_tiles"]


def test_top_tiles_show_unflagged_tissue_first(slide, tiny_model, tmp_path, monkeypatch):
    import wsi_anomaly.pipeline.render as render

    drawn = []
    real = render.render_slide_outputs
    monkeypatch.setattr(render, "render_slide_outputs", lambda d, o: drawn.append(o) or real(d, o))
    process_slide(slide.path, tmp_path, tiny_model, settings(qc_settings=EDGE, top_k=5))
    store = TileStore(tmp_path / slide.path.name / "tiles.zarr")
    flags, scores = store.qc_flags, store.scores
    assert flags is not None and 0 < (flags == 0).sum() < 5 and (flags != 0).sum() >= 5
    top = [i for i, _ in drawn[0].top_tiles]
    clean, flagged = np.flatnonzero(flags == 0), np.flatnonzero(flags != 0)
    ranked = [*clean[np.argsort(-scores[clean])], *flagged[np.argsort(-scores[flagged])]]
    assert top == [int(i) for i in ranked[:5]]  # every clean tile, then the best flagged ones
    # without QC the same slide's top tiles are the highest scores, flagged or not
    drawn.clear()
    process_slide(slide.path, tmp_path / "off", tiny_model, settings(qc="off", top_k=5))
    off = TileStore(tmp_path / "off" / slide.path.name / "tiles.zarr").scores
    assert [i for i, _ in drawn[0].top_tiles] == np.argsort(-off)[:5].tolist()


def test_exclude_leaves_flagged_tiles_unscored(slide, tiny_model, tmp_path):
    flagged = process_slide(slide.path, tmp_path / "f", tiny_model, settings(qc_settings=EDGE))
    summary = process_slide(
        slide.path, tmp_path / "x", tiny_model, settings(qc="exclude", qc_settings=EDGE)
    )
    store = TileStore(tmp_path / "x" / slide.path.name / "tiles.zarr")
    flags, scores = store.qc_flags, store.scores
    assert np.isnan(scores[flags != 0]).all() and np.isfinite(scores[flags == 0]).all()
    assert (
        summary["n_scored"]
        == int((flags == 0).sum())
        == summary["n_tiles"] - (summary["qc"]["n_excluded"])
    )
    # The scored tiles have the same scores as when every tile is scored.
    everything = TileStore(tmp_path / "f" / slide.path.name / "tiles.zarr").scores
    np.testing.assert_allclose(scores[flags == 0], everything[flags == 0], rtol=1e-4, atol=1e-5)
    # fraction_anomalous counts only the scored tiles.
    threshold = ColourScale.from_dict(summary["colour_scale"]).threshold
    kept = everything[flags == 0]
    assert summary["fraction_anomalous"] == pytest.approx(float(np.mean(kept >= threshold)))
    assert flagged["n_scored"] == flagged["n_tiles"]
    rows = read_csv(tmp_path / "x" / slide.path.name / "tiles.csv")
    assert all(r["score"] == "" for r in rows if r["qc_flags"])


def test_off_writes_no_qc(slide, tiny_model, tmp_path):
    summary = process_slide(slide.path, tmp_path, tiny_model, settings(qc="off"))
    out = tmp_path / slide.path.name
    assert TileStore(out / "tiles.zarr").qc is None
    assert "qc_flags" not in read_csv(out / "tiles.csv")[0]
    assert summary["qc"] == {"mode": "off"}


def test_qc_settings_are_part_of_the_identity(slide, tiny_model, tmp_path):
    process_slide(slide.path, tmp_path, tiny_model, settings(qc_settings=EDGE))
    again = process_slide(slide.path, tmp_path, tiny_model, settings(qc_settings=EDGE))
    assert again["status"] == "skipped (done)"
    with pytest.raises(OutputExistsError, match="settings"):
        process_slide(slide.path, tmp_path, tiny_model, settings(qc_settings=QCSettings()))
    with pytest.raises(OutputExistsError, match="settings"):
        process_slide(slide.path, tmp_path, tiny_model, settings(qc="exclude", qc_settings=EDGE))
    # With --overwrite the tile store is reused and its QC measured again with the new settings.
    redone = process_slide(
        slide.path,
        tmp_path,
        tiny_model,
        settings(qc_settings=QCSettings(border_um=0), overwrite=True),
    )
    assert redone["status"] == "ok" and redone["qc"]["n_flagged"] == 0
    assert (TileStore(tmp_path / slide.path.name / "tiles.zarr").qc_flags == 0).all()


def test_a_rerun_after_an_interruption_has_qc_rows_for_every_tile(
    slide, tiny_model, tmp_path, monkeypatch
):
    """The QC rows are written once, with the finished tile store; a run interrupted after
    tiling leaves a store the next run takes over, and its QC rows are those of a clean run."""
    import wsi_anomaly.pipeline.render as render

    for mode in ("flag", "exclude"):
        clean = tmp_path / f"clean-{mode}"
        process_slide(slide.path, clean, tiny_model, settings(qc=mode, qc_settings=EDGE))

        def crash(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(render, "render_slide_outputs", crash)
        run = tmp_path / f"run-{mode}"
        with pytest.raises(KeyboardInterrupt):
            process_slide(slide.path, run, tiny_model, settings(qc=mode, qc_settings=EDGE))
        monkeypatch.undo()
        left = [p for p in run.rglob("tiles.zarr") if p.is_dir()]
        assert len(left) == 1  # the interrupted run's finished store, with its QC rows
        assert TileStore(left[0]).qc_values is not None
        resumed = process_slide(slide.path, run, tiny_model, settings(qc=mode, qc_settings=EDGE))
        assert resumed["status"] == "ok"
        want = TileStore(clean / slide.path.name / "tiles.zarr")
        got = TileStore(run / slide.path.name / "tiles.zarr")
        assert got.qc_values is not None and want.qc_values is not None
        assert np.isfinite(got.qc_values).all()
        np.testing.assert_allclose(got.qc_values, want.qc_values, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got.qc_flags, want.qc_flags)
        assert 0 < (got.qc_flags != 0).sum() < len(got)
        np.testing.assert_array_equal(np.isnan(got.scores), np.isnan(want.scores))


class _FirstPixelScorer:
    def __init__(self, batch_size):
        self.batch_size = batch_size
        self.seen: list[np.ndarray] = []

    def score_batches(self, batches, keep_maps=False):
        for tiles in batches:
            self.seen.append(tiles[:, 0, 0, 0].copy())
            first = tiles[:, 0, 0, 0].astype(np.float32)
            yield ScoreBatch(first, first + 1, None)


class _Sink:
    def __init__(self):
        self.writes = {}

    def write_scores(self, start, mean, peak, maps=None):
        self.writes[start] = mean.copy()


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_skipped_tiles_never_reach_the_model(batch_size):
    tiles = np.zeros((14, 2, 2, 3), np.uint8)
    tiles[:, 0, 0, 0] = np.arange(1, 15)
    sizes = [4, 4, 4, 2]
    starts = np.cumsum([0, *sizes[:-1]])
    shards = [(int(s), tiles[s : s + n]) for s, n in zip(starts, sizes)]
    skip = {
        0: np.array([False, True, False, True]),
        4: np.ones(4, bool),  # a whole shard skipped
        8: np.zeros(4, bool),
        12: np.ones(2, bool),  # the last shard skipped
    }
    scorer, sink = _FirstPixelScorer(batch_size), _Sink()
    _score_shards(scorer, iter(shards), sink, HeatmapSettings(), {}, skip)
    seen = np.concatenate(scorer.seen)
    assert seen.tolist() == [1, 3, 9, 10, 11, 12]
    assert sorted(sink.writes) == [0, 4, 8, 12]
    np.testing.assert_array_equal(sink.writes[0], [1, np.nan, 3, np.nan])
    assert np.isnan(sink.writes[4]).all() and np.isnan(sink.writes[12]).all()
    np.testing.assert_array_equal(sink.writes[8], [9, 10, 11, 12])


def test_cli_qc_options(slide, tiny_model, tmp_path, capsys):
    code = main(
        [
            "heatmap",
            str(slide.path),
            "--model",
            str(tiny_model),
            "--out",
            str(tmp_path),
            "--qc",
            "exclude",
            "--device",
            "cpu",
            "-q",
        ]
    )
    assert code == 0
    saved = json.loads((tmp_path / slide.path.name / "summary.json").read_text())
    assert saved["qc"]["mode"] == "exclude"
    bad = tmp_path / "bad.yaml"
    bad.write_text("qc:\n  min_focus: -1\n", encoding="utf-8")
    code = main(["heatmap", str(slide.path), "--model", str(tiny_model), "--qc-config", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "min_focus" in err[0] and "Traceback" not in err[0]
    code = main(["heatmap", str(slide.path), "--model", str(tiny_model), "--qc", "maybe"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "--qc" in err[0]
