"""``wsi-anomaly score --model model.pt PATH…``: per-image scores of image files."""

from __future__ import annotations

import argparse

from ..errors import InvalidInputError
from ..words import count
from . import options as opt

HELP = "score images or folders of tiles"
DESCRIPTION = """Score image files with a trained model: a CSV of per-image mean and max anomaly
scores, and optionally anomaly-map PNGs."""
EXAMPLES = ("wsi-anomaly score --model model.pt tiles/ --out scores.csv --maps maps/",)


def add_parser(sub, parents: list[argparse.ArgumentParser]) -> None:
    p = opt.add_command(sub, parents, "score", HELP, DESCRIPTION, run, EXAMPLES)
    p.add_argument("paths", nargs="+", help="image files and/or folders (searched recursively)")
    opt.add_model_option(p)
    p.add_argument("--out", default="scores.csv", help="CSV to write (default scores.csv)")
    p.add_argument("--maps", metavar="DIR", help="also write anomaly-map PNGs here")
    opt.add_scoring_options(p, "images per model batch")
    opt.add_loader_workers_option(p, default=0)
    opt.add_device_option(p)
    opt.add_precision_option(p)
    opt.add_runtime_option(p)
    opt.add_overwrite_option(p)


def run(args: argparse.Namespace) -> int:
    from ..score import score_images

    out = opt.check_output_file(args.out)
    if out.exists() and not args.overwrite:
        raise InvalidInputError(f"{out} already exists; pass --overwrite to replace it")
    summary = score_images(
        args.model,
        args.paths,
        out,
        maps_dir=args.maps,
        workers=args.loader_workers,
        progress=not args.quiet,
        **opt.scoring_settings(args),
    )
    skipped = summary["skipped"]
    extra = ""
    if skipped["unreadable"] or skipped["too_small"]:
        extra = f" (skipped {skipped['unreadable']} unreadable, {skipped['too_small']} too small)"
    print(
        f"scored {count(summary['scored'], 'image')}{extra} → {summary['csv']}"
        + (f"; maps in {summary['maps']}" if summary["maps"] else "")
    )
    return 0
