"""Slides a brightfield model cannot judge: fluorescence is told from the tissue thumbnail and
named with one line (exit status 6); --skip-errors records the reason."""

import csv
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import CMU_SVS, needs_cmu
from test_cli import assert_one_error_line, run

from wsi_anomaly.errors import NotBrightfieldError
from wsi_anomaly.slide import Slide
from wsi_anomaly.slide.stain import brightfield_problem, measure_brightness


def _blobs(shape, rng, n=40, radius=25):
    """A boolean mask of ``n`` round "nuclei clusters"."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    mask = np.zeros(shape, bool)
    for y, x in zip(rng.integers(0, shape[0], n), rng.integers(0, shape[1], n)):
        mask |= (yy - y) ** 2 + (xx - x) ** 2 < radius**2
    return mask


def fluorescence_image(shape=(512, 512), channel=2, seed=0):
    """Dark background (a little noise) with light in one channel where the "tissue" is."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 12, (*shape, 3)).astype(np.uint8)
    img[_blobs(shape, rng), channel] = 180
    return img


def brightfield_image(shape=(512, 512), seed=0):
    """Near-white glass with pink/purple "tissue"."""
    rng = np.random.default_rng(seed)
    img = np.full((*shape, 3), 240, np.uint8) + rng.integers(0, 10, (*shape, 3)).astype(np.uint8)
    tissue = _blobs(shape, rng, n=30, radius=60)
    img[tissue] = (170, 90, 160)
    return img


def test_fluorescence_is_told_from_brightfield():
    fluo = measure_brightness(fluorescence_image())
    assert fluo is not None and fluo.fluorescence and fluo.channels == ("blue",)
    assert "blue channel only" in brightfield_problem(fluorescence_image())
    two = fluorescence_image()
    two[..., 0] = np.maximum(two[..., 0], fluorescence_image(channel=0, seed=3)[..., 0])
    assert measure_brightness(two).channels == ("red", "blue")
    bright = measure_brightness(brightfield_image())
    assert bright is not None and not bright.fluorescence and bright.dark_share < 0.05
    assert brightfield_problem(brightfield_image()) is None


def test_black_padding_is_not_a_dark_background():
    """Unscanned areas read as exact black (MRXS, sparse DICOM) do not make a slide dark."""
    img = brightfield_image()
    img[:, : img.shape[1] * 3 // 4] = 0
    assert brightfield_problem(img) is None
    assert measure_brightness(np.zeros((64, 64, 3), np.uint8)) is None  # nothing scanned


def test_brightfield_slides_pass(small_slide):
    with Slide(small_slide.path) as slide:
        assert brightfield_problem(slide.thumbnail(512)[0]) is None


@needs_cmu
def test_real_he_slide_passes():
    with Slide(CMU_SVS) as slide:
        thumb = slide.thumbnail(512)[0]
    assert brightfield_problem(thumb) is None
    assert measure_brightness(thumb).channels == ("red", "green", "blue")


@pytest.fixture(scope="module")
def fluorescence_slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("fluo") / "dapi.tif"
    img = fluorescence_image((1536, 2048), seed=4)
    tifffile.imwrite(
        path,
        img,
        photometric="rgb",
        tile=(256, 256),
        resolution=(1e4 / 0.5, 1e4 / 0.5),
        resolutionunit="CENTIMETER",
    )
    return path


def test_tile_names_a_fluorescence_slide(capsys, tmp_path, fluorescence_slide):
    code, _, err = run(capsys, "tile", str(fluorescence_slide), "--out", str(tmp_path / "t.zarr"))
    assert code == NotBrightfieldError.exit_code == 6
    assert_one_error_line(code, err, "dapi.tif looks like a fluorescence slide", "blue channel")
    assert not (tmp_path / "t.zarr").exists()


def test_skip_errors_records_why(capsys, tmp_path, fluorescence_slide, tiny_model):
    out = tmp_path / "results"
    code, _, err = run(
        capsys,
        "heatmap",
        str(fluorescence_slide),
        "--model",
        str(tiny_model),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--skip-errors",
        "-q",
    )
    assert code == 5
    rows = list(csv.DictReader(Path(out / "summary.csv").open()))
    assert rows[0]["status"] == "failed"
    assert "fluorescence" in rows[0]["error"] and "brightfield" in rows[0]["error"]
    assert err.count("looks like a fluorescence slide") == 1
