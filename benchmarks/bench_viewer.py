"""Tile latency of ``wsi-anomaly view``: deep-zoom tiles of the original slide over HTTP.

Measures, against a running viewer server on this machine (one client connection, keep-alive):

- **first view**: the slide page, its overlay and every slide tile of the zoom level the page
  opens at, fetched cold (new server after its start-up imports, slide not yet opened, empty
  cache) by 6 parallel connections as a browser does;
- **cold tiles**: a random sample of tiles across the finest zoom levels, each requested once
  on a fresh server (read from the slide + JPEG encoding);
- **warm tiles**: the same tiles again (served from the LRU of encoded tiles).

By default a synthetic pyramidal slide (``--size`` px square at 0.5 µm/px) is written with a
minimal results folder around it (the tile route needs only the slide and its summary); with
``--results`` an existing ``heatmap`` results folder and ``--slide`` one of its slides are used.

Prints a Markdown table; ``--json`` also writes the numbers. Example::

    python benchmarks/bench_viewer.py --size 16384 --tiles 200
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import http.client
import json
import math
import platform
import random
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from wsi_anomaly.viewer import make_server
from wsi_anomaly.viewer.pages import PLOT_H, PLOT_W
from wsi_anomaly.viewer.pyramid import TILE_PX, max_zoom_for


def _cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def minimal_results(folder: Path, size: int) -> tuple[Path, str]:
    """A synthetic slide and a results folder that names it (no tiles scored)."""
    from wsi_anomaly.slide.synthetic import write_synthetic_slide

    slide = write_synthetic_slide(
        folder / "bench.tif", width=size, height=size, mpp=0.5, seed=0, progress=True
    )
    results = folder / "results"
    (results / "bench.tif").mkdir(parents=True)
    summary = {
        "slide": "bench.tif",
        "status": "ok",
        "slide_path": str(slide.path),
        "slide_dimensions": [size, size],
        "level0_mpp": 0.5,
    }
    (results / "bench.tif" / "summary.json").write_text(json.dumps(summary))
    with (results / "summary.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, ["slide", "slide_path", "status", "output"])
        writer.writeheader()
        writer.writerow(
            {
                "slide": "bench.tif",
                "slide_path": str(slide.path),
                "status": "ok",
                "output": str(results / "bench.tif"),
            }
        )
    return results, "bench.tif"


class Client:
    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def get(self, path: str) -> tuple[int, float]:
        t0 = time.perf_counter()
        self.conn.request("GET", path)
        response = self.conn.getresponse()
        response.read()
        return response.status, time.perf_counter() - t0


def serve(results: Path, cache_mb: int):
    server = make_server(results, port=0, cache_bytes=cache_mb << 20)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def first_view(results: Path, name: str, cache_mb: int, viewable: bool) -> dict:
    """Page (when the results are complete) + all slide tiles of the opening zoom level, cold
    (the slide not yet opened), after the imports ``view`` does when it starts."""
    server = serve(results, cache_mb)
    server.viewer.warm_up()
    try:
        port = server.server_address[1]
        summary = json.loads((results / name / "summary.json").read_text())
        w, h = summary["slide_dimensions"]
        zmax = max_zoom_for(w, h)
        # The page opens with the whole slide in the plot; bokeh's tile renderer takes the finest
        # zoom whose tile pixels are not smaller than a screen pixel.
        px_per_screen = max(w / PLOT_W, h / PLOT_H) * 1.02
        z = max(0, min(zmax, zmax - math.ceil(math.log2(max(px_per_screen, 1)))))
        side = TILE_PX * 2 ** (zmax - z)
        paths = [
            f"/slide/{name}/tiles/{z}/{x}/{y}.jpg"
            for x in range(math.ceil(w / side))
            for y in range(math.ceil(h / side))
        ]
        t0 = time.perf_counter()
        if viewable:
            Client(port).get(f"/slide/{name}/")
            paths.append(f"/slide/{name}/overlay/cells.png")
        local = threading.local()

        def fetch(path: str) -> int:
            if not hasattr(local, "client"):
                local.client = Client(port)
            return local.client.get(path)[0]

        with ThreadPoolExecutor(6) as pool:
            statuses = list(pool.map(fetch, paths))
        seconds = time.perf_counter() - t0
        assert all(s == 200 for s in statuses), statuses
        return {"zoom": z, "requests": len(paths), "seconds": seconds}
    finally:
        server.shutdown()
        server.server_close()


def tile_latency(results: Path, name: str, n_tiles: int, cache_mb: int, seed: int) -> dict:
    summary = json.loads((results / name / "summary.json").read_text())
    w, h = summary["slide_dimensions"]
    zmax = max_zoom_for(w, h)
    rng = random.Random(seed)
    tiles = []
    for _ in range(n_tiles):
        z = rng.randint(max(0, zmax - 4), zmax)
        side = TILE_PX * 2 ** (zmax - z)
        tiles.append((z, rng.randrange(math.ceil(w / side)), rng.randrange(math.ceil(h / side))))
    tiles = list(dict.fromkeys(tiles))
    server = serve(results, cache_mb)
    try:
        client = Client(server.server_address[1])
        client.get(f"/slide/{name}/tiles/0/0/0.jpg")  # opens the slide and its thumbnail
        cold = [client.get(f"/slide/{name}/tiles/{z}/{x}/{y}.jpg")[1] for z, x, y in tiles]
        warm = [client.get(f"/slide/{name}/tiles/{z}/{x}/{y}.jpg")[1] for z, x, y in tiles]
        cache = server.viewer.cache
        return {
            "tiles": len(tiles),
            "cold_s": cold,
            "warm_s": warm,
            "cache_mib": cache.nbytes / 2**20,
            "cache_hits": cache.hits,
        }
    finally:
        server.shutdown()
        server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, help="an existing results folder")
    parser.add_argument("--slide", help="with --results: the slide's folder name")
    parser.add_argument("--size", type=int, default=16384, help="synthetic slide side, px")
    parser.add_argument("--tiles", type=int, default=200, help="tiles sampled")
    parser.add_argument("--cache-mb", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.results:
            results, name = args.results, args.slide
            if not name:
                parser.error("--results needs --slide (the slide's folder name)")
        else:
            results, name = minimal_results(Path(tmp), args.size)
        summary = json.loads((results / name / "summary.json").read_text())
        viewable = "colour_scale" in summary and (results / name / "tiles.zarr").is_dir()
        view = first_view(results, name, args.cache_mb, viewable)
        lat = tile_latency(results, name, args.tiles, args.cache_mb, args.seed)

    def ms(values: list[float], q: float) -> float:
        return float(np.quantile(values, q) * 1000)

    w, h = summary["slide_dimensions"]
    print(
        f"\nviewer tile latency — {w}×{h} px slide, {lat['tiles']} tiles of {TILE_PX} px "
        f"(zoom levels max-4…max), {_cpu_name()}\n"
    )
    print("| measure | median ms | p95 ms |")
    print("|---|---:|---:|")
    print(
        f"| tile, cold (slide read + JPEG) | {ms(lat['cold_s'], 0.5):.1f} | "
        f"{ms(lat['cold_s'], 0.95):.1f} |"
    )
    print(
        f"| tile, warm (LRU hit) | {ms(lat['warm_s'], 0.5):.2f} | {ms(lat['warm_s'], 0.95):.2f} |"
    )
    print(
        f"\nfirst view, cold: {view['requests']} requests (zoom {view['zoom']}"
        f"{', page + overlay' if viewable else ''}) in {view['seconds']:.2f} s; "
        f"tile cache after the sample: {lat['cache_mib']:.1f} MiB of {args.cache_mb} MiB"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"slide_dimensions": [w, h], "first_view": view, **lat, "cpu": _cpu_name()},
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
