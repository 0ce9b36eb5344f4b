"""The command line: results for good input; one error line and a non-zero exit for bad input."""

import json
import subprocess
import sys

import pytest
from conftest import CMU_SVS, needs_cmu

from wsi_anomaly.cli import main
from wsi_anomaly.tiles import TileStore


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code, err, *needles):
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error:" in lines[0]
    for n in needles:
        assert n in lines[0], lines[0]


def test_info_table_and_json(capsys, small_slide):
    code, out, _ = run(capsys, "info", str(small_slide.path))
    assert code == 0 and "2048 × 1536" in out and "µm/px" in out
    code, out, _ = run(capsys, "info", "--json", str(small_slide.path))
    info = json.loads(out)
    assert info["dimensions"] == [2048, 1536] and len(info["levels"]) >= 2
    assert info["mpp"] == pytest.approx(0.5, rel=1e-3)


@needs_cmu
def test_info_cmu_reports_vendor_mpp(capsys):
    code, out, _ = run(capsys, "info", "--json", str(CMU_SVS))
    info = json.loads(out)
    assert code == 0 and info["mpp"] == pytest.approx(0.499) and info["mpp_source"] == "openslide"
    assert info["objective_power"] == 20 and "macro" in info["associated_images"]


def test_tile_prints_summary(capsys, small_slide, tmp_path):
    out_store = tmp_path / "t.zarr"
    code, out, _ = run(capsys, "tile", str(small_slide.path), "--out", str(out_store), "-q")
    assert code == 0 and "tiles/s" in out and "kept" in out
    assert len(TileStore(out_store)) > 0


