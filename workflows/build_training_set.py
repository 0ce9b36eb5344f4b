"""Build a training set of tiles from annotated regions across a cohort.

For every slide in a folder that has a QuPath GeoJSON export beside it (``slide.svs`` +
``slide.geojson``), tile the annotated regions (optionally one class only, e.g. ``Tumor``) at one
resolution into ``OUT/<slide stem>.zarr``. The stores are what ``wsi-anomaly train --tiles``
takes (several at once). Slides already done are skipped; ``--skip-errors`` records failures and
goes on.

    python workflows/build_training_set.py slides/ --out tumour_tiles/ --mpp 0.5 --class Tumor
    wsi-anomaly train --tiles tumour_tiles/*.zarr --out model.pt
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from wsi_anomaly.errors import WsiAnomalyError
from wsi_anomaly.tiles import TilingSettings, tile_slide

SLIDE_SUFFIXES = {".svs", ".ndpi", ".mrxs", ".tif", ".tiff", ".scn", ".vms", ".bif", ".dcm"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "slides", help="folder of slides with <stem>.geojson annotation files beside them"
    )
    ap.add_argument("--out", required=True, help="folder for the tile stores")
    ap.add_argument("--mpp", type=float, default=0.5, help="tile resolution, µm/px (default 0.5)")
    ap.add_argument("--class", dest="class_name", help="only annotations of this QuPath class")
    ap.add_argument("--min-tissue", type=float, default=0.5)
    ap.add_argument("--skip-errors", action="store_true", help="record failing slides and go on")
    args = ap.parse_args(argv)

    folder, out = Path(args.slides), Path(args.out)
    if not folder.is_dir():
        print(f"build_training_set: error: not a folder: {folder}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    pairs = [
        (s, s.with_suffix(".geojson"))
        for s in sorted(folder.iterdir())
        if s.suffix.lower() in SLIDE_SUFFIXES and s.with_suffix(".geojson").is_file()
    ]
    if not pairs:
        print(
            f"build_training_set: error: no slide with a .geojson beside it in {folder}",
            file=sys.stderr,
        )
        return 2
    rows = []
    for slide, geojson in pairs:
        store = out / f"{slide.stem}.zarr"
        if store.exists():
            rows.append({"slide": slide.name, "status": "skipped (done)", "tiles": "", "error": ""})
            continue
        settings = TilingSettings(
            target_mpp=args.mpp,
            min_tissue=args.min_tissue,
            annotations=str(geojson),
            annotation_class=args.class_name,
        )
        try:
            result = tile_slide(slide, store, settings)
            rows.append({"slide": slide.name, "status": "ok", "tiles": result.n_tiles, "error": ""})
            print(f"{slide.name}: {result.n_tiles} tiles → {store}")
        except WsiAnomalyError as exc:
            if not args.skip_errors:
                print(f"build_training_set: error: {exc}", file=sys.stderr)
                return 2
            rows.append({"slide": slide.name, "status": "failed", "tiles": "", "error": str(exc)})
            print(f"{slide.name}: FAILED: {exc}", file=sys.stderr)
    with (out / "training_set.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["slide", "status", "tiles", "error"])
        writer.writeheader()
        writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
