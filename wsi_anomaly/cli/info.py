"""``wsi-anomaly info SLIDE``: format, dimensions, levels and resolution of a slide."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .options import add_command, add_slide_mpp_options, slide_override

HELP = "describe a slide: format, levels, mpp"
DESCRIPTION = """Print a slide's format, dimensions, pyramid levels with downsample and mpp,
where the mpp came from, objective power and associated images. A slide without resolution
metadata is described too (its resolution as unknown)."""
EXAMPLES = (
    "wsi-anomaly info slide.svs",
    "wsi-anomaly info slide.ndpi --json",
)


def add_parser(sub, parents: list[argparse.ArgumentParser]) -> None:
    p = add_command(sub, parents, "info", HELP, DESCRIPTION, run, EXAMPLES)
    p.add_argument("slide", help="slide file (SVS, NDPI, MRXS, SCN, DICOM, TIFF, OME-TIFF…)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_slide_mpp_options(p)


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def run(args: argparse.Namespace) -> int:
    from ..slide import Slide

    override = slide_override(args, args.slide)
    with Slide(args.slide, override_mpp=override, require_mpp=False) as slide:
        w, h = slide.dimensions
        res = slide.resolution
        info: dict[str, Any] = {
            "path": str(slide.path),
            "format": slide.format,
            "reader": slide.backend,
            "dimensions": [w, h],
            "mpp": _round(res.mpp if res else None, 6),
            "mpp_x": _round(res.mpp_x if res else None, 6),
            "mpp_y": _round(res.mpp_y if res else None, 6),
            "mpp_source": res.source if res else None,
            "objective_power": slide.objective_power,
            "levels": [
                {
                    "level": lv.index,
                    "width": lv.width,
                    "height": lv.height,
                    "downsample": round(lv.downsample, 4),
                    "mpp": _round(lv.mpp, 4),
                }
                for lv in slide.levels
            ],
            "associated_images": list(slide.associated_images),
        }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    power = f"{info['objective_power']:g}x" if info["objective_power"] else "unknown"
    print(f"{slide.name}")
    print(f"  format          {info['format']} (read with {info['reader']})")
    print(f"  dimensions      {w} × {h} px")
    if info["mpp"] is None:
        print("  resolution      unknown — pass --slide-mpp MPP")
    else:
        print(f"  resolution      {info['mpp']:.4f} µm/px (source: {info['mpp_source']})")
    print(f"  objective       {power}")
    print(f"  levels          {len(info['levels'])}")
    for lv in info["levels"]:
        mpp = "unknown" if lv["mpp"] is None else f"{lv['mpp']:.4f}"
        print(
            f"    {lv['level']:>2}  {lv['width']:>7} × {lv['height']:<7}  "
            f"downsample {lv['downsample']:<8g}  {mpp} µm/px"
        )
    print(f"  associated      {', '.join(info['associated_images']) or 'none'}")
    return 0
