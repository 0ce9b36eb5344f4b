import pytest
import torch
from conftest import tiny_config

from wsi_anomaly.checkpoint import load_checkpoint, save_checkpoint
from wsi_anomaly.errors import (
    CheckpointError,
    DeviceUnavailableError,
    OutputExistsError,
)
from wsi_anomaly.models import (
    HaloAE,
    haloae_loss,
    load_vgg19,
    make_cutpaste_batch,
    normalise,
)
from wsi_anomaly.tiles.dataset import ZarrTileDataset
from wsi_anomaly.training import resolve_device, resume_path, train_model


def test_a_few_steps_lower_the_loss(small_store):
    torch.manual_seed(0)
    ds = ZarrTileDataset(small_store)
    images = ds[0].unsqueeze(0)
    batch, labels = make_cutpaste_batch(images, torch.Generator().manual_seed(0))
    x = normalise(batch)
    model = HaloAE(load_vgg19("random")).train()
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-4)
    losses = []
    for _ in range(5):
        loss, _ = haloae_loss(model(x), x, labels, (1 / 3, 1 / 3, 1 / 3))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0], losses


def test_checkpoint_is_complete_and_calibrated(tiny_model):
    ckpt = load_checkpoint(tiny_model)
    assert ckpt["model_name"] == "haloae" and ckpt["complete"]
    assert ckpt["backbone"] == "vgg19-random" and ckpt["tile_mpp"] == 0.5
    assert ckpt["config"]["model"]["backbone_weights"] == "random"
    cal = ckpt["calibration"]
    assert cal["extras"]["mean_map"].shape == (64, 64) and cal["n_tiles"] == 4
    q = [cal["score_quantiles"][k] for k in ("0", "0.5", "0.99", "1")]
    assert q == sorted(q) and q[0] >= 0
    assert ckpt["software_version"]
    assert tiny_model.with_name("tiny.config.yaml").is_file()
    assert not resume_path(tiny_model).exists()
    assert len(ckpt["history"]) == 1


def test_resume_continues_exactly(small_store, tmp_path, monkeypatch):
    ds = ZarrTileDataset(small_store)
    cfg = tiny_config(epochs=2, calibration_tiles=2)
    straight = tmp_path / "straight.pt"
    train_model(ds, cfg, straight, device="cpu", progress=False)

    import wsi_anomaly.models.haloae_family as family_mod

    calls = {"n": 0}
    real = family_mod.make_cutpaste_batch

    def crash_in_second_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:  # two single-tile steps per epoch
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    resumed = tmp_path / "resumed.pt"
    monkeypatch.setattr(family_mod, "make_cutpaste_batch", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_model(ds, cfg, resumed, device="cpu", progress=False)
    assert not resumed.exists() and resume_path(resumed).exists()
    with pytest.raises(CheckpointError, match="unfinished"):
        load_checkpoint(resume_path(resumed))
    monkeypatch.setattr(family_mod, "make_cutpaste_batch", real)
    train_model(ds, cfg, resumed, device="cpu", resume=True, progress=False)

    a, b = load_checkpoint(straight), load_checkpoint(resumed)
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]


def test_existing_checkpoint_refused(tiny_model, small_store):
    with pytest.raises(OutputExistsError, match="--overwrite"):
        train_model(
            ZarrTileDataset(small_store), tiny_config(), tiny_model, device="cpu", progress=False
        )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_request_without_cuda():
    with pytest.raises(DeviceUnavailableError, match="no usable CUDA"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def test_foreign_and_old_checkpoints(tmp_path, tiny_model):
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="not a wsi-anomaly checkpoint"):
        load_checkpoint(other)
    ckpt = load_checkpoint(tiny_model)
    old = tmp_path / "old.pt"
    save_checkpoint({**ckpt, "format_version": 0}, old)
    with pytest.raises(CheckpointError, match="format 0"):
        load_checkpoint(old)
    with pytest.raises(CheckpointError, match="not 'atacnet'"):
        load_checkpoint(tiny_model, expect_model="atacnet")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(junk)


