"""End-to-end `heatmap` throughput with the time per stage, on a synthetic slide.

Trains nothing: a HaloAE checkpoint with random weights is built and calibrated on a few tiles of
the slide (the speed of scoring does not depend on the weights). Then one slide goes through
``wsi_anomaly.pipeline.process_slide`` and the summary's stage timings are printed: decoding,
model, store writes, stitching. Because the stages overlap, the pipeline's wall time should be
close to its slowest stage, not to their sum.

    python benchmarks/bench_heatmap.py --size 8192 --mpp 1.0 --device cpu --batch-size 16
    python benchmarks/bench_heatmap.py --size 8192 --mpp 1.0 --device cpu --redraw
    python benchmarks/bench_heatmap.py --size 70000 --mpp 0.5 --device cuda --batch-size 256
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", type=int, default=8192, help="synthetic slide side, px (0.5 µm/px)")
    ap.add_argument("--mpp", type=float, default=1.0, help="tile resolution, µm/px")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", help="auto, fp32 or bf16")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workdir", default="/tmp/wsi-anomaly-bench-heatmap")
    ap.add_argument("--json", help="also write the summary's timings here")
    ap.add_argument(
        "--redraw",
        action="store_true",
        help="then time a re-run with another --cmap (re-drawn from the stored scores)",
    )
    args = ap.parse_args()

    from wsi_anomaly.config import load_config
    from wsi_anomaly.pipeline import HeatmapSettings, process_slide
    from wsi_anomaly.slide.synthetic import write_synthetic_slide
    from wsi_anomaly.tiles import TileStore, TilingSettings, tile_slide
    from wsi_anomaly.tiles.dataset import ZarrTileDataset
    from wsi_anomaly.training import train_model

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    slide = work / f"synthetic_{args.size}.tif"
    if not slide.exists():
        write_synthetic_slide(slide, width=args.size, height=args.size, mpp=0.5, progress=True)
    model = work / f"model_{args.mpp}.pt"
    if not model.exists():
        calib = work / "calibration.zarr"
        shutil.rmtree(calib, ignore_errors=True)
        tile_slide(slide, calib, TilingSettings(target_mpp=args.mpp), progress=False)
        config = load_config(
            "haloae_fast",
            {
                "model": {"backbone_weights": "random"},
                "haloae": {"epochs": 1, "samples_per_epoch": 1, "batch_size": 1},
                "train": {"calibration_tiles": 8},
            },
        )
        train_model(
            ZarrTileDataset(calib),
            config,
            model,
            device=args.device,
            tile_mpp=TileStore(calib).mpp,
            progress=False,
        )
    results = work / "results"
    settings = HeatmapSettings(
        device=args.device, precision=args.precision, batch_size=args.batch_size, overwrite=True
    )
    t0 = time.perf_counter()
    summary = process_slide(slide, results, model, settings)
    wall = time.perf_counter() - t0
    t = summary["timings_s"]
    n = summary["n_tiles"]
    stages = {k: t[k] for k in ("read_s", "model_s", "write_s")}
    pipeline = t["total_s"] - t["plan_s"] - t["stitch_s"]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    machine = f"{platform.machine()}, {os.cpu_count()} cores, device {summary['device']}"
    print(
        f"\nheatmap end to end — {machine}; {args.size}² px slide at 0.5 µm/px, tiles at "
        f"{args.mpp:g} µm/px, batch {args.batch_size}, {summary['precision']}\n"
    )
    print(
        "| tissue tiles | end to end tiles/s | wall (s) | plan (s) | decode, busy (s) | model (s) | "
        "store write (s) | sum of stages (s) | pipeline wall (s) | model waited for tiles (s) | "
        "stitch (s) | peak RSS (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {n} | {n / wall:.1f} | {wall:.1f} | {t['plan_s']:.1f} | {stages['read_s']:.1f} | "
        f"{stages['model_s']:.1f} | {stages['write_s']:.1f} | {sum(stages.values()):.1f} | "
        f"{pipeline:.1f} | {t['read_wait_s']:.2f} | {t['stitch_s']:.1f} | {peak_mb:.0f} |"
    )
    redraw_s = None
    if args.redraw:
        again = HeatmapSettings(
            device=args.device, precision=args.precision, batch_size=args.batch_size, cmap="viridis"
        )
        t1 = time.perf_counter()
        process_slide(slide, results, model, again)
        redraw_s = time.perf_counter() - t1
        print(
            f"\nre-run with another --cmap (re-drawn, no tile scored): {redraw_s:.1f} s, "
            f"{wall / redraw_s:.0f}× faster than scoring ({wall:.1f} s)"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "machine": machine,
                    "summary": summary,
                    "wall_s": wall,
                    "redraw_s": redraw_s,
                    "peak_rss_mb": peak_mb,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
