"""What each part of tissue QC costs: ``measure_tiles`` on 32-tile batches of CMU-1.

The tissue tiles of CMU-1-Small-Region (0.5 µm/px, stride 128 px, as ``bench_qc.py`` cuts them)
are measured in batches of 32 with every measurement on, then with the bubble rims off
(``max_bubble: 0``), then with the folds off too (``max_fold: 0``, ``max_fold_step: 0``); the
differences are each part's cost, the last run what the rest costs (ink colours, brightness,
staining, focus). CPU time of the measuring thread (``time.thread_time``), best of five rounds,
the three settings alternated in each.

With ``--against FILE`` (another version of ``wsi_anomaly/slide/qc.py``, e.g. from
``git show REV:wsi_anomaly/slide/qc.py > old_qc.py``) it also times that version's
``measure_tiles`` against the current one on the same tiles, alternated in each round (so the
machine's drift falls on both alike), and says whether their values are identical on the clean
tiles and on bubble-injected copies.

With ``--slide-work SLIDE`` it also times, on that slide's tissue tiles at 0.5 µm/px, the QC
work done once per slide outside ``measure_tiles`` — the tiles' distances to the tissue border,
their flags and writing the QC arrays into the store — each as it is done now and as it was done
before (a distance transform of the tissue's bounding box; flags and a store write per shard of
256 tiles), the process's CPU time (zarr writes from its own thread), best of ``--rounds``.

    python benchmarks/bench_qc_parts.py [--slide CMU-1-Small-Region.svs] [--json out.json]
        [--slide-work /tmp/wsi-bench-qc/synthetic-0.25mpp-16384.tif] [--against old_qc.py]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
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
    ap.add_argument("--slide-work", help="also time the per-slide QC work on this slide")
    ap.add_argument("--against", help="also time measure_tiles of this other version of qc.py")
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
    ms = alternated_ms(
        {
            name: functools.partial(
                measure_tiles, settings=s, reference=reference, colour_reference=colour_reference
            )
            for name, s in variants.items()
        },
        tiles,
        args,
    )
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
    result: dict = {"n_tiles": len(tiles), "ms_per_tile": parts}
    if args.against:
        versus = against(Path(args.against), tiles, every, reference, colour_reference, args)
        result["against"] = versus
        print(
            f"\nmeasure_tiles, CPU ms/tile, best of {args.rounds}: {versus['other']:.3f} "
            f"({Path(args.against).name}) -> {versus['current']:.3f} (current, "
            f"{versus['current'] / versus['other'] - 1:+.0%}); values identical: "
            f"{versus['identical']}"
        )
    if args.slide_work:
        work = slide_work(Path(args.slide_work), args.rounds)
        result["slide_work"] = work
        print(f"\nper-slide QC work on {Path(args.slide_work).name}: {work['n_tiles']} tiles")
        print("| step | now, ms per slide | before, ms per slide |")
        print("|---|---|---|")
        for step, (now, before) in work["ms"].items():
            print(f"| {step} | {now:.1f} | {before:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2), encoding="utf-8")


def against(path: Path, tiles, settings, reference, colour_reference, args) -> dict:
    """``measure_tiles`` of the qc module at ``path`` against the current one: CPU ms/tile
    (best of ``args.rounds``, the two alternated) and whether their values are identical."""
    import importlib.util
    import sys

    import numpy as np

    from wsi_anomaly.slide import artifacts
    from wsi_anomaly.slide import qc as current

    # Loaded inside the package, so that its relative imports resolve as the current one's.
    spec = importlib.util.spec_from_file_location("wsi_anomaly.slide._qc_against", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"not a Python file: {path}")
    other = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = other
    spec.loader.exec_module(other)
    rng = np.random.default_rng(0)
    bubbles = np.stack([artifacts.bubble(t, rng) for t in tiles])
    identical = all(
        np.array_equal(
            other.measure_tiles(batch[i : i + args.batch], settings, reference, colour_reference),
            current.measure_tiles(batch[i : i + args.batch], settings, reference, colour_reference),
            equal_nan=True,
        )
        for batch in (tiles, bubbles)
        for i in range(0, len(batch), args.batch)
    )
    ms = alternated_ms(
        {
            name: functools.partial(
                module.measure_tiles,
                settings=settings,
                reference=reference,
                colour_reference=colour_reference,
            )
            for name, module in (("other", other), ("current", current))
        },
        tiles,
        args,
    )
    return {**ms, "identical": identical}


def alternated_ms(measures: dict, tiles, args) -> dict[str, float]:
    """CPU ms per tile of each of ``measures`` (called on ``args.batch``-tile batches of
    ``tiles``) in the measuring thread, best of ``args.rounds``, all of them alternated in
    each round so that the machine's drift falls on each alike."""
    best = dict.fromkeys(measures, float("inf"))
    for _ in range(args.rounds):
        for name, measure in measures.items():
            c0 = time.thread_time()
            for i in range(0, len(tiles), args.batch):
                measure(tiles[i : i + args.batch])
            best[name] = min(best[name], time.thread_time() - c0)
    return {k: 1e3 * v / len(tiles) for k, v in best.items()}


