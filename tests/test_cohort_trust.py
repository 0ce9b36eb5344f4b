"""Cohort runs never lose results or present them as something they are not."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wsi_anomaly.errors import OutputExistsError, OutputLockedError, OutputWriteError
from wsi_anomaly.outputs import OutputLock
from wsi_anomaly.pipeline import HeatmapSettings, process_slide, run_cohort
from wsi_anomaly.slide.synthetic import write_synthetic_slide
from wsi_anomaly.tiles import tile_slide


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """Two different slides with the same file name, in two folders."""
    root = tmp_path_factory.mktemp("twins")
    (root / "a").mkdir()
    (root / "b").mkdir()
    a = write_synthetic_slide(root / "a" / "slide.tif", width=1024, height=1024, mpp=0.5, seed=11)
    b = write_synthetic_slide(root / "b" / "slide.tif", width=1280, height=1024, mpp=0.5, seed=12)
    return a.path, b.path


def settings(**kw):
    return HeatmapSettings(device="cpu", batch_size=8, progress=False, **kw)


def test_same_file_name_gets_two_result_folders(twins, tiny_model, tmp_path):
    a, b = twins
    rows = run_cohort([a, b], tmp_path, tiny_model, settings())
    assert [r["status"] for r in rows] == ["ok", "ok"]
    outputs = [Path(r["output"]) for r in rows]
    assert outputs[0] != outputs[1]
    for row, slide in zip(rows, (a, b)):
        saved = json.loads((Path(row["output"]) / "summary.json").read_text())
        assert saved["slide_path"] == str(slide.resolve())
    table = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert sorted(r["slide_path"] for r in table) == sorted(str(p.resolve()) for p in (a, b))
    # A later run of one of them alone finds its own folder again and reuses it.
    again = run_cohort([b], tmp_path, tiny_model, settings())
    assert again[0]["status"] == "skipped (done)" and again[0]["output"] == rows[1]["output"]
    assert len(list(csv.DictReader((tmp_path / "summary.csv").open()))) == 2


def test_other_folder_of_same_name_is_not_taken_over(twins, tiny_model, tmp_path):
    a, b = twins
    first = process_slide(a, tmp_path, tiny_model, settings())
    second = process_slide(b, tmp_path, tiny_model, settings())
    assert second["status"] == "ok"
    assert Path(first["output"]) != Path(second["output"])
    assert json.loads((Path(first["output"]) / "summary.json").read_text())["slide_path"] == str(
        a.resolve()
    )


def test_reuse_only_for_the_same_work(twins, tiny_model, tmp_path):
    a, _ = twins
    slide = tmp_path / "slides" / "s.tif"
    slide.parent.mkdir()
    slide.write_bytes(a.read_bytes())
    out = tmp_path / "results"
    process_slide(slide, out, tiny_model, settings())
    assert process_slide(slide, out, tiny_model, settings())["status"] == "skipped (done)"
    with pytest.raises(OutputExistsError, match="settings differ.*--overwrite"):
        process_slide(slide, out, tiny_model, settings(min_tissue=0.3))
    other_model = tmp_path / "other.pt"
    other_model.write_bytes(tiny_model.read_bytes() + b"\0")  # another file: another sha256
    with pytest.raises(OutputExistsError, match="model differ"):
        process_slide(slide, out, other_model, settings())
    # A replaced slide file at the same path.
    write_synthetic_slide(slide, width=1024, height=1024, mpp=0.5, seed=99)
    with pytest.raises(OutputExistsError, match="slide content differ"):
        process_slide(slide, out, tiny_model, settings())
    redone = process_slide(slide, out, tiny_model, settings(overwrite=True))
    assert redone["status"] == "ok"
    assert process_slide(slide, out, tiny_model, settings())["status"] == "skipped (done)"


def test_overwrite_never_deletes_foreign_folders(twins, tiny_model, tmp_path):
    a, _ = twins
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="not a tile store"):
        tile_slide(a, precious, overwrite=True, progress=False)
    assert (precious / "notes.txt").read_text() == "keep me"
    # A results folder the user made by hand where a slide's results would go.
    out = tmp_path / "results"
    (out / "slide.tif").mkdir(parents=True)
    (out / "slide.tif" / "mine.txt").write_text("keep me too")
    with pytest.raises(OutputExistsError, match="not a slide results folder"):
        process_slide(a, out, tiny_model, settings(overwrite=True))
    assert (out / "slide.tif" / "mine.txt").is_file()
    # The tool's own tile store is replaced with --overwrite.
    store = tmp_path / "own.zarr"
    tile_slide(a, store, progress=False)
    tile_slide(a, store, overwrite=True, progress=False)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        tile_slide(a, store, progress=False)


def test_skip_errors_records_any_failure(twins, tiny_model, tmp_path, monkeypatch):
    import wsi_anomaly.pipeline.cohort as pipeline

    a, b = twins
    real = pipeline.process_slide

    def flaky(slide, *args, **kw):
        if Path(slide) == b:
            raise MemoryError("out of memory while decoding")
        return real(slide, *args, **kw)

    monkeypatch.setattr(pipeline, "process_slide", flaky)
    rows = run_cohort([a, b], tmp_path, tiny_model, settings(), skip_errors=True)
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert "MemoryError: out of memory" in rows[1]["error"]
    table = {r["slide_path"]: r for r in csv.DictReader((tmp_path / "summary.csv").open())}
    assert table[str(b.resolve())]["status"] == "failed"
    assert not list(tmp_path.glob(".*partial*"))
    with pytest.raises(MemoryError):
        run_cohort([b], tmp_path / "strict", tiny_model, settings())


def test_no_space_is_found_before_work(twins, tiny_model, tmp_path, monkeypatch):
    import shutil

    import wsi_anomaly.outputs as outputs

    a, _ = twins
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda p: usage._replace(free=1 << 20))
    with pytest.raises(OutputWriteError, match="not enough disk space"):
        run_cohort([a], tmp_path / "results", tiny_model, settings())
    with pytest.raises(OutputWriteError, match="not enough disk space"):
        tile_slide(a, tmp_path / "t.zarr", progress=False)
    assert not [p for p in tmp_path.rglob("*") if "partial" in p.name]


def test_out_that_is_a_file_is_one_line(twins, tiny_model, tmp_path):
    a, _ = twins
    target = tmp_path / "results"
    target.write_text("a file")
    with pytest.raises(OutputExistsError, match="is a file"):
        run_cohort([a], target, tiny_model, settings())
    with pytest.raises(OutputExistsError, match="not a tile store"):
        tile_slide(a, target, overwrite=True, progress=False)
    assert target.read_text() == "a file"


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    target = tmp_path / "out"
    with OutputLock(target):
        with pytest.raises(OutputLockedError, match="another run"):
            OutputLock(target).acquire()
    assert not (tmp_path / ".out.lock").exists()
    # A lock left by a process that is gone (kill -9) is stale.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    import socket

    (tmp_path / ".out.lock").write_text(
        json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "time": 0})
    )
    with OutputLock(target) as lock:
        assert lock.held
    # The second run can also wait for the first to finish.
    first = OutputLock(target)
    first.acquire()
    import threading

    threading.Timer(0.5, first.release).start()
    with OutputLock(target, wait_s=10, poll_s=0.05) as second:
        assert second.held


def test_two_concurrent_runs_on_one_output(twins, tiny_model, tmp_path):
    a, _ = twins
    out = tmp_path / "results"
    cmd = [
        sys.executable,
        "-c",
        "import sys; from wsi_anomaly.cli import main; sys.exit(main())",
        "heatmap",
        str(a),
        "--model",
        str(tiny_model),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--batch-size",
        "8",
        "-q",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    for _code, err in results:
        assert "Traceback" not in err, err
    codes = sorted(code for code, _ in results)
    # Either the second waited its turn and found the work done, or it was refused (busy).
    assert codes[0] == 0 and codes[1] in (0, 4, 5), results
    summary = json.loads((out / "slide.tif" / "summary.json").read_text())
    assert summary["n_tiles"] > 0
    assert not list(out.glob(".*partial*")) and not list(out.glob(".*.lock"))
    from wsi_anomaly.tiles import TileStore

    assert np.isfinite(TileStore(out / "slide.tif" / "tiles.zarr").scores).all()


def test_two_slides_in_flight_give_the_same_results(twins, tiny_model, tmp_path):
    from wsi_anomaly.tiles import TileStore

    a, b = twins
    one = run_cohort([a, b], tmp_path / "one", tiny_model, settings())
    two = run_cohort([a, b], tmp_path / "two", tiny_model, settings(slides_in_flight=2))
    assert [r["status"] for r in two] == ["ok", "ok"]
    for x, y in zip(one, two):
        np.testing.assert_allclose(
            TileStore(Path(y["output"]) / "tiles.zarr").scores,
            TileStore(Path(x["output"]) / "tiles.zarr").scores,
            rtol=1e-5,
            atol=1e-7,
        )


def test_lock_of_another_host_is_stale_once_its_heartbeat_stops(tmp_path):
    import time

    target = tmp_path / "out"
    lock = tmp_path / ".out.lock"
    lock.write_text(json.dumps({"pid": 1, "host": "node-that-died", "time": time.time()}))
    with pytest.raises(OutputLockedError, match="node-that-died"):
        OutputLock(target, stale_after_s=60).acquire()  # recently touched: alive
    old = time.time() - 120
    os.utime(lock, (old, old))
    with OutputLock(target, stale_after_s=60) as taken:  # not touched for 2 min: stale
        assert taken.held
    # A holder keeps its lock fresh while it works.
    with OutputLock(target, heartbeat_s=0.05) as held:
        os.utime(held.path, (old, old))
        time.sleep(0.3)
        assert time.time() - held.path.stat().st_mtime < 5


def test_names_too_long_are_one_line(twins, tiny_model, tmp_path, capsys, monkeypatch):
    from wsi_anomaly.cli import main

    a, _ = twins
    monkeypatch.chdir(tmp_path)
    long = "x" * 300
    for argv in (
        ["tile", str(a), "--out", long + ".zarr"],
        ["heatmap", str(a), "--model", str(tiny_model), "--out", long, "-q"],
    ):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert "too long" in err
