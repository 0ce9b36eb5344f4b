"""Tiler throughput and peak memory against a naive OpenSlide loop.

Writes (once, cached) large synthetic slides — pyramidal JPEG TIFFs at 0.25 µm/px — then, for
each slide size and each target resolution (native 0.25 and 0.5 µm/px), measures in a fresh
subprocess each:

* ``wsi-anomaly tile`` (threads decoding TIFF tiles directly, zarr v3 sharded store written), and
* the naive baseline on the same grid: a single-threaded loop of OpenSlide ``read_region`` +
  conversion to numpy (+ the same resize when the target is coarser than the level read).

Prints a Markdown table (tiles/s, peak RSS) and optionally writes JSON.

    python benchmarks/bench_tiler.py --sizes 20000 40000 70000 --workdir /tmp/wsi-bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child_tiler(slide: str, mpp: float, out: str) -> dict:
    from wsi_anomaly.tiles import TilingSettings, tile_slide

    shutil.rmtree(out, ignore_errors=True)
    res = tile_slide(slide, out, TilingSettings(target_mpp=mpp), overwrite=True, progress=False)
    return {
        "tiles": res.n_tiles,
        "seconds": res.seconds,
        "tiles_per_s": res.tiles_per_s,
        "peak_rss_mb": _peak_rss_mb(),
    }


def child_reader(slide: str, mpp: float) -> dict:
    """Our decoding alone (threads, direct TIFF tile decode), without the zarr write."""
    from wsi_anomaly.slide import Slide
    from wsi_anomaly.tiles.tiler import TilingSettings, iter_tile_batches, plan_tiles

    with Slide(slide) as s:
        _, kept, _ = plan_tiles(s, TilingSettings(target_mpp=mpp))
        t0 = time.perf_counter()
        n = sum(len(tiles) for _, tiles in iter_tile_batches(s, kept, 256))
        dt = time.perf_counter() - t0
    return {"tiles": n, "seconds": dt, "tiles_per_s": n / dt, "peak_rss_mb": _peak_rss_mb()}


def child_baseline(slide: str, mpp: float, max_tiles: int) -> dict:
    import numpy as np
    import openslide
    from PIL import Image

    from wsi_anomaly.slide import Slide
    from wsi_anomaly.tiles.tiler import TilingSettings, plan_tiles

    with Slide(slide) as s:  # the same grid and tissue selection as the tiler
        _, kept, _ = plan_tiles(s, TilingSettings(target_mpp=mpp))
    plan = kept.plan
    osr = openslide.OpenSlide(slide)
    n = min(len(kept), max_tiles)
    step = max(1, len(kept) // n)
    idx = list(range(0, len(kept), step))[:n]
    t0 = time.perf_counter()
    for i in idx:
        x, y = (int(v) for v in kept.coords[i])
        region = osr.read_region((x, y), plan.level, (plan.read_px, plan.read_px)).convert("RGB")
        if plan.resize:
            region = region.resize((plan.tile_px, plan.tile_px), Image.Resampling.BOX)
        np.asarray(region)
    dt = time.perf_counter() - t0
    return {
        "tiles": len(idx),
        "seconds": dt,
        "tiles_per_s": len(idx) / dt,
        "peak_rss_mb": _peak_rss_mb(),
    }


def run_child(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[20000, 40000, 70000],
        help="slide sides in px (level 0, 0.25 µm/px)",
    )
    ap.add_argument("--mpps", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--workdir", default="/tmp/wsi-anomaly-bench")
    ap.add_argument(
        "--baseline-tiles",
        type=int,
        default=3000,
        help="tiles timed for the baseline (a uniform sample of the grid)",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs per measurement, each in a fresh process; the best is reported",
    )
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child is not None:
        kind, *rest = args.child
        if kind == "tiler":
            out = child_tiler(rest[0], float(rest[1]), rest[2])
        elif kind == "reader":
            out = child_reader(rest[0], float(rest[1]))
        else:
            out = child_baseline(rest[0], float(rest[1]), int(rest[2]))
        print(json.dumps(out))
        return

    from wsi_anomaly.slide.synthetic import write_synthetic_slide

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        slide = work / f"synthetic_{size}.tif"
        if not slide.exists():
            t0 = time.perf_counter()
            write_synthetic_slide(slide, width=size, height=size, mpp=0.25, seed=0, progress=True)
            print(f"wrote {slide} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        for mpp in args.mpps:

            def best(*child_args: str) -> dict:
                runs = [run_child(*child_args) for _ in range(args.repeats)]
                return max(runs, key=lambda r: r["tiles_per_s"])

            ours = best("tiler", str(slide), str(mpp), str(work / f"tiles_{size}_{mpp}.zarr"))
            shutil.rmtree(work / f"tiles_{size}_{mpp}.zarr", ignore_errors=True)
            reader = best("reader", str(slide), str(mpp))
            base = best("baseline", str(slide), str(mpp), str(args.baseline_tiles))
            rows.append(
                {
                    "size": size,
                    "mpp": mpp,
                    "tiles": ours["tiles"],
                    "ours_tiles_per_s": ours["tiles_per_s"],
                    "ours_peak_rss_mb": ours["peak_rss_mb"],
                    "decode_only_tiles_per_s": reader["tiles_per_s"],
                    "baseline_tiles_per_s": base["tiles_per_s"],
                    "baseline_peak_rss_mb": base["peak_rss_mb"],
                    "speedup": ours["tiles_per_s"] / base["tiles_per_s"],
                }
            )
            print(
                f"{size} px @ {mpp} mpp: ours {ours['tiles_per_s']:.0f} tiles/s, "
                f"baseline {base['tiles_per_s']:.0f} tiles/s",
                file=sys.stderr,
            )

    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(
        f"\nTiler vs naive OpenSlide loop — {machine}; tiles 256 px, JPEG q85 synthetic slides, "
        f"tissue tiles only; best of {args.repeats} fresh processes each\n"
    )
    print(
        "| slide (px) | target mpp | tissue tiles | ours, end to end tiles/s | ours peak RSS (MB) | "
        "ours, decode only tiles/s | baseline tiles/s | baseline peak RSS (MB) | "
        "speed-up end to end | speed-up decode |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['size']}² | {r['mpp']:g} | {r['tiles']} | {r['ours_tiles_per_s']:.0f} | "
            f"{r['ours_peak_rss_mb']:.0f} | {r['decode_only_tiles_per_s']:.0f} | "
            f"{r['baseline_tiles_per_s']:.0f} | {r['baseline_peak_rss_mb']:.0f} | "
            f"{r['speedup']:.1f}× | "
            f"{r['decode_only_tiles_per_s'] / r['baseline_tiles_per_s']:.1f}× |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