def test_bad_inputs_give_one_line(capsys, tmp_path, small_slide, blank_slide, no_mpp_slide):
    code, _, err = run(capsys, "info", str(tmp_path / "missing.svs"))
    assert_one_error_line(code, err, "not found")

    txt = tmp_path / "notes.txt"
    txt.write_text("not a slide")
    code, _, err = run(capsys, "tile", str(txt), "--out", str(tmp_path / "a.zarr"))
    assert_one_error_line(code, err, "not a slide")

    cut = tmp_path / "cut.tif"
    cut.write_bytes(small_slide.path.read_bytes()[: small_slide.path.stat().st_size // 2])
    code, _, err = run(capsys, "tile", str(cut), "--out", str(tmp_path / "b.zarr"), "-q")
    assert_one_error_line(code, err)
    assert not (tmp_path / "b.zarr").exists()

    code, _, err = run(capsys, "tile", str(no_mpp_slide.path), "--out", str(tmp_path / "c.zarr"))
    assert_one_error_line(code, err, "--slide-mpp")
    code, _, _ = run(
        capsys,
        "tile",
        str(no_mpp_slide.path),
        "--out",
        str(tmp_path / "c.zarr"),
        "--slide-mpp",
        "0.5",
        "-q",
    )
    assert code == 0

    code, _, err = run(capsys, "info", str(small_slide.path), "--slide-mpp", "50")
    assert_one_error_line(code, err, "implausible")

    code, _, err = run(capsys, "tile", str(blank_slide.path), "--out", str(tmp_path / "d.zarr"))
    assert_one_error_line(code, err, "no tissue")
    assert not (tmp_path / "d.zarr").exists()

    code, _, err = run(capsys, "tile", str(small_slide.path), "--out", str(tmp_path / "c.zarr"))
    assert_one_error_line(code, err, "--overwrite")


@pytest.mark.parametrize(
    "argv,needles",
    [
        (
            ["tile", "slide.svs", "--out", "t.zarr", "--mpp", "abc"],
            ["--mpp", "'abc'", "tile --help"],
        ),
        (["tile", "slide.svs"], ["--out", "tile --help"]),
        (["frobnicate"], ["'frobnicate'", "wsi-anomaly --help"]),
        (["heatmap", "s.svs", "--model", "m.pt", "--batch-size", "many"], ["--batch-size"]),
    ],
)
def test_usage_errors_are_one_line(capsys, argv, needles):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert_one_error_line(code, err, *needles)


def test_console_script_exit_code_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "wsi_anomaly.cli", "info", str(tmp_path / "x.svs")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "not found" in proc.stderr


def test_train_and_score_commands(capsys, tmp_path, small_store, tiny_model):
    model = tmp_path / "m.pt"
    code, out, err = run(
        capsys,
        "train",
        "--tiles",
        str(small_store),
        "--out",
        str(model),
        "--config",
        "haloae_fast",
        "--backbone-weights",
        "random",
        "--epochs",
        "1",
        "--samples-per-epoch",
        "1",
        "--batch-size",
        "1",
        "-q",
    )
    assert code == 0, err
    assert "trained 1 epoch in" in out and model.is_file()
    code, out, err = run(
        capsys,
        "score",
        "--model",
        str(tiny_model),
        str(small_store.parent),
        "--out",
        str(tmp_path / "s.csv"),
        "-q",
    )
    assert_one_error_line(code, err, "no images")


def test_train_and_score_bad_inputs(capsys, tmp_path, tiny_model):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(capsys, "train", "--tiles", str(empty), "--out", str(tmp_path / "m.pt"))
    assert_one_error_line(code, err, "no images")
    code, _, err = run(capsys, "train", "--tiles", str(tmp_path / "nope"), "--out", "m.pt")
    assert_one_error_line(code, err, "not found")
    other = tmp_path / "other.pt"
    other.write_bytes(b"junk")
    img = tmp_path / "imgs"
    img.mkdir()
    from PIL import Image

    Image.new("RGB", (256, 256), (200, 100, 150)).save(img / "a.png")
    code, _, err = run(
        capsys, "score", "--model", str(other), str(img), "--out", str(tmp_path / "s.csv")
    )
    assert_one_error_line(code, err, "checkpoint")
    code, _, err = run(
        capsys,
        "score",
        "--model",
        str(tiny_model),
        str(img),
        "--device",
        "cuda",
        "--out",
        str(tmp_path / "s.csv"),
    )
    if not __import__("torch").cuda.is_available():
        assert_one_error_line(code, err, "CUDA")
    code, _, err = run(
        capsys,
        "train",
        "--tiles",
        str(img),
        "--out",
        str(tmp_path / "m.pt"),
        "--config",
        "nonexistent",
    )
    assert_one_error_line(code, err, "not found")


def test_train_atacnet_command(capsys, tmp_path, small_store):
    from PIL import Image

    from wsi_anomaly.checkpoint import load_checkpoint

    anomalies = tmp_path / "abnormal"
    anomalies.mkdir()
    for i in range(2):
        Image.new("RGB", (256, 256), (30 + 40 * i, 160, 40)).save(anomalies / f"a{i}.png")
    model = tmp_path / "atac.pt"
    code, out, err = run(
        capsys,
        "train",
        "--family",
        "atacnet",
        "--tiles",
        str(small_store),
        "--anomalies",
        str(anomalies),
        "--out",
        str(model),
        "--config",
        "atacnet_fast",
        "--backbone-weights",
        "random",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "-q",
    )
    assert code == 0, err
    assert "2 labelled anomalies" in out and model.is_file()
    assert load_checkpoint(model, expect_model="atacnet")["n_labelled_anomalies"] == 2
    code, _, err = run(
        capsys,
        "train",
        "--tiles",
        str(small_store),
        "--anomalies",
        str(anomalies),
        "--out",
        str(tmp_path / "h.pt"),
    )
    assert_one_error_line(code, err, "--family atacnet")
    empty = tmp_path / "none"
    empty.mkdir()
    code, _, err = run(
        capsys,
        "train",
        "--family",
        "atacnet",
        "--tiles",
        str(small_store),
        "--anomalies",
        str(empty),
        "--out",
        str(tmp_path / "x.pt"),
    )
    assert_one_error_line(code, err, "no images")
