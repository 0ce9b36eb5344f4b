"""``wsi-anomaly qc``: QC pictures and tables without a model; bad input gives one line."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import CMU_SVS, needs_cmu
from PIL import Image

from wsi_anomaly.cli import main
from wsi_anomaly.errors import EXIT_SLIDES_FAILED
from wsi_anomaly.quality import first_flag_labels, qc_canvas
from wsi_anomaly.slide.qc import FLAG_COLOURS, FLAG_NAMES, VALUE_NAMES


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code, err, *needles):
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error" in lines[0]
    for n in needles:
        assert n in lines[0], lines[0]


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_qc_writes_picture_tables_and_verdict(capsys, small_slide, tmp_path):
    out = tmp_path / "qc"
    code, text, _ = run(capsys, "qc", small_slide.path, "--out", out, "-q")
    assert code == 0, text
    folder = out / small_slide.path.name
    assert {"qc.png", "qc_tiles.csv", "summary.json"} <= {p.name for p in folder.iterdir()}
    tiles = read_csv(folder / "qc_tiles.csv")
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    assert len(tiles) == summary["n_tiles"] > 0
    assert set(VALUE_NAMES) <= set(tiles[0]) and "flags" in tiles[0]
    # The synthetic slide is clean: no artifact flags, a pass.
    flagged = {f for row in tiles for f in row["flags"].split(";") if f}
    assert flagged <= {"border"}
    cohort = read_csv(out / "qc_summary.csv")
    assert [r["verdict"] for r in cohort] == ["pass"]
    assert float(cohort[0]["usable_fraction"]) == pytest.approx(1.0)
    with Image.open(folder / "qc.png") as im:
        assert im.width > 400
    # A re-run is skipped; other settings are refused without --overwrite.
    code, text, _ = run(capsys, "qc", small_slide.path, "--out", out, "-q")
    assert code == 0 and "pass" in text
    strict = tmp_path / "strict.yaml"
    strict.write_text("qc:\n  min_focus: 10\n", encoding="utf-8")
    code, _, err = run(capsys, "qc", small_slide.path, "--out", out, "--qc-config", strict, "-q")
    assert_one_error_line(code, err, "--overwrite")
    code, text, _ = run(
        capsys, "qc", small_slide.path, "--out", out, "--qc-config", strict, "--overwrite", "-q"
    )
    # Every tile is "blurred" at that threshold: the slide fails, with blur as the reason.
    assert code == 0
    cohort = read_csv(out / "qc_summary.csv")
    assert cohort[0]["verdict"] == "fail" and "blur" in cohort[0]["reasons"]
    assert float(cohort[0]["usable_fraction"]) == pytest.approx(0.0)


@needs_cmu
def test_qc_on_real_slide(capsys, tmp_path):
    code, text, _ = run(capsys, "qc", CMU_SVS, "--out", tmp_path, "-q")
    assert code == 0
    rows = read_csv(tmp_path / "qc_summary.csv")
    assert rows[0]["status"] == "ok" and int(rows[0]["n_tiles"]) > 20
    # Some tissue lies at the border of this small region; distances are in µm.
    tiles = read_csv(tmp_path / CMU_SVS.name / "qc_tiles.csv")
    border = np.array([float(r["border_um"]) for r in tiles])
    assert (border >= 0).all() and border.max() > 64 and "border" in {r["flags"] for r in tiles}


def test_qc_bad_input_one_line(capsys, tmp_path, small_slide, blank_slide):
    code, _, err = run(capsys, "qc", tmp_path / "missing.svs", "--out", tmp_path / "o")
    assert_one_error_line(code, err, "missing.svs")
    text = tmp_path / "notes.svs"
    text.write_text("not a slide", encoding="utf-8")
    code, _, err = run(capsys, "qc", text, "--out", tmp_path / "o")
    assert_one_error_line(code, err)
    code, _, err = run(capsys, "qc", small_slide.path, "--qc-config", "nope", "--out", tmp_path)
    assert_one_error_line(code, err, "nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("qc:\n  max_pen: [1, 2\n", encoding="utf-8")
    code, _, err = run(capsys, "qc", small_slide.path, "--qc-config", bad, "--out", tmp_path)
    assert_one_error_line(code, err, "bad.yaml")
    code, _, err = run(capsys, "qc", blank_slide.path, "--out", tmp_path / "b", "-q")
    assert_one_error_line(code, err, "no tissue")
    # Nothing half-written is left behind by failures.
    assert not list((tmp_path / "b").glob("*.partial"))
    # With --skip-errors the run goes on and records the failure.
    code, _, _ = run(
        capsys, "qc", small_slide.path, text, "--out", tmp_path / "c", "--skip-errors", "-q"
    )
    assert code == EXIT_SLIDES_FAILED
    rows = {r["slide"]: r for r in read_csv(tmp_path / "c" / "qc_summary.csv")}
    assert rows[small_slide.path.name]["status"] == "ok"
    assert rows["notes.svs"]["status"] == "failed" and rows["notes.svs"]["error"]


def test_picture_outlines_flagged_tiles_in_their_colour():
    thumb = np.full((64, 64, 3), 255, np.uint8)
    blur, pen_red = 1 << FLAG_NAMES.index("blur"), 1 << FLAG_NAMES.index("pen_red")
    coords = np.array([[0, 0], [320, 320], [0, 320]])
    canvas = qc_canvas(thumb, 10.0, coords, 320.0, np.array([blur, pen_red, 0], np.uint16))
    colours = {tuple(c) for c in canvas.reshape(-1, 3).tolist()}
    assert FLAG_COLOURS["blur"] in colours and FLAG_COLOURS["pen_red"] in colours
    assert tuple(canvas[32 + 16, 16]) == (255, 255, 255)  # the clean tile is not outlined
    assert tuple(canvas[0, 0]) == FLAG_COLOURS["blur"]
    assert tuple(canvas[16, 16]) == (255, 255, 255)  # an outline, not a filled box


def test_first_flag_labels_prefer_artifacts_over_border():
    border = 1 << FLAG_NAMES.index("border")
    fold = 1 << FLAG_NAMES.index("fold")
    labels = first_flag_labels(np.array([0, border, border | fold], np.uint16))
    assert labels.tolist() == [0, FLAG_NAMES.index("border") + 1, FLAG_NAMES.index("fold") + 1]


def test_tile_takes_the_qc_thresholds(capsys, small_slide, tmp_path):
    from wsi_anomaly.tiles import TileStore

    strict = tmp_path / "strict.yaml"
    strict.write_text("qc:\n  min_sharpness: 100\n", encoding="utf-8")
    out = tmp_path / "t.zarr"
    code, _, _ = run(capsys, "tile", small_slide.path, "--out", out, "--qc-config", strict, "-q")
    assert code == 0
    store = TileStore(out)
    assert store.qc["settings"]["min_sharpness"] == 100
    assert (store.qc_flags & 1).all()  # every tile "blurred" at that threshold
    bad = tmp_path / "bad.yaml"
    bad.write_text("qc:\n  min_sharpness: many\n", encoding="utf-8")
    code, _, err = run(
        capsys, "tile", small_slide.path, "--out", tmp_path / "u.zarr", "--qc-config", bad
    )
    assert_one_error_line(code, err, "min_sharpness")
    assert not (tmp_path / "u.zarr").exists()