def test_checkpoint_loads_with_weights_only(tiny_model, small_store, tmp_path):
    """Only tensors and plain data: the final and the resumable checkpoints load safely."""
    data = torch.load(tiny_model, map_location="cpu", weights_only=True)
    assert data["complete"] and data["model_name"] == "haloae"
    out = tmp_path / "m.pt"
    ds = ZarrTileDataset(small_store)
    # tile_mpp as numpy scalar and source as a Path must still be stored as plain values
    from pathlib import Path

    import numpy as np

    train_model(
        ds,
        tiny_config(epochs=2, calibration_tiles=2),
        out,
        device="cpu",
        tile_mpp=np.float64(0.5),
        source=Path("tiles"),
        progress=False,
    )
    data = torch.load(out, map_location="cpu", weights_only=True)
    assert data["tile_mpp"] == 0.5 and type(data["tile_mpp"]) is float
    assert data["training_source"] == "tiles"


def test_out_that_is_a_folder_is_refused_before_training(small_store, tmp_path, monkeypatch):
    import wsi_anomaly.models.haloae_family as family_mod

    def never(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(family_mod, "make_cutpaste_batch", never)
    folder = tmp_path / "models"
    folder.mkdir()
    with pytest.raises(OutputExistsError, match="folder"):
        train_model(
            ZarrTileDataset(small_store),
            tiny_config(),
            folder,
            device="cpu",
            overwrite=True,
            progress=False,
        )


def test_no_room_for_the_checkpoint_is_refused_before_training(small_store, tmp_path, monkeypatch):
    import shutil

    import wsi_anomaly.models.haloae_family as family_mod
    from wsi_anomaly.errors import OutputWriteError

    def never(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(family_mod, "make_cutpaste_batch", never)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10 * 2**20))
    with pytest.raises(OutputWriteError, match="disk space"):
        train_model(
            ZarrTileDataset(small_store),
            tiny_config(),
            tmp_path / "m.pt",
            device="cpu",
            progress=False,
        )


def test_score_scale_comes_from_held_out_normal_tiles(small_store, tmp_path):
    from torch.utils.data import ConcatDataset

    from wsi_anomaly.training import MIN_HOLDOUT_TILES, holdout_split

    one = ZarrTileDataset(small_store)
    two = ConcatDataset([one, one])  # two "slides"
    train, held, groups = holdout_split(two, 0.25, seed=0)
    assert not set(train) & set(held) and sorted(train + held) == list(range(len(two)))
    # Stratified: each source gives its share.
    assert [g["n_held_out"] for g in groups] == [round(0.25 * len(one))] * 2
    assert holdout_split(two, 0.25, seed=0)[1] == held  # seeded: a resume sees the same split
    out = tmp_path / "m.pt"
    fraction = max(0.25, (MIN_HOLDOUT_TILES + 1) / len(two))
    train_model(
        two,
        tiny_config(calibration_holdout=fraction),
        out,
        device="cpu",
        tile_mpp=0.5,
        progress=False,
    )
    calibration = load_checkpoint(out)["calibration"]
    assert calibration["scale_source"] == "held-out normal tiles"
    assert calibration["holdout"]["n_tiles"] >= MIN_HOLDOUT_TILES
    assert calibration["in_sample"]["score_quantiles"] != calibration["score_quantiles"]
    assert calibration["extras"]["mean_map"] is not None
    # Too few tiles to hold out: in-sample, and said so.
    small = tmp_path / "s.pt"
    train_model(
        one,
        tiny_config(calibration_holdout=0.01),
        small,
        device="cpu",
        tile_mpp=0.5,
        progress=False,
    )
    assert load_checkpoint(small)["calibration"]["scale_source"].endswith("(in-sample)")