def best_ms(fn, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        c0 = time.process_time()  # zarr writes from its own thread: the process's time
        fn()
        best = min(best, time.process_time() - c0)
    return 1e3 * best


def slide_work(path: Path, rounds: int) -> dict:
    """CPU ms of the per-slide QC steps on ``path``'s tissue tiles, now and as before."""
    import numpy as np
    import zarr
    from scipy import ndimage

    from wsi_anomaly.slide.qc import (
        VALUE_NAMES,
        QCSettings,
        flag_tiles,
        qc_record,
        tissue_border_um,
    )
    from wsi_anomaly.slide.reader import Slide
    from wsi_anomaly.tiles.store import create_qc_arrays
    from wsi_anomaly.tiles.tiler import TilingSettings, plan_tiles

    with Slide(path) as slide:
        _, kept, tissue = plan_tiles(slide, TilingSettings(target_mpp=0.5))
        mpp = slide.mpp
    n, shard = len(kept), 256
    tile_l0 = kept.plan.tile_size_l0
    mask = tissue.mask
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    box = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    rng = np.random.default_rng(0)
    values = rng.random((n, len(VALUE_NAMES))).astype(np.float32)
    settings = QCSettings()
    flags = flag_tiles(values, settings)
    record = qc_record(settings)
    ms: dict[str, tuple[float, float]] = {}
    ms["tissue-border distances"] = (
        best_ms(lambda: tissue_border_um(tissue, mpp, kept.coords, tile_l0), rounds),
        best_ms(lambda: ndimage.distance_transform_edt(np.pad(box, 1)), rounds),
    )
    ms["flags"] = (
        best_ms(lambda: flag_tiles(values, settings), rounds),
        best_ms(
            lambda: [flag_tiles(values[s : s + shard], settings) for s in range(0, n, shard)],
            rounds,
        ),
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = zarr.open_group(str(Path(tmp) / "s.zarr"), mode="w", zarr_format=3)

        def before() -> None:
            # Arrays chunked by shard, one write of each array per shard.
            k = len(VALUE_NAMES)
            root.create_array(
                "qc_values",
                shape=(n, k),
                dtype="float32",
                chunks=(shard, k),
                fill_value=float("nan"),
                overwrite=True,
            )
            root.create_array(
                "qc_flags",
                shape=(n,),
                dtype="uint16",
                chunks=(shard,),
                fill_value=0,
                overwrite=True,
            )
            for s in range(0, n, shard):
                root["qc_values"][s : s + shard] = values[s : s + shard]
                root["qc_flags"][s : s + shard] = flags[s : s + shard]

        ms["QC arrays into the store"] = (
            best_ms(lambda: create_qc_arrays(root, n, record, values, flags), rounds),
            best_ms(before, rounds),
        )
    return {"n_tiles": n, "ms": ms}


if __name__ == "__main__":
    main()
