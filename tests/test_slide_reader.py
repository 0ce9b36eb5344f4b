import numpy as np
import openslide
import pytest
import tifffile
from conftest import CMU_SVS, needs_cmu

from wsi_anomaly.errors import (
    CorruptSlideError,
    InputNotFoundError,
    ResolutionError,
    UnsupportedSlideError,
)
from wsi_anomaly.slide import Slide


def test_synthetic_slide_levels_and_mpp(small_slide):
    with Slide(small_slide.path) as s:
        assert s.dimensions == (2048, 1536)
        assert len(s.levels) >= 2
        assert s.mpp == pytest.approx(0.5, rel=1e-3)
        assert s.resolution.source in ("openslide", "tiff-tags")
        assert s.levels[1].mpp == pytest.approx(0.5 * s.levels[1].downsample, rel=1e-3)


def test_fast_path_is_pixel_identical_to_openslide(small_slide):
    osr = openslide.OpenSlide(str(small_slide.path))
    with Slide(small_slide.path) as s:
        assert 0 in s.fast_levels
        for level in range(len(s.levels)):
            ds = s.levels[level].downsample
            # a region straddling TIFF tile borders and the right/bottom edge
            for x, y, w, h in [(100, 70, 300, 200), (s.levels[level].width - 50, 5, 80, 40)]:
                ref = np.asarray(osr.read_region((int(x * ds), int(y * ds)), level, (w, h)))
                ours = s.read_level(level, x, y, w, h)
                inside = ref[..., 3] == 255
                np.testing.assert_array_equal(ours[inside], ref[..., :3][inside])
                assert (ours[~inside] == 255).all()  # outside the image is white background


def test_whole_tiles_decode_straight_into_the_callers_array(small_slide, monkeypatch):
    from wsi_anomaly.slide import reader

    targets = []  # the arrays decoded into
    original = reader._TiledPage._decode_into
    monkeypatch.setattr(
        reader._TiledPage,
        "_decode_into",
        lambda self, i, out: targets.append(out) or original(self, i, out),
    )
    osr = openslide.OpenSlide(str(small_slide.path))
    with Slide(small_slide.path) as s:
        assert targets, "the check at open must cover the direct decode too"
        page = s._pages[0]
        tw, th = page.tile_w, page.tile_h
        for tx, ty in [(0, 0), (1, 2), (3, 1)]:
            x, y = tx * tw, ty * th
            ref = np.asarray(osr.read_region((x, y), 0, (tw, th)))[..., :3]
            out = np.zeros((th, tw, 3), np.uint8)
            targets.clear()
            got = s.read_level(0, x, y, tw, th, out)
            assert got is out and [t is out for t in targets] == [True]  # no cache, no copy
            np.testing.assert_array_equal(out, ref)
            cached = len(page._cache)
            np.testing.assert_array_equal(s.read_level(0, x, y, tw, th), ref)  # the cached path
            assert len(page._cache) == cached + 1
        # A region off the TIFF tile grid goes through the cache (decoded tiles are kept for the
        # neighbouring regions), never into the caller's array.
        out = np.zeros((th, tw, 3), np.uint8)
        targets.clear()
        x, y = 5 * tw + 7, 4 * th  # straddles two tiles not read before
        s.read_level(0, x, y, tw, th, out)
        assert len(targets) == 2 and not any(t is out for t in targets)
        np.testing.assert_array_equal(
            out, np.asarray(osr.read_region((x, y), 0, (tw, th)))[..., :3]
        )


def test_thumbnail_is_bounded_and_scaled(small_slide):
    with Slide(small_slide.path) as s:
        thumb, ds = s.thumbnail(max_px=300)
        assert max(thumb.shape[:2]) <= 300
        assert thumb.shape[1] == pytest.approx(2048 / ds, abs=1)


def test_flat_tiff_falls_back_to_tifffile(tmp_path):
    rgb = np.full((300, 400, 3), 230, np.uint8)
    rgb[100:200, 100:300] = (150, 60, 160)
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, rgb, resolution=(20000, 20000), resolutionunit="CENTIMETER")
    with Slide(path) as s:
        assert s.backend == "tifffile"
        assert s.mpp == pytest.approx(0.5)
        np.testing.assert_array_equal(s.read_level(0, 90, 90, 30, 30), rgb[90:120, 90:120])
        assert (s.read_level(0, 390, 290, 20, 20)[10:, 10:] == 255).all()


def test_missing_file():
    with pytest.raises(InputNotFoundError, match="not found"):
        Slide("/no/such/slide.svs")


def test_text_and_png_are_not_slides(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(UnsupportedSlideError):
        Slide(txt)
    from PIL import Image

    png = tmp_path / "x.png"
    Image.new("RGB", (64, 64)).save(png)
    with pytest.raises(UnsupportedSlideError, match="not a slide"):
        Slide(png)


def test_truncated_slide(small_slide, tmp_path):
    data = small_slide.path.read_bytes()
    for keep in (len(data) // 2, len(data) - 5000):
        cut = tmp_path / f"cut{keep}.tif"
        cut.write_bytes(data[:keep])
        with pytest.raises(CorruptSlideError):
            with Slide(cut) as s:
                for lv in s.levels:  # every tile must decode, or fail with a typed error
                    s.read_level(lv.index, 0, 0, lv.width, lv.height)


def test_slide_without_mpp_needs_override(no_mpp_slide):
    with pytest.raises(ResolutionError, match="--slide-mpp"):
        Slide(no_mpp_slide.path)
    with Slide(no_mpp_slide.path, override_mpp=0.5) as s:
        assert s.mpp == 0.5 and s.resolution.source == "override"


@needs_cmu
def test_cmu_svs_metadata():
    with Slide(CMU_SVS) as s:
        assert s.format == "aperio"
        assert s.mpp == pytest.approx(0.499)
        assert s.resolution.source == "openslide"
        assert s.objective_power == 20
        assert {"label", "macro", "thumbnail"} <= set(s.associated_images)


@needs_cmu
def test_truncated_svs_is_damaged_not_missing_resolution(tmp_path):
    from wsi_anomaly.errors import CorruptSlideError

    data = CMU_SVS.read_bytes()
    for fraction in (0.5, 0.9):
        cut = tmp_path / f"cut{fraction}.svs"
        cut.write_bytes(data[: int(len(data) * fraction)])
        with pytest.raises(CorruptSlideError, match="truncated"):
            Slide(cut)


def test_dicom_that_is_not_a_slide_is_not_called_damaged(tmp_path):
    from wsi_anomaly.errors import UnsupportedSlideError

    fake = tmp_path / "image.dcm"
    fake.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 512)
    with pytest.raises(UnsupportedSlideError, match="DICOM") as info:
        Slide(fake)
    assert "damaged" not in str(info.value) and "truncated" not in str(info.value)


def test_slide_without_resolution_opens_for_description(no_mpp_slide):
    from wsi_anomaly.errors import ResolutionError

    with pytest.raises(ResolutionError, match="--slide-mpp"):
        Slide(no_mpp_slide.path)
    with Slide(no_mpp_slide.path, require_mpp=False) as slide:
        assert slide.resolution is None and slide.dimensions == (1024, 768)
        assert all(level.mpp is None for level in slide.levels)
        with pytest.raises(ResolutionError):
            _ = slide.mpp
        assert "mpp unknown" in repr(slide)
