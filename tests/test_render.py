"""Display settings re-draw stored scores: no tile is scored, no --overwrite; refusals name
the settings that differ; an interrupted re-draw is re-drawn on the next run."""

import json
import shutil

import numpy as np
import pytest

from wsi_anomaly.cli import main
from wsi_anomaly.errors import OutputExistsError
from wsi_anomaly.pipeline import HeatmapSettings, process_slide
from wsi_anomaly.slide.synthetic import write_synthetic_slide
from wsi_anomaly.tiles import TileStore


def settings(**kw):
    return HeatmapSettings(device="cpu", batch_size=8, progress=False, **kw)


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tiny_model):
    """A slide and its results folder, scored once for the module."""
    folder = tmp_path_factory.mktemp("render")
    slide = write_synthetic_slide(folder / "r.tif", width=1024, height=768, mpp=0.5, seed=7)
    out = folder / "results"
    process_slide(slide.path, out, tiny_model, settings())
    return slide.path, out


@pytest.fixture
def results(scored, tmp_path):
    """A fresh copy of the scored results folder: (slide path, results root, slide folder)."""
    slide, out = scored
    root = tmp_path / "results"
    shutil.copytree(out, root)
    return slide, root, root / "r.tif"


@pytest.fixture
def no_scoring(monkeypatch):
    """Any attempt to score a tile fails the test."""
    from wsi_anomaly.pipeline import slide_run

    def refuse(*args, **kwargs):
        raise AssertionError("a tile was scored")

    monkeypatch.setattr(slide_run, "_scorer", refuse)
    monkeypatch.setattr(slide_run, "_score_shards", refuse)


def read_summary(folder):
    return json.loads((folder / "summary.json").read_text())


def test_other_cmap_redraws_without_scoring(results, tiny_model, no_scoring):
    slide, root, folder = results
    overlay = (folder / "overlay.png").read_bytes()
    scores = TileStore(folder / "tiles.zarr").scores.copy()
    summary = process_slide(slide, root, tiny_model, settings(cmap="viridis", top_k=4))
    assert summary["status"] == "redrawn" and "redrawn" in summary
    assert read_summary(folder)["status"] == "ok"
    assert (folder / "overlay.png").read_bytes() != overlay
    saved = read_summary(folder)
    assert saved["identity"]["display"]["cmap"] == "viridis"
    assert saved["identity"]["display"]["top_k"] == 4
    assert "cmap" not in saved["identity"]["scoring"]
    assert saved["colour_scale"]["cmap"] == "viridis"
    np.testing.assert_array_equal(TileStore(folder / "tiles.zarr").scores, scores)
    assert not list(folder.glob(".redraw.*")) and not list(root.glob(".*partial*"))
    # the same settings again: nothing to do
    again = process_slide(slide, root, tiny_model, settings(cmap="viridis", top_k=4))
    assert again["status"] == "skipped (done)"


def test_slide_scale_redraw_keeps_model_threshold(results, tiny_model, no_scoring):
    slide, root, folder = results
    was = read_summary(folder)
    process_slide(slide, root, tiny_model, settings(scale="slide", alpha=0.8))
    cs = read_summary(folder)["colour_scale"]
    assert cs["basis"] == "slide"
    assert cs["anomalous_at"] == pytest.approx(
        was["colour_scale"]["anomalous_at"] or was["colour_scale"]["vcenter"]
    )


def test_refusal_names_each_differing_setting(results, tiny_model):
    slide, root, _ = results
    with pytest.raises(OutputExistsError) as info:
        process_slide(slide, root, tiny_model, settings(min_tissue=0.6, keep_maps=True))
    message = str(info.value)
    assert "settings differ: min_tissue 0.5 → 0.6, keep_maps False → True" in message
    assert "--overwrite" in message and "cmap" not in message


def test_results_of_the_older_layout_are_reused_and_redrawn(results, tiny_model, no_scoring):
    slide, root, folder = results
    summary = read_summary(folder)
    identity = summary["identity"]
    identity["scoring"].update(identity.pop("display"))  # display keys among the scoring ones
    summary.pop("model_colour_scale")
    (folder / "summary.json").write_text(json.dumps(summary))
    assert process_slide(slide, root, tiny_model, settings())["status"] == "skipped (done)"
    overlay = (folder / "overlay.png").read_bytes()
    process_slide(slide, root, tiny_model, settings(cmap="magma"))
    assert (folder / "overlay.png").read_bytes() != overlay
    saved = read_summary(folder)
    assert saved["identity"]["display"]["cmap"] == "magma"
    assert "cmap" not in saved["identity"]["scoring"]


