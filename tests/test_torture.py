"""Hostile input and hostile timing, class by class: every case ends in a result that can be
trusted or in one error line — never a traceback, a destroyed run, or a non-finite "success".

Classes: working folders and locks; interruption; non-finite results; option values;
checkpoints; configs (YAML); annotations (GeoJSON); mpp CSVs; the filesystem (symlinks); the
viewer's folder and Host header.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import assert_one_error_line, run

from wsi_anomaly.slide.synthetic import write_synthetic_slide
from wsi_anomaly.tiles import TileStore


def _env() -> dict[str, str]:
    """The environment of a command-line run of the package these tests import."""
    import wsi_anomaly

    source = Path(wsi_anomaly.__file__).resolve().parents[1]
    return {**os.environ, "PYTHONPATH": str(source), "OMP_NUM_THREADS": "1"}


def _cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "wsi_anomaly", *argv]


def _partials(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if "partial" in p.name]


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _lock(target: Path, pid: int) -> Path:
    """A lock file as a run with ``pid`` on this host leaves it."""
    lock = target.with_name(f".{target.name}.lock")
    info = {"pid": pid, "host": socket.gethostname(), "token": "f" * 32, "started": "?"}
    lock.write_text(json.dumps(info))
    return lock


# -- working folders and locks -------------------------------------------------------------------


def test_a_refused_tile_run_leaves_the_running_ones_work_alone(capsys, small_slide, tmp_path):
    out = tmp_path / "t.zarr"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock(out, holder.pid)
        # The running run's working folders, as this and earlier versions name them.
        work = [tmp_path / ".t.zarr.partial", tmp_path / ".t.zarr.0123456789ab.partial"]
        for w in work:
            w.mkdir()
            (w / "zarr.json").write_text("{}")
        code, _, err = run(capsys, "tile", str(small_slide.path), "--out", str(out), "-q")
        assert code == 4
        assert_one_error_line(code, err, "being written by another run")
        assert all((w / "zarr.json").is_file() for w in work), "the holder's work was removed"
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_rerun_after_kill_9_clears_dead_work_and_publishes_a_complete_store(
    capsys, small_slide, tmp_path
):
    out = tmp_path / "t.zarr"
    _lock(out, _dead_pid())
    left = [tmp_path / ".t.zarr.partial", tmp_path / ".t.zarr.89abcdef0123.partial"]
    for w in left:
        (w / "tiles").mkdir(parents=True)
        (w / "tiles" / "c.0.0.0.0.1234.partial").write_bytes(b"half a shard")
    code, _, err = run(capsys, "tile", str(small_slide.path), "--out", str(out), "-q")
    assert code == 0, err
    assert len(TileStore(out)) > 0
    assert not _partials(tmp_path), "a dead run's work outlived the next run"
    assert not list(tmp_path.glob(".*.lock"))


def test_a_heatmap_rerun_after_kill_9_while_drawing_publishes_only_complete_files(
    capsys, small_slide, tiny_model, tmp_path
):
    results = tmp_path / "results"
    args = ("heatmap", str(small_slide.path), "--model", str(tiny_model), "--out", str(results))
    args += (
        "--mpp",
        "1",
        "--min-tissue",
        "0.05",
    )  # a few tiles: the point is the folders, not the scores
    code, _, err = run(capsys, *args, "--device", "cpu", "-q")
    assert code == 0, err
    final = results / Path(small_slide.path).name
    # A run killed while drawing: its working folder holds a finished tile store and half-
    # written pictures, and the final folder is not there yet.
    work = results / f".{final.name}.partial"
    os.replace(final, work)
    (work / ".overlay.png.deadbeef.partial.png").write_bytes(b"half a picture")
    (work / "overlay.png").write_bytes(b"not a whole picture")
    _lock(final, _dead_pid())
    code, _, err = run(capsys, *args, "--device", "cpu", "-q")
    assert code == 0, err
    assert final.is_dir() and not _partials(results), sorted(p.name for p in _partials(results))
    with Image.open(final / "overlay.png") as image:
        image.load()  # the re-run drew it again: a whole PNG


def test_sigterm_mid_tiling_gives_one_line_and_leaves_nothing(tmp_path):
    slide = write_synthetic_slide(tmp_path / "big.tif", width=6144, height=6144, mpp=0.5, seed=4)
    out = tmp_path / "t.zarr"
    proc = subprocess.Popen(
        _cli("tile", str(slide.path), "--out", str(out), "-q"),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not any(
        p.name.startswith(".t.zarr.") and "partial" in p.name for p in tmp_path.iterdir()
    ):
        assert proc.poll() is None and time.monotonic() < deadline, "the run never started work"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert_one_error_line(1, err.replace("terminated", "error: terminated"))
    assert not out.exists() and not _partials(tmp_path) and not list(tmp_path.glob(".*.lock"))


# -- non-finite results ---------------------------------------------------------------------------


def _tile_png(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tile.png"
    rgb = np.random.default_rng(0).integers(0, 255, (256, 256, 3), np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def _checkpoint(tiny_model: Path, out: Path, change) -> Path:
    data = torch.load(tiny_model, map_location="cpu", weights_only=True)
    change(data)
    torch.save(data, out)
    return out


def _first_float(state: dict) -> str:
    return next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)


def test_a_checkpoint_with_nan_weights_is_refused_not_scored(capsys, tiny_model, tmp_path):
    def poison(data):
        data["state_dict"][_first_float(data["state_dict"])].fill_(float("nan"))

    bad = _checkpoint(tiny_model, tmp_path / "nan.pt", poison)
    image = _tile_png(tmp_path / "images")
    out = tmp_path / "scores.csv"
    code, _, err = run(capsys, "score", str(image), "--model", str(bad), "--out", str(out), "-q")
    assert_one_error_line(code, err, "NaN")
    assert not out.exists()


def test_a_model_that_scores_nan_is_refused_naming_the_tiles(tiny_model, monkeypatch):
    from wsi_anomaly.errors import WsiAnomalyError
    from wsi_anomaly.score import Scorer

    scorer = Scorer(tiny_model, device="cpu", batch_size=2)
    real = scorer._predict

    def predict(x, keep_maps, compiled=True):
        score, peak, maps = real(x, keep_maps, compiled)
        score = score.clone()
        score[1] = float("nan")
        return score, peak, maps

    monkeypatch.setattr(scorer, "_predict", predict)
    tiles = np.random.default_rng(0).integers(0, 255, (4, 256, 256, 3), np.uint8)
    with pytest.raises(WsiAnomalyError) as caught:
        list(scorer.score_batches([tiles[:2], tiles[2:]]))
    message = str(caught.value)
    assert "non-finite" in message and "tile 1" in message


# -- option values --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["inf", "1e300", "nan", "-inf"])
def test_tile_mpp_must_be_finite_and_in_range(capsys, small_slide, tmp_path, value):
    out = tmp_path / "t.zarr"
    code, _, err = run(capsys, "tile", str(small_slide.path), "--out", str(out), "--mpp", value)
    assert code == 2
    assert_one_error_line(code, err, "--mpp")
    assert not out.exists()


@pytest.mark.parametrize("value", ["-1", str(2**70)])
def test_seed_must_be_in_range(capsys, tmp_path, value):
    out = tmp_path / "s.tif"
    code, _, err = run(capsys, "synth", str(out), "--width", "512", "--seed", value)
    assert_one_error_line(code, err, "--seed")
    assert not out.exists()


@pytest.mark.parametrize("value", ["70000", "-1"])
def test_view_port_must_be_a_port(capsys, tmp_path, value):
    code, _, err = run(capsys, "view", str(tmp_path), "--port", value, "--no-browser")
    assert_one_error_line(code, err, "--port")


def test_float_options_refuse_infinity(capsys, tmp_path):
    code, _, err = run(capsys, "train", "--tiles", str(tmp_path), "--lr", "inf", "--out", "m.pt")
    assert_one_error_line(code, err, "--lr")


# -- checkpoints ----------------------------------------------------------------------------------


def _other_family_state() -> dict:
    from wsi_anomaly.config import load_config
    from wsi_anomaly.models.registry import get_family

    family = get_family("atacnet")
    config = load_config("atacnet_fast", {"model": {"backbone_weights": "random"}})
    return family.make_model(config, family.backbone.unweighted("test")).state_dict()


def _reshape(data):
    key = _first_float(data["state_dict"])
    data["state_dict"][key] = torch.zeros(3, 2)


def _drop(data):
    data["state_dict"].pop(_first_float(data["state_dict"]))


def _nan_quantile(data):
    data["calibration"]["score_quantiles"]["0.5"] = float("nan")


CHECKPOINT_DAMAGE = {
    "wrong shape": (_reshape, "shape"),
    "missing key": (_drop, "missing"),
    "extra key": (lambda d: d["state_dict"].update(extra=torch.zeros(2)), "unexpected"),
    "another family's weights": (lambda d: d.update(state_dict=_other_family_state()), "fit"),
    "no calibration": (lambda d: d.pop("calibration"), "calibration"),
    "non-finite calibration": (_nan_quantile, "not finite"),
    "tile_mpp a string": (lambda d: d.update(tile_mpp="half"), "tile_mpp"),
    "tile_mpp infinite": (lambda d: d.update(tile_mpp=math.inf), "tile_mpp"),
    "weights a list": (
        lambda d: d["state_dict"].update({_first_float(d["state_dict"]): [1]}),
        "not a tensor",
    ),
    "config a string": (lambda d: d.update(config="x"), "config"),
    "calibration a list": (lambda d: d.update(calibration=[1.0]), "calibration"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_DAMAGE))
def test_damaged_checkpoints_are_one_line_for_score(capsys, tiny_model, tmp_path, case):
    change, needle = CHECKPOINT_DAMAGE[case]
    bad = _checkpoint(tiny_model, tmp_path / "bad.pt", change)
    image = _tile_png(tmp_path / "images")
    out = tmp_path / "scores.csv"
    code, _, err = run(capsys, "score", str(image), "--model", str(bad), "--out", str(out), "-q")
    assert_one_error_line(code, err, needle)
    assert not out.exists()


def test_damaged_checkpoint_is_one_line_for_heatmap(capsys, small_slide, tiny_model, tmp_path):
    bad = _checkpoint(tiny_model, tmp_path / "bad.pt", _reshape)
    out = tmp_path / "results"
    code, _, err = run(
        capsys, "heatmap", str(small_slide.path), "--model", str(bad), "--out", str(out), "-q"
    )
    assert_one_error_line(code, err, "shape")


def test_a_checkpoint_that_would_inflate_is_refused_before_reading(capsys, tmp_path):
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", bytes(96 << 20))
        archive.writestr("archive/version", b"3\n")
    assert bomb.stat().st_size < 1 << 20
    image = _tile_png(tmp_path / "images")
    out = tmp_path / "x.csv"
    code, _, err = run(capsys, "score", str(image), "--model", str(bomb), "--out", str(out))
    assert_one_error_line(code, err, "inflate")


# -- configs (YAML) -------------------------------------------------------------------------------


def _config_error(path: Path) -> str:
    from wsi_anomaly.config import load_config
    from wsi_anomaly.errors import InvalidInputError

    with pytest.raises(InvalidInputError) as caught:
        load_config(str(path))
    return str(caught.value)


def test_yaml_alias_bomb_is_refused(tmp_path):
    lines = ['a0: &a0 ["lol"]']
    for k in range(1, 13):
        lines.append(f"a{k}: &a{k} [{', '.join([f'*a{k - 1}'] * 12)}]")
    lines.append("train: {loss_terms: *a12}")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert "aliases" in _config_error(path)


def test_deeply_nested_yaml_is_refused(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("train: " + "[" * 20000 + "]" * 20000 + "\n")
    assert "deep" in _config_error(path)


def test_huge_yaml_is_refused(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text("# " + "x" * (2 << 20) + "\n")
    assert "larger than" in _config_error(path)


# -- annotations (GeoJSON) ------------------------------------------------------------------------


def _geojson(path: Path, rings) -> Path:
    feature = {
        "type": "Feature",
        "properties": {},
        "geometry": {"type": "Polygon", "coordinates": rings},
    }
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    return path


def _tile_with(capsys, slide, annotations: Path, out: Path):
    return run(
        capsys, "tile", str(slide.path), "--out", str(out), "--annotations", str(annotations), "-q"
    )


@pytest.mark.parametrize("bad", ["Infinity", "1e999", "NaN"])
def test_geojson_with_non_finite_coordinates_is_one_line(capsys, small_slide, tmp_path, bad):
    path = tmp_path / "a.geojson"
    text = json.dumps(
        {"type": "Polygon", "coordinates": [[[0, 0], [500, 0], [500, 500], [0, 0]]]}
    ).replace("500, 500", f"{bad}, 500")
    path.write_text(text)
    code, _, err = _tile_with(capsys, small_slide, path, tmp_path / "t.zarr")
    assert_one_error_line(code, err, str(path))


def test_deeply_nested_geojson_is_one_line(capsys, small_slide, tmp_path):
    path = tmp_path / "deep.geojson"
    path.write_text("[" * 100_000 + "]" * 100_000)
    code, _, err = _tile_with(capsys, small_slide, path, tmp_path / "t.zarr")
    assert_one_error_line(code, err, "deep")


def test_a_500k_vertex_polygon_answers_within_seconds(small_slide, tmp_path):
    n = 500_000
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    ring = np.c_[1024 + 600 * np.cos(t), 768 + 500 * np.sin(t)].round(2)
    path = _geojson(tmp_path / "big.geojson", [ring.tolist() + [ring[0].tolist()]])
    t0 = time.monotonic()
    done = subprocess.run(
        _cli(
            "tile",
            str(small_slide.path),
            "--out",
            str(tmp_path / "t.zarr"),
            "--annotations",
            str(path),
            "-q",
        ),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in done.stderr
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - t0 < 120
    assert len(TileStore(tmp_path / "t.zarr")) > 0


# -- mpp CSVs --------------------------------------------------------------------------------------


MPP_CSVS = {
    "not UTF-8": (b"slide,mpp\nsl\xefde\xff.svs,0.5\n", "UTF-8"),
    "random bytes": (random.Random(0).randbytes(4096), "mpp CSV"),
    "300 kB field": (b"slide,mpp\n" + b"x" * 300_000 + b",0.5\n", "mpp CSV"),
    "a slide twice": (b"slide,mpp\na.svs,0.5\nb.svs,0.25\na.svs,0.25\n", "'a.svs'"),
    "infinite mpp": (b"slide,mpp\na.svs,inf\n", "not a number"),
}


@pytest.mark.parametrize("case", list(MPP_CSVS))
def test_bad_mpp_csvs_are_one_line(capsys, small_slide, tmp_path, case):
    content, needle = MPP_CSVS[case]
    path = tmp_path / "mpp.csv"
    path.write_bytes(content)
    code, _, err = run(capsys, "info", str(small_slide.path), "--mpp-csv", str(path))
    assert_one_error_line(code, err, needle)


def test_the_same_value_twice_is_not_a_conflict(tmp_path):
    from wsi_anomaly.slide.resolution import load_mpp_csv

    path = tmp_path / "mpp.csv"
    path.write_text("slide,mpp\na.svs,0.5\na.svs,0.5\n")
    assert load_mpp_csv(path) == {"a.svs": 0.5}


# -- the filesystem ---------------------------------------------------------------------------------


def test_a_symlink_loop_given_as_a_slide_is_one_line(capsys, tiny_model, tmp_path):
    loop = tmp_path / "loop.svs"
    loop.symlink_to(loop)
    for argv in (
        ("tile", str(loop), "--out", str(tmp_path / "t.zarr")),
        ("heatmap", str(loop), "--model", str(tiny_model), "--out", str(tmp_path / "r"), "-q"),
        ("info", str(loop)),
    ):
        code, _, err = run(capsys, *argv)
        assert_one_error_line(code, err, "loop.svs")


# -- the viewer ------------------------------------------------------------------------------------


@pytest.fixture
def viewer(tmp_path):
    pytest.importorskip("bokeh", reason="the viewer extra is not installed")
    from wsi_anomaly.viewer import make_server

    secret = tmp_path / "outside" / "secret.png"
    secret.parent.mkdir()
    secret.write_bytes(b"SECRET")
    (tmp_path / "outside" / "summary.json").write_text(json.dumps({"slide": "x"}))
    results = tmp_path / "results"
    inside = results / "inside"
    inside.mkdir(parents=True)
    (inside / "summary.json").write_text(json.dumps({"slide": "inside.tif", "status": "ok"}))
    (inside / "heatmap.png").symlink_to(secret)
    (results / "linked").symlink_to(tmp_path / "outside")
    server = make_server(results, port=0)
    import threading

    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def _get(server, path: str, host: str | None = None) -> tuple[int, bytes]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    conn.putrequest("GET", path, skip_host=True)
    conn.putheader("Host", host or f"127.0.0.1:{server.server_address[1]}")
    conn.endheaders()
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body


def test_the_viewer_never_follows_a_symlink_out_of_its_folder(viewer):
    status, body = _get(viewer, "/slide/inside/files/heatmap.png")
    assert status == 404 and b"SECRET" not in body
    status, body = _get(viewer, "/slide/linked/files/summary.json")
    assert status == 404 and b'"slide"' not in body
    assert b"linked" not in _get(viewer, "/api/cohort")[1]


def test_the_viewer_parses_the_host_header(viewer):
    port = viewer.server_address[1]
    for host, status in (
        ("[::1].evil.example", 403),
        (f"[::1].evil.example:{port}", 403),
        ("[::1]x", 403),
        (f"localhost:{port}:1", 403),
        (f"localhost:{port}", 200),
        (f"[::1]:{port}", 200),
        ("localhost", 200),
    ):
        assert _get(viewer, "/api/cohort", host)[0] == status, host
