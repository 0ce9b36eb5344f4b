import json

import numpy as np
import openslide
import pytest
from conftest import CMU_SVS, needs_cmu

from wsi_anomaly.errors import InvalidInputError, NoTissueError, OutputExistsError, WsiAnomalyError
from wsi_anomaly.tiles import TileStore, TilingSettings, tile_slide
from wsi_anomaly.tiles.dataset import ZarrTileDataset


def test_tiles_are_tissue_and_match_slide(small_slide, tmp_path):
    out = tmp_path / "t.zarr"
    res = tile_slide(small_slide.path, out, TilingSettings(target_mpp=0.5), progress=False)
    store = TileStore(out)
    assert len(store) == res.n_tiles > 0
    assert res.n_grid == (2048 // 256) * (1536 // 256)
    assert (store.tissue_fraction >= 0.5).all()
    a = store.attrs
    assert a["complete"] and a["level"] == 0 and a["actual_mpp"] == pytest.approx(0.5, rel=1e-3)
    assert a["slide_fingerprint"] and a["software_version"] and a["mpp_source"]
    # pixel-identical to OpenSlide at native mpp
    osr = openslide.OpenSlide(str(small_slide.path))
    for i in (0, len(store) - 1):
        x, y = (int(v) for v in store.coords[i])
        ref = np.asarray(osr.read_region((x, y), 0, (256, 256)))[..., :3]
        np.testing.assert_array_equal(store.read(i, i + 1)[0], ref)
    # kept tiles are where the synthetic layout put tissue
    truth = small_slide.layout.labels(0, 0, 2048, 1536, downsample=16.0) > 0
    for x, y in store.coords:
        assert truth[y // 16 : (y + 256) // 16, x // 16 : (x + 256) // 16].mean() > 0.3


def test_coarser_target_reads_pyramid_and_resizes(small_slide, tmp_path):
    res = tile_slide(
        small_slide.path,
        tmp_path / "t.zarr",
        TilingSettings(target_mpp=1.0, tile_px=128),
        progress=False,
    )
    store = TileStore(res.store)
    assert store.tiles.shape[1:] == (128, 128, 3)
    assert store.attrs["read_px"] == 256 and store.attrs["tile_size_l0"] == 256
    assert store.mpp == pytest.approx(1.0, rel=1e-3)


@pytest.mark.parametrize("target_mpp", [1.0, 0.75])
def test_coarser_tiles_are_area_averages_of_the_slide(small_slide, tmp_path, target_mpp):
    from PIL import Image

    res = tile_slide(
        small_slide.path,
        tmp_path / "t.zarr",
        TilingSettings(target_mpp=target_mpp, tile_px=64),
        progress=False,
    )
    store = TileStore(res.store)
    read_px = store.attrs["read_px"]
    assert store.attrs["level"] == 0 and read_px == round(64 * target_mpp / 0.5)
    osr = openslide.OpenSlide(str(small_slide.path))
    for i in (0, len(store) // 2, len(store) - 1):
        x, y = (int(v) for v in store.coords[i])
        region = np.asarray(osr.read_region((x, y), 0, (read_px, read_px)))[..., :3]
        tile = store.read(i, i + 1)[0].astype(int)
        if read_px % 64 == 0:  # an integer factor: the exact k×k mean, rounded half up
            k = read_px // 64
            mean = region.reshape(64, k, 64, k, 3).astype(float).mean(axis=(1, 3))
            np.testing.assert_array_equal(tile, np.floor(mean + 0.5))
        else:  # any other factor: Pillow's area-averaging (BOX) resize
            box = Image.fromarray(region).resize((64, 64), Image.Resampling.BOX)
            np.testing.assert_array_equal(tile, np.asarray(box))


def test_stride_gives_overlap(small_slide, tmp_path):
    res = tile_slide(
        small_slide.path,
        tmp_path / "t.zarr",
        TilingSettings(target_mpp=0.5, stride_px=128, min_tissue=0.0),
        progress=False,
    )
    assert res.n_grid == 15 * 11 and res.n_tiles == res.n_grid


def test_no_tissue_is_explicit(blank_slide, tmp_path):
    out = tmp_path / "t.zarr"
    with pytest.raises(NoTissueError, match="no tissue"):
        tile_slide(blank_slide.path, out, progress=False)
    assert not out.exists() and not any(tmp_path.iterdir())


def test_existing_output_refused_unless_overwrite(small_slide, tmp_path):
    out = tmp_path / "t.zarr"
    tile_slide(small_slide.path, out, progress=False)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        tile_slide(small_slide.path, out, progress=False)
    tile_slide(small_slide.path, out, overwrite=True, progress=False)
    assert TileStore(out).attrs["complete"]


def test_interrupted_run_leaves_nothing_that_looks_complete(small_slide, tmp_path, monkeypatch):
    import wsi_anomaly.tiles.tiler as tiler

    calls = {"n": 0}
    real = tiler.read_tile

    def flaky(slide, grid, i, out=None):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real(slide, grid, i, out)

    monkeypatch.setattr(tiler, "read_tile", flaky)
    out = tmp_path / "t.zarr"
    with pytest.raises(KeyboardInterrupt):
        tile_slide(small_slide.path, out, TilingSettings(workers=1), progress=False)
    assert not out.exists()
    with pytest.raises(WsiAnomalyError):
        TileStore(out)
    monkeypatch.setattr(tiler, "read_tile", real)
    tile_slide(small_slide.path, out, progress=False)  # a re-run completes cleanly
    assert TileStore(out).attrs["complete"]


def test_annotations_keep_only_tiles_inside(small_slide, tmp_path):
    geo = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "id": "a",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[0, 0], [1024, 0], [1024, 1536], [0, 1536], [0, 0]]],
                },
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": "Tumor", "color": [200, 0, 0]},
                },
            },
            {
                "type": "Feature",
                "id": "b",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[1024, 0], [2048, 0], [2048, 1536], [1024, 1536], [1024, 0]]],
                },
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": "Stroma", "color": [0, 200, 0]},
                },
            },
        ],
    }
    path = tmp_path / "regions.geojson"
    path.write_text(json.dumps(geo))
    res = tile_slide(
        small_slide.path,
        tmp_path / "a.zarr",
        TilingSettings(min_tissue=0.0, annotations=str(path), annotation_class="Tumor"),
        progress=False,
    )
    store = TileStore(res.store)
    assert len(store) == 4 * 6 and (store.coords[:, 0] + 256 <= 1024).all()
    with pytest.raises(InvalidInputError, match="no Polygon"):
        tile_slide(
            small_slide.path,
            tmp_path / "b.zarr",
            TilingSettings(annotations=str(path), annotation_class="Necrosis"),
            progress=False,
        )


