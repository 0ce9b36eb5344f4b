"""What each part of tissue QC costs: ``measure_tiles`` on 32-tile batches of CMU-1.

The tissue tiles of CMU-1-Small-Region (0.5 µm/px, stride 128 px, as ``bench_qc.py`` cuts them)
are measured in batches of 32 with every measurement on, then with the bubble rims off
(``max_bubble: 0``), then with the folds off too (``max_fold: 0``, ``max_fold_step: 0``); the
differences are each part's cost, the last run what the rest costs (ink colours, brightness,
staining, focus). CPU time of the measuring thread (``time.thread_time``), best of five rounds,
the three settings alternated in each.

    python benchmarks/bench_qc_parts.py [--slide CMU-1-Small-Region.svs] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CMU = REPO.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--slide", default=str(CMU), help="the slide whose tiles are measured")
    ap.add_argument("--batch", type=int, default=32, help="tiles per measure_tiles call")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    from wsi_anomaly.slide.qc import QCSettings, measure_tiles, stored_colour_reference
    from wsi_anomaly.tiles import TileStore, TilingSettings, tile_slide

    slide = Path(args.slide)
    if not slide.is_file():
        raise SystemExit(f"slide not found: {slide}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "tiles.zarr"
        tile_slide(slide, out, TilingSettings(target_mpp=0.5, stride_px=128), progress=False)
        store = TileStore(out)
        tiles = store.read(0, len(store))
        every = QCSettings.from_dict(store.qc["settings"])
        reference = store.qc.get("reference_od") or float("nan")
        colour_reference = stored_colour_reference(store.qc)
    no_bubble = dataclasses.replace(every, max_bubble=0.0)
    rest = dataclasses.replace(no_bubble, max_fold=0.0, max_fold_step=0.0)
    variants = {"all": every, "no bubble": no_bubble, "rest": rest}
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(args.rounds):
        for name, settings in variants.items():
            c0 = time.thread_time()
            for i in range(0, len(tiles), args.batch):
                measure_tiles(tiles[i : i + args.batch], settings, reference, colour_reference)
            best[name] = min(best[name], time.thread_time() - c0)
    ms = {k: 1e3 * v / len(tiles) for k, v in best.items()}
    parts = {
        "bubble rims (line map, labelling, circle fits)": ms["all"] - ms["no bubble"],
        "folds (block sums, doubled fraction, edge steps)": ms["no bubble"] - ms["rest"],
        "the rest (ink colours, brightness, staining, focus)": ms["rest"],
        "all of measure_tiles": ms["all"],
    }
    print(
        f"machine: {platform.processor() or platform.machine()}, Python "
        f"{platform.python_version()}; {len(tiles)} tiles of {slide.name}, batches of "
        f"{args.batch}"
    )
    print("| part | CPU ms/tile | share |")
    print("|---|---|---|")
    for name, v in parts.items():
        print(f"| {name} | {v:.3f} | {v / ms['all']:.0%} |")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"n_tiles": len(tiles), "ms_per_tile": parts}, indent=2), encoding="utf-8"
        )


if __name__ == "__main__":
    main()
