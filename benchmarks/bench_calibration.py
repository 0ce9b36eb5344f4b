"""How often unseen normal tiles are called "Anomalous": the score scale taken from the training
tiles themselves (in-sample) against the scale taken from normal tiles held out of training.

A synthetic slide's tumour tiles play the normal tissue the model is trained on (as in
``wsi-anomaly demo``). They are split once, with a seed, into three disjoint sets: tiles to train
on, normal tiles held out for the score scale, and test tiles the model never sees. One model is
trained; its checkpoint holds both scales, the held-out one it uses and the in-sample one it keeps
beside it (``calibration.in_sample``), so the two thresholds come from the same weights. The table
gives, for each scale, the median and 99th percentile of the scale's tiles and the share of the
unseen test tiles at or above that 99th percentile (the "Anomalous" threshold), with a 95 %
Clopper-Pearson interval. A threshold that means what it says calls about 1 % of them; a 99th
percentile of n tiles is itself exceeded by a new tile with probability about 1/(n+1) at best, so
the held-out set needs ~100 tiles before 1 % is reachable.

The in-sample scale is biased low where the model fits its own tiles better than new ones: its
scores are also normalised by the mean anomaly map of those same tiles. A 99th percentile of a
few dozen or a hundred tiles is, on the other hand, noisy whichever tiles it comes from; run
several seeds to see both effects.

    python benchmarks/bench_calibration.py --size 24576 --train-tiles 48 --holdout-tiles 100 \
        --test-tiles 300 --epochs 2 --samples-per-epoch 16
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.stats import binomtest
from torch.utils.data import Subset

from wsi_anomaly.checkpoint import load_checkpoint
from wsi_anomaly.config import load_config
from wsi_anomaly.demo import tumour_annotations
from wsi_anomaly.score import Scorer
from wsi_anomaly.slide.synthetic import write_synthetic_slide
from wsi_anomaly.tiles import TileStore, TilingSettings, tile_slide
from wsi_anomaly.tiles.dataset import ZarrTileDataset
from wsi_anomaly.training import train_model

BATCH = 16


def exceedance(scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Share of ``scores`` at or above ``threshold``, with its 95 % Clopper-Pearson interval."""
    k, n = int(np.sum(scores >= threshold)), len(scores)
    ci = binomtest(k, n).proportion_ci(0.95, method="exact")
    return {"share": k / n, "k": k, "n": n, "ci_low": ci.low, "ci_high": ci.high}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", type=int, default=24576, help="slide side, px at 0.5 µm/px")
    ap.add_argument("--mpp", type=float, default=0.5, help="tile resolution, µm/px")
    ap.add_argument("--train-tiles", type=int, default=48)
    ap.add_argument("--holdout-tiles", type=int, default=100)
    ap.add_argument("--test-tiles", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--samples-per-epoch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    t_start = time.perf_counter()
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
        wanted = args.train_tiles + args.holdout_tiles + args.test_tiles
        if len(tiles) < wanted:
            raise SystemExit(
                f"the slide gives {len(tiles)} normal tiles, {wanted} wanted: raise --size"
            )
        order = np.random.default_rng(args.seed).permutation(len(tiles))
        test_idx = sorted(int(i) for i in order[: args.test_tiles])
        usable_idx = sorted(int(i) for i in order[args.test_tiles : wanted])
        usable = Subset(tiles, usable_idx)
        reader = TileStore(store)
        test = np.stack([reader.read(i, i + 1)[0] for i in test_idx])

        # The held-out share of the usable tiles is what train_model draws for the scale.
        holdout = args.holdout_tiles / len(usable_idx)
        config = load_config(
            "haloae_fast",
            {
                "model": {"backbone_weights": "random"},
                "seed": args.seed,
                "haloae": {"epochs": args.epochs, "samples_per_epoch": args.samples_per_epoch},
                "train": {
                    "workers": 0,
                    "calibration_holdout": holdout,
                    "calibration_tiles": max(args.train_tiles, args.holdout_tiles),
                },
            },
        )
        out = work / "model.pt"
        t0 = time.perf_counter()
        train_model(usable, config, out, device="cpu", tile_mpp=args.mpp, progress=False)
        train_s = time.perf_counter() - t0
        calibration = load_checkpoint(out)["calibration"]
        assert calibration["scale_source"] == "held-out normal tiles", calibration["scale_source"]
        scorer = Scorer(out, device="cpu", batch_size=BATCH)
        t0 = time.perf_counter()
        scores = np.concatenate(
            [
                scorer.score(test[b : b + BATCH], keep_maps=False).mean
                for b in range(0, len(test), BATCH)
            ]
        )
        score_s = time.perf_counter() - t0

    rows = []
    for label, cal in (
        ("training tiles (in-sample)", calibration["in_sample"]),
        ("held-out normal tiles", calibration),
    ):
        q = cal["score_quantiles"]
        rows.append(
            {
                "scale": label,
                "scale_tiles": int(cal["n_tiles"]),
                "p50": q["0.5"],
                "p99": q["0.99"],
                "unseen": exceedance(scores, q["0.99"]),
            }
        )
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"{len(tiles)} normal tiles at {args.mpp} µm/px from a {args.size}² synthetic slide: "
        f"{args.train_tiles} trained on ({args.epochs} epochs × {args.samples_per_epoch} "
        f"samples), {args.holdout_tiles} held out for the scale, {len(test_idx)} unseen test "
        f"tiles (median score {np.median(scores):.4g}); random VGG19 weights, seed {args.seed}; "
        f"training {train_s:.0f} s, scoring {score_s:.0f} s, total "
        f"{time.perf_counter() - t_start:.0f} s, peak RSS {peak_mb:.0f} MB"
    )
    print(
        "| score scale from | tiles | median | 99th percentile (threshold) "
        "| unseen normal tiles called Anomalous (95 % CI) |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        u = r["unseen"]
        print(
            f"| {r['scale']} | {r['scale_tiles']} | {r['p50']:.4g} | {r['p99']:.4g} | "
            f"{u['share']:.1%} ({u['k']} of {u['n']}; {u['ci_low']:.1%}–{u['ci_high']:.1%}) |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
