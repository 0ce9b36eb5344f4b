"""How close training's duration estimate comes to the time the run then takes, and what a
resume point costs to write.

``wsi-anomaly train`` estimates the rest of a run from its first batches (the first warms up, the
next ``ESTIMATE_BATCHES`` are timed) and prints "about N h M min". This trains a preset on the
tiles of a synthetic slide (random backbone weights: the time of a batch does not depend on the
weights' values) and prints a table: the estimate, the time the rest of the training actually took
(from the estimate to the start of calibration), their ratio, the time of one batch, and the time
and size of the resume point written after each epoch.

    python benchmarks/bench_train_estimate.py --config haloae_fast --epochs 2 \
        --samples-per-epoch 4 --batch-size 1 --calibration-tiles 4
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import wsi_anomaly.checkpoint as checkpoint
import wsi_anomaly.training as training
from wsi_anomaly.config import load_config
from wsi_anomaly.slide.synthetic import write_synthetic_slide
from wsi_anomaly.tiles import tile_slide
from wsi_anomaly.tiles.dataset import ZarrTileDataset
from wsi_anomaly.words import about


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="haloae_fast")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--samples-per-epoch", type=int, help="override train.samples_per_epoch")
    parser.add_argument("--batch-size", type=int, help="override train.batch_size")
    parser.add_argument("--calibration-tiles", type=int, help="override train.calibration_tiles")
    parser.add_argument("--size", type=int, default=4096, help="side of the synthetic slide, px")
    parser.add_argument("--json", type=Path, help="also write the row here")
    args = parser.parse_args()
    logging.basicConfig(format="%(message)s")  # the schedule, the estimate, each epoch's line
    logging.getLogger("wsi_anomaly").setLevel(logging.INFO)

    marks: dict[str, Any] = {"saves": []}
    real_calibrate, real_save = training.calibrate, checkpoint.save_checkpoint

    def on_estimate(estimate: training.DurationEstimate) -> None:
        marks["estimate"], marks["at"] = estimate, time.perf_counter()
        print(f"estimated time to the end of training: {estimate.describe()}", flush=True)

    def calibrate(*a: Any, **k: Any) -> Any:
        marks.setdefault("calibration", time.perf_counter())
        return real_calibrate(*a, **k)

    def save(payload: dict[str, Any], path: Any) -> None:
        start = time.perf_counter()
        real_save(payload, path)
        if not payload.get("complete"):
            marks["saves"].append((time.perf_counter() - start, Path(path).stat().st_size))

    training.calibrate, training.save_checkpoint = calibrate, save
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        slide = write_synthetic_slide(
            folder / "s.tif", width=args.size, height=args.size, mpp=0.5, seed=0
        )
        store = folder / "s.zarr"
        tile_slide(slide.path, store, progress=False)
        schedule = {
            "epochs": args.epochs,
            "samples_per_epoch": args.samples_per_epoch,
            "batch_size": args.batch_size,
            "calibration_tiles": args.calibration_tiles,
        }
        config = load_config(
            args.config,
            {
                "model": {"backbone_weights": "random"},
                "train": {k: v for k, v in schedule.items() if v is not None},
            },
        )
        training.train_model(
            ZarrTileDataset(store),
            config,
            folder / "m.pt",
            device="cpu",
            progress=False,
            on_estimate=on_estimate,
        )
    estimate: training.DurationEstimate = marks["estimate"]
    t = config.train
    config_text = f"{t.epochs} epochs × {t.samples_per_epoch} samples, batch {t.batch_size}"
    actual = marks["calibration"] - marks["at"]
    save_s = [s for s, _ in marks["saves"]]
    row = {
        "config": args.config,
        "epochs": args.epochs,
        "estimate_s": round(estimate.seconds, 1),
        "estimate": about(estimate.seconds),
        "actual_s": round(actual, 1),
        "actual_over_estimate": round(actual / estimate.seconds, 2),
        "s_per_batch": round(estimate.seconds_per_batch, 2),
        "batches_estimated": estimate.batches_left,
        "resume_point_s": round(sum(save_s) / len(save_s), 2) if save_s else None,
        "resume_point_mib": round(marks["saves"][0][1] / 2**20, 1) if save_s else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    print(
        "| preset | batches after the estimate | estimate | actual | actual / estimate "
        "| s per batch | resume point write | resume point size |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.config}, {config_text} | {estimate.batches_left} | {row['estimate']} "
        f"({row['estimate_s']} s) | {row['actual_s']} s | {row['actual_over_estimate']} "
        f"| {row['s_per_batch']} | {row['resume_point_s']} s | {row['resume_point_mib']} MiB |"
    )
    if args.json:
        args.json.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
