"""Folders of images as tile datasets: every PIL mode to RGB, damaged files skipped."""

import numpy as np
import pytest
import tifffile
from PIL import Image

from wsi_anomaly.errors import InvalidInputError
from wsi_anomaly.tiles.dataset import ImageFolderDataset, array_to_rgb, image_to_rgb

TILE = 32


def _rgb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (TILE, TILE, 3), np.uint8)


def test_truncated_image_is_skipped_and_counted(tmp_path):
    Image.fromarray(_rgb(0)).save(tmp_path / "good.png")
    Image.fromarray(_rgb(1)).save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])  # header intact, data cut off
    Image.fromarray(_rgb(2)).save(tmp_path / "cut.jpg", quality=95)
    data = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with Image.open(tmp_path / "cut.png") as im:  # the header alone looks fine
        assert im.size == (TILE, TILE)
    ds = ImageFolderDataset(tmp_path, TILE)
    assert [p.name for p in ds.files] == ["good.png"]
    assert ds.skipped == {"unreadable": 2, "too_small": 0}
    assert ds[0].shape == (3, TILE, TILE)


def test_only_damaged_images_is_one_error(tmp_path):
    Image.fromarray(_rgb(1)).save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:60])
    with pytest.raises(InvalidInputError, match="1 unreadable"):
        ImageFolderDataset(tmp_path, TILE)


def test_sixteen_bit_grey_keeps_its_tones(tmp_path):
    grey16 = np.full((TILE, TILE), 32768, np.uint16)
    grey16[:, : TILE // 2] = 8192
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    tifffile.imwrite(tmp_path / "g16.tif", grey16)
    ds = ImageFolderDataset(tmp_path, TILE)
    for i in range(len(ds)):
        rgb = ds.load_rgb(i)
        assert rgb.dtype == np.uint8 and rgb.shape == (TILE, TILE, 3)
        assert rgb[0, -1].tolist() == [128, 128, 128]  # 32768 / 65535, not clipped to white
        assert rgb[0, 0].tolist() == [32, 32, 32]


def test_sixteen_bit_rgb_tiff(tmp_path):
    rgb16 = np.zeros((TILE, TILE, 3), np.uint16)
    rgb16[..., 0] = 65535
    rgb16[..., 2] = 257 * 100
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb16, photometric="rgb")
    ds = ImageFolderDataset(tmp_path, TILE)
    assert ds.load_rgb(0)[0, 0].tolist() == [255, 0, 100]


@pytest.mark.parametrize("mode", ["L", "1", "P", "CMYK", "RGBA", "LA", "I", "F", "YCbCr"])
def test_every_pil_mode_to_rgb(mode):
    base = Image.fromarray(_rgb(3))
    if mode == "I":
        im = Image.fromarray(np.asarray(base.convert("L")).astype(np.int32) * 257)
        expected = np.asarray(base.convert("L"))
    elif mode == "F":
        im = Image.fromarray(np.asarray(base.convert("L")).astype(np.float32) / 255.0)
        expected = np.asarray(base.convert("L"))
    else:
        im = base.convert(mode)
        expected = None
    rgb = image_to_rgb(im)
    assert rgb.dtype == np.uint8 and rgb.shape == (TILE, TILE, 3)
    if expected is not None:
        assert np.abs(rgb[..., 0].astype(int) - expected).max() <= 1
    if mode in ("L", "CMYK", "YCbCr"):
        assert np.abs(rgb.astype(int) - np.asarray(im.convert("RGB"))).max() <= 1


def test_alpha_is_composited_over_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3] = 255  # opaque red-ish
    rgba[0, 1, 3] = 0  # fully transparent → white
    rgba[1, :, 3] = 128  # half
    out = image_to_rgb(Image.fromarray(rgba, "RGBA"))
    assert out[0, 0].tolist() == [200, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert out[1, 0].tolist() == [227, 127, 127]  # 200·128/255 + 255·127/255
    palette = Image.fromarray(rgba[..., :3]).convert("P")
    palette.info["transparency"] = 0
    assert image_to_rgb(palette).dtype == np.uint8


def test_array_to_rgb_dtypes():
    assert array_to_rgb(np.full((2, 2), 65535, np.uint16))[0, 0].tolist() == [255] * 3
    assert array_to_rgb(np.full((2, 2, 3), 0.5, np.float32))[0, 0].tolist() == [128] * 3
    assert array_to_rgb(np.zeros((3, 4, 5), np.uint8)).shape == (4, 5, 3)  # planar
    with pytest.raises(ValueError):
        array_to_rgb(np.zeros((2, 2, 7), np.uint8))
