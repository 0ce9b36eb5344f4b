"""Tile features other tools extracted (TRIDENT, CLAM) as `train` and `heatmap` input: a memory
bank of normal tile vectors, slides scored from their `.h5` files without tiling, and every
mismatch between file, slide and model refused with one line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from test_cli import assert_one_error_line, run

h5py = pytest.importorskip("h5py")

DIM = 24
SIDE = 256  # tile side at level 0 (the small slide is 2048 × 1536: an 8 × 6 grid)
#: (col, row) of the tiles whose vectors are drawn from a shifted distribution
ANOMALOUS = ((2, 1), (5, 3), (6, 4))


def grid_coords(width: int, height: int, side: int = SIDE) -> np.ndarray:
    cols, rows = width // side, height // side
    xy = np.stack(np.meshgrid(np.arange(cols), np.arange(rows)), axis=-1).reshape(-1, 2)
    return (xy * side).astype(np.int64)


def write_features(
    path: Path,
    features: np.ndarray,
    coords: np.ndarray,
    layout: str = "trident",
    encoder: str = "uni_v1",
    level0_size: tuple[int, int] | None = None,
) -> Path:
    """A features file as TRIDENT (attributes on both datasets) or CLAM (none) writes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        feats = f.create_dataset("features", data=features.astype(np.float32))
        xy = f.create_dataset("coords", data=coords)
        if layout == "trident":
            feats.attrs["encoder"] = encoder
            xy.attrs.update(
                {
                    "patch_size": SIDE,
                    "patch_size_level0": SIDE,
                    "target_magnification": 20,
                    "level0_magnification": 20,
                    "overlap": 0,
                    "name": path.stem,
                }
            )
            if level0_size is not None:
                xy.attrs["level0_width"], xy.attrs["level0_height"] = level0_size
    return path


