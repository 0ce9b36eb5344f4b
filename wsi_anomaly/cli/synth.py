"""``wsi-anomaly synth OUT.tif``: write a synthetic slide."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InvalidInputError
from .options import add_command, add_overwrite_option, positive_float, positive_int, seed

HELP = "write a synthetic slide"
DESCRIPTION = """Write a pyramidal JPEG TIFF with stroma and tumour-like textures, for trying the
pipeline and for benchmarks."""
EXAMPLES = ("wsi-anomaly synth slide.tif --width 20000 --height 15000",)


def add_parser(sub, parents: list[argparse.ArgumentParser]) -> None:
    p = add_command(sub, parents, "synth", HELP, DESCRIPTION, run, EXAMPLES)
    p.add_argument("out", help="output .tif path")
    p.add_argument(
        "--width", type=positive_int, default=8192, help="level-0 width in px (default 8192)"
    )
    p.add_argument(
        "--height", type=positive_int, default=None, help="level-0 height (default: width)"
    )
    p.add_argument(
        "--slide-mpp",
        type=positive_float,
        default=0.5,
        help="level-0 microns per pixel written to the file (default 0.5)",
    )
    p.add_argument("--seed", type=seed, default=0)
    add_overwrite_option(p)


def run(args: argparse.Namespace) -> int:
    from ..slide.synthetic import write_synthetic_slide

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise InvalidInputError(f"{out} already exists; pass --overwrite to replace it")
    slide = write_synthetic_slide(
        out,
        width=args.width,
        height=args.height or args.width,
        mpp=args.slide_mpp,
        seed=args.seed,
        progress=not args.quiet,
    )
    print(
        f"wrote synthetic slide {slide.path} ({slide.width} × {slide.height} px, "
        f"{slide.mpp:g} µm/px)"
    )
    return 0
