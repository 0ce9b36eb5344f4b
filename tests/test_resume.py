"""Resume points: written after every epoch and when a run is stopped, atomically, holding
everything a resumed run needs to continue the same schedule."""

import os
import signal

import pytest
import torch
from conftest import tiny_config

import wsi_anomaly.models.haloae_family as haloae_family
import wsi_anomaly.training as training
from wsi_anomaly.checkpoint import load_checkpoint
from wsi_anomaly.tiles.dataset import ZarrTileDataset
from wsi_anomaly.training import (
    describe_resume_point,
    resume_path,
    snapshot_path,
    train_model,
)


@pytest.fixture(autouse=True)
def python_sigint_handler():
    """Ctrl-C as Python handles it by default: a library imported by another test (dask-jobqueue
    installs its own SIGINT handler on import) must not decide what these tests see."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


class Stopped(KeyboardInterrupt):
    """What the test's SIGTERM handler raises (the command line's unwinds like Ctrl-C too)."""


def signal_during_batch(monkeypatch, call, signals):
    """Send ``signals`` to this process from inside the forward pass of the ``call``-th training
    batch (1-based, counted over the run)."""
    real = haloae_family.make_cutpaste_batch
    calls = {"n": 0}

    def cutpaste(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            for sig in signals:
                os.kill(os.getpid(), sig)
        return real(*args, **kwargs)

    monkeypatch.setattr(haloae_family, "make_cutpaste_batch", cutpaste)
    return calls


def same_run(a, b):
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert a["history"] == b["history"]  # losses, terms and the loss weights of every epoch


def test_a_signal_within_an_epoch_waits_for_the_batch_and_resumes_exactly(
    small_store, tmp_path, monkeypatch
):
    ds = ZarrTileDataset(small_store)
    cfg = tiny_config(epochs=2, samples_per_epoch=2, calibration_tiles=2, calibration_holdout=0)
    straight = tmp_path / "straight.pt"
    train_model(ds, cfg, straight, device="cpu", progress=False)

    def stop(signum, frame):
        raise Stopped

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        out = tmp_path / "resumed.pt"
        calls = signal_during_batch(monkeypatch, 3, [signal.SIGTERM])  # epoch 2, batch 1
        with pytest.raises(Stopped):
            train_model(ds, cfg, out, device="cpu", progress=False)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert calls["n"] == 3  # the batch that got the signal finished; no further one began
    assert not out.exists()
    state = load_checkpoint(resume_path(out), require_complete=False)["train_state"]
    assert (state["epoch"], state["step"], state["epoch_batches"]) == (0, 1, 2)
    assert set(state["rng"]) >= {"torch", "numpy", "python"} and "aug_state" in state
    assert describe_resume_point(out) == "epoch 1 of 2 and 1 of 2 batches of epoch 2"

    calls = signal_during_batch(monkeypatch, 0, [])
    train_model(ds, cfg, out, device="cpu", resume=True, progress=False)
    assert calls["n"] == 1  # only the last batch of epoch 2 was trained again
    same_run(load_checkpoint(straight), load_checkpoint(out))
    assert not resume_path(out).exists()


def test_resume_point_every_epoch_numbered_copies_and_a_second_ctrl_c(
    small_store, tmp_path, monkeypatch
):
    ds = ZarrTileDataset(small_store)
    cfg = tiny_config(epochs=3, samples_per_epoch=1, calibration_tiles=2, checkpoint_every=2)
    out = tmp_path / "m.pt"
    # two Ctrl-C within the third epoch's batch: the second one stops at once, mid-batch, so the
    # resume point stays the one written after epoch 2
    signal_during_batch(monkeypatch, 3, [signal.SIGINT, signal.SIGINT])
    with pytest.raises(KeyboardInterrupt):
        train_model(ds, cfg, out, device="cpu", progress=False)
    state = load_checkpoint(resume_path(out), require_complete=False)
    assert state["train_state"]["epoch"] == 1 and state["train_state"]["step"] == 0
    assert [h["epoch"] for h in state["history"]] == [0, 1]
    assert snapshot_path(out, 2).is_file() and not snapshot_path(out, 1).exists()
    assert (
        load_checkpoint(snapshot_path(out, 2), require_complete=False)["history"]
        == (state["history"])
    )
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_an_interrupted_write_keeps_the_previous_resume_point(small_store, tmp_path, monkeypatch):
    ds = ZarrTileDataset(small_store)
    cfg = tiny_config(epochs=3, samples_per_epoch=1, calibration_tiles=2)
    out = tmp_path / "m.pt"
    real_save = torch.save
    saves = {"n": 0}

    def save_cut_short(obj, f, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] >= 2:  # from the resume point after epoch 2 on: half a file, then Ctrl-C
            with open(f, "wb") as fh:
                fh.write(b"PK\x03\x04 half a zip")
            raise KeyboardInterrupt
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_cut_short)
    with pytest.raises(KeyboardInterrupt):
        train_model(ds, cfg, out, device="cpu", progress=False)
    monkeypatch.setattr(torch, "save", real_save)
    state = load_checkpoint(resume_path(out), require_complete=False)
    assert state["train_state"]["epoch"] == 0  # the point after epoch 1, whole
    assert [p.name for p in tmp_path.iterdir()] == ["m.resume.pt"]  # no temporary left


def test_patchcore_resumes_after_its_fit(small_store, tmp_path, monkeypatch):
    """A memory bank is resumable once built: a run stopped during calibration does not stream
    the tiles through the backbone again."""
    from wsi_anomaly.config import load_config
    from wsi_anomaly.models.patchcore import PatchCore

    cfg = load_config(
        "patchcore_fast",
        {
            "model": {"backbone_weights": "random"},
            "patchcore": {"target_dim": 32, "coreset_budget": 64, "image_px": 64},
            "train": {"calibration_tiles": 4, "workers": 0, "calibration_holdout": 0},
        },
    )
    ds = ZarrTileDataset(small_store)
    out = tmp_path / "pc.pt"
    real = training.calibrate

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "calibrate", stopped)
    with pytest.raises(KeyboardInterrupt):
        train_model(ds, cfg, out, device="cpu", progress=False)
    bank = load_checkpoint(resume_path(out), require_complete=False)
    assert bank["train_state"]["fitted"] and bank["state_dict"]["memory_bank"].shape[0] > 0
    assert describe_resume_point(out) == "the finished fit (1 epoch); it goes on with calibration"

    monkeypatch.setattr(training, "calibrate", real)

    def no_second_pass(*args, **kwargs):
        raise AssertionError("the tiles were streamed again")

    monkeypatch.setattr(PatchCore, "observe", no_second_pass)
    train_model(ds, cfg, out, device="cpu", resume=True, progress=False)
    done = load_checkpoint(out)
    assert torch.equal(done["state_dict"]["memory_bank"], bank["state_dict"]["memory_bank"])


def test_atacnet_resumes_its_scheduler_at_the_end_of_an_epoch(small_store, tmp_path, monkeypatch):
    """Stopped after the last batch of epoch 2, before the epoch's end (the scheduler's step):
    the resumed run trains nothing again and ends as the run never stopped."""
    from test_train_atacnet import Marked, atac_config

    import wsi_anomaly.models.atacnet_family as atacnet_family

    normals = ZarrTileDataset(small_store)
    anomalies = Marked(normals, range(3))
    cfg = atac_config(epochs=2, steps_per_epoch=1, lr_step_epochs=1)
    straight, out = tmp_path / "straight.pt", tmp_path / "resumed.pt"
    train_model(normals, cfg, straight, device="cpu", anomalies=anomalies, progress=False)

    real = atacnet_family.cutmix_anomalous_half
    calls = {"n": 0}

    def cutmix(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(atacnet_family, "cutmix_anomalous_half", cutmix)
    with pytest.raises(KeyboardInterrupt):
        train_model(normals, cfg, out, device="cpu", anomalies=anomalies, progress=False)
    state = load_checkpoint(resume_path(out), require_complete=False)["train_state"]
    assert (state["epoch"], state["step"], state["epoch_batches"]) == (0, 1, 1)
    train_model(normals, cfg, out, device="cpu", anomalies=anomalies, resume=True, progress=False)
    assert calls["n"] == 2  # nothing trained again
    a, b = load_checkpoint(straight), load_checkpoint(out)
    same_run(a, b)
    assert a["train_state"]["scheduler"] == b["train_state"]["scheduler"]
