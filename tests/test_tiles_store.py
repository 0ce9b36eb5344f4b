"""The tile store's direct shard encoder must write exactly what zarr itself writes."""

import numpy as np
import pytest
import zarr

from wsi_anomaly.tiles import TileStore, TileStoreWriter
from wsi_anomaly.tiles import store as store_mod


def _tiles(n, px=16, seed=0):
    rng = np.random.default_rng(seed)
    tiles = rng.integers(0, 256, (n, px, px, 3), np.uint8)
    tiles[::3] //= 8  # a mix of compressible and incompressible chunks
    return tiles


def _write(path, tiles, monkeypatch=None, encoder=True):
    n = len(tiles)
    with TileStoreWriter(
        path, n, tiles.shape[1], np.zeros((n, 2)), np.zeros((n, 2)), np.ones(n), {"test": True}
    ) as writer:
        if not encoder:
            writer._encoder = None
        for start in range(0, n, writer.shard_tiles):
            writer.write(start, tiles[start : start + writer.shard_tiles])
        writer.close()
        return writer.shard_tiles


def test_shard_files_are_byte_identical_to_zarrs(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "SHARD_TILES", 32)
    monkeypatch.setattr(store_mod, "CHUNK_TILES", 8)
    tiles = _tiles(32 * 3 + 5)  # three whole shards and a partial one
    assert store_mod.shard_encoder(8) is not None
    assert _write(tmp_path / "direct.zarr", tiles) == 32
    _write(tmp_path / "zarr.zarr", tiles, encoder=False)
    shards = sorted(
        p.relative_to(tmp_path / "direct.zarr")
        for p in (tmp_path / "direct.zarr" / "tiles").rglob("*")
        if p.is_file()
    )
    assert len([s for s in shards if s.name != "zarr.json"]) == 4
    for rel in shards:
        assert (tmp_path / "direct.zarr" / rel).read_bytes() == (
            tmp_path / "zarr.zarr" / rel
        ).read_bytes(), rel
    assert not list((tmp_path / "direct.zarr").rglob("*.partial"))
    back = TileStore(tmp_path / "direct.zarr")
    np.testing.assert_array_equal(back.read(0, len(tiles)), tiles)
    np.testing.assert_array_equal(
        np.asarray(zarr.open_array(tmp_path / "direct.zarr" / "tiles")[40]), tiles[40]
    )


def test_encoder_is_refused_when_its_bytes_differ_from_zarrs(monkeypatch):
    original = store_mod.ShardEncoder.encode
    monkeypatch.setattr(
        store_mod.ShardEncoder,
        "encode",
        lambda self, shard: original(self, shard)[:-1] + [b"\0\0\0\0"],
    )
    store_mod.shard_encoder.cache_clear()
    try:
        assert store_mod.shard_encoder(8) is None
    finally:
        store_mod.shard_encoder.cache_clear()


def test_failed_shard_write_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "SHARD_TILES", 16)
    monkeypatch.setattr(store_mod, "CHUNK_TILES", 8)
    tiles = _tiles(16)
    writer = TileStoreWriter(
        tmp_path / "t.zarr", 16, 16, np.zeros((16, 2)), np.zeros((16, 2)), np.ones(16), {}
    )
    assert writer._encoder is not None

    # The first part reaches the file, the second cannot be written.
    monkeypatch.setattr(writer._encoder, "encode", lambda shard: [b"first part", None])
    with pytest.raises(TypeError):
        writer.write(0, tiles)
    assert [p.name for p in (writer.tmp / "tiles").rglob("*") if p.is_file()] == ["zarr.json"]
    writer.abort()


def test_coords_h5_for_clam_and_trident(small_store, tmp_path):
    h5py = pytest.importorskip("h5py", reason="h5py is not installed (pip install '.[export]')")
    from wsi_anomaly.tiles import TileStore
    from wsi_anomaly.tiles.export import write_coords_h5

    store = TileStore(small_store)
    for tool in ("trident", "clam"):
        path = write_coords_h5(store, tmp_path / f"{tool}.h5", tool)
        with h5py.File(path, "r") as f:
            coords = f["coords"]
            np.testing.assert_array_equal(coords[:], store.coords)
            assert coords.attrs["patch_size"] == store.tile_px
            assert coords.attrs["patch_size_level0"] == round(store.attrs["tile_size_l0"])
            if tool == "clam":
                assert coords.attrs["patch_level"] == store.attrs["level"]
            assert coords.attrs["overlap"] == 0
            assert coords.attrs["target_mpp"] == pytest.approx(0.5)
    assert not list(tmp_path.glob(".*partial*"))


@pytest.mark.parametrize("rows", ["all at once", "in parts", "none"])
def test_qc_arrays_whatever_rows_were_written(tmp_path, rows):
    """QC arrays made lazily: rows written at once, in parts, or never (NaN) all read back."""
    from wsi_anomaly.slide.qc import QCSettings, qc_record

    n = 10
    coords = np.stack([np.arange(n) * 64, np.zeros(n, int)], 1)
    writer = TileStoreWriter(
        tmp_path / "s.zarr", n, 32, coords, np.zeros((n, 2), int), np.ones(n), {}
    )
    record = qc_record(QCSettings())
    writer.create_qc(record)
    k = len(record["names"])
    values = np.arange(n * k, dtype=np.float32).reshape(n, k)
    flags = np.arange(n, dtype=np.uint16)
    if rows == "all at once":
        writer.write_qc(0, values, flags)
    elif rows == "in parts":
        writer.write_qc(4, values[4:], flags[4:])
        writer.write_qc(0, values[:4], flags[:4])
    writer.write(0, np.zeros((n, 32, 32, 3), np.uint8))
    writer.close()
    store = TileStore(tmp_path / "s.zarr")
    assert store.qc is not None and store.qc["names"] == record["names"]
    if rows == "none":
        assert np.isnan(store.qc_values).all() and (store.qc_flags == 0).all()
    else:
        np.testing.assert_array_equal(store.qc_values, values)
        np.testing.assert_array_equal(store.qc_flags, flags)
