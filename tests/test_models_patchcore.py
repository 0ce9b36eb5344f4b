"""The PatchCore family: a streamed memory bank, maps on the patch grid, checkpoints that record
the backbone instead of holding it, and the backbone-weights hash check at scoring time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from test_cli import assert_one_error_line, run

from wsi_anomaly.checkpoint import load_checkpoint
from wsi_anomaly.config import load_config
from wsi_anomaly.models.calibration import Calibration
from wsi_anomaly.models.patchcore import PatchCore
from wsi_anomaly.models.registry import get_family
from wsi_anomaly.models.wide_resnet import WideResNetPatchFeatures

FAMILY = get_family("patchcore")


def tiny(**patchcore):
    settings = {"target_dim": 32, "coreset_budget": 64, "projection_dim": 16, "image_px": 64}
    return load_config(
        "patchcore_fast",
        {
            "model": {"backbone_weights": "random"},
            "patchcore": {**settings, **patchcore},
            "train": {"calibration_tiles": 16},
        },
    )


class Colour(torch.nn.Module):
    """A stand-in backbone: the RGB values, 4×4 patches (a 16×16 grid for 64 px inputs)."""

    backbone_identity = "colour"

    def forward(self, x):
        return torch.nn.functional.avg_pool2d(x, 4)


def test_bank_is_bounded_and_distances_are_exact():
    model = PatchCore(Colour(), input_px=64, aggregate=False, coreset_budget=20, pool_factor=2)
    torch.manual_seed(0)
    for _ in range(5):  # 5 × 2 × 256 patches streamed through a pool of at most 40 rows
        model.observe(torch.rand(2, 3, 64, 64))
        assert model._builder is not None and model._builder.pooled <= 40
    model.finish_fit()
    assert model.memory_bank.shape == (20, 3)
    x = torch.rand(1, 3, 64, 64)
    maps = model(x)
    assert maps.shape == (1, 16, 16)
    patches = torch.nn.functional.avg_pool2d(x, 4)[0].permute(1, 2, 0).reshape(-1, 3)
    exact = torch.cdist(patches, model.memory_bank).min(dim=1).values.reshape(16, 16)
    torch.testing.assert_close(maps[0], exact, rtol=1e-4, atol=1e-5)


def test_a_normal_patch_scores_lower_than_an_odd_one():
    model = PatchCore(Colour(), input_px=64, aggregate=False, coreset_budget=50)
    grey = torch.full((4, 3, 64, 64), 0.5) + 0.02 * torch.randn(4, 3, 64, 64)
    model.observe(grey)
    model.finish_fit()
    odd = grey[:1].clone()
    odd[:, 0, :8, :8] = 1.0  # a red corner
    normal, anomalous = FAMILY.predict(model, torch.cat([grey[:1], odd]), {})[0]
    assert anomalous > 3 * normal
    maps = model(odd)[0]
    assert maps[:2, :2].min() > maps[8:, 8:].max()


def test_map_size_follows_the_backbone_grid():
    assert FAMILY.map_size(tiny()) == WideResNetPatchFeatures.grid(64, 64)[0] == 8
    assert FAMILY.map_size(tiny(image_px=224)) == 28


def test_config_is_validated():
    from wsi_anomaly.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="patchcore.coreset_budget"):
        tiny(coreset_budget=0)
    with pytest.raises(InvalidInputError, match="patchcore.backbone"):
        tiny(backbone="resnet18")


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory):
    """A Wide ResNet-50-2 trunk state dict (random values, fp16 to keep the file small)."""
    path = tmp_path_factory.mktemp("weights") / "wrn.pth"
    torch.manual_seed(1)
    state = {k: v.half() for k, v in WideResNetPatchFeatures().state_dict().items()}
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def fitted(backbone_file, small_store, tmp_path_factory):
    """A patchcore model fitted through the CLI on a backbone weights file."""
    from wsi_anomaly.cli import main

    folder = tmp_path_factory.mktemp("patchcore")
    config = folder / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"name": "patchcore"},
                "patchcore": {"target_dim": 32, "coreset_budget": 64, "image_px": 64},
                "train": {"workers": 0, "calibration_tiles": 16},
            }
        )
    )
    out = folder / "model.pt"
    code = main(
        ["train", "--tiles", str(small_store), "--out", str(out), "--family", "patchcore",
         "--config", str(config), "--backbone-weights", str(backbone_file), "--device", "cpu",
         "-q"]
    )  # fmt: skip
    assert code == 0
    return out


def test_checkpoint_records_the_backbone_not_its_weights(fitted, backbone_file):
    from wsi_anomaly.models.weights import sha256_file

    ckpt = load_checkpoint(fitted)
    assert set(ckpt["state_dict"]) == {"memory_bank"}
    bank = ckpt["state_dict"]["memory_bank"]
    assert bank.shape == (64, 32) and torch.isfinite(bank).all()
    assert ckpt["backbone"] == f"wide_resnet50_2-file:{sha256_file(backbone_file)}"
    assert "optimizer" not in ckpt["train_state"]
    cal = Calibration.from_dict(ckpt["calibration"])
    assert cal.threshold() >= cal.median() > 0
    # far smaller than the backbone it was fitted with
    assert fitted.stat().st_size < backbone_file.stat().st_size / 10


def test_scoring_checks_the_backbone_file(capsys, fitted, backbone_file, small_slide, tmp_path):
    import zarr

    # the right file: a heatmap with the maps on the patch grid
    results = tmp_path / "results"
    code, _, err = run(
        capsys, "heatmap", str(small_slide.path), "--model", str(fitted), "--out", str(results),
        "--backbone-weights", str(backbone_file), "--keep-maps", "--device", "cpu", "-q",
    )  # fmt: skip
    assert code == 0, err
    folder = results / small_slide.path.name
    store = zarr.open_group(str(folder / "tiles.zarr"), mode="r")
    maps = np.asarray(store["maps"][:], np.float32)
    assert maps.shape[1:] == (8, 8)
    # the tile's peak and mean, in the columns every family with maps fills
    np.testing.assert_allclose(maps.max(axis=(1, 2)), store["max_scores"][:], rtol=1e-2)
    np.testing.assert_allclose(maps.mean(axis=(1, 2)), store["scores"][:], rtol=1e-2)
    assert (store["max_scores"][:] > store["scores"][:]).all()
    fine = zarr.open_group(str(folder / "heatmap.ome.zarr"), mode="r")["pixel"]["0"]
    coarse = zarr.open_group(str(folder / "heatmap.ome.zarr"), mode="r")["0"]
    assert fine.shape == (coarse.shape[0] * 8, coarse.shape[1] * 8)

    # another file: refused in one line before any slide work
    other = tmp_path / "other.pth"
    state = torch.load(backbone_file, weights_only=True)
    state["conv1.weight"] = state["conv1.weight"] + 1
    torch.save(state, other)
    code, _, err = run(
        capsys, "heatmap", str(small_slide.path), "--model", str(fitted), "--out",
        str(tmp_path / "r2"), "--backbone-weights", str(other), "--device", "cpu",
    )  # fmt: skip
    assert_one_error_line(code, err, "sha256", "fitted")


def test_missing_backbone_file_is_one_line(capsys, fitted, backbone_file, tmp_path):
    moved = tmp_path / "model.pt"
    moved.write_bytes(fitted.read_bytes())
    ckpt = load_checkpoint(moved)
    ckpt["config"]["model"]["backbone_weights"] = str(tmp_path / "gone.pth")
    torch.save(ckpt, moved)
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((256, 256, 3), np.uint8)).save(images / "a.png")
    code, _, err = run(
        capsys, "score", str(images), "--model", str(moved), "--out", str(tmp_path / "s.csv"),
        "--device", "cpu",
    )  # fmt: skip
    assert_one_error_line(code, err, "--backbone-weights")


@pytest.mark.parametrize("name, grid", [("uni", 14), ("virchow2", 16)])
def test_foundation_backbone_gives_maps_on_its_patch_grid(monkeypatch, name, grid):
    """A foundation backbone (one transformer block, random weights) through fit, predict and
    restore: maps on the model's own patch grid, the same model rebuilt from the checkpoint."""
    import wsi_anomaly.models.patchcore_family as pc
    from wsi_anomaly.models.foundation import build_foundation

    monkeypatch.setattr(pc, "_foundation", lambda n, w: build_foundation(n, w, depth=1))
    config = tiny(backbone=name, coreset_budget=32)
    assert FAMILY.map_size(config) == grid
    model = FAMILY.build(config)
    tiles = torch.rand(2, 3, 256, 256)
    model.observe(tiles)
    model.finish_fit()
    assert model.memory_bank.shape[0] == 32
    prediction = FAMILY.predict(model, tiles, {})
    assert prediction.map.shape == (2, grid, grid)
    torch.testing.assert_close(prediction.score, prediction.map.mean(dim=(1, 2)))
    torch.testing.assert_close(prediction.max, prediction.map.amax(dim=(1, 2)))
    again = FAMILY.restore(config, FAMILY.checkpoint_state(model), model.backbone_identity)
    torch.testing.assert_close(FAMILY.predict(again, tiles, {}).score, prediction.score)


