"""What a user sees around the work: no empty folders left by a failed run, quiet exits into a
closed pipe, one report per failed slide, counts with the right noun form."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from test_cli import assert_one_error_line, run

from wsi_anomaly.cli import EXIT_BROKEN_PIPE
from wsi_anomaly.words import count

REPO = Path(__file__).resolve().parents[1]


def _cli(*argv, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "wsi_anomaly", *argv], env=env, text=True, **kwargs
    )


# -- a failed run leaves no empty --out folder it created ------------------------------------------
def test_failed_heatmap_removes_the_out_folders_it_created(capsys, tmp_path):
    bad = tmp_path / "bad.svs"
    bad.write_text("not a slide")
    model = tmp_path / "m.pt"
    model.write_bytes(b"")
    out = tmp_path / "new" / "results"
    code, _, err = run(capsys, "heatmap", str(bad), "--model", str(model), "--out", str(out))
    assert_one_error_line(code, err, "not a slide")
    assert not out.exists() and not (tmp_path / "new").exists()


def test_failed_run_keeps_a_folder_that_was_there(capsys, tmp_path):
    bad = tmp_path / "bad.svs"
    bad.write_text("not a slide")
    out = tmp_path / "results"
    out.mkdir()
    code, _, err = run(capsys, "tile", str(bad), "--out", str(out / "sub" / "t.zarr"))
    assert_one_error_line(code, err, "not a slide")
    assert out.is_dir() and not (out / "sub").exists()


def test_failed_run_keeps_a_created_folder_with_content(capsys, tmp_path, monkeypatch):
    """Only empty folders go: a folder the run filled before failing stays as it is."""
    import wsi_anomaly.cli.info as info
    from wsi_anomaly.errors import InvalidInputError

    out = tmp_path / "made"

    def fails(args):
        out.mkdir()
        (out / "kept.txt").write_text("x")
        raise InvalidInputError("stop")

    monkeypatch.setattr(info, "run", fails)
    code, _, err = run(capsys, "info", "x.svs")  # info has no --out: nothing is tracked
    assert_one_error_line(code, err, "stop")
    assert (out / "kept.txt").is_file()


# -- output into a closed pipe ------------------------------------------------------------------
def test_output_into_a_closed_pipe_exits_quietly(small_slide):
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first byte, as with `| head -1` on a long output
    try:
        done = _cli("info", "--json", str(small_slide.path), stdout=write, stderr=subprocess.PIPE)
    finally:
        os.close(write)
    assert done.stderr == ""
    assert done.returncode == EXIT_BROKEN_PIPE == 141


def test_head_of_info_json(small_slide):
    done = subprocess.run(
        f"{sys.executable} -m wsi_anomaly info --json {small_slide.path} | head -1",
        shell=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.stdout == "{\n" and done.stderr == ""


# -- --skip-errors reports each failure once ------------------------------------------------------
def test_skip_errors_reports_each_failure_once(tmp_path):
    bad = tmp_path / "bad.svs"
    bad.write_text("not a slide")
    model = tmp_path / "m.pt"
    model.write_bytes(b"")
    done = _cli(
        "heatmap",
        str(bad),
        "--model",
        str(model),
        "--out",
        str(tmp_path / "results"),
        "--skip-errors",
        capture_output=True,
    )
    assert done.returncode == 5
    both = done.stdout + done.stderr
    assert both.count("is not a slide") == 1, both
    assert "bad.svs: failed: " in done.stderr


# -- counts --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "n,noun,plural,expected",
    [
        (1, "epoch", None, "1 epoch"),
        (0, "epoch", None, "0 epochs"),
        (3, "tile", None, "3 tiles"),
        (1, "category", "categories", "1 category"),
        (2, "category", "categories", "2 categories"),
    ],
)
def test_count(n, noun, plural, expected):
    assert count(n, noun, plural) == expected


def test_score_counts_one_image(capsys, tmp_path, tiny_model):
    images = tmp_path / "imgs"
    images.mkdir()
    Image.new("RGB", (256, 256), (200, 100, 150)).save(images / "a.png")
    code, out, err = run(
        capsys, "score", "--model", str(tiny_model), str(images), "--out", str(tmp_path / "s.csv")
    )
    assert code == 0, err
    assert "scored 1 image →" in out


# -- calibration warnings in plain words ------------------------------------------------------------
@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.05])
def test_tiles_for_holdout_is_the_fewest_that_hold_enough_out(fraction):
    import torch
    from torch.utils.data import TensorDataset

    from wsi_anomaly.training import MIN_HOLDOUT_TILES, holdout_split, tiles_for_holdout

    n = tiles_for_holdout(fraction)
    held = len(holdout_split(TensorDataset(torch.zeros(n)), fraction, seed=0)[1])
    fewer = len(holdout_split(TensorDataset(torch.zeros(n - 1)), fraction, seed=0)[1])
    assert held >= MIN_HOLDOUT_TILES > fewer


def test_too_few_tiles_to_hold_out_says_how_many_are_needed(small_store, tmp_path, caplog):
    import logging

    from conftest import tiny_config

    from wsi_anomaly.checkpoint import load_checkpoint
    from wsi_anomaly.tiles.dataset import ZarrTileDataset
    from wsi_anomaly.training import tiles_for_holdout, train_model

    tiles = ZarrTileDataset(small_store)
    caplog.set_level(logging.WARNING, logger="wsi_anomaly")
    out = tmp_path / "m.pt"
    train_model(tiles, tiny_config(), out, device="cpu", tile_mpp=0.5, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    message = next(w for w in warnings if "held-out calibration" in w)
    n = len(tiles)
    assert message.startswith(f"{n} normal tiles given; ")
    assert f"needs at least {tiles_for_holdout(0.1)} tiles (20 held out at 10 %" in message
    assert f"here {round(0.1 * n)})" in message
    assert "calibrating on the training tiles instead" in message
    assert load_checkpoint(out)["calibration"]["scale_source"].endswith("(in-sample)")


# -- scoring progress per scored batch ----------------------------------------------------------------
def test_scoring_progress_moves_with_every_batch(small_slide, tiny_model, tmp_path, monkeypatch):
    import math

    import wsi_anomaly as wa
    import wsi_anomaly.pipeline.slide_run as pipeline

    bars = []

    class Bar:  # records what the scoring bar is told
        def __init__(self, *args, **kwargs):
            self.total, self.updates = kwargs.get("total"), []
            bars.append(self)

        def update(self, n):
            self.updates.append(n)

        def close(self):
            pass

    monkeypatch.setattr(pipeline, "tqdm", Bar)
    seen = []
    rows = wa.heatmap(
        small_slide.path,
        tiny_model,
        out=tmp_path / "results",
        device="cpu",
        batch_size=3,
        progress=True,
        on_progress=seen.append,
    )
    n = int(rows[0]["n_tiles"])
    assert n > 6
    assert len(seen) == math.ceil(n / 3)  # one report per model batch of 3
    assert [p.done for p in seen] == [min(3 * (i + 1), n) for i in range(len(seen))]
    assert all(p.total == n and p.slide == small_slide.path.name for p in seen)
    assert all(p.tiles_per_s > 0 and p.eta_s >= 0 for p in seen) and seen[-1].eta_s == 0
    (bar,) = [b for b in bars if b.total == n]
    assert bar.updates == [3] * (n // 3) + ([n % 3] if n % 3 else [])


# -- interruption messages say what is left and what a re-run reuses ---------------------------------
def test_interrupted_heatmap_says_what_is_kept(capsys, tmp_path, monkeypatch):
    import wsi_anomaly.pipeline as pipeline

    out = tmp_path / "results"

    def interrupted_cohort(slides, out_root, *args, **kwargs):
        (out_root / "a.svs").mkdir(parents=True)
        (out_root / "a.svs" / "summary.json").write_text("{}")
        (out_root / ".b.svs.partial").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_cohort", interrupted_cohort)
    model = tmp_path / "m.pt"
    model.write_bytes(b"")
    code, _, err = run(capsys, "heatmap", "s.svs", "--model", str(model), "--out", str(out))
    assert code == 130
    (line,) = err.strip().splitlines()
    assert line.startswith("wsi-anomaly heatmap: interrupted; 1 finished slide in ")
    assert ".b.svs.partial" in line and "skips the finished slides" in line
    assert "not kept" not in line


@pytest.mark.parametrize("with_resume", [True, False])
def test_interrupted_training_says_whether_it_can_resume(
    capsys, tmp_path, monkeypatch, small_store, with_resume
):
    import wsi_anomaly.training as training

    out = tmp_path / "model.pt"

    def interrupted_training(*args, **kwargs):
        if with_resume:
            training.resume_path(out).write_bytes(b"checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train_model", interrupted_training)
    code, _, err = run(
        capsys, "train", "--tiles", str(small_store), "--out", str(out), "--config", "haloae_fast"
    )
    assert code == 130
    (line,) = err.strip().splitlines()
    if with_resume:
        assert "model.resume.pt, is kept: add --resume" in line
    else:
        assert "no resumable checkpoint had been written yet" in line


def test_interrupted_tile_says_nothing_was_kept(capsys, tmp_path, monkeypatch, small_slide):
    import wsi_anomaly.tiles as tiles

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tiles, "tile_slide", interrupted)
    code, _, err = run(capsys, "tile", str(small_slide.path), "--out", str(tmp_path / "t.zarr"))
    assert code == 130
    assert err.strip() == (
        "wsi-anomaly tile: interrupted; partial outputs were not kept; a re-run starts over"
    )


_ABANDONED_IO = """
import asyncio, gc, sys
import wsi_anomaly.tiles as tiles
from wsi_anomaly.cli import Terminated, main

