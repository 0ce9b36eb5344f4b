"""The command line's shared options: one meaning per flag, global -v/-q/--debug, options
checked before any work starts, the exit status of a cohort with failed slides, and `info` on a
slide without resolution metadata."""

import json
import logging
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_cli import assert_one_error_line, run

from wsi_anomaly.cli import build_parser, main
from wsi_anomaly.cli.options import scoring_settings
from wsi_anomaly.errors import EXIT_SLIDES_FAILED
from wsi_anomaly.slide.synthetic import write_synthetic_slide

REPO = Path(__file__).resolve().parents[1]


# -- one meaning per flag ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv,needles",
    [
        (
            ["train", "--tiles", "t", "--out", "m.pt", "--model", "atacnet"],
            ["--model", "--family atacnet"],
        ),
        (["mvtec", "--root", "r", "--model", "haloae"], ["--model", "--family haloae"]),
        (["tile", "s.svs", "--out", "t.zarr", "--workers", "2"], ["--workers", "--read-threads"]),
        (
            ["train", "--tiles", "t", "--out", "m.pt", "--workers", "2"],
            ["--workers", "--loader-workers"],
        ),
        (["score", "--model", "m.pt", "x", "--workers", "2"], ["--workers", "--loader-workers"]),
        (["mvtec", "--root", "r", "--workers", "2"], ["--workers", "--loader-workers"]),
    ],
)
def test_moved_flags_name_the_right_one(capsys, argv, needles):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert_one_error_line(code, err, *needles)


def test_each_flag_parses_where_it_belongs():
    parse = build_parser().parse_args
    args = parse(
        ["train", "--tiles", "t", "--out", "m.pt", "--family", "atacnet", "--loader-workers", "3"]
    )
    assert args.family == "atacnet" and args.loader_workers == 3
    assert parse(["mvtec", "--root", "r", "--family", "atacnet"]).family == "atacnet"
    assert parse(["tile", "s.svs", "--out", "t.zarr", "--read-threads", "2"]).read_threads == 2
    assert parse(["score", "--model", "m.pt", "x", "--loader-workers", "0"]).loader_workers == 0
    args = parse(["heatmap", "s.svs", "--model", "m.pt", "--workers", "2", "--read-threads", "4"])
    assert args.workers == 2 and args.read_threads == 4 and args.model == "m.pt"


# -- -v / -q / --debug before or after the subcommand ----------------------------------------------
@pytest.fixture
def restore_loggers():
    loggers = [logging.getLogger(), logging.getLogger("wsi_anomaly")]
    levels = [lg.level for lg in loggers]
    yield
    for lg, level in zip(loggers, levels):
        lg.setLevel(level)


def test_verbosity_flags_before_and_after_the_command():
    parse = build_parser().parse_args
    for argv in (
        ["-v", "-q", "--debug", "tile", "s.svs", "--out", "t.zarr"],
        ["tile", "s.svs", "--out", "t.zarr", "-v", "-q", "--debug"],
    ):
        args = parse(argv)
        assert args.verbose and args.quiet and args.debug
    args = parse(["tile", "s.svs", "--out", "t.zarr"])
    assert not (args.verbose or args.quiet or args.debug)


