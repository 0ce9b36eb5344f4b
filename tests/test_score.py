import csv

import numpy as np
import pytest
import torch
from PIL import Image

from wsi_anomaly.errors import InvalidInputError
from wsi_anomaly.score import Scorer, score_images
from wsi_anomaly.stitch import colour_scale
from wsi_anomaly.tiles.dataset import ZarrTileDataset


def test_scorer_matches_calibration_definition(tiny_model, small_store):
    scorer = Scorer(tiny_model, device="cpu", batch_size=4)
    ds = ZarrTileDataset(small_store)
    images = torch.stack([ds[i] for i in range(3)])
    out = scorer.score(images)
    assert out.mean.shape == (3,) and out.maps.shape == (3, 64, 64)
    np.testing.assert_allclose(out.mean, out.maps.reshape(3, -1).mean(1), rtol=1e-5)
    assert (out.max >= out.mean).all()
    # the same tiles in another batch composition give the same scores (eval-mode BN)
    again = scorer.score(images[1:2])
    np.testing.assert_allclose(again.mean, out.mean[1:2], rtol=1e-4)
    assert scorer.identity["model_sha256"] and scorer.identity["tile_mpp"] == 0.5


def test_colour_scale_is_fixed_by_training_distribution(tiny_model):
    scorer = Scorer(tiny_model, device="cpu")
    scale = colour_scale(scorer.calibration)
    q = scorer.calibration["score_quantiles"]
    assert scale.vmin == pytest.approx(q["0.5"])
    rgb = scale.to_rgb(np.array([scale.vmin, scale.vcenter, scale.vmax]))
    assert rgb[0, 2] > rgb[0, 0]  # blue at the training median
    assert rgb[2, 0] > rgb[2, 2]  # red far above the 99th percentile


def test_score_images_csv_and_maps(tiny_model, tmp_path, small_store):
    ds = ZarrTileDataset(small_store)
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i in range(3):
        rgb = (ds[i].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        Image.fromarray(rgb).save(folder / ("sub" if i else ".") / f"t{i}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    Image.new("RGB", (64, 64)).save(folder / "small.png")
    out = tmp_path / "scores.csv"
    summary = score_images(
        tiny_model, [folder], out, maps_dir=tmp_path / "maps", device="cpu", progress=False
    )
    assert summary["scored"] == 3
    assert summary["skipped"] == {"unreadable": 1, "too_small": 1}
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 3 and all(float(r["score_max"]) >= float(r["score_mean"]) for r in rows)
    assert len(list((tmp_path / "maps").glob("*_map.png"))) == 3


def test_score_nothing_usable(tiny_model, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidInputError, match="no images"):
        score_images(tiny_model, [empty], tmp_path / "s.csv", device="cpu", progress=False)
    (empty / "bad.jpg").write_bytes(b"xx")
    with pytest.raises(InvalidInputError, match="no usable images"):
        score_images(tiny_model, [empty], tmp_path / "s.csv", device="cpu", progress=False)


def test_scorer_takes_uint8_tiles_as_stored(tiny_model, small_store):
    """``B×H×W×3`` uint8 (numpy or tensor) scores like the same tiles as float ``B×3×H×W``."""
    scorer = Scorer(tiny_model, device="cpu", batch_size=4)
    ds = ZarrTileDataset(small_store)
    floats = torch.stack([ds[i] for i in range(2)])
    stored = (floats.permute(0, 2, 3, 1) * 255).round().to(torch.uint8)
    reference = scorer.score(stored.permute(0, 3, 1, 2).float() / 255)
    for batch in (stored, stored.numpy()):
        out = scorer.score(batch)
        # float32 convolutions may accumulate in another order for another memory layout:
        # agreement to 1e-4 of each value (the maps square feature differences, doubling them).
        np.testing.assert_allclose(out.mean, reference.mean, rtol=1e-5)
        np.testing.assert_allclose(out.maps, reference.maps, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError):
        scorer.score(stored.permute(0, 3, 1, 2))  # uint8 must be channels-last, as stored


def test_maps_of_images_with_the_same_name_do_not_overwrite(tiny_model, tmp_path, small_store):
    ds = ZarrTileDataset(small_store)
    folder = tmp_path / "imgs"
    for i, sub in enumerate(("a", "b")):
        (folder / sub).mkdir(parents=True)
        rgb = (ds[i].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        Image.fromarray(rgb).save(folder / sub / "tile.png")
    Image.fromarray(rgb).save(folder / "tile.jpg")
    out = tmp_path / "scores.csv"
    score_images(
        tiny_model, [folder], out, maps_dir=tmp_path / "maps", device="cpu", progress=False
    )
    rows = list(csv.DictReader(out.open()))
    assert len({r["map"] for r in rows}) == 3
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == sorted(r["map"] for r in rows)