def test_export_png_and_dataset(small_slide, tmp_path):
    out, pngs = tmp_path / "t.zarr", tmp_path / "pngs"
    res = tile_slide(small_slide.path, out, export_png=pngs, progress=False)
    files = sorted(pngs.glob("*.png"))
    assert len(files) == res.n_tiles
    ds = ZarrTileDataset(out)
    assert len(ds) == res.n_tiles
    img = ds[3]
    assert img.shape == (3, 256, 256) and img.dtype.is_floating_point
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0


@needs_cmu
def test_cmu_tiles_equal_openslide(tmp_path):
    res = tile_slide(
        CMU_SVS, tmp_path / "cmu.zarr", TilingSettings(target_mpp=0.499), progress=False
    )
    store = TileStore(res.store)
    assert store.attrs["mpp_source"] == "openslide" and not store.attrs["read_px"] != 256
    osr = openslide.OpenSlide(str(CMU_SVS))
    for i in range(0, len(store), 5):
        x, y = (int(v) for v in store.coords[i])
        ref = np.asarray(osr.read_region((x, y), 0, (256, 256)))[..., :3]
        np.testing.assert_array_equal(store.read(i, i + 1)[0], ref)


def test_decoded_parts_reach_the_hook_once_each(small_slide):
    """Per-tile work in the decoding threads sees every tile once, with its own pixels."""
    import threading

    from wsi_anomaly.slide.reader import Slide
    from wsi_anomaly.tiles.tiler import iter_tile_batches, plan_tiles

    seen: dict[int, float] = {}
    threads: set[str] = set()
    lock = threading.Lock()

    def hook(start: int, tiles: np.ndarray) -> None:
        with lock:
            threads.add(threading.current_thread().name)
            for k, tile in enumerate(tiles):
                assert start + k not in seen
                seen[start + k] = float(tile.mean())

    with Slide(small_slide.path) as slide:
        _, kept, _ = plan_tiles(slide, TilingSettings())
        means = {}
        for start, tiles in iter_tile_batches(slide, kept, 5, workers=2, on_decoded=hook):
            means.update({start + k: float(t.mean()) for k, t in enumerate(tiles)})
    assert sorted(seen) == list(range(len(kept))) and seen == means
    assert all(name.startswith("tile-read") for name in threads)


def test_qc_rows_of_every_shard_are_written_once(small_slide, tmp_path, monkeypatch):
    """QC rows are kept in memory and written once for the whole slide: with many small shards
    every tile still gets its own row, the one measured from its stored pixels."""
    import wsi_anomaly.tiles.store as store_mod
    from wsi_anomaly.slide.qc import VALUE_NAMES, flag_tiles, measure_tiles, stored_colour_reference

    writes = []
    real = store_mod.TileStoreWriter.write_qc

    def counted(self, start, values, flags):
        writes.append((start, len(flags)))
        real(self, start, values, flags)

    monkeypatch.setattr(store_mod, "SHARD_TILES", 8)
    monkeypatch.setattr(store_mod, "CHUNK_TILES", 4)
    monkeypatch.setattr(store_mod.TileStoreWriter, "write_qc", counted)
    out = tmp_path / "s.zarr"
    tile_slide(small_slide.path, out, TilingSettings(stride_px=128), progress=False)
    store = TileStore(out)
    assert store.shard_tiles == 8 and len(store) > 3 * store.shard_tiles
    assert writes == [(0, len(store))]
    values, flags = store.qc_values, store.qc_flags
    assert values is not None and flags is not None and store.qc is not None
    assert np.isfinite(values).all()
    colour = stored_colour_reference(store.qc)
    again = measure_tiles(store.read(0, len(store)), None, store.qc["reference_od"], colour)
    own = [k for k, name in enumerate(VALUE_NAMES) if name != "border_um"]
    np.testing.assert_allclose(values[:, own], again[:, own], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(flags, flag_tiles(values))


def test_a_meter_refuses_results_with_tiles_unmeasured():
    from wsi_anomaly.slide.qc import QCSettings, TileQCMeter

    meter = TileQCMeter(QCSettings(), np.full(4, 100.0))
    tiles = np.full((2, 64, 64, 3), 200, np.uint8)
    meter.measure(0, tiles)
    with pytest.raises(RuntimeError, match="2 of 4"):
        meter.results()
    meter.ensure_measured(2, tiles)
    values, flags = meter.results()
    assert values.shape[0] == 4 and flags.shape == (4,)
    np.testing.assert_array_equal(
        values[:, :-1], meter(0, np.concatenate([tiles, tiles]))[0][:, :-1]
    )
