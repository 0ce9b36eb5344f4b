"""``wsi-anomaly render RESULTS/<slide>/...``: re-draw results folders from their stored scores."""

from __future__ import annotations

import argparse

from . import options as opt
from .options import add_command

HELP = "re-draw results folders with other colours or sizes, without scoring"
DESCRIPTION = """Re-draw the pictures (heatmap, overlay, thumbnail, top tiles), the NGFF score
image, the GeoJSON and tiles.csv of slide results folders that heatmap wrote, from the scores
stored in each folder: no tile is scored and no model is needed (the model's colour scale is
read from summary.json). Give slide folders or a results root (every slide folder in it).
Settings not given stay as the folder records them. The slide must still be at the path
summary.json records, with the same content (its thumbnail and tissue are drawn again).
A heatmap re-run with other display settings re-draws the same way."""
EXAMPLES = (
    "wsi-anomaly render results/slide1.svs --cmap viridis",
    "wsi-anomaly render results/ --scale slide --alpha 0.7 --max-px 4096",
)


def add_parser(sub, parents: list[argparse.ArgumentParser]) -> None:
    p = add_command(sub, parents, "render", HELP, DESCRIPTION, run, EXAMPLES, interrupted)
    p.add_argument(
        "folders", nargs="+", metavar="FOLDER", help="slide results folder(s) or a results root"
    )
    p.add_argument(
        "--cmap",
        type=opt.colormap,
        default=None,
        help="matplotlib colour map (default: as recorded)",
    )
    p.add_argument(
        "--scale",
        choices=["fixed", "slide"],
        default=None,
        help="colour scale: fixed = the model's calibration, slide = this slide's own "
        "percentiles (default: as recorded)",
    )
    p.add_argument(
        "--alpha",
        type=opt.fraction,
        default=None,
        help="opacity of the heat colours in overlay.png, 0 to 1 (default: as recorded)",
    )
    opt.add_count_option(
        p, "--max-px", "longest side of the pictures", None, "default: as recorded", metavar="PX"
    )
    opt.add_count_option(
        p, "--top-k", "tiles in top_tiles.png", None, "default: as recorded", metavar="TOP_K"
    )


def interrupted(args: argparse.Namespace) -> str:
    return (
        "the folders re-drawn so far are complete; the one being re-drawn is marked stale "
        "(status redrawing in its summary.json) and a re-run re-draws it"
    )


def run(args: argparse.Namespace) -> int:
    from ..pipeline.render import redraw_folder, results_folders

    folders = results_folders(args.folders)
    for folder in folders:
        summary = redraw_folder(
            folder,
            cmap=args.cmap,
            scale=args.scale,
            alpha=args.alpha,
            max_px=args.max_px,
            top_k=args.top_k,
        )
        print(f"{folder}: re-drawn in {summary['redrawn']['seconds']:.1f} s")
    return 0
