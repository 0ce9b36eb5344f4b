"""How often unseen normal tiles are called "Anomalous": score scale from the training tiles
themselves (in-sample) against a scale from normal tiles held out of training.

A synthetic slide's tumour tiles play the normal tissue the model is trained on (as in
``wsi-anomaly demo``). They are split once, with a seed, into tiles the model may use and test
tiles it never sees. Two models are trained on the same usable tiles with the same seed: one
calibrated in-sample (``train.calibration_holdout: 0``), one holding a fraction out. For each,
the table gives the share of the unseen normal test tiles at or above the "Anomalous" threshold
(the calibration's 99th percentile): a calibrated threshold calls about 1 % of them.

    python benchmarks/bench_calibration.py --size 12288 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from torch.utils.data import Subset

from wsi_anomaly.checkpoint import load_checkpoint
from wsi_anomaly.config import load_config
from wsi_anomaly.demo import tumour_annotations
from wsi_anomaly.score import Scorer
from wsi_anomaly.slide.synthetic import write_synthetic_slide
from wsi_anomaly.tiles import TileStore, TilingSettings, tile_slide
from wsi_anomaly.tiles.dataset import ZarrTileDataset
from wsi_anomaly.train import train_model


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", type=int, default=12288, help="slide side, px at 0.5 µm/px")
    ap.add_argument("--mpp", type=float, default=1.0, help="tile resolution, µm/px")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--holdout", type=float, default=0.1)
    ap.add_argument("--test-fraction", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        slide = write_synthetic_slide(
            work / "slide.tif", width=args.size, height=args.size, mpp=0.5, seed=args.seed
        )
        regions = tumour_annotations(slide, work / "tumour.geojson")
        store = work / "tumour.zarr"
        tile_slide(
            slide.path,
            store,
            TilingSettings(target_mpp=args.mpp, annotations=str(regions), min_annotation=0.9),
            progress=False,
        )
        tiles = ZarrTileDataset(store)
        order = np.random.default_rng(args.seed).permutation(len(tiles))
        n_test = int(round(args.test_fraction * len(tiles)))
        test_idx, usable_idx = sorted(order[:n_test]), sorted(order[n_test:])
        usable = Subset(tiles, [int(i) for i in usable_idx])
        reader = TileStore(store)
        test = np.stack([reader.read(int(i), int(i) + 1)[0] for i in test_idx])
        rows = []
        for label, holdout in (
            ("in-sample (training tiles)", 0.0),
            (f"held out ({args.holdout:.0%} of usable tiles)", args.holdout),
        ):
            config = load_config(
                "haloae_fast",
                {
                    "model": {"backbone_weights": "random"},
                    "seed": args.seed,
                    "train": {"epochs": args.epochs, "workers": 0, "calibration_holdout": holdout},
                },
            )
            out = work / f"model-{holdout:g}.pt"
            t0 = time.perf_counter()
            train_model(usable, config, out, device="cpu", tile_mpp=args.mpp, progress=False)
            seconds = time.perf_counter() - t0
            calibration = load_checkpoint(out)["calibration"]
            threshold = calibration["score_quantiles"]["0.99"]
            scorer = Scorer(out, device="cpu", batch_size=16)
            scores = np.concatenate(
                [
                    scorer.score(test[b : b + 16], keep_maps=False).mean
                    for b in range(0, len(test), 16)
                ]
            )
            rows.append(
                {
                    "scale": label,
                    "scale_tiles": calibration["n_tiles"],
                    "threshold_p99": threshold,
                    "unseen_normal_called_anomalous": float(np.mean(scores >= threshold)),
                    "n_unseen": int(len(scores)),
                    "train_s": seconds,
                }
            )
    print(
        f"{len(tiles)} normal tiles: {len(usable_idx)} usable for training, {n_test} unseen "
        f"test tiles; {args.epochs} epochs, random VGG19 weights, seed {args.seed}"
    )
    print("| score scale from | tiles | 99th percentile | unseen normal tiles called Anomalous |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['scale']} | {r['scale_tiles']} | {r['threshold_p99']:.4g} | "
            f"{r['unseen_normal_called_anomalous']:.1%} of {r['n_unseen']} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