def test_foundation_backbone_has_no_imagenet_weights():
    from wsi_anomaly.errors import InvalidInputError, WeightsUnavailableError

    config = tiny(backbone="uni")
    import dataclasses

    config = dataclasses.replace(
        config, model=dataclasses.replace(config.model, backbone_weights="imagenet")
    )
    with pytest.raises((WeightsUnavailableError, InvalidInputError), match="--backbone-weights"):
        FAMILY.build(config)


def test_mvtec_scores_are_the_map_max_then_its_mean(fitted):
    """PatchCore's headline image score is the map's maximum; its mean comes too, in the
    columns every family with maps fills (the scorer's mean and max)."""
    from wsi_anomaly.mvtec.adapters import ScorerAdapter

    adapter = ScorerAdapter(fitted, device="cpu", batch_size=2)
    assert adapter.score_names == ("max", "mean")
    images = torch.rand(3, 3, 256, 256, generator=torch.Generator().manual_seed(4))
    out = adapter(images)
    assert list(out.scores) == ["max", "mean"]
    np.testing.assert_allclose(out.scores["max"], out.maps.max(axis=(1, 2)), rtol=1e-5)
    np.testing.assert_allclose(out.scores["mean"], out.maps.mean(axis=(1, 2)), rtol=1e-5)
    assert (out.scores["max"] > out.scores["mean"]).all()
    cal = Calibration.from_dict(load_checkpoint(fitted)["calibration"])
    # the two scales are of the two statistics: the peaks' sit above the means'
    assert cal.threshold("max") > cal.threshold("mean")
