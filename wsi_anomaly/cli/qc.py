"""``wsi-anomaly qc SLIDE… --out qc/``: tissue quality control alone, no model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import EXIT_SLIDES_FAILED
from . import options as opt

HELP = "tissue quality control of slides (blur, pen, folds, bubbles, exposure), no model"
DESCRIPTION = f"""Tile each slide's tissue, measure every tile (focus, pen ink, folds, bubble rims,
exposure, faint staining, distance to the tissue border) and write OUT/<slide name>/qc.png (the
slide with each artifact class outlined in its colour), qc_tiles.csv and summary.json, plus the
cohort table OUT/qc_summary.csv (fraction of tissue per artifact class, usable tissue, a
pass/check/fail verdict with its reasons). Exit status {EXIT_SLIDES_FAILED} when --skip-errors
recorded failed slides."""


def add_parser(sub, parents: list[argparse.ArgumentParser]) -> None:
    p = opt.add_command(
        sub,
        parents,
        "qc",
        HELP,
        DESCRIPTION,
        run,
        examples=[
            "wsi-anomaly qc slides/*.svs --out qc/",
            "wsi-anomaly qc cohort/ --recursive --out qc/ --qc-config my_qc.yaml --skip-errors",
        ],
    )
    opt.add_slides_arguments(p)
    opt.add_out_folder_option(p, "qc")
    p.add_argument(
        "--mpp",
        type=opt.mpp,
        default=0.5,
        help="tile resolution, µm/px (default 0.5 ≈ 20x)",
    )
    opt.add_count_option(p, "--tile-px", "tile side in pixels", 256, metavar="TILE_PX")
    opt.add_min_tissue_option(p, "check")
    opt.add_qc_config_option(p)
    opt.add_read_threads_option(p, "slide-decoding threads per slide")
    p.add_argument(
        "--skip-errors",
        action="store_true",
        help="record a failing slide in qc_summary.csv and go on (exit status "
        f"{EXIT_SLIDES_FAILED} if any failed)",
    )
    opt.add_overwrite_option(p, "redo slides that are already done")
    opt.add_slide_mpp_options(p)


def run(args: argparse.Namespace) -> int:
    from ..pipeline.qc_run import QCRunSettings, run_qc
    from ..slide.qc import load_qc_settings

    out = opt.check_output_folder(args.out)
    qc = load_qc_settings(args.qc_config)
    if args.mpp_csv:
        from ..slide.resolution import load_mpp_csv

        load_mpp_csv(args.mpp_csv)  # a bad file stops the run before any slide work
    settings = QCRunSettings(
        target_mpp=args.mpp,
        tile_px=args.tile_px,
        min_tissue=args.min_tissue,
        qc=qc,
        read_workers=args.read_threads or 0,
        slide_mpp=args.slide_mpp,
        mpp_csv=args.mpp_csv,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    rows = run_qc(args.slides, out, settings, args.skip_errors, args.recursive)
    for row in rows:
        if row["status"] in ("ok", "skipped (done)"):
            reasons = f" ({row['reasons']})" if row["reasons"] else ""
            print(
                f"{row['slide']}: {row['verdict']}{reasons}, {row['n_tiles']} tiles, "
                f"usable tissue {float(row['usable_fraction']):.1%} → {row['output']}"
            )
        else:
            print(f"{row['slide']}: {row['status']}: {row['error']}")
    summary = Path(out) / "qc_summary.csv"
    done = [r for r in rows if r["status"] in ("ok", "skipped (done)")]
    print(f"{len(done)} of {len(rows)} slides checked; cohort table {summary}")
    failed = [r for r in rows if r["status"] in ("failed", "busy")]
    if len(rows) == 1 and rows[0]["status"] == "no tissue":
        failed = rows
    if failed:
        print(f"{len(failed)} of {len(rows)} slides failed (see {summary})", file=sys.stderr)
        return EXIT_SLIDES_FAILED
    return 0