def slide_vectors(coords: np.ndarray, seed: int = 5, dim: int = DIM) -> tuple[np.ndarray, set]:
    """Normal vectors N(0, 1) everywhere, shifted ones (mean 3) at :data:`ANOMALOUS`."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(len(coords), dim))
    cells = {(int(x) // SIDE, int(y) // SIDE) for x, y in coords}
    anomalous = set()
    for i, (x, y) in enumerate(coords.tolist()):
        if (x // SIDE, y // SIDE) in ANOMALOUS:
            features[i] += 3.0
            anomalous.add((x, y))
    assert len(anomalous) == len(ANOMALOUS) and len(cells) == len(coords)
    return features, anomalous


@pytest.fixture(scope="module")
def trident_job(small_slide, tmp_path_factory):
    """A TRIDENT job folder: three normal training slides and the small slide, UNI-like."""
    job = tmp_path_factory.mktemp("trident")
    folder = job / "20x_256px_0px_overlap" / "features_uni_v1"
    rng = np.random.default_rng(0)
    coords = grid_coords(4096, 2048)
    for i in range(3):
        write_features(folder / f"normal{i}.h5", rng.normal(size=(len(coords), DIM)), coords)
    features, _ = slide_vectors(grid_coords(2048, 1536))
    write_features(
        job / "slides" / "features_uni_v1" / f"{small_slide.path.stem}.h5",
        features,
        grid_coords(2048, 1536),
        level0_size=(2048, 1536),
    )
    return job


@pytest.fixture(scope="module")
def knn_model(trident_job, tmp_path_factory):
    from wsi_anomaly.cli import main

    out = tmp_path_factory.mktemp("knn") / "knn.pt"
    folder = trident_job / "20x_256px_0px_overlap" / "features_uni_v1"
    code = main(["train", "--features", str(folder), "--out", str(out), "--device", "cpu", "-q"])
    assert code == 0
    return out


def test_train_fits_a_bank_of_tile_vectors_and_records_their_source(knn_model):
    from wsi_anomaly.checkpoint import load_checkpoint
    from wsi_anomaly.models.calibration import Calibration

    ckpt = load_checkpoint(knn_model)
    assert ckpt["model_name"] == "features-knn"
    assert set(ckpt["state_dict"]) == {"memory_bank"}
    bank = ckpt["state_dict"]["memory_bank"]
    assert bank.shape[1] == DIM and 1 <= bank.shape[0] <= 3 * 128
    record = ckpt["tile_features"]
    assert record["encoder"] == "uni_v1" and record["dim"] == DIM
    assert record["patch_size_level0"] == SIDE and record["target_magnification"] == 20
    assert record["n_files"] == 3 and record["n_tiles"] == 3 * 128
    calibration = Calibration.from_dict(ckpt["calibration"])
    assert calibration.scale_source == "held-out normal tiles"
    assert 0 < calibration.median() < calibration.threshold()


def read_table(folder: Path) -> list[dict[str, str]]:
    with (folder / "tiles.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_heatmap_from_trident_features_ranks_the_shifted_tiles_first(
    capsys, small_slide, trident_job, knn_model, tmp_path
):
    _, anomalous = slide_vectors(grid_coords(2048, 1536))
    results = tmp_path / "results"
    args = [
        "heatmap", str(small_slide.path), "--features", str(trident_job / "slides"),
        "--model", str(knn_model), "--out", str(results), "--device", "cpu", "-q",
    ]  # fmt: skip
    code, out, err = run(capsys, *args)
    assert code == 0, err
    folder = results / small_slide.path.name
    for name in ("heatmap.png", "overlay.png", "thumbnail.png", "tiles.geojson", "top_tiles.png"):
        assert (folder / name).is_file(), name
    assert (folder / "heatmap.ome.zarr").is_dir() and not (folder / "tiles.zarr").exists()
    rows = read_table(folder)
    assert len(rows) == 48 and all(r["width"] == str(SIDE) for r in rows)
    ranked = sorted(rows, key=lambda r: -float(r["score"]))
    top = {(int(r["x"]), int(r["y"])) for r in ranked[: len(anomalous)]}
    assert top == anomalous
    assert all(r["class"] == "Anomalous" for r in ranked[: len(anomalous)])
    summary = json.loads((folder / "summary.json").read_text())
    h5 = trident_job / "slides" / "features_uni_v1" / f"{small_slide.path.stem}.h5"
    import hashlib

    assert summary["features"]["sha256"] == hashlib.sha256(h5.read_bytes()).hexdigest()
    assert summary["identity"]["scoring"]["features"]["sha256"] == summary["features"]["sha256"]
    assert summary["grid"] == [8, 6] and summary["n_tiles"] == 48
    assert 0 < summary["fraction_anomalous"] < 0.5

    # the same work again is skipped; another features file is other work
    code, out, err = run(capsys, *args)
    assert code == 0 and "skipped (done)" in out, err
    features, _ = slide_vectors(grid_coords(2048, 1536), seed=9)
    write_features(h5, features, grid_coords(2048, 1536), level0_size=(2048, 1536))
    code, _, err = run(capsys, *args)
    assert_one_error_line(code, err, "other work", "settings")


def test_heatmap_from_clam_features_needs_the_tile_side(capsys, small_slide, knn_model, tmp_path):
    coords = grid_coords(2048, 1536)
    features, anomalous = slide_vectors(coords, seed=11)
    # CLAM lays one grid per tissue region, from the region's corner: the right half's grid
    # starts 37 px further right and 11 px lower (its tiles still overlap none of the left's)
    right = coords[:, 0] >= 1024
    coords[right] += np.array([37, 11])
    anomalous = {(x + 37, y + 11) if x >= 1024 else (x, y) for x, y in anomalous}
    feat_dir = tmp_path / "clam_features"
    write_features(feat_dir / "h5_files" / f"{small_slide.path.stem}.h5", features, coords, "clam")
    base = [
        "heatmap", str(small_slide.path), "--features", str(feat_dir), "--model",
        str(knn_model), "--out", str(tmp_path / "results"), "--device", "cpu", "-q",
    ]  # fmt: skip
    code, _, err = run(capsys, *base)
    assert_one_error_line(code, err, "does not record its tile size", "--patch-size-level0")
    code, _, err = run(capsys, *base, "--patch-size-level0", str(SIDE))
    assert code == 0, err
    folder = tmp_path / "results" / small_slide.path.name
    rows = read_table(folder)
    ranked = sorted(rows, key=lambda r: -float(r["score"]))
    assert {(int(r["x"]), int(r["y"])) for r in ranked[: len(anomalous)]} == anomalous
    assert len(rows) == 48
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["features"]["tiles_off_grid"] == 24 and summary["grid"] == [8, 6]
    import zarr

    cells = np.asarray(zarr.open_group(str(folder / "heatmap.ome.zarr"), mode="r")["0"][:])
    assert cells.shape == (6, 8) and np.isfinite(cells).all()  # every tile in its own cell


@pytest.mark.parametrize(
    "case, needles",
    [
        ("outside", ["outside the 2048×1536 px slide", "do not belong together"]),
        ("off-grid", ["tiles 3 at (868, 0) and 4 at (1024, 0) overlap", "256 px tile grid"]),
        ("dimension", ["16-dimensional", "24-dimensional", "another encoder"]),
        ("encoder", ["conch_v15", "uni_v1"]),
        ("slide size", ["4096×4096 px slide", "do not belong together"]),
        ("duplicate", ["more than once"]),
        ("missing", ["no features file for"]),
    ],
)
def test_mismatched_features_are_refused_with_one_line(
    capsys, small_slide, knn_model, tmp_path, case, needles
):
    coords = grid_coords(2048, 1536)
    features, _ = slide_vectors(coords)
    encoder, size = "uni_v1", (2048, 1536)
    if case == "outside":
        coords = coords + np.array([1024, 0])
    elif case == "off-grid":
        coords[3] += np.array([100, 0])
    elif case == "dimension":
        features = features[:, :16]
    elif case == "encoder":
        encoder = "conch_v15"
    elif case == "slide size":
        size = (4096, 4096)
    elif case == "duplicate":
        coords[3] = coords[2]
    name = "other-slide" if case == "missing" else small_slide.path.stem
    folder = tmp_path / "features"
    write_features(folder / f"{name}.h5", features, coords, encoder=encoder, level0_size=size)
    code, _, err = run(
        capsys, "heatmap", str(small_slide.path), "--features", str(folder), "--model",
        str(knn_model), "--out", str(tmp_path / "results"), "--device", "cpu",
    )  # fmt: skip
    assert_one_error_line(code, err, *needles)
    assert not any((tmp_path / "results").glob("*/summary.json"))


def test_models_and_inputs_of_the_other_kind_are_refused(
    capsys, small_slide, small_store, tiny_model, knn_model, trident_job, tmp_path
):
    folder = str(trident_job / "20x_256px_0px_overlap" / "features_uni_v1")
    # a features model on a slide's pixels, and on images
    code, _, err = run(
        capsys, "heatmap", str(small_slide.path), "--model", str(knn_model), "--out",
        str(tmp_path / "r1"), "--device", "cpu",
    )  # fmt: skip
    assert_one_error_line(code, err, "tile feature vectors", "--features")
    # an image model given tile features
    code, _, err = run(
        capsys, "heatmap", str(small_slide.path), "--features", str(trident_job / "slides"),
        "--model", str(tiny_model), "--out", str(tmp_path / "r2"), "--device", "cpu",
    )  # fmt: skip
    assert_one_error_line(code, err, "HaloAE", "train --features")
    # training: tiles for the features family, features for an image family
    code, _, err = run(
        capsys, "train", "--tiles", str(small_store), "--family", "features-knn", "--out",
        str(tmp_path / "a.pt"), "--device", "cpu",
    )  # fmt: skip
    assert_one_error_line(code, err, "--features")
    code, _, err = run(
        capsys, "train", "--features", folder, "--family", "haloae", "--out",
        str(tmp_path / "b.pt"), "--device", "cpu",
    )  # fmt: skip
    assert_one_error_line(code, err, "--family features-knn")
    code, _, err = run(
        capsys, "heatmap", str(small_slide.path), "--patch-size-level0", "256", "--model",
        str(knn_model), "--out", str(tmp_path / "r3"),
    )  # fmt: skip
    assert_one_error_line(code, err, "--patch-size-level0", "--features")


def test_training_files_of_two_encoders_are_refused(capsys, tmp_path):
    coords = grid_coords(1024, 1024)
    rng = np.random.default_rng(1)
    write_features(tmp_path / "f" / "a.h5", rng.normal(size=(16, DIM)), coords)
    write_features(tmp_path / "f" / "b.h5", rng.normal(size=(16, DIM)), coords, encoder="virchow2")
    code, _, err = run(
        capsys, "train", "--features", str(tmp_path / "f"), "--out", str(tmp_path / "m.pt"),
        "--device", "cpu",
    )  # fmt: skip
    assert_one_error_line(code, err, "virchow2", "uni_v1", "one encoder")


def test_feature_files_are_found_in_trident_and_clam_layouts(tmp_path):
    from wsi_anomaly.errors import InputNotFoundError, InvalidInputError
    from wsi_anomaly.tiles.feature_files import feature_file_for_slide, training_feature_files

    coords = grid_coords(512, 512)
    vectors = np.zeros((len(coords), DIM))
    job = tmp_path / "job"
    trident = write_features(job / "20x_256px_0px_overlap" / "features_uni_v1" / "s1.h5",
                             vectors, coords)  # fmt: skip
    clam = write_features(tmp_path / "clam" / "h5_files" / "s1.h5", vectors, coords, "clam")
    flat = write_features(tmp_path / "flat" / "s1.h5", vectors, coords)
    assert feature_file_for_slide("/slides/s1.svs", [job]) == trident
    assert feature_file_for_slide("/slides/s1.svs", [job / "20x_256px_0px_overlap"]) == trident
    assert feature_file_for_slide("/slides/s1.svs", [tmp_path / "clam"]) == clam
    assert feature_file_for_slide("/slides/s1.ndpi", [tmp_path / "flat"]) == flat
    other = write_features(tmp_path / "other" / "s9.h5", vectors, coords)
    assert feature_file_for_slide("s1.tif", [other, flat]) == flat
    with pytest.raises(InputNotFoundError, match="does not exist"):
        feature_file_for_slide("s1.tif", [tmp_path / "nothing-here"])
    with pytest.raises(InputNotFoundError, match="no features file for s2.svs"):
        feature_file_for_slide("s2.svs", [job, tmp_path / "clam"])
    assert training_feature_files([job]) == [trident.resolve()]
    assert training_feature_files([tmp_path / "clam", flat]) == [clam.resolve(), flat.resolve()]
    # two encoders side by side: name the one to use
    write_features(job / "20x_256px_0px_overlap" / "features_conch_v15" / "s1.h5", vectors, coords)
    with pytest.raises(InvalidInputError, match="more than one folder"):
        feature_file_for_slide("s1.svs", [job])
    with pytest.raises(InvalidInputError, match="more than one folder"):
        training_feature_files([job])


def test_first_overlap_finds_tiles_closer_than_the_grid_step():
    from wsi_anomaly.tiles.feature_files import first_overlap

    grid = grid_coords(1024, 1024)
    assert first_overlap(grid, SIDE) is None
    shifted = grid.copy()
    shifted[grid[:, 0] >= 512] += np.array([5, 3])  # a second region's grid: no overlap
    assert first_overlap(shifted, SIDE) is None
    assert first_overlap(grid, SIDE + 1) is not None  # tiles of another size
    bumped = grid.copy()
    bumped[5] += np.array([0, 255])
    assert first_overlap(bumped, SIDE) in {(5, 9), (9, 5)}


def test_python_api_trains_on_features_and_scores_slides_from_them(
    small_slide, trident_job, tmp_path
):
    import wsi_anomaly as wa

    folder = trident_job / "20x_256px_0px_overlap" / "features_uni_v1"
    trained = wa.train_on_features([folder], tmp_path / "api.pt", device="cpu")
    assert trained.checkpoint.is_file() and trained.epochs == 1
    rows = wa.heatmap(
        [small_slide.path], trained.checkpoint, out=tmp_path / "results", device="cpu",
        features=[trident_job / "slides"],
    )  # fmt: skip
    assert rows[0]["status"] == "ok" and int(rows[0]["n_tiles"]) == 48
    assert (tmp_path / "results" / "summary.csv").is_file()
