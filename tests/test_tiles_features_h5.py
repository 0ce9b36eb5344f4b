import numpy as np
import pytest

h5py = pytest.importorskip("h5py")

from wsi_anomaly.errors import InputNotFoundError, InvalidInputError
from wsi_anomaly.tiles.features_h5 import check_coordinates, read_tile_features


def _grid(n, step=512, cols=8):
    i = np.arange(n)
    return np.stack([(i % cols) * step, (i // cols) * step], axis=1).astype(np.int64)


def write_trident(path, n=20, dim=16, step=512, dtype=np.float32, **overrides):
    """A file as TRIDENT's extract_patch_features writes it."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(n, dim)).astype(dtype)
    coords = _grid(n, step)
    attrs = {
        "patch_size": 256,
        "patch_size_level0": 512,
        "level0_magnification": 40,
        "target_magnification": 20,
        "overlap": 0,
        "name": "slide",
        "savetodir": "/tmp/x",
        "level0_width": 8192,
        "level0_height": 6144,
    }
    attrs.update(overrides)
    with h5py.File(path, "w") as f:
        d = f.create_dataset("features", data=features)
        d.attrs.update({"name": "slide", "savetodir": "/tmp/x", "encoder": "uni_v1"})
        c = f.create_dataset("coords", data=coords)
        c.attrs.update({k: v for k, v in attrs.items() if v is not None})
    return features, coords


def write_clam(path, features, coords, attrs=None):
    """A file as CLAM's extract_features_fp writes it (no attributes by default)."""
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=features)
        c = f.create_dataset("coords", data=coords)
        c.attrs.update(attrs or {})


def test_reads_trident_file(tmp_path):
    features, coords = write_trident(tmp_path / "s.h5", dtype=np.float16)
    tiles = read_tile_features(tmp_path / "s.h5")
    assert len(tiles) == 20 and tiles.dim == 16
    assert tiles.features.dtype == np.float32 and tiles.coords.dtype == np.int64
    np.testing.assert_array_equal(tiles.features, features.astype(np.float32))
    np.testing.assert_array_equal(tiles.coords, coords)
    assert tiles.patch_size_level0 == 512 and tiles.level0_size == (8192, 6144)
    assert tiles.encoder == "uni_v1" and tiles.attrs["target_magnification"] == 20
    check_coordinates(tiles, 8192, 6144, step_px=512)
    check_coordinates(tiles, 8192, 6144, patch_size_level0=512)


def test_reads_clam_files(tmp_path):
    rng = np.random.default_rng(1)
    features = rng.normal(size=(10, 1024)).astype(np.float32)
    coords = _grid(10, 256).astype(np.int32)
    write_clam(tmp_path / "clam.h5", features, coords)
    tiles = read_tile_features(tmp_path / "clam.h5")
    assert tiles.patch_size_level0 is None and tiles.level0_size is None and tiles.encoder is None
    with pytest.raises(InvalidInputError, match="does not record its tile size"):
        check_coordinates(tiles, 4096, 4096)
    check_coordinates(tiles, 4096, 4096, patch_size_level0=256, step_px=256)
    # CLAM's patch attributes: patch_size at patch_level, downsample per axis
    attrs = {"patch_size": 256, "patch_level": 1, "downsample": np.array([4.0, 4.0])}
    write_clam(tmp_path / "clam2.h5", features, coords * 4, attrs)
    tiles = read_tile_features(tmp_path / "clam2.h5")
    assert tiles.patch_size_level0 == 1024 and tiles.attrs["downsample"] == [4.0, 4.0]
    with pytest.raises(InvalidInputError, match="records tiles of 1024"):
        check_coordinates(tiles, 8192, 8192, patch_size_level0=512)


def test_coordinates_that_do_not_belong_to_the_slide(tmp_path):
    write_trident(tmp_path / "s.h5")
    tiles = read_tile_features(tmp_path / "s.h5")
    with pytest.raises(InvalidInputError, match="8192×6144 px slide, this slide is 4000×3000") as e:
        check_coordinates(tiles, 4000, 3000)
    assert "\n" not in str(e.value)
    write_trident(tmp_path / "nosize.h5", level0_width=None, level0_height=None)
    tiles = read_tile_features(tmp_path / "nosize.h5")
    with pytest.raises(InvalidInputError, match=r"tile \d+ at \(\d+, \d+\) lies outside"):
        check_coordinates(tiles, 2000, 2000)
    with pytest.raises(InvalidInputError, match="not on the 384 px grid"):
        check_coordinates(tiles, 8192, 6144, step_px=384)
    check_coordinates(tiles, 8192, 6144, step_px=256, origin_px=(0, 0))
    features = np.zeros((3, 4), np.float32)
    write_clam(tmp_path / "dup.h5", features, np.array([[0, 0], [256, 0], [0, 0]]))
    tiles = read_tile_features(tmp_path / "dup.h5")
    with pytest.raises(InvalidInputError, match="more than once"):
        check_coordinates(tiles, 1000, 1000, patch_size_level0=256)


def test_refuses_bad_files(tmp_path):
    with pytest.raises(InputNotFoundError):
        read_tile_features(tmp_path / "absent.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(InvalidInputError, match="not a readable HDF5"):
        read_tile_features(tmp_path / "text.h5")
    with h5py.File(tmp_path / "nofeat.h5", "w") as f:
        f.create_dataset("coords", data=np.zeros((2, 2), np.int64))
    with pytest.raises(InvalidInputError, match="no 'features' dataset"):
        read_tile_features(tmp_path / "nofeat.h5")
    write_clam(tmp_path / "n.h5", np.zeros((3, 4), np.float32), np.zeros((2, 2), np.int64))
    with pytest.raises(InvalidInputError, match=r"expected \(3, 2\)"):
        read_tile_features(tmp_path / "n.h5")
    bad = np.zeros((3, 4), np.float32)
    bad[2, 1] = np.nan
    write_clam(tmp_path / "nan.h5", bad, _grid(3))
    with pytest.raises(InvalidInputError, match="tile 2 has NaN"):
        read_tile_features(tmp_path / "nan.h5")
    write_clam(tmp_path / "neg.h5", np.zeros((3, 4), np.float32), _grid(3) - 1)
    with pytest.raises(InvalidInputError, match="negative coordinate"):
        read_tile_features(tmp_path / "neg.h5")
    write_clam(tmp_path / "frac.h5", np.zeros((2, 4), np.float32), np.array([[0.5, 0], [1, 1]]))
    with pytest.raises(InvalidInputError, match="whole level-0 pixel"):
        read_tile_features(tmp_path / "frac.h5")
    write_clam(tmp_path / "int.h5", np.zeros((2, 4), np.int32), _grid(2))
    with pytest.raises(InvalidInputError, match="expected floats"):
        read_tile_features(tmp_path / "int.h5")


def test_size_bounds_are_checked_before_reading(tmp_path):
    path = tmp_path / "huge.h5"
    with h5py.File(path, "w") as f:
        # declared 10 million × 4096 float32 (160 GB), never written: no data is allocated
        f.create_dataset("features", shape=(10_000_000, 4096), dtype=np.float32)
        f.create_dataset("coords", shape=(10_000_000, 2), dtype=np.int64)
    assert path.stat().st_size < 1 << 20
    with pytest.raises(InvalidInputError, match="outside the bounds"):
        read_tile_features(path)
    write_clam(tmp_path / "wide.h5", np.zeros((2, 64), np.float32), _grid(2))
    with pytest.raises(InvalidInputError, match="outside the bounds"):
        read_tile_features(tmp_path / "wide.h5", max_dim=32)
    assert read_tile_features(tmp_path / "wide.h5").dim == 64


def test_batch_axis_and_empty_file(tmp_path):
    feats = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    write_clam(tmp_path / "b.h5", feats, _grid(3))
    tiles = read_tile_features(tmp_path / "b.h5")
    np.testing.assert_array_equal(tiles.features, feats[0])
    write_clam(tmp_path / "e.h5", np.zeros((0, 8), np.float32), np.zeros((0, 2), np.int64))
    tiles = read_tile_features(tmp_path / "e.h5")
    assert len(tiles) == 0 and tiles.dim == 8
    check_coordinates(tiles, 100, 100, patch_size_level0=16)
