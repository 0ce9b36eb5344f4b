"""The viewer's server without a browser: routes, refused paths, 404s, the tile cache bound."""

from __future__ import annotations

import http.client
import io
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("bokeh", reason="bokeh or jinja2 is not installed")
pytest.importorskip("jinja2", reason="bokeh or jinja2 is not installed")

from PIL import Image
from viewer_demo import build_demo_results, tumour_mask

from wsi_anomaly.slide import Slide
from wsi_anomaly.tiles import TileStore
from wsi_anomaly.viewer import make_server
from wsi_anomaly.viewer.command import add_parser, run
from wsi_anomaly.viewer.pyramid import TILE_PX, TileCache, max_zoom_for


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    return build_demo_results(tmp_path_factory.mktemp("viewer-demo"))


def serve(results: Path, **kw):
    server = make_server(results, port=0, **kw)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def server(results):
    server = serve(results)
    yield server
    server.shutdown()
    server.server_close()


def get(server, path: str, method: str = "GET") -> tuple[int, bytes, dict]:
    """Send ``path`` exactly as written (no client-side normalisation of ``..``)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    conn.request(method, path)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body, dict(response.getheaders())


def test_cohort_page_lists_every_slide_with_status_and_error(server):
    status, body, headers = get(server, "/")
    html = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert 'href="/slide/demo.tif/"' in html
    assert "missing.tif" in html and "slide not found" in html  # the failed slide, its error
    assert "/slide/demo.tif/thumb.jpg" in html  # a small JPEG, not the full thumbnail PNG
    rows = {r["slide"]: r for r in json.loads(get(server, "/api/cohort")[1])}
    assert rows["demo.tif"]["status"] == "ok" and rows["demo.tif"]["n_tiles"] > 0
    assert rows["missing.tif"]["status"] == "failed" and rows["missing.tif"]["url"] is None


def test_slide_page_and_its_assets(server, results):
    status, body, _ = get(server, "/slide/demo.tif/")
    html = body.decode()
    assert status == 200
    assert "/bokeh/bokeh.min.js" in html and "tiles/{Z}/{X}/{Y}.jpg" in html
    summary = json.loads((results / "demo.tif" / "summary.json").read_text())
    assert f"{summary['colour_scale']['vmax']:.4g}" in html  # the fixed colour scale is shown
    for path in (
        "/bokeh/bokeh.min.js",
        "/static/slide.js",
        "/static/viewer.css",
        "/static/cohort.js",
        "/slide/demo.tif/files/thumbnail.png",
        "/slide/demo.tif/files/tiles.geojson",
        "/slide/demo.tif/overlay/pixels.png",
    ):
        assert get(server, path)[0] == 200, path


def test_slide_without_trailing_slash_redirects(server):
    status, _, headers = get(server, "/slide/demo.tif")
    assert status == 301 and headers["Location"] == "/slide/demo.tif/"
    assert get(server, "/slide/nope.tif")[0] == 404


def test_only_the_command_line_imports_the_viewer_and_cheaply():
    package = Path(__file__).resolve().parents[1] / "wsi_anomaly"
    offenders = [
        str(p.relative_to(package))
        for p in package.rglob("*.py")
        if not {"viewer", "cli", "cli.py"} & set(p.relative_to(package).parts)
        and (
            "from .viewer" in p.read_text()
            or "wsi_anomaly.viewer" in p.read_text()
            or "from ..viewer" in p.read_text()
        )
    ]
    assert offenders == []
    # Registering the subcommand must not load the web stack (every CLI call would pay for it).
    import subprocess
    import sys

    code = (
        "import sys, wsi_anomaly.viewer.command; "
        "print(sorted(m for m in ('bokeh', 'jinja2', 'torch') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=package.parent
    )
    assert out.stdout.strip() == "[]"


def test_tiles_show_the_original_slide(server, results):
    summary = json.loads((results / "demo.tif" / "summary.json").read_text())
    w, h = summary["slide_dimensions"]
    zmax = max_zoom_for(w, h)
    status, body, headers = get(server, f"/slide/demo.tif/tiles/{zmax}/2/2.jpg")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    tile = np.asarray(Image.open(io.BytesIO(body)).convert("RGB")).astype(float)
    with Slide(summary["slide_path"]) as slide:
        expected = slide.read_level(0, 2 * TILE_PX, 2 * TILE_PX, TILE_PX, TILE_PX).astype(float)
    assert tile.shape == expected.shape
    assert np.abs(tile - expected).mean() < 6  # JPEG re-encoding only
    # A coarser tile: the whole slide in one 256-px tile, white beyond the slide's edge.
    coarse = np.asarray(Image.open(io.BytesIO(get(server, "/slide/demo.tif/tiles/0/0/0.jpg")[1])))
    assert coarse.shape == (TILE_PX, TILE_PX, 3)
    assert coarse[-5:, :].min() > 240  # rows below the 2048×1536 slide's bottom edge
    assert get(server, f"/slide/demo.tif/tiles/{zmax + 1}/0/0.jpg")[0] == 404
    assert get(server, "/slide/demo.tif/tiles/0/1/0.jpg")[0] == 404


def test_overlay_colours_follow_the_stored_scores(server, results):
    store = TileStore(results / "demo.tif" / "tiles.zarr")
    status, body, _ = get(server, "/slide/demo.tif/overlay/cells.png")
    assert status == 200
    overlay = np.asarray(Image.open(io.BytesIO(body)).convert("RGBA"))
    rows, cols = store.attrs["grid_rows"], store.attrs["grid_cols"]
    k = overlay.shape[0] // rows
    assert overlay.shape[:2] == (rows * k, cols * k)
    tumour = tumour_mask(store.coords, store.attrs["tile_size_l0"])
    assert tumour.any() and (~tumour).any()
    for (col, row), is_tumour in zip(store.grid_index, tumour):
        r, g, b, a = (int(v) for v in overlay[row * k + k // 2, col * k + k // 2])
        assert a == 255
        assert (r > b + 60) if is_tumour else (b > r + 60), (col, row, r, g, b)
    scored = {(int(c), int(r)) for c, r in store.grid_index}
    empty = [(c, r) for r in range(rows) for c in range(cols) if (c, r) not in scored]
    assert empty and all(overlay[r * k, c * k, 3] == 0 for c, r in empty)


def test_tile_table_matches_the_store(server, results):
    store = TileStore(results / "demo.tif" / "tiles.zarr")
    table = json.loads(get(server, "/slide/demo.tif/api/tiles")[1])
    np.testing.assert_array_equal(table["x"], store.coords[:, 0])
    np.testing.assert_allclose(table["score"], store.scores, rtol=1e-6)
    np.testing.assert_allclose(table["max"], store.max_scores, rtol=1e-6)
    np.testing.assert_allclose(table["tissue"], store.tissue_fraction, rtol=1e-6)


@pytest.mark.parametrize(
    "path",
    [
        "/slide/../summary.csv",
        "/slide/%2e%2e/summary.csv",
        "/slide/%2E%2E/%2E%2E/etc/passwd",
        "/slide/demo.tif/files/../summary.json",
        "/slide/demo.tif/files/%2e%2e%2fsummary.csv",
        "/slide/demo.tif/files/..%2f..%2fdemo.tif",
        "/slide/demo.tif/files/tiles.zarr",
        "/slide/demo.tif/files/%2Fetc%2Fpasswd",
        "/slide/%2Fetc%2Fpasswd/",
        "/slide/%2Ftmp/",
        "//etc/passwd",
        "/etc/passwd",
        "/static/../server.py",
        "/static/%2e%2e%2fserver.py",
        "/static/%2Fetc%2Fpasswd",
        "/bokeh/..%2f..%2f__init__.py",
        "/bokeh/%2e%2e/%2e%2e/__init__.py",
        "/slide/demo.tif/tiles/0/0/..%2f..%2f0.jpg",
    ],
)
def test_paths_outside_the_served_set_are_refused(server, path):
    status, body, _ = get(server, path)
    assert status == 404, path
    assert b"root:" not in body and b"import" not in body


def test_absolute_slide_path_in_results_is_not_a_route(server, results):
    # The slide file itself is read for tiles, never served whole, whatever the URL.
    slide_path = json.loads((results / "demo.tif" / "summary.json").read_text())["slide_path"]
    assert get(server, "/slide/demo.tif/files/" + slide_path)[0] == 404
    assert get(server, "/slide/demo.tif/files/demo.tif")[0] == 404


def test_only_loopback_host_names_are_answered(server):
    port = server.server_address[1]
    for host, status in (
        (f"127.0.0.1:{port}", 200),
        (f"localhost:{port}", 200),
        ("evil.example", 403),
        (f"evil.example:{port}", 403),
        ("127.0.0.1.evil.example", 403),
    ):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.putrequest("GET", "/api/cohort", skip_host=True)
        conn.putheader("Host", host)
        conn.endheaders()
        response = conn.getresponse()
        body = response.read()
        conn.close()
        assert response.status == status, host
        assert (b"demo.tif" in body) == (status == 200)


def test_unknown_routes_and_failed_slides_are_404_and_writes_are_refused(server):
    for path in (
        "/nope",
        "/slide/nope.tif/",
        "/slide/missing.tif/",
        "/slide/demo.tif/nope",
        "/slide/demo.tif/files/nope.png",
        "/static/nope.js",
        "/bokeh/nope.js",
        "/slide/demo.tif/tiles/a/b/c.jpg",
    ):
        assert get(server, path)[0] == 404, path
    for method in ("POST", "PUT", "DELETE"):
        assert get(server, "/", method)[0] == 405


def test_tile_cache_is_bounded_and_lru():
    cache = TileCache(max_bytes=1000)
    for i in range(20):
        cache.put(("t", i), bytes(300))
        assert cache.nbytes <= 1000
    assert len(cache) == 3 and cache.get(("t", 0)) is None
    assert cache.get(("t", 17)) is not None  # now most recent: survives the next put
    cache.put(("t", 20), bytes(300))
    assert cache.get(("t", 17)) is not None and cache.get(("t", 18)) is None
    cache.put(("big",), bytes(2000))  # larger than the whole cache: not kept
    assert cache.get(("big",)) is None and cache.nbytes <= 1000


def test_server_tile_cache_hits_and_stays_within_its_bound(results):
    server = serve(results, cache_bytes=40_000)
    try:
        zmax = 3
        for x in range(4):
            for y in range(3):
                assert get(server, f"/slide/demo.tif/tiles/{zmax}/{x}/{y}.jpg")[0] == 200
        cache = server.viewer.cache
        assert 0 < cache.nbytes <= 40_000
        hits = cache.hits
        get(server, f"/slide/demo.tif/tiles/{zmax}/3/2.jpg")  # the most recent: still cached
        assert cache.hits == hits + 1
    finally:
        server.shutdown()
        server.server_close()


def test_slide_that_cannot_be_read_falls_back_to_the_thumbnail(results, tmp_path):
    copy = tmp_path / "results"
    shutil.copytree(results, copy)
    summary_path = copy / "demo.tif" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["slide_path"] = str(tmp_path / "moved-away.tif")
    summary_path.write_text(json.dumps(summary))
    server = serve(copy)
    try:
        status, body, _ = get(server, "/slide/demo.tif/")
        assert status == 200 and b"cannot be read" in body and b"files/thumbnail.png" in body
        assert get(server, "/slide/demo.tif/tiles/0/0/0.jpg")[0] == 404
    finally:
        server.shutdown()
        server.server_close()


def test_localhost_by_default_and_command_line(results):
    server = make_server(results, port=0)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.server_close()
    import argparse

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["view", str(results), "--no-browser"])
    assert (args.port, args.host, args.no_browser, args.func) == (8000, "127.0.0.1", True, run)
    missing = parser.parse_args(["view", str(results / "nope"), "--no-browser", "--port", "0"])
    assert run(missing) == 2


def test_view_command_serves_until_stopped(results):
    import re
    import signal
    import subprocess
    import sys
    import urllib.request

    code = (
        "import argparse, sys; from wsi_anomaly.viewer.command import add_parser; "
        "p = argparse.ArgumentParser(); add_parser(p.add_subparsers()); "
        "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "view", str(results), "--port", "0", "--no-browser"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert url, line + proc.stderr.read()
        with urllib.request.urlopen(url.group(0), timeout=30) as response:
            assert response.status == 200 and b"demo.tif" in response.read()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


def get_with(server, path: str, headers: dict) -> tuple[int, bytes, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    conn.request("GET", path, headers=headers)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body, dict(response.getheaders())


@pytest.mark.parametrize(
    "path", ["/", "/slide/demo.tif/", "/slide/demo.tif/tiles/0/0/0.jpg", "/static/slide.js"]
)
def test_etag_answers_304_for_pages_and_tiles(server, path):
    status, body, headers = get(server, path)
    assert status == 200 and headers["ETag"].startswith('"') and body
    status, again, headers304 = get_with(server, path, {"If-None-Match": headers["ETag"]})
    assert status == 304 and again == b"" and headers304["ETag"] == headers["ETag"]
    status, _, _ = get_with(server, path, {"If-None-Match": '"something-else"'})
    assert status == 200


def test_text_is_gzipped_for_clients_that_accept_it(server):
    import gzip

    plain = get(server, "/slide/demo.tif/")[1]
    status, body, headers = get_with(server, "/slide/demo.tif/", {"Accept-Encoding": "gzip"})
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert int(headers["Content-Length"]) == len(body) < len(plain) / 2
    assert gzip.decompress(body) == plain
    # Images are not compressed again.
    _, _, headers = get_with(server, "/slide/demo.tif/tiles/0/0/0.jpg", {"Accept-Encoding": "gzip"})
    assert "Content-Encoding" not in headers


def test_cohort_thumbnails_are_small_jpegs(server, results):
    status, body, headers = get(server, "/slide/demo.tif/thumb.jpg")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    png_size = (results / "demo.tif" / "thumbnail.png").stat().st_size
    image = Image.open(io.BytesIO(body))
    assert image.format == "JPEG" and max(image.size) <= 240 and len(body) < png_size / 4
    assert get(server, "/slide/missing.tif/thumb.jpg")[0] == 404


def test_top_tile_images_come_from_the_tile_store(server, results):
    store = TileStore(results / "demo.tif" / "tiles.zarr")
    top = int(np.argmax(store.scores))
    status, body, headers = get(server, f"/slide/demo.tif/tile-image/{top}.jpg")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    image = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"), np.float64)
    tile = np.asarray(Image.fromarray(store.read(top, top + 1)[0]).resize(image.shape[:2][::-1]))
    assert np.abs(image - tile).mean() < 12
    html = get(server, "/slide/demo.tif/")[1].decode()
    assert f'src="tile-image/{top}.jpg"' in html
    for bad in (f"/slide/demo.tif/tile-image/{len(store)}.jpg", "/slide/demo.tif/tile-image/x.jpg"):
        assert get(server, bad)[0] == 404


def test_qc_flags_overlay_and_toggle(server, results):
    from wsi_anomaly.quality import first_flag_labels
    from wsi_anomaly.slide.qc import FLAG_COLOURS, FLAG_NAMES

    store = TileStore(results / "demo.tif" / "tiles.zarr")
    flags = store.qc_flags
    assert flags is not None and (flags != 0).any()  # the demo's edge tiles at least
    status, body, _ = get(server, "/slide/demo.tif/")
    assert status == 200 and 'id="show-qc"' in body.decode()
    status, body, _ = get(server, "/slide/demo.tif/overlay/qc.png")
    assert status == 200
    overlay = np.asarray(Image.open(io.BytesIO(body)).convert("RGBA"))
    k = overlay.shape[0] // store.attrs["grid_rows"]
    for (col, row), label in zip(store.grid_index, first_flag_labels(flags)):
        pixel = tuple(int(v) for v in overlay[row * k + k // 2, col * k + k // 2])
        if label:
            assert pixel == (*FLAG_COLOURS[FLAG_NAMES[label - 1]], 255)
        else:
            assert pixel[3] == 0