VERBOSE_PROBE = """
import logging, sys
from wsi_anomaly.cli import main
code = main(sys.argv[1:])
logging.getLogger("wsi_anomaly.cli.probe").debug("package detail")
logging.getLogger("PIL.PngImagePlugin").debug("third-party noise")
sys.exit(code)
"""


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_is_for_the_package_only(small_slide, where):
    argv = ["info", str(small_slide.path)]
    argv = ["-v", *argv] if where == "before" else [*argv, "-v"]
    # A fresh interpreter: logging is configured by the command, not by pytest.
    proc = subprocess.run(
        [sys.executable, "-c", VERBOSE_PROBE, *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "package detail" in proc.stderr
    assert "third-party noise" not in proc.stderr


def test_quiet_silences_info(capsys, caplog, restore_loggers, small_slide):
    assert main(["-q", "info", str(small_slide.path)]) == 0
    logging.getLogger("wsi_anomaly.x").info("progress")
    logging.getLogger("wsi_anomaly.x").warning("a problem")
    messages = [r.getMessage() for r in caplog.records]
    assert "a problem" in messages and "progress" not in messages


# -- every option checked before the work starts ---------------------------------------------------
@pytest.mark.parametrize(
    "argv,needles",
    [
        (["heatmap", "s.svs", "--model", "m.pt", "--workers", "0"], ["--workers", "must be"]),
        (["heatmap", "s.svs", "--model", "m.pt", "--workers", "-2"], ["--workers", "must be"]),
        (
            ["heatmap", "s.svs", "--model", "m.pt", "--read-threads", "0"],
            ["--read-threads", "must be"],
        ),
        (
            ["tile", "s.svs", "--out", "t.zarr", "--read-threads", "-1"],
            ["--read-threads", "must be"],
        ),
        (
            ["train", "--tiles", "t", "--out", "m.pt", "--loader-workers", "-1"],
            ["--loader-workers", "must be"],
        ),
        (
            ["score", "--model", "m.pt", "x", "--loader-workers", "-1"],
            ["--loader-workers", "must be"],
        ),
        (["mvtec", "--root", "r", "--loader-workers", "-1"], ["--loader-workers", "must be"]),
        (["heatmap", "s.svs", "--model", "m.pt", "--batch-size", "0"], ["--batch-size", "must be"]),
        (["score", "--model", "m.pt", "x", "--batch-size", "-4"], ["--batch-size", "must be"]),
        (
            ["train", "--tiles", "t", "--out", "m.pt", "--batch-size", "0"],
            ["--batch-size", "must be"],
        ),
        (["heatmap", "s.svs", "--model", "m.pt", "--cmap", "nosuchmap"], ["--cmap", "'nosuchmap'"]),
        (["heatmap", "s.svs", "--model", "m.pt", "--alpha", "1.5"], ["--alpha", "between 0 and 1"]),
        (["heatmap", "s.svs", "--model", "m.pt", "--alpha", "half"], ["--alpha", "'half'"]),
        (["heatmap", "s.svs", "--model", "m.pt", "--scale", "auto"], ["--scale", "'auto'"]),
        (["heatmap", "s.svs", "--model", "m.pt", "--compile", "fast"], ["--compile", "'fast'"]),
        (["score", "--model", "m.pt", "x", "--compile", "yes"], ["--compile", "reduce-overhead"]),
        (["score", "--model", "m.pt", "x", "--precision", "fp16"], ["--precision", "'fp16'"]),
        (["heatmap", "s.svs", "--model", "m.pt", "--runtime", "tvm"], ["--runtime", "'tvm'"]),
        (
            ["score", "--model", "m.pt", "x", "--batch-size", "biggest"],
            ["--batch-size", "'biggest'"],
        ),
    ],
)
def test_bad_option_values_stop_at_parsing(capsys, argv, needles):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert_one_error_line(code, err, *needles)


def test_scale_and_alpha_parse():
    parse = build_parser().parse_args
    args = parse(["heatmap", "s.svs", "--model", "m.pt"])
    assert args.scale == "fixed" and args.alpha == 0.5
    args = parse(["heatmap", "s.svs", "--model", "m.pt", "--scale", "slide", "--alpha", "0.8"])
    assert args.scale == "slide" and args.alpha == 0.8


def test_known_colour_maps_pass():
    for cmap in ("coolwarm", "viridis", "inferno_r"):
        assert (
            build_parser().parse_args(["heatmap", "s.svs", "--model", "m.pt", "--cmap", cmap]).cmap
            == cmap
        )


def heatmap_of_nothing(tmp_path, out=None) -> list[str]:
    """``heatmap`` of a slide and model that do not exist: what is checked before slide work."""
    out = out or tmp_path / "out"
    return [
        "heatmap",
        str(tmp_path / "none.svs"),
        "--model",
        str(tmp_path / "none.pt"),
        "--out",
        str(out),
    ]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dead_scheduler_is_refused_before_slide_work(capsys, tmp_path):
    address = f"tcp://127.0.0.1:{_closed_port()}"
    code, _, err = run(capsys, *heatmap_of_nothing(tmp_path), "--scheduler", address)
    assert code == 2
    assert_one_error_line(code, err, f"cannot reach dask scheduler at {address}")
    assert not (tmp_path / "out").exists()


def test_outputs_of_the_wrong_kind_are_refused(capsys, tmp_path):
    a_file = tmp_path / "results.txt"
    a_file.write_text("not a folder")
    a_folder = tmp_path / "folder"
    a_folder.mkdir()
    code, _, err = run(capsys, *heatmap_of_nothing(tmp_path, out=a_file))
    assert_one_error_line(code, err, "--out", "is a file")
    code, _, err = run(capsys, "train", "--tiles", str(tmp_path / "none"), "--out", str(a_folder))
    assert_one_error_line(code, err, "--out", "is a folder")
    code, _, err = run(
        capsys,
        "score",
        "--model",
        str(tmp_path / "none.pt"),
        str(tmp_path),
        "--out",
        str(a_folder),
        "--overwrite",
    )
    assert_one_error_line(code, err, "--out", "is a folder")
    assert a_folder.is_dir() and a_file.read_text() == "not a folder"


# -- the exit status of a cohort with failed slides -------------------------------------------------
@pytest.fixture(scope="module")
def good_slide(tmp_path_factory):
    return write_synthetic_slide(
        tmp_path_factory.mktemp("cohort") / "good.tif", width=1280, height=1024, mpp=0.5, seed=5
    )


def test_skip_errors_exit_status_says_slides_failed(capsys, tmp_path, good_slide, tiny_model):
    bad = tmp_path / "bad.svs"
    bad.write_text("not a slide")
    out = tmp_path / "results"
    code, stdout, err = run(
        capsys,
        "heatmap",
        str(good_slide.path),
        str(bad),
        "--model",
        str(tiny_model),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--batch-size",
        "8",
        "--skip-errors",
        "-q",
    )
    assert code == EXIT_SLIDES_FAILED == 5
    assert "1 of 2 slides done" in stdout
    assert err.strip().splitlines()[-1] == f"1 of 2 slides failed (see {out / 'summary.csv'})"
    assert (out / "good.tif" / "heatmap.png").is_file()


def test_lone_slide_without_tissue_counts_as_failed(capsys, tmp_path, blank_slide, tiny_model):
    out = tmp_path / "results"
    code, _, err = run(
        capsys,
        "heatmap",
        str(blank_slide.path),
        "--model",
        str(tiny_model),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--skip-errors",
        "-q",
    )
    assert code == EXIT_SLIDES_FAILED
    assert err.strip().splitlines()[-1] == f"1 of 1 slides failed (see {out / 'summary.csv'})"


# -- info on a slide without resolution metadata ----------------------------------------------------
@pytest.fixture
def plain_tiff(tmp_path):
    import tifffile

    path = tmp_path / "plain.tif"
    rng = np.random.default_rng(0)
    tifffile.imwrite(path, rng.integers(0, 255, (300, 400, 3), dtype=np.uint8), photometric="rgb")
    return path


def test_info_describes_a_slide_without_resolution(capsys, plain_tiff):
    code, out, err = run(capsys, "info", str(plain_tiff))
    assert code == 0, err
    assert "400 × 300 px" in out
    assert "resolution      unknown — pass --slide-mpp MPP" in out
    code, out, _ = run(capsys, "info", "--json", str(plain_tiff))
    info = json.loads(out)
    assert code == 0 and info["mpp"] is None and info["dimensions"] == [400, 300]
    assert [lv["mpp"] for lv in info["levels"]] == [None] * len(info["levels"])
    code, out, _ = run(capsys, "info", "--json", str(plain_tiff), "--slide-mpp", "0.25")
    assert code == 0 and json.loads(out)["mpp"] == pytest.approx(0.25)


def test_info_without_resolution_on_a_pyramid(capsys, no_mpp_slide):
    code, out, _ = run(capsys, "info", str(no_mpp_slide.path))
    assert code == 0 and "unknown — pass --slide-mpp MPP" in out and "1024 × 768" in out


def test_batch_size_auto_and_compile_modes_parse():
    for command in (["heatmap", "s.svs", "--model", "m.pt"], ["score", "--model", "m.pt", "x"]):
        args = build_parser().parse_args(command)
        assert args.batch_size == "auto" and args.compile == "off"
        args = build_parser().parse_args(
            [*command, "--batch-size", "64", "--compile", "reduce-overhead"]
        )
        assert args.batch_size == 64 and args.compile == "reduce-overhead"
        assert scoring_settings(args)["precision"] == "auto"
        assert scoring_settings(args)["engine"] == "torch"
        args = build_parser().parse_args([*command, "--precision", "bf16", "--runtime", "onnx"])
        assert scoring_settings(args)["precision"] == "bf16"
        assert scoring_settings(args)["engine"] == "onnx"


def test_bad_mpp_csv_header_is_one_error_line(capsys, tmp_path):
    bad = tmp_path / "mpp.csv"
    bad.write_text("name,res\na.svs,0.25\n")
    code, _, err = run(capsys, *heatmap_of_nothing(tmp_path), "--mpp-csv", str(bad))
    assert_one_error_line(code, err, "slide,mpp", "wsi,mpp")
    assert not (tmp_path / "out").exists()


def test_recursive_flag_parses():
    parse = build_parser().parse_args
    assert not parse(["heatmap", "d", "--model", "m.pt"]).recursive
    assert parse(["heatmap", "d", "--model", "m.pt", "--recursive"]).recursive
