"""``wsi-anomaly tile SLIDE --out tiles.zarr``: a slide's tissue tiles into a zarr store."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InvalidInputError
from . import options as opt

HELP = "cut a slide's tissue into tiles (zarr)"
DESCRIPTION = """Stream the tissue tiles of a slide into a zarr v3 store at a chosen resolution.
Tiles with less tissue than --min-tissue are dropped."""
EXAMPLES = (
    "wsi-anomaly tile slide.svs --out slide.zarr --mpp 0.5",
    "wsi-anomaly tile slide.svs --out tumour.zarr --annotations regions.geojson --annotation-class Tumor",
)


def add_parser(sub, parents: list[argparse.ArgumentParser]) -> None:
    p = opt.add_command(sub, parents, "tile", HELP, DESCRIPTION, run, EXAMPLES)
    p.add_argument("slide", help="slide file")
    p.add_argument("--out", required=True, help="output tile store, e.g. tiles.zarr")
    p.add_argument(
        "--mpp",
        type=opt.mpp,
        default=0.5,
        help="target microns per pixel of the tiles (default 0.5 ≈ 20x)",
    )
    opt.add_count_option(p, "--tile-px", "tile side in pixels", 256, metavar="TILE_PX")
    p.add_argument(
        "--stride",
        type=opt.positive_int,
        default=None,
        metavar="PX",
        help="step between tiles in pixels at the target mpp (default: tile size, "
        "no overlap; smaller overlaps)",
    )
    opt.add_min_tissue_option(p, "keep")
    p.add_argument(
        "--annotations",
        metavar="GEOJSON",
        help="keep only tiles inside these polygons (QuPath GeoJSON, level-0 px)",
    )
    p.add_argument(
        "--annotation-class",
        metavar="NAME",
        help="use only annotations of this QuPath class (e.g. Tumor)",
    )
    p.add_argument(
        "--export-png",
        metavar="DIR",
        help="also write the tiles as PNG files (the input form of train --tiles)",
    )
    p.add_argument(
        "--coords-h5",
        metavar="DIR",
        help="also write the tile coordinates for TRIDENT, CLAM and wsinfer, each where and "
        "as that tool reads them: DIR/trident/patches/<slide>_patches.h5, "
        "DIR/clam/patches/<slide>.h5, DIR/wsinfer/patches/<slide>.h5 "
        "(needs h5py: pip install 'wsi-anomaly[export]')",
    )
    opt.add_qc_config_option(p)
    opt.add_read_threads_option(p, "slide-decoding threads")
    opt.add_overwrite_option(p)
    opt.add_slide_mpp_options(p)


def _tiling_settings(args: argparse.Namespace):
    from ..slide.qc import load_qc_settings
    from ..slide.tissue import TissueSettings
    from ..tiles import TilingSettings

    return TilingSettings(
        target_mpp=args.mpp,
        tile_px=args.tile_px,
        stride_px=args.stride,
        min_tissue=args.min_tissue,
        tissue=TissueSettings(),
        annotations=args.annotations,
        annotation_class=args.annotation_class,
        workers=args.read_threads or 0,
        qc=load_qc_settings(args.qc_config),
    )


def run(args: argparse.Namespace) -> int:
    from ..tiles import tile_slide

    if args.coords_h5:
        from ..tiles.export import COORD_TOOLS, coords_path

        opt.check_output_folder(args.coords_h5, "--coords-h5")
        stem = Path(args.slide).stem
        for tool in COORD_TOOLS:
            if coords_path(args.coords_h5, tool, stem).exists() and not args.overwrite:
                raise InvalidInputError(
                    f"{coords_path(args.coords_h5, tool, stem)} already exists; pass "
                    "--overwrite to replace it"
                )

    result = tile_slide(
        args.slide,
        args.out,
        _tiling_settings(args),
        slide_mpp=opt.slide_override(args, args.slide),
        overwrite=args.overwrite,
        export_png=args.export_png,
        progress=not args.quiet,
    )
    plan = result.plan
    print(
        f"{Path(args.slide).name}: kept {result.n_tiles} of {result.n_grid} tiles "
        f"(mean tissue fraction {result.tissue_fraction:.2f}) at {plan['actual_mpp']:.3f} mpp "
        f"(requested {plan['target_mpp']:g}, level {plan['level']}) in {result.seconds:.1f} s, "
        f"{result.tiles_per_s:.0f} tiles/s → {result.store}"
    )
    if args.export_png:
        print(f"tiles also written as PNG files to {args.export_png}")
    if args.coords_h5:
        from ..tiles import TileStore
        from ..tiles.export import write_coords_files

        for line in write_coords_files(TileStore(result.store), args.coords_h5).lines():
            print(line)
    return 0
