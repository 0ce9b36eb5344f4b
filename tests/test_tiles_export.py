"""Coordinate files for TRIDENT, CLAM and wsinfer: each tool's reading rule, written here from
its documentation, must cut exactly the store's tiles out of the slide again.

The rules are re-stated in this file (not imported from the package) so that a mistake in the
writer cannot hide in a shared helper. Pixels are read with OpenSlide, as the tools do.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

h5py = pytest.importorskip("h5py", reason="h5py is not installed (pip install '.[export]')")
openslide = pytest.importorskip("openslide")

from wsi_anomaly.errors import InvalidInputError
from wsi_anomaly.tiles import TileStore, tile_slide
from wsi_anomaly.tiles.export import coords_path, write_coords_files
from wsi_anomaly.tiles.tiler import TilingSettings


def _trident_read(attrs, downsamples):
    """TRIDENT (WSIPatcher with src_mag/dst_mag from the file): the level-0 side is
    round(patch_size × level0_mag / target_mag); the level is one whose downsample is within
    0.1 of that ratio, else the coarsest one not coarser than it; it reads
    round(side / int(level downsample)) level pixels and resizes them to patch_size."""
    ratio = float(attrs["level0_magnification"]) / float(attrs["target_magnification"])
    side_l0 = round(int(attrs["patch_size"]) * ratio)
    close = [i for i, d in enumerate(downsamples) if abs(d - ratio) <= 0.1]
    level = close[0] if close else max(i for i, d in enumerate(downsamples) if d <= ratio)
    return level, round(side_l0 / int(downsamples[level])), int(attrs["patch_size"])


def _clam_read(attrs, downsamples):
    """CLAM (Whole_Slide_Bag_FP): read_region(coord, patch_level, (patch_size,) * 2); the
    resize to the model's side is the transform's (here the file's target_patch_size)."""
    size = int(attrs["patch_size"])
    return int(attrs["patch_level"]), size, int(attrs.get("target_patch_size", size))


def _wsinfer_read(attrs, downsamples):
    """wsinfer (WholeSlideImagePatches): refuses patch_level ≠ 0; reads patch_size level-0
    pixels and resizes them to its model's patch size."""
    if int(attrs["patch_level"]) != 0:
        raise NotImplementedError("wsinfer reads only patch_level 0")
    return 0, int(attrs["patch_size"]), None


RULES = {"trident": _trident_read, "clam": _clam_read, "wsinfer": _wsinfer_read}


@pytest.fixture(scope="module")
def stores(small_slide, tmp_path_factory):
    """The small 0.5 µm/px slide (pyramid downsamples 1, 4, 16) tiled three ways: native at
    level 0, resampled (1 µm/px from level 0) and native at level 1 (2 µm/px)."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for mpp in (0.5, 1.0, 2.0):
        path = root / f"t{mpp}.zarr"
        settings = TilingSettings(target_mpp=mpp, tile_px=64, min_tissue=0.3)
        tile_slide(small_slide.path, path, settings, progress=False)
        out[mpp] = path
    return out


@pytest.mark.parametrize("mpp", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("tool", ["trident", "clam", "wsinfer"])
def test_each_tool_reads_the_stores_tiles(stores, small_slide, tmp_path, mpp, tool):
    store = TileStore(stores[mpp])
    done = write_coords_files(store, tmp_path)
    assert set(done.written) == {"trident", "clam", "wsinfer"}, done.refused
    path = coords_path(tmp_path, tool, "small")
    assert done.written[tool] == path and path.is_file()
    side_l0 = float(store.attrs["tile_size_l0"])
    tile_px = store.tile_px
    with h5py.File(path, "r") as f, openslide.OpenSlide(str(small_slide.path)) as osr:
        coords = f["coords"][:]
        attrs = dict(f["coords"].attrs)
        np.testing.assert_array_equal(coords, store.coords)
        downsamples = list(osr.level_downsamples)
        level, read_px, out_px = RULES[tool](attrs, downsamples)
        # The square the tool cuts is the tile's, in level-0 pixels.
        assert read_px * downsamples[level] == pytest.approx(side_l0, abs=0.5)
        tiles = store.read(0, min(len(store), 12))

        for k, tile in enumerate(tiles):
            x, y = (int(v) for v in coords[k])
            region = osr.read_region((x, y), level, (read_px,) * 2).convert("RGB")
            region = np.asarray(region.resize((tile_px, tile_px), Image.Resampling.BOX))
            if level == int(store.attrs["level"]):  # the same pixels the tiler read
                diff = np.abs(region.astype(np.int16) - tile.astype(np.int16)).mean()
                assert diff < 1.0, (tool, mpp, k, diff)
            # else: wsinfer at 2 µm/px reads level 0, which the synthetic pyramid renders on
            # its own (its level 1 is not a downsample of it); the level-0 square above is the
            # check there.
        if out_px is not None:
            assert out_px == tile_px


def test_resampled_tiling_is_not_the_level0_patch_size(stores, tmp_path):
    """At 1 µm/px from a 0.5 µm/px level, CLAM and wsinfer must read 2 × the tile side."""
    store = TileStore(stores[1.0])
    write_coords_files(store, tmp_path)
    for tool in ("clam", "wsinfer"):
        with h5py.File(coords_path(tmp_path, tool, "small"), "r") as f:
            assert f["coords"].attrs["patch_size"] == 2 * store.tile_px
            assert f["coords"].attrs["patch_level"] == 0
    with h5py.File(coords_path(tmp_path, "trident", "small"), "r") as f:
        assert f["coords"].attrs["patch_size"] == store.tile_px
        assert "patch_level" not in f["coords"].attrs  # TRIDENT would fall back to it


def _fake_store(side_l0):
    attrs = {
        "tile_px": 256,
        "read_px": 256,
        "stride_px": 256,
        "level": 1,
        "tile_size_l0": side_l0,
        "target_mpp": 1.0,
        "actual_mpp": 1.0,
        "level0_mpp": 0.25,
        "slide_name": "odd.svs",
    }
    return SimpleNamespace(attrs=attrs, coords=np.zeros((3, 2), np.int64))


def test_fractional_level0_side_is_refused_for_wsinfer_only(tmp_path):
    done = write_coords_files(_fake_store(1024.35), tmp_path)
    assert set(done.written) == {"trident", "clam"}
    assert "whole level-0 pixels" in done.refused["wsinfer"]
    assert not coords_path(tmp_path, "wsinfer", "odd").exists()
    lines = done.lines()
    assert len(lines) == 3 and any(line.startswith("wsinfer: no coordinate file") for line in lines)


def test_unknown_tool_is_a_clear_error(tmp_path):
    from wsi_anomaly.tiles.export import write_coords_h5

    with pytest.raises(InvalidInputError, match="no coordinate convention"):
        write_coords_h5(_fake_store(1024.0), tmp_path / "x.h5", "qupath")


def test_tile_command_writes_each_tools_file(small_slide, tmp_path, capsys):
    from wsi_anomaly.cli import main

    argv = ["tile", str(small_slide.path), "--out", str(tmp_path / "t.zarr"), "--mpp", "1"]
    code = main([*argv, "--coords-h5", str(tmp_path / "coords"), "-q"])
    out = capsys.readouterr().out
    assert code == 0
    for tool in ("trident", "clam", "wsinfer"):
        assert coords_path(tmp_path / "coords", tool, "small").is_file()
        assert f"{tool} coordinates → " in out
    with h5py.File(coords_path(tmp_path / "coords", "clam", "small"), "r") as f:
        assert f["coords"].attrs["patch_size"] == 512  # 256 px at 1 µm/px, read at 0.5 µm/px
    # A second run refuses to replace them without --overwrite, in one line.
    code = main([*argv[:3], str(tmp_path / "u.zarr"), "--coords-h5", str(tmp_path / "coords")])
    err = capsys.readouterr().err
    assert code != 0 and "already exists" in err and "Traceback" not in err


def test_heatmap_writes_the_cohorts_coords(small_slide, tiny_model, tmp_path, capsys):
    from wsi_anomaly.cli import main

    out = tmp_path / "results"
    code = main(
        [
            "heatmap",
            str(small_slide.path),
            "--model",
            str(tiny_model),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--coords-h5",
            "-q",
        ]
    )
    assert code == 0, capsys.readouterr()
    store = TileStore(out / "small.tif" / "tiles.zarr")
    with h5py.File(coords_path(out / "coords", "trident", "small"), "r") as f:
        np.testing.assert_array_equal(f["coords"][:], store.coords)
        assert f["coords"].attrs["patch_size"] == store.tile_px
    # The same run's QuPath tiles name the model on every tile (QuPath drops collection
    # properties): measurement names and the tile name carry the sha256's first 8 hex digits.
    import json

    summary = json.loads((out / "small.tif" / "summary.json").read_text())
    tag = summary["identity"]["model_sha256"][:8]
    features = json.loads((out / "small.tif" / "tiles.geojson").read_text())["features"]
    assert len(tag) == 8 and features
    for f in features:
        assert f["properties"]["name"].endswith(tag)
        # the model's measurements (QC measurements belong to the tile, not to a model)
        model_names = [n for n in f["properties"]["measurements"] if not n.startswith("qc_")]
        assert model_names and all(name.endswith(f"[{tag}]") for name in model_names)