held = []

def stopped_mid_write(*args, **kwargs):
    # What a stopped zarr write leaves: a task on an event loop that will never finish.
    loop = asyncio.new_event_loop()
    loop.run_until_complete(asyncio.sleep(0))
    never = loop.create_future()
    held.append(loop.create_task(asyncio.wait_for(never, None)))
    loop.run_until_complete(asyncio.sleep(0))
    held.append(loop)
    raise {error}

tiles.tile_slide = stopped_mid_write
code = main(["tile", sys.argv[1], "--out", sys.argv[2]])
held.clear()
gc.collect()  # the pending task is destroyed here, as at interpreter exit
sys.exit(code)
"""


@pytest.mark.parametrize("error, status", [("Terminated()", 143), ("KeyboardInterrupt", 130)])
def test_io_abandoned_by_an_interruption_is_not_reported_at_exit(
    tmp_path, small_slide, error, status
):
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _ABANDONED_IO.format(error=error),
            str(small_slide.path),
            str(tmp_path / "t.zarr"),
        ],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == status, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "partial outputs were not kept" in lines[0], proc.stderr


# -- a preset belongs to its family -----------------------------------------------------------------
def test_a_preset_picks_its_family_and_another_family_is_refused(tmp_path, capsys):
    import argparse

    from wsi_anomaly.cli import main
    from wsi_anomaly.cli.options import family_of_run

    def family(config, given):
        return family_of_run(argparse.Namespace(config=config, family=given))

    assert family("atacnet_fast", None) == "atacnet"
    assert family("patchcore_fast", None) == "patchcore"
    assert family(None, None) == "haloae"
    assert family("haloae_fast", "haloae") == "haloae"
    plain = tmp_path / "plain.yaml"  # a config that names no family keeps --family's choice
    plain.write_text("train:\n  epochs: 1\n")
    assert family(str(plain), "atacnet") == "atacnet"

    tiles = tmp_path / "tiles"
    tiles.mkdir()
    out = tmp_path / "m.pt"
    code = main(
        ["train", "--tiles", str(tiles), "--out", str(out), "--config", "atacnet_fast",
         "--family", "haloae"]
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "atacnet" in err and "haloae_fast" in err and "leave out --family" in err
    assert not out.exists()
