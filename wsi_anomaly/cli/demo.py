"""``wsi-anomaly demo``: the whole pipeline on a synthetic slide with a known answer."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..models.registry import DEFAULT_FAMILY
from ..words import count
from .options import (
    add_command,
    add_device_option,
    add_out_folder_option,
    check_output_folder,
    positive_int,
    seed,
)

HELP = "the whole pipeline on a synthetic slide"
DESCRIPTION = """Write a synthetic slide with known tumour and stroma, train HaloAE on its
tumour tiles (fast preset), draw the heatmap of the whole slide and report how well tile scores
separate tumour from the rest (AUROC)."""
EXAMPLES = ("wsi-anomaly demo --out demo_out/",)


def add_parser(sub, parents: list[argparse.ArgumentParser]) -> None:
    p = add_command(sub, parents, "demo", HELP, DESCRIPTION, run, EXAMPLES)
    add_out_folder_option(p, "demo_out")
    p.add_argument(
        "--size", type=positive_int, default=8192, help="synthetic slide side in px (default 8192)"
    )
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument(
        "--backbone-weights",
        default="random",
        help="VGG19 weights for the demo: random (default: works offline), imagenet "
        "or a state-dict file",
    )
    add_device_option(p)
    p.add_argument(
        "--family",
        default=DEFAULT_FAMILY,
        metavar="FAMILY",
        help="model family trained on the tumour tiles with its fast preset (default "
        f"{DEFAULT_FAMILY}; any family trained on normal tiles only)",
    )


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    check_output_folder(args.out)
    result = run_demo(
        args.out,
        size_px=args.size,
        seed=args.seed,
        backbone_weights=args.backbone_weights,
        device=args.device,
        progress=not args.quiet,
        family=args.family,
    )
    outputs = result.summary["outputs"]
    print(
        f"\nAUROC of tile scores, tumour (like the training tiles) vs the rest of the tissue: "
        f"{result.auroc:.3f} over {count(result.n_tiles, 'tile')}"
    )
    print("pictures:")
    for name in ("heatmap", "overlay", "thumbnail", "top_tiles"):
        print(f"  {result.results / Path(outputs[name]).name}")
    print(
        f"for viewers: {result.results / Path(outputs['ngff']).name} (NGFF: napari…), "
        f"{result.results / Path(outputs['geojson']).name} (QuPath)"
    )
    print(f"look at it in the browser: wsi-anomaly view {result.results.parent}")
    return 0
