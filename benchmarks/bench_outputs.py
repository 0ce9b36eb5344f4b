"""What the review outputs cost: napari's tiles layer, the viewer's cohort thumbnails and its
compressed script.

- **napari tiles layer**: building the layer data of ``--tiles`` tiles from a ``tiles.csv``
  (the labels layer the reader returns), and, for comparison, adding the same tiles to napari
  as a Shapes layer of rectangles (what the reader did before), both headless (``ViewerModel``);
- **cohort thumbnail**: ``thumbnail.png`` of a synthetic ``--size`` px slide as ``heatmap``
  writes it (2048 px canvas) against the small JPEG the cohort page now loads;
- **bokeh script**: ``bokeh.min.js`` as served plain and gzip-compressed.

Prints a Markdown table; ``--json`` also writes the numbers. Example::

    python benchmarks/bench_outputs.py --tiles 25000 --size 16384
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gzip
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def _cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def write_tile_table(path: Path, n: int, tile_px: int = 512) -> None:
    cols = int(np.ceil(np.sqrt(n)))
    rng = np.random.default_rng(0)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["x", "y", "width", "height", "score", "max", "tissue_fraction", "class"])
        for k in range(n):
            score = float(rng.random())
            w.writerow(
                [
                    (k % cols) * tile_px,
                    (k // cols) * tile_px,
                    tile_px,
                    tile_px,
                    f"{score:.6g}",
                    f"{score:.6g}",
                    1,
                    "Anomalous" if score > 0.99 else "",
                ]
            )


def napari_tiles(n: int, folder: Path) -> dict[str, float]:
    from napari.components import ViewerModel

    from wsi_anomaly.napari_reader import _tiles_layer

    table = folder / "tiles.csv"
    write_tile_table(table, n)
    # napari's one-off start-up costs (its unit registry, first layer) are not the layer's.
    ViewerModel().add_image(np.zeros((2, 2)), units=("micrometer", "micrometer"))
    t0 = time.perf_counter()
    data, kwargs, _ = _tiles_layer(table, 0.25, "bench")
    viewer = ViewerModel()
    viewer.add_labels(data, **kwargs)
    labels_s = time.perf_counter() - t0

    rects = []
    with table.open(newline="") as fh:
        for row in csv.DictReader(fh):
            x, y, s = float(row["x"]), float(row["y"]), float(row["width"])
            rects.append(np.array([[y, x], [y + s, x + s]]) * 0.25)
    t0 = time.perf_counter()
    ViewerModel().add_shapes(rects, shape_type="rectangle", visible=False)
    shapes_s = time.perf_counter() - t0
    return {"labels_layer_s": labels_s, "shapes_layer_s": shapes_s}


def thumbnails(size: int, folder: Path) -> dict[str, float]:
    from wsi_anomaly.slide import Slide
    from wsi_anomaly.slide.synthetic import write_synthetic_slide
    from wsi_anomaly.stitch import (
        ColourScale,
        SlideGeometry,
        SlideOutputs,
        render_slide_outputs,
    )
    from wsi_anomaly.viewer.server import _small_jpeg

    # A synthetic slide's own thumbnail, as heatmap makes it (at most 2048 px a side).
    synthetic = write_synthetic_slide(folder / "bench.tif", width=size, height=size, mpp=0.25)
    with Slide(synthetic.path) as slide:
        thumb, thumb_ds = slide.thumbnail(2048)
    tile = 512
    cols = rows = max(1, size // tile)
    grid = np.array([(c, r) for r in range(rows) for c in range(cols)], np.int64)
    rng = np.random.default_rng(0)
    paths = render_slide_outputs(
        folder,
        SlideOutputs(
            slide_name="bench.tif",
            geometry=SlideGeometry(size, size, 0.25, tile, tile, cols, rows),
            coords=grid * tile,
            grid_index=grid,
            scores=rng.random(len(grid)).astype(np.float32),
            max_scores=rng.random(len(grid)).astype(np.float32),
            thumbnail=thumb,
            thumbnail_downsample=thumb_ds,
            tissue_mask=np.ones((256, 256), bool),
            mask_downsample=size / 256,
            scale=ColourScale(vmin=0.2, vcenter=0.5, vmax=0.8),
            top_tiles=[],
        ),
    )
    png = Path(paths["thumbnail"]).stat().st_size
    jpeg = len(_small_jpeg(Path(paths["thumbnail"])) or b"")
    return {"thumbnail_png_bytes": png, "thumbnail_jpeg_bytes": jpeg}


def bokeh_script() -> dict[str, float]:
    from wsi_anomaly.viewer.server import _bokeh_assets

    body = _bokeh_assets()["bokeh.min.js"].read_bytes()
    return {"bokeh_js_bytes": len(body), "bokeh_js_gzip_bytes": len(gzip.compress(body, 6))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=25000, help="tiles in tiles.csv")
    parser.add_argument(
        "--size", type=int, default=16384, help="synthetic slide side, level-0 px (0.25 µm/px)"
    )
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = {
            **napari_tiles(args.tiles, Path(tmp)),
            **thumbnails(args.size, Path(tmp) / "slide"),
            **bokeh_script(),
        }
    print(f"{_cpu_name()}, {args.tiles} tiles, {args.size} px slide\n")
    print("| measure | value |")
    print("|---|---:|")
    print(f"| napari tiles layer (labels, built from tiles.csv) | {out['labels_layer_s']:.2f} s |")
    print(f"| the same tiles as a Shapes layer | {out['shapes_layer_s']:.2f} s |")
    print(f"| cohort thumbnail: thumbnail.png | {out['thumbnail_png_bytes'] / 1e6:.2f} MB |")
    print(f"| cohort thumbnail: thumb.jpg | {out['thumbnail_jpeg_bytes'] / 1e3:.0f} kB |")
    print(f"| bokeh.min.js plain | {out['bokeh_js_bytes'] / 1e3:.0f} kB |")
    print(f"| bokeh.min.js gzip | {out['bokeh_js_gzip_bytes'] / 1e3:.0f} kB |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
