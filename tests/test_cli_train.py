"""``wsi-anomaly train``: the schedule, the duration estimate and its confirmation, the loss
explanation, and what an interrupted run says it keeps."""

import io
import logging

import pytest
import yaml
from test_cli import assert_one_error_line, run

import wsi_anomaly.training as training
from wsi_anomaly.words import about


@pytest.fixture
def short_config(tmp_path):
    """A config of single-tile batches, 2 epochs of 2 by default: the estimate comes after
    three batches, one is left."""

    def write(epochs=2, samples_per_epoch=2):
        path = tmp_path / "short.yaml"
        train = {
            "epochs": epochs,
            "samples_per_epoch": samples_per_epoch,
            "batch_size": 1,
            "workers": 0,
            "calibration_tiles": 2,
            "calibration_holdout": 0,
        }
        model = {"name": "haloae", "backbone_weights": "random"}
        path.write_text(yaml.safe_dump({"model": model, "train": train}))
        return path

    return write


def train(capsys, store, out, config, *more):
    return run(
        capsys, "train", "--tiles", str(store), "--out", str(out), "--config", str(config),
        "--device", "cpu", *more,
    )  # fmt: skip


@pytest.fixture
def two_days_per_batch(monkeypatch):
    monkeypatch.setattr(training, "_seconds_per_batch", lambda durations: 2 * 86400.0)


def test_about_reads_as_hours_and_minutes():
    assert about(20) == "about 20 s"
    assert about(12 * 60 + 10) == "about 12 min"
    assert about(3 * 3600 + 5 * 60) == "about 3 h 5 min"
    assert about(2 * 86400) == "about 48 h 0 min (2.0 days)"


def test_over_a_day_without_a_terminal_is_refused_naming_yes(
    capsys, tmp_path, small_store, short_config, two_days_per_batch
):
    out = tmp_path / "m.pt"
    code, stdout, err = train(capsys, small_store, out, short_config(1, 4), "-q")
    assert_one_error_line(code, err, "--yes", "about 48 h 0 min", "over a day")
    assert "estimated time to the end of training on this machine: about 48 h" in stdout
    assert not out.exists() and not training.resume_path(out).exists()


def test_over_a_day_on_a_terminal_asks(
    capsys, tmp_path, small_store, short_config, two_days_per_batch, monkeypatch
):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    asked = []
    monkeypatch.setattr("sys.stdin", Terminal("n\n"))
    monkeypatch.setattr("sys.stdout.isatty", lambda: True, raising=False)
    monkeypatch.setattr("builtins.input", lambda prompt: asked.append(prompt) or "n")
    code, _, err = train(capsys, small_store, tmp_path / "m.pt", short_config(1, 4), "-q")
    assert len(asked) == 1 and "[y/N]" in asked[0] and "--config haloae_fast" in asked[0]
    assert_one_error_line(code, err, "not continued", "about 48 h")


def test_yes_trains_and_the_loss_weights_are_explained(
    capsys, tmp_path, small_store, short_config, two_days_per_batch, caplog
):
    out = tmp_path / "m.pt"
    with caplog.at_level(logging.INFO, logger="wsi_anomaly"):
        code, stdout, err = train(capsys, small_store, out, short_config(), "--yes", "-v")
    assert code == 0 and out.is_file(), err
    lines = stdout.splitlines()
    assert lines[0].startswith("training haloae on ")  # the schedule, before anything runs
    assert any("about 48 h 0 min (2.0 days)" in ln for ln in lines)
    messages = [r.getMessage() for r in caplog.records]
    (explained,) = [m for m in messages if "weights evolve" in m]  # once
    assert "can rise from one epoch to the next while every term falls" in explained
    first, second = [m for m in messages if m.startswith("epoch")]
    # the EWS weights of the schedule's first and last epoch, and the unweighted terms
    assert first.startswith("epoch 1/2  loss ") and "= 0.97×cls " in first
    assert second.startswith("epoch 2/2  loss ") and "= 0.11×cls " in second


def test_interrupted_run_says_what_a_resume_reuses(capsys, tmp_path, monkeypatch, small_store):
    out = tmp_path / "model.pt"

    def interrupted_training(*args, **kwargs):
        training.resume_path(out).write_bytes(b"checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train_model", interrupted_training)
    monkeypatch.setattr(
        training, "describe_resume_point", lambda out: "epochs 1–2 of 8 and 5 of 16 batches"
    )
    code, _, err = run(
        capsys, "train", "--tiles", str(small_store), "--out", str(out), "--config", "haloae_fast"
    )
    assert code == 130
    (line,) = err.strip().splitlines()
    assert "model.resume.pt, is kept: add --resume" in line
    assert line.endswith(
        "a re-run with --resume reuses epochs 1–2 of 8 and 5 of 16 batches and goes on from there"
    )
