"""The viewer in a real browser (headless Chromium): cohort page, slide page with slide and
overlay tiles, the overlay's colours where the synthetic tumour is, clicking a tile.

Needs Debian's ``chromium`` and the ``playwright`` package (``.ci/install_browser.sh``); skips
with the reason when either is missing. ``WSI_ANOMALY_CHROMIUM`` names another Chromium binary.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("bokeh", reason="bokeh or jinja2 is not installed")
playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (.ci/install_browser.sh)"
)

from PIL import Image
from viewer_demo import build_demo_results, tumour_mask

from wsi_anomaly.stitch import ColourScale
from wsi_anomaly.tiles import TileStore
from wsi_anomaly.viewer import make_server


def _chromium() -> str | None:
    for candidate in (os.environ.get("WSI_ANOMALY_CHROMIUM"), "chromium", "chromium-browser"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium found (apt-get install chromium, or set WSI_ANOMALY_CHROMIUM)",
)

# Page coordinates of level-0 slide points, through the bokeh figure's own scales.
TO_PAGE = """(points) => {
  const doc = Bokeh.documents[0];
  const view = Bokeh.index.get_one(doc.get_model_by_name('slide_figure'));
  const box = view.canvas_view.el.getBoundingClientRect();
  const mpp = JSON.parse(document.getElementById('viewer-config').textContent).mpp;
  return points.map(([x, y]) => [box.left + view.frame.x_scale.compute(x * mpp),
                                 box.top + view.frame.y_scale.compute(-y * mpp)]);
}"""


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    return build_demo_results(tmp_path_factory.mktemp("viewer-browser-demo"))


@pytest.fixture(scope="module")
def base_url(results):
    server = make_server(results, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        try:
            browser = p.chromium.launch(
                executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
            )
        except Exception as exc:  # a binary that is not a usable Chromium
            pytest.skip(f"Chromium at {CHROMIUM} cannot be started by playwright: {exc}")
        yield browser
        browser.close()


@pytest.fixture()
def page(browser):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    page.close()
    assert not errors, errors


def test_cohort_page_lists_the_slides(page, base_url):
    page.goto(base_url + "/")
    row = page.locator("tr[data-slide='demo.tif']")
    assert row.locator("a.slide-link").inner_text() == "demo.tif"
    # The thumbnail (a small JPEG made on first request, loaded lazily) arrives.
    row.locator("img.thumb").evaluate(
        "img => img.complete ? null : new Promise(done => img.addEventListener('load', done))"
    )
    assert row.locator("img.thumb").evaluate("img => img.complete && img.naturalWidth > 0")
    failed = page.locator("tr[data-slide='missing.tif']")
    assert "failed" in failed.inner_text() and "slide not found" in failed.inner_text()
    # Sorting by tiles, descending: the scored slide first, the failed one (no tiles) last.
    page.locator("th", has_text="tiles").click()
    page.locator("th", has_text="tiles").click()
    slides = page.locator("#cohort tbody tr").evaluate_all("rows => rows.map(r => r.dataset.slide)")
    assert slides == ["demo.tif", "missing.tif"]


def _open_slide(page, base_url) -> tuple[list[str], float]:
    loaded: list[str] = []
    page.on("response", lambda r: loaded.append(r.url) if r.status == 200 else None)
    t0 = time.perf_counter()
    page.goto(base_url + "/slide/demo.tif/")
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)
    page.wait_for_function("() => true")
    deadline = time.perf_counter() + 30
    while not any("/tiles/" in u for u in loaded) and time.perf_counter() < deadline:
        page.wait_for_timeout(50)
    first_view_s = time.perf_counter() - t0
    page.wait_for_load_state("networkidle")
    return loaded, first_view_s


def test_slide_page_draws_slide_and_overlay_on_the_fixed_scale(page, base_url, results):
    loaded, first_view_s = _open_slide(page, base_url)
    assert any("/slide/demo.tif/tiles/" in u and u.endswith(".jpg") for u in loaded)
    assert any(u.endswith("/slide/demo.tif/overlay/cells.png") for u in loaded)
    assert first_view_s < 20, f"first view took {first_view_s:.1f} s"

    store = TileStore(results / "demo.tif" / "tiles.zarr")
    summary = json.loads((results / "demo.tif" / "summary.json").read_text())
    cs = summary["colour_scale"]
    scale = ColourScale(cs["vmin"], cs["vcenter"], cs["vmax"], cs["cmap"])
    side = store.attrs["tile_size_l0"]
    tumour = tumour_mask(store.coords, side)
    centres = (store.coords + side / 2).tolist()

    # Opacity 1 through the slider: the overlay's own colours, nothing of the slide below.
    page.locator("#opacity").fill("1")
    page.wait_for_timeout(300)
    points = page.evaluate(TO_PAGE, centres)
    shot = np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB")).astype(int)
    red = scale.to_rgb(np.array([cs["vmax"]]))[0].astype(int)
    blue = scale.to_rgb(np.array([cs["vmin"]]))[0].astype(int)
    for (px, py), is_tumour in zip(points, tumour):
        colour = shot[round(py), round(px)]
        expected = red if is_tumour else blue
        assert np.abs(colour - expected).max() < 40, (px, py, colour, expected)

    # Opacity 0: the slide shows through (tissue is not the overlay's blue).
    page.locator("#opacity").fill("0")
    page.wait_for_timeout(300)
    shot = np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB")).astype(int)
    px, py = points[int(np.flatnonzero(~tumour)[0])]
    assert np.abs(shot[round(py), round(px)] - blue).max() > 40


def test_clicking_a_tile_shows_its_stored_values(page, base_url, results):
    _open_slide(page, base_url)
    store = TileStore(results / "demo.tif" / "tiles.zarr")
    side = store.attrs["tile_size_l0"]
    i = int(np.flatnonzero(tumour_mask(store.coords, side))[0])
    ((px, py),) = page.evaluate(TO_PAGE, [(store.coords[i] + side / 2).tolist()])
    page.mouse.click(px, py)
    page.wait_for_selector("#tile-info dd[data-field='score']", timeout=10_000)
    info = page.locator("#tile-info")
    assert float(info.locator("dd[data-field='score']").inner_text()) == pytest.approx(
        float(store.scores[i]), rel=1e-4
    )
    assert float(info.locator("dd[data-field='max']").inner_text()) == pytest.approx(
        float(store.max_scores[i]), rel=1e-4
    )
    x, y = (int(v) for v in store.coords[i])
    assert info.locator("dd[data-field='level-0 x, y']").inner_text() == f"{x}, {y}"

    # The top of the list jumps to the most anomalous tile and shows it.
    top = int(np.argmax(store.scores))
    page.locator("#top-tiles button").first.click()
    page.wait_for_function(
        f"() => document.getElementById('tile-info').dataset.index == '{top}'", timeout=10_000
    )
    centre = page.evaluate("""() => {
      const doc = Bokeh.documents[0];
      const xr = doc.get_model_by_name('x_range'), yr = doc.get_model_by_name('y_range');
      return [(xr.start + xr.end) / 2, (yr.start + yr.end) / 2];
    }""")
    mpp = summary_mpp(results)
    tx, ty = store.coords[top] + side / 2
    assert centre[0] == pytest.approx(tx * mpp, abs=1) and centre[1] == pytest.approx(
        -ty * mpp, abs=1
    )


def summary_mpp(results: Path) -> float:
    return float(json.loads((results / "demo.tif" / "summary.json").read_text())["level0_mpp"])


def test_hovering_a_tile_shows_its_values_and_the_pixel_map_can_be_shown(page, base_url, results):
    loaded, _ = _open_slide(page, base_url)
    store = TileStore(results / "demo.tif" / "tiles.zarr")
    side = store.attrs["tile_size_l0"]
    i = int(np.flatnonzero(~tumour_mask(store.coords, side))[-1])
    ((px, py),) = page.evaluate(TO_PAGE, [(store.coords[i] + side / 2).tolist()])
    page.mouse.move(px - 5, py - 5)
    page.mouse.move(px, py, steps=5)
    tooltip = page.locator(".bk-Tooltip")
    x, y = (int(v) for v in store.coords[i])
    tooltip.get_by_text(f"{x}, {y}", exact=True).wait_for(timeout=10_000)
    assert tooltip.get_by_text(f"{float(store.scores[i]):.4f}", exact=True).count() == 1
    assert tooltip.get_by_text(f"{float(store.max_scores[i]):.4f}", exact=True).count() == 1

    assert not page.evaluate("() => Bokeh.documents[0].get_model_by_name('pixel_overlay').visible")
    page.locator("#show-pixels").check()
    page.wait_for_function(
        """() => Bokeh.documents[0].get_model_by_name('pixel_overlay').visible"""
    )
    page.wait_for_load_state("networkidle")
    assert any(u.endswith("/slide/demo.tif/overlay/pixels.png") for u in loaded)


VIEW_STATE = """() => {
  const doc = Bokeh.documents[0];
  const xr = doc.get_model_by_name('x_range'), yr = doc.get_model_by_name('y_range');
  const view = Bokeh.index.get_one(doc.get_model_by_name('slide_figure'));
  return {cx: (xr.start + xr.end) / 2, cy: (yr.start + yr.end) / 2,
          w: xr.end - xr.start, h: yr.end - yr.start,
          fw: view.frame.bbox.width, fh: view.frame.bbox.height, min: xr.min_interval};
}"""


def test_navigation_fills_the_window_presets_keyboard_zoom_limit_and_overview(
    page, base_url, results
):
    _open_slide(page, base_url)
    mpp = summary_mpp(results)
    state = page.evaluate(VIEW_STATE)
    # The canvas fills the window beside the panel (viewport 1400 × 900), with square µm.
    assert state["fw"] > 900 and state["fh"] > 700
    assert state["w"] / state["fw"] == pytest.approx(state["h"] / state["fh"], rel=1e-3)
    # Presets: M× is 10 / M µm per screen pixel, around the same centre.
    for mag in (5, 10, 20):
        page.locator(f"#presets button[data-mag='{mag}']").click()
        now = page.evaluate(VIEW_STATE)
        assert now["w"] / now["fw"] == pytest.approx(10 / mag, rel=1e-3)
        assert now["cx"] == pytest.approx(state["cx"], abs=1e-6)
    # Keyboard: arrows pan by a quarter of the view, + zooms in, 0 shows the whole slide.
    before = page.evaluate(VIEW_STATE)
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowUp")
    after = page.evaluate(VIEW_STATE)
    assert after["cx"] == pytest.approx(before["cx"] + before["w"] / 4, rel=1e-6)
    assert after["cy"] == pytest.approx(before["cy"] + before["h"] / 4, rel=1e-6)
    # The zoom limit: however often + is pressed, never more than 4 screen px a level-0 px.
    for _ in range(25):
        page.keyboard.press("+")
    zoomed = page.evaluate(VIEW_STATE)
    assert zoomed["w"] == pytest.approx(zoomed["fw"] * mpp / 4, rel=1e-3)
    # 40× asks for 0.25 µm/px, finer than the limit on this 0.5 µm/px slide: clamped.
    page.locator("#presets button[data-mag='40']").click()
    assert page.evaluate(VIEW_STATE)["w"] >= zoomed["fw"] * mpp / 4 * (1 - 1e-6)
    # The wheel obeys the same limit.
    box = page.locator("#view").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    for _ in range(10):
        page.mouse.wheel(0, -400)
    page.wait_for_timeout(300)
    assert page.evaluate(VIEW_STATE)["w"] >= zoomed["fw"] * mpp / 4 * 0.99
    page.keyboard.press("0")
    whole = page.evaluate(VIEW_STATE)
    assert whole["w"] >= 2048 * mpp and whole["h"] >= 1536 * mpp
    # The overview: its box follows the main view; a click there centres the main view.
    page.locator("#presets button[data-mag='10']").click()
    overview_box = page.evaluate("""() => {
      const b = Bokeh.documents[0].get_model_by_name('overview_box');
      return [b.left, b.right, b.bottom, b.top];
    }""")
    now = page.evaluate(VIEW_STATE)
    assert overview_box[0] == pytest.approx(now["cx"] - now["w"] / 2, rel=1e-6)
    canvas = page.evaluate(
        """(um) => {
      const doc = Bokeh.documents[0];
      const view = Bokeh.index.get_one(doc.get_model_by_name('overview_figure'));
      const r = view.canvas_view.el.getBoundingClientRect();
      return [r.left + view.frame.x_scale.compute(um[0]), r.top + view.frame.y_scale.compute(um[1])];
    }""",
        [300 * mpp, -1000 * mpp],
    )
    page.mouse.click(*canvas)
    page.wait_for_timeout(200)
    moved = page.evaluate(VIEW_STATE)
    assert moved["cx"] == pytest.approx(300 * mpp, abs=3) and moved["cy"] == pytest.approx(
        -1000 * mpp, abs=3
    )


def test_threshold_and_outline_mode_show_only_tiles_above_the_score(page, base_url, results):
    _open_slide(page, base_url)
    store = TileStore(results / "demo.tif" / "tiles.zarr")
    scores = np.asarray(store.scores, np.float64)
    cs = json.loads((results / "demo.tif" / "summary.json").read_text())["colour_scale"]
    threshold = (cs["vmin"] + cs["vcenter"]) / 2
    shown = """() => {
      const doc = Bokeh.documents[0], d = doc.get_model_by_name('tile_source').data;
      const heat = doc.get_model_by_name('cell_overlay');
      return {fill: Array.from(d.fa).filter(v => v > 0).length,
              line: Array.from(d.la).filter(v => v > 0).length, image: heat.visible};
    }"""
    assert page.evaluate(shown) == {"fill": 0, "line": 0, "image": True}
    page.locator("#threshold").fill(str(threshold))
    page.wait_for_timeout(200)
    expected = int((scores >= threshold).sum())
    assert 0 < expected < len(scores)
    assert page.evaluate(shown) == {"fill": expected, "line": 0, "image": False}
    page.locator("#overlay-mode").select_option("outline")
    page.wait_for_timeout(200)
    assert page.evaluate(shown) == {"fill": 0, "line": expected, "image": False}
    # On screen: a tile below the threshold shows the slide, one above shows its outline colour.
    page.locator("#opacity").fill("1")
    page.wait_for_timeout(300)
    side = store.attrs["tile_size_l0"]
    low, high = int(np.argmin(scores)), int(np.argmax(scores))
    centres = [(store.coords[i] + side / 2).tolist() for i in (low, high)]
    corners = [(store.coords[high] + 2).tolist()]
    (p_low, p_high), (p_edge,) = page.evaluate(TO_PAGE, centres), page.evaluate(TO_PAGE, corners)
    shot = np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB")).astype(int)
    scale = ColourScale(cs["vmin"], cs["vcenter"], cs["vmax"], cs["cmap"])
    red = scale.to_rgb(np.array([scores[high]]))[0].astype(int)
    assert np.abs(shot[round(p_edge[1]), round(p_edge[0])] - red).max() < 40
    # Outline mode leaves the tile's inside to the slide, and a tile below the threshold too.
    assert np.abs(shot[round(p_high[1]), round(p_high[0])] - red).max() > 40
    blue = scale.to_rgb(np.array([scores[low]]))[0].astype(int)
    assert np.abs(shot[round(p_low[1]), round(p_low[0])] - blue).max() > 40


def test_marking_tiles_and_exporting_the_marks(page, base_url, results):
    _open_slide(page, base_url)
    page.evaluate("() => localStorage.clear()")
    store = TileStore(results / "demo.tif" / "tiles.zarr")
    side = store.attrs["tile_size_l0"]
    tumour = tumour_mask(store.coords, side)
    picks = {"anomalous": int(np.flatnonzero(tumour)[0]), "normal": int(np.flatnonzero(~tumour)[0])}
    for mark, i in picks.items():
        ((px, py),) = page.evaluate(TO_PAGE, [(store.coords[i] + side / 2).tolist()])
        page.wait_for_timeout(400)  # two clicks closer in time are a double tap to bokeh
        page.mouse.click(px, py)
        page.wait_for_function(
            f"() => document.getElementById('tile-info').dataset.index == '{i}'", timeout=10_000
        )
        if mark == "anomalous":
            page.keyboard.press("a")  # the key
        else:
            page.locator(f".mark-buttons button[data-mark='{mark}']").click()  # the button
    assert page.locator("#mark-count").inner_text() == "2"
    marked = page.locator("#marks li").evaluate_all(
        "items => items.map(li => [Number(li.dataset.index), li.dataset.mark])"
    )
    assert sorted(marked) == sorted([i, m] for m, i in picks.items())
    # Marks survive a reload (kept in the browser for this slide).
    page.reload()
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)
    assert page.locator("#mark-count").inner_text() == "2"

    with page.expect_download() as info:
        page.locator("#export-geojson").click()
    doc = json.loads(Path(info.value.path()).read_text())
    assert info.value.suggested_filename == "demo.tif.review.geojson"
    by_class = {f["properties"]["classification"]["name"]: f for f in doc["features"]}
    assert set(by_class) == {"Anomalous", "Normal"}
    for mark, i in picks.items():
        f = by_class[mark.capitalize()]
        x, y = (int(v) for v in store.coords[i])
        assert f["geometry"]["coordinates"][0][0] == [x, y]
        assert f["geometry"]["coordinates"][0][2] == [x + side, y + side]
        assert f["properties"]["objectType"] == "annotation" and len(f["id"]) == 36
        (value,) = f["properties"]["measurements"].values()
        assert value == pytest.approx(float(store.scores[i]), rel=1e-5)

    with page.expect_download() as info:
        page.locator("#export-csv").click()
    rows = Path(info.value.path()).read_text().strip().splitlines()
    assert rows[0] == "x,y,width,height,score,mark" and len(rows) == 3
    got = {r.split(",")[5]: r.split(",")[:2] for r in rows[1:]}
    for mark, i in picks.items():
        assert got[mark] == [str(int(v)) for v in store.coords[i]]