def test_interrupted_redraw_is_redrawn_next_time(results, tiny_model, no_scoring, monkeypatch):
    from wsi_anomaly.pipeline import render

    slide, root, folder = results
    overlay = (folder / "overlay.png").read_bytes()
    real = render.render_slide_outputs

    def half_then_fail(out_dir, outputs):
        real(out_dir, outputs)
        raise KeyboardInterrupt  # after drawing, before anything is moved into place

    monkeypatch.setattr(render, "render_slide_outputs", half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        process_slide(slide, root, tiny_model, settings(cmap="viridis"))
    # old pictures, and a summary that says so: nothing looks complete and new
    assert (folder / "overlay.png").read_bytes() == overlay
    stale = read_summary(folder)
    assert stale["status"] == "redrawing" and stale["identity"]["display"] is None
    monkeypatch.setattr(render, "render_slide_outputs", real)
    # even the old settings are re-drawn now: the summary no longer vouches for the pictures
    again = process_slide(slide, root, tiny_model, settings(cmap="viridis"))
    assert again["status"] == "redrawn"
    assert (folder / "overlay.png").read_bytes() != overlay
    assert read_summary(folder)["identity"]["display"]["cmap"] == "viridis"
    assert not list(folder.glob(".redraw.*"))


def test_render_command_redraws_folders(results, no_scoring, capsys):
    _, root, folder = results
    overlay = (folder / "overlay.png").read_bytes()
    assert main(["render", str(folder), "--cmap", "magma", "--top-k", "3"]) == 0
    assert (folder / "overlay.png").read_bytes() != overlay
    saved = read_summary(folder)["identity"]["display"]
    assert saved["cmap"] == "magma" and saved["top_k"] == 3
    assert saved["alpha"] == 0.5  # what is not asked for stays as it was
    # a results root: every slide folder in it
    assert main(["render", str(root), "--alpha", "0.9"]) == 0
    saved = read_summary(folder)["identity"]["display"]
    assert saved["alpha"] == 0.9 and saved["cmap"] == "magma"
    capsys.readouterr()


def test_render_command_refuses_other_folders(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["render", str(tmp_path / "empty")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a slide results folder" in err
    assert main(["render", str(tmp_path / "missing")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_older_slide_scale_results_take_the_scale_from_their_model(results, no_scoring):
    """Results of the older layout drawn on the slide's own scale do not record the model's
    scale: ``render`` reads it from the checkpoint they name (its sha256 must match)."""
    from wsi_anomaly.pipeline import redraw_folder

    _, _, folder = results
    summary = read_summary(folder)
    model_scale = summary.pop("model_colour_scale")
    summary["colour_scale"] = {**summary["colour_scale"], "basis": "slide", "vcenter": 123.0}
    identity = summary["identity"]
    identity["scoring"].update(identity.pop("display"))
    (folder / "summary.json").write_text(json.dumps(summary))
    redraw_folder(folder, scale="fixed")
    saved = read_summary(folder)
    assert saved["colour_scale"]["vcenter"] == pytest.approx(model_scale["vcenter"])
    assert saved["identity"]["display"]["scale"] == "fixed"


def test_render_needs_the_scored_slide(results, tmp_path, capsys):
    _, _, folder = results
    summary = read_summary(folder)
    summary["slide_path"] = str(tmp_path / "gone.tif")
    (folder / "summary.json").write_text(json.dumps(summary))
    overlay = (folder / "overlay.png").read_bytes()
    assert main(["render", str(folder), "--cmap", "magma"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "gone.tif is not there" in err
    assert (folder / "overlay.png").read_bytes() == overlay
    assert read_summary(folder)["status"] == "ok"  # nothing was touched


def test_heatmap_command_redraws_on_another_cmap(results, tiny_model, no_scoring, capsys):
    slide, root, folder = results
    overlay = (folder / "overlay.png").read_bytes()
    args = ["heatmap", str(slide), "--model", str(tiny_model), "--out", str(root)]
    assert main([*args, "--device", "cpu", "--cmap", "magma", "-q"]) == 0
    out = capsys.readouterr().out
    assert "r.tif: redrawn" in out and "1 of 1 slides done" in out
    assert (folder / "overlay.png").read_bytes() != overlay
