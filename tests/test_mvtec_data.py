"""MVTec AD layout: categories, splits, greyscale images, native-resolution masks, bad layouts."""

import numpy as np
import pytest
import torch
from PIL import Image

from wsi_anomaly.errors import InputNotFoundError, InvalidInputError
from wsi_anomaly.mvtec import (
    MVTecCategory,
    find_categories,
    resolve_categories,
    write_synthetic_category,
)


@pytest.fixture
def root(tmp_path):
    write_synthetic_category(tmp_path, "widget", size_px=96)
    write_synthetic_category(tmp_path, "greyish", size_px=64, grey=True, seed=1)
    return tmp_path


def test_layout_splits_labels_and_masks(root):
    widget = MVTecCategory(root / "widget")
    assert len(widget.train_files) == 4 and widget.defect_types == ["scratch", "spot"]
    train, test = widget.dataset("train"), widget.dataset("test")
    assert len(train) == 4 and list(train.labels) == [0] * 4
    assert [s.defect_type for s in test.samples] == ["good"] * 2 + ["scratch"] * 2 + ["spot"] * 2
    assert list(test.labels) == [0, 0, 1, 1, 1, 1]
    x = test[4]
    assert x.shape == (3, 256, 256) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    mask = test.load_mask(4)  # at the image's own resolution
    assert mask.shape == (96, 96) and mask.dtype == bool and 0 < mask.sum() < mask.size
    good = test.load_mask(0)
    assert good.shape == (96, 96) and not good.any()
    assert test.load_rgb(4).shape == (96, 96, 3)
    with pytest.raises(InvalidInputError):
        widget.dataset("validation")


def test_greyscale_images_become_three_equal_channels(root):
    grey = MVTecCategory(root / "greyish")
    with Image.open(grey.train_files[0]) as im:
        assert im.mode == "L"
    x = grey.dataset("train")[0]
    assert x.shape == (3, 256, 256)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    assert grey.dataset("test").load_rgb(0).shape == (64, 64, 3)


def test_downsizing_is_antialiased(tmp_path):
    board = (np.indices((512, 512)).sum(0) % 2 * 255).astype(np.uint8)  # 1-px checkerboard
    for folder in ("train/good", "test/good"):
        (tmp_path / "fine" / folder).mkdir(parents=True)
        Image.fromarray(board).save(tmp_path / "fine" / folder / "000.png")
    x = MVTecCategory(tmp_path / "fine").dataset("train")[0]
    # Antialiased: the pattern averages to grey. Point sampling would keep 0s and 1s.
    assert abs(float(x.mean()) - 0.5) < 0.01 and float(x.std()) < 0.05


def test_categories_all_named_and_single_folder(root):
    assert sorted(find_categories(root)) == ["greyish", "widget"]
    assert [c.name for c in resolve_categories(root, ["all"])] == ["greyish", "widget"]
    assert [c.name for c in resolve_categories(root, ["widget"])] == ["widget"]
    only = resolve_categories(root / "widget")  # a category folder given as the root
    assert [c.name for c in only] == ["widget"]


def test_bad_layouts_are_explained(root, tmp_path_factory):
    empty = tmp_path_factory.mktemp("not_mvtec")
    (empty / "images").mkdir()
    with pytest.raises(InvalidInputError, match="MVTec AD layout"):
        resolve_categories(empty)
    with pytest.raises(InputNotFoundError, match="not found"):
        resolve_categories(empty / "nowhere")
    with pytest.raises(
        InputNotFoundError, match=r"'carpet' not found .*available: greyish, widget"
    ):
        resolve_categories(root, ["widget", "carpet"])

    (root / "widget" / "ground_truth" / "spot" / "001_mask.png").unlink()
    with pytest.raises(InvalidInputError, match=r"test/spot/001.png has no ground-truth mask"):
        MVTecCategory(root / "widget")

    mask = root / "greyish" / "ground_truth" / "scratch" / "000_mask.png"
    Image.new("L", (32, 32)).save(mask)
    with pytest.raises(InvalidInputError, match=r"32×32 px but its image .* 64×64 px"):
        resolve_categories(root, ["greyish"])


def test_a_category_without_ground_truth_is_image_level_data(tmp_path):
    folder = write_synthetic_category(tmp_path, "plain", size_px=64, masks=False)
    assert not (folder / "ground_truth").exists()
    category = MVTecCategory(folder)
    assert not category.has_masks and category.defect_types == ["scratch", "spot"]
    test = category.dataset("test")
    assert not test.has_masks and list(test.labels) == [0, 0, 1, 1, 1, 1]
    assert all(s.mask is None for s in test.samples)
    assert not test.load_mask(0).any()  # a good image's ground truth is known: all clear
    with pytest.raises(InvalidInputError, match="no ground_truth/ folder"):
        test.load_mask(4)
    assert MVTecCategory(write_synthetic_category(tmp_path, "masked", size_px=64)).has_masks
