"""Speed of the tile-feature path: `train --features` and `heatmap --features` (TRIDENT layout).

Writes ``--slides`` normal training files of ``--tiles-per-slide`` vectors each (``--dim`` wide,
UNI's 1 024 by default) in a TRIDENT job folder, fits ``features-knn`` on them
(``--budget`` bank rows) through the training loop (h5 reads included), then scores one
synthetic slide (``--slide-px`` square, 0.5 µm/px, 256 px tiles at level 0, every grid cell a
tile; a few tiles' vectors shifted) from its features file through the heatmap's per-slide
function, all outputs written. The vectors are Gaussian mixtures (``--tissue-types`` clusters):
real features need more or fewer bank rows to cover the same tissue.

Reports the fit's wall time and vectors per second, the scoring throughput (vectors per
second through the bank) and the slide's end-to-end seconds by stage. Prints a Markdown table;
``--json`` also writes the numbers. Example::

    python benchmarks/bench_features.py --slides 10 --tiles-per-slide 5000 --budget 4096 --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

SIDE = 256


def write_file(path: Path, features: np.ndarray, coords: np.ndarray, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=features.astype(np.float32)).attrs["encoder"] = "uni_v1"
        xy = f.create_dataset("coords", data=coords)
        xy.attrs.update({"patch_size": SIDE, "patch_size_level0": SIDE, "overlap": 0,
                         "target_magnification": 20, "level0_width": size[0],
                         "level0_height": size[1]})  # fmt: skip


def grid(width: int, height: int) -> np.ndarray:
    xy = np.stack(np.meshgrid(np.arange(width // SIDE), np.arange(height // SIDE)), -1)
    return (xy.reshape(-1, 2) * SIDE).astype(np.int64)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=10)
    ap.add_argument("--tiles-per-slide", type=int, default=5000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--budget", type=int, default=4096)
    ap.add_argument("--tissue-types", type=int, default=16)
    ap.add_argument("--slide-px", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from wsi_anomaly.config import load_config
    from wsi_anomaly.features_run import FeatureSources
    from wsi_anomaly.pipeline import HeatmapSettings, process_slide
    from wsi_anomaly.slide.synthetic import write_synthetic_slide
    from wsi_anomaly.tiles.feature_files import open_training_features
    from wsi_anomaly.training import train_model

    rng = np.random.default_rng(0)
    centres = 2.0 * rng.normal(size=(args.tissue_types, args.dim))

    def vectors(n: int) -> np.ndarray:
        kind = rng.integers(args.tissue_types, size=n)
        return centres[kind] + rng.normal(size=(n, args.dim))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = root / "job" / "20x_256px_0px_overlap" / "features_uni_v1"
        side = int(np.ceil(np.sqrt(args.tiles_per_slide)))
        train_coords = grid(side * SIDE, side * SIDE)[: args.tiles_per_slide]
        for i in range(args.slides):
            write_file(folder / f"normal{i}.h5", vectors(len(train_coords)), train_coords,
                       (side * SIDE, side * SIDE))  # fmt: skip
        config = load_config("features_knn", {"features_knn": {"coreset_budget": args.budget}})
        t0 = time.perf_counter()
        dataset = open_training_features([folder])
        result = train_model(dataset, config, root / "knn.pt", device="cpu", progress=False)
        fit_s = time.perf_counter() - t0
        n_train = args.slides * len(train_coords)

        slide = write_synthetic_slide(root / "slide.tif", width=args.slide_px,
                                      height=args.slide_px, mpp=0.5, seed=3)  # fmt: skip
        coords = grid(args.slide_px, args.slide_px)
        feats = vectors(len(coords))
        feats[:: max(1, len(coords) // 20)] += 3.0  # 5 % shifted tiles
        write_file(root / "slides" / f"{slide.path.stem}.h5", feats, coords,
                   (args.slide_px, args.slide_px))  # fmt: skip
        settings = HeatmapSettings(device="cpu", progress=False,
                                   features=FeatureSources((str(root / "slides"),)))  # fmt: skip
        t0 = time.perf_counter()
        summary = process_slide(slide.path, root / "results", root / "knn.pt", settings)
        slide_s = time.perf_counter() - t0
        timings = summary["timings_s"]

    numbers = {
        "machine": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dim": args.dim,
        "train_vectors": n_train,
        "bank_rows": args.budget,
        "fit_s": fit_s,
        "fit_vectors_per_s": n_train / fit_s,
        "train_loop_s": result.seconds,
        "slide_tiles": len(coords),
        "slide_s": slide_s,
        "score_vectors_per_s": summary["tiles_per_s"]["model"],
        "read_features_s": timings["read_features_s"],
        "model_s": timings["model_s"],
        "stitch_s": timings["stitch_s"],
    }
    print(f"torch {torch.__version__}, {numbers['threads']} thread(s), D = {args.dim}\n")
    print("| step | size | seconds | vectors/s |")
    print("|---|---|---|---|")
    print(f"| train --features (read, fit, calibrate) | {n_train} vectors → {args.budget} rows "
          f"| {fit_s:.1f} | {numbers['fit_vectors_per_s']:.0f} |")  # fmt: skip
    print(f"| score vectors against the bank | {len(coords)} tiles | {timings['model_s']:.2f} "
          f"| {numbers['score_vectors_per_s']:.0f} |")  # fmt: skip
    print(f"| heatmap --features, one slide end to end | {args.slide_px}² px, {len(coords)} "
          f"tiles | {slide_s:.1f} | {len(coords) / slide_s:.0f} |")  # fmt: skip
    print(f"|   of which reading the .h5 / outputs and pictures | | "
          f"{timings['read_features_s']:.2f} / {timings['stitch_s']:.1f} | |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(numbers, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
