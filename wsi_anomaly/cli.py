"""The ``wsi-anomaly`` command line: argument parsing only; the work is done by the package.

Every user error (a :class:`~wsi_anomaly.errors.WsiAnomalyError`) becomes one line on stderr and
a non-zero exit code; tracebacks are kept for bugs (and shown for everything with ``--debug``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from . import __version__
from .errors import InvalidInputError, WsiAnomalyError

log = logging.getLogger("wsi_anomaly")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be positive")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} must be between 0 and 1")
    return value


def _add_slide_mpp_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--slide-mpp", type=_positive_float, metavar="MPP",
                   help="level-0 microns per pixel of the slide, overriding its metadata "
                        "(needed when the slide has none)")
    p.add_argument("--mpp-csv", metavar="CSV",
                   help="cohort overrides: a CSV with columns slide,mpp (slide = file name, "
                        "stem or path)")


def _slide_override(args: argparse.Namespace, slide: str) -> float | None:
    if args.slide_mpp is not None:
        return args.slide_mpp
    if args.mpp_csv:
        from .slide.resolution import load_mpp_csv, lookup_mpp

        return lookup_mpp(load_mpp_csv(args.mpp_csv), slide)
    return None


# -- info --------------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    from .slide import Slide

    with Slide(args.slide, override_mpp=_slide_override(args, args.slide)) as slide:
        w, h = slide.dimensions
        info = {
            "path": str(slide.path),
            "format": slide.format,
            "reader": slide.backend,
            "dimensions": [w, h],
            "mpp": round(slide.mpp, 6),
            "mpp_x": round(slide.resolution.mpp_x, 6),
            "mpp_y": round(slide.resolution.mpp_y, 6),
            "mpp_source": slide.resolution.source,
            "objective_power": slide.objective_power,
            "levels": [
                {"level": lv.index, "width": lv.width, "height": lv.height,
                 "downsample": round(lv.downsample, 4), "mpp": round(lv.mpp, 4)}
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
    print(f"  resolution      {info['mpp']:.4f} µm/px (source: {info['mpp_source']})")
    print(f"  objective       {power}")
    print(f"  levels          {len(info['levels'])}")
    for lv in info["levels"]:
        print(f"    {lv['level']:>2}  {lv['width']:>7} × {lv['height']:<7}  "
              f"downsample {lv['downsample']:<8g}  {lv['mpp']:.4f} µm/px")
    print(f"  associated      {', '.join(info['associated_images']) or 'none'}")
    return 0


# -- tile --------------------------------------------------------------------------------------
def _tiling_settings(args: argparse.Namespace):
    from .slide.tissue import TissueSettings
    from .tiles import TilingSettings

    return TilingSettings(
        target_mpp=args.mpp, tile_px=args.tile_px, stride_px=args.stride,
        min_tissue=args.min_tissue, tissue=TissueSettings(),
        annotations=args.annotations, annotation_class=args.annotation_class,
        workers=args.workers)


def cmd_tile(args: argparse.Namespace) -> int:
    from .tiles import tile_slide

    result = tile_slide(args.slide, args.out, _tiling_settings(args),
                        slide_mpp=_slide_override(args, args.slide), overwrite=args.overwrite,
                        export_png=args.export_png, progress=not args.quiet)
    plan = result.plan
    print(f"{Path(args.slide).name}: kept {result.n_tiles} of {result.n_grid} tiles "
          f"(mean tissue fraction {result.tissue_fraction:.2f}) at {plan['actual_mpp']:.3f} mpp "
          f"(requested {plan['target_mpp']:g}, level {plan['level']}) in {result.seconds:.1f} s, "
          f"{result.tiles_per_s:.0f} tiles/s → {result.store}")
    if args.export_png:
        print(f"tiles also written as PNG files to {args.export_png}")
    return 0


# -- train -------------------------------------------------------------------------------------
def _training_data(paths: list[str], tile_px: int, mpp: float | None):
    """A dataset over tile stores and/or image folders, and the tiles' mpp."""
    from torch.utils.data import ConcatDataset

    from .tiles.dataset import ZarrTileDataset, open_tiles

    parts = [open_tiles(p, tile_px) for p in paths]
    store_mpps = [d.mpp for d in parts if isinstance(d, ZarrTileDataset)]
    if store_mpps and max(store_mpps) > 1.05 * min(store_mpps):
        raise InvalidInputError(f"tile stores at different resolutions ({', '.join(f'{m:.3f}' for m in store_mpps)} "
                                "µm/px); train on tiles of one resolution")
    tile_mpp = mpp if mpp is not None else (store_mpps[0] if store_mpps else None)
    if tile_mpp is None:
        log.warning("tile resolution unknown: pass --mpp so heatmaps tile slides at the training "
                    "resolution (assuming nothing for now)")
    dataset = parts[0] if len(parts) == 1 else ConcatDataset(parts)
    return dataset, tile_mpp


def _default_config(args: argparse.Namespace) -> str:
    """The preset of the chosen model family when --config is not given."""
    if getattr(args, "config", None):
        return args.config
    return "atacnet" if getattr(args, "model", "haloae") == "atacnet" else "haloae_paper"


def _config_overrides(args: argparse.Namespace) -> dict:
    """Command-line values into the config: schedule knobs go to the chosen model's section."""
    model, train, atacnet = {}, {}, {}
    if getattr(args, "model", None):
        model["name"] = args.model
    if getattr(args, "backbone_weights", None):
        model["backbone_weights"] = args.backbone_weights
    schedule = atacnet if getattr(args, "model", None) == "atacnet" else train
    for name in ("epochs", "batch_size", "lr"):
        value = getattr(args, name, None)
        if value is not None:
            schedule[name] = value
    if getattr(args, "samples_per_epoch", None) is not None:
        train["samples_per_epoch"] = args.samples_per_epoch
    if getattr(args, "workers", None) is not None:
        train["workers"] = args.workers
    out: dict = {}
    for key, section in (("model", model), ("train", train), ("atacnet", atacnet)):
        if section:
            out[key] = section
    if getattr(args, "seed", None) is not None:
        out["seed"] = args.seed
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train import train_model

    config = load_config(_default_config(args), _config_overrides(args))
    dataset, tile_mpp = _training_data(args.tiles, config.tile_px, args.mpp)
    anomalies = None
    if args.anomalies:
        if config.model.name != "atacnet":
            raise InvalidInputError("--anomalies is for ATAC-Net: add --model atacnet")
        anomalies, _ = _training_data(args.anomalies, config.tile_px, args.mpp)
    if config.model.name == "atacnet":
        a = config.atacnet
        print(f"training atacnet ({a.variant}) on {len(dataset)} normal tiles and "
              f"{len(anomalies) if anomalies is not None else 0} labelled anomalies "
              f"({a.epochs} epochs × {a.steps_per_epoch} steps, batch {a.batch_size}, "
              f"backbone {config.model.backbone_weights})")
    else:
        print(f"training {config.model.name} on {len(dataset)} tiles "
              f"({config.train.epochs} epochs × {config.train.samples_per_epoch} samples, "
              f"batch {config.train.batch_size}, backbone {config.model.backbone_weights})")
    result = train_model(dataset, config, args.out, device=args.device, resume=args.resume,
                         overwrite=args.overwrite, tile_mpp=tile_mpp,
                         source=", ".join(args.tiles), progress=not args.quiet,
                         anomalies=anomalies)
    last = result.history[-1] if result.history else {}
    q = result.score_quantiles
    terms = ("cls", "fm", "im") if config.model.name == "haloae" else ("score_normal",
                                                                       "score_anomalous")
    detail = ", ".join(f"{k} {last.get(k, float('nan')):.3f}" for k in terms)
    print(f"trained {result.epochs} epochs in {result.seconds:.0f} s "
          f"({result.images_per_s:.1f} images/s); final loss {last.get('loss', float('nan')):.4f} "
          f"({detail})")
    print(f"training scores: median {q.get('0.5', float('nan')):.4g}, "
          f"99th percentile {q.get('0.99', float('nan')):.4g} → {result.checkpoint}")
    return 0


# -- score -------------------------------------------------------------------------------------
def cmd_score(args: argparse.Namespace) -> int:
    from .score import score_images

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise InvalidInputError(f"{out} already exists; pass --overwrite to replace it")
    summary = score_images(args.model, args.paths, out, maps_dir=args.maps, device=args.device,
                           batch_size=args.batch_size, workers=args.workers,
                           progress=not args.quiet)
    skipped = summary["skipped"]
    extra = ""
    if skipped["unreadable"] or skipped["too_small"]:
        extra = (f" (skipped {skipped['unreadable']} unreadable, {skipped['too_small']} too small)")
    print(f"scored {summary['scored']} images{extra} → {summary['csv']}"
          + (f"; maps in {summary['maps']}" if summary["maps"] else ""))
    return 0


# -- mvtec -------------------------------------------------------------------------------------
def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def anomaly_count(text: str) -> int | str:
    """argparse type of ``--anomalies`` (``mvtec`` and the MVTec workflow): a number of labelled
    anomalies, or ``paper``."""
    from .mvtec.weak import PAPER_COUNTS

    if text == PAPER_COUNTS:
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or '{PAPER_COUNTS}', got {text!r}")


def cmd_mvtec(args: argparse.Namespace) -> int:
    from .config import load_config
    from .mvtec.adapters import check_model_name
    from .mvtec.benchmark import BenchmarkSettings, run_benchmark

    check_model_name(args.model)
    weak = args.model == "atacnet"
    if not weak:
        for flag, value in (("--anomalies", args.anomalies), ("--setting", args.setting),
                            ("--known-type", args.known_type), ("--seeds", args.seeds)):
            if value is not None:
                raise InvalidInputError(f"{flag} is for the weakly supervised protocol of "
                                        "ATAC-Net: add --model atacnet")
    if args.eval_batch_size < 1:
        raise InvalidInputError("--eval-batch-size must be at least 1")
    if args.figures < 0:
        raise InvalidInputError("--figures must be 0 or more")
    overrides = _config_overrides(args)
    overrides.setdefault("model", {})["name"] = args.model
    config = load_config(_default_config(args), overrides)
    settings = BenchmarkSettings(
        device=args.device, eval_batch_size=args.eval_batch_size, workers=config.train.workers,
        n_figures=args.figures, overwrite=args.overwrite, progress=not args.quiet,
        checkpoint_dir=Path(args.checkpoint_dir) if args.checkpoint_dir else None)

    def report(record: dict) -> None:
        if "metrics" not in record:
            print(f"{record['category']}: {record['status']}")
            return
        m = record["metrics"]
        image = ", ".join(f"{name} {_percent(v)}" for name, v in m["image_auroc"].items())
        print(f"{record['category']}: {record['status']}; image AUROC % {image}; pixel AUROC % "
              f"{_percent(m['pixel_auroc'])} (128² paper protocol {_percent(m['pixel_auroc_128_paper'])}); "
              f"AUPRO@{m['aupro_fpr_limit']:g} % {_percent(m['aupro'])}; "
              f"eval {record['timing']['eval_images_per_s']:.1f} images/s")

    if weak:
        from .mvtec.weak import WeakProtocol, run_weak_benchmark

        protocol = WeakProtocol(
            n=10 if args.anomalies is None else args.anomalies,
            setting=args.setting or "general", known_type=args.known_type,
            n_seeds=3 if args.seeds is None else args.seeds, first_seed=config.seed)

        def report_run(record: dict) -> None:
            if "metrics" not in record:
                print(f"{record['category']} seed {record['seed']}: {record['status']}")
                return
            auroc = next(iter(record["metrics"]["image_auroc"].values()))
            print(f"{record['category']} seed {record['seed']}: {record['status']}; "
                  f"image AUROC {'n/a' if auroc is None else f'{auroc:.3f}'} "
                  f"({record['n_test']} test images, {record['n_labelled_anomalies']} labelled "
                  "anomalies in training)")

        result = run_weak_benchmark(args.root, args.category, config, args.out, settings,
                                    protocol, on_run=report_run)
    else:
        result = run_benchmark(args.root, args.category, config, args.out, settings,
                               on_category=report)
    print()
    print(result.markdown, end="")
    print(f"\ntables: {result.table_csv}, {result.table_md}")
    return 0


# -- synth -------------------------------------------------------------------------------------
def cmd_synth(args: argparse.Namespace) -> int:
    from .slide.synthetic import write_synthetic_slide

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise InvalidInputError(f"{out} already exists; pass --overwrite to replace it")
    slide = write_synthetic_slide(out, width=args.width, height=args.height or args.width,
                                  mpp=args.slide_mpp, seed=args.seed, progress=not args.quiet)
    print(f"wrote synthetic slide {slide.path} ({slide.width} × {slide.height} px, "
          f"{slide.mpp:g} µm/px)")
    return 0


# -- heatmap -----------------------------------------------------------------------------------
def cmd_heatmap(args: argparse.Namespace) -> int:
    from .pipeline import HeatmapSettings, run_cohort

    settings = HeatmapSettings(
        target_mpp=args.mpp, min_tissue=args.min_tissue, batch_size=args.batch_size,
        device=args.device, keep_maps=args.keep_maps, top_k=args.top_k, cmap=args.cmap,
        slide_mpp=args.slide_mpp, mpp_csv=args.mpp_csv, overwrite=args.overwrite,
        progress=not args.quiet, read_workers=args.read_threads)
    rows = run_cohort(args.slides, args.out, args.model, settings, scheduler=args.scheduler,
                      workers=args.workers, skip_errors=args.skip_errors)
    for row in rows:
        if row["status"] in ("ok", "skipped (done)"):
            print(f"{row['slide']}: {row['status']}, {row['n_tiles']} tiles, "
                  f"{float(row['fraction_anomalous'] or 0):.1%} above the training 99th "
                  f"percentile → {row['output']}")
        else:
            print(f"{row['slide']}: {row['status']}: {row['error']}")
    failed = [r for r in rows if r["status"] not in ("ok", "skipped (done)")]
    print(f"{len(rows) - len(failed)} of {len(rows)} slides done; cohort table "
          f"{Path(args.out) / 'summary.csv'}")
    return 1 if failed and len(failed) == len(rows) else 0


# -- demo --------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(args.out, size_px=args.size, seed=args.seed,
                      backbone_weights=args.backbone_weights, device=args.device,
                      progress=not args.quiet)
    outputs = result.summary["outputs"]
    print(f"\nAUROC of tile scores, tumour (like the training tiles) vs the rest of the tissue: "
          f"{result.auroc:.3f} over {result.n_tiles} tiles")
    print("pictures:")
    for name in ("heatmap", "overlay", "thumbnail", "top_tiles"):
        print(f"  {result.results / Path(outputs[name]).name}")
    print(f"for viewers: {result.results / Path(outputs['ngff']).name} (NGFF: napari…), "
          f"{result.results / Path(outputs['geojson']).name} (QuPath)")
    return 0


# -- parser ------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: the problem and where to look, not the whole usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="wsi-anomaly",
        description="Find anomalous tissue in whole-slide images: tile slides, train HaloAE on "
                    "normal tissue, score every tile and draw slide heatmaps.")
    parser.add_argument("--version", action="version", version=f"wsi-anomaly {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    common.add_argument("--debug", action="store_true", help="show tracebacks for every error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", parents=[common], help="describe a slide: format, levels, mpp",
                       description="Print a slide's format, dimensions, pyramid levels with "
                                   "downsample and mpp, where the mpp came from, objective power "
                                   "and associated images.")
    p.add_argument("slide", help="slide file (SVS, NDPI, MRXS, SCN, DICOM, TIFF, OME-TIFF…)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_slide_mpp_options(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("tile", parents=[common], help="cut a slide's tissue into tiles (zarr)",
                       description="Stream the tissue tiles of a slide into a zarr v3 store at a "
                                   "chosen resolution. Tiles with less tissue than --min-tissue "
                                   "are dropped.")
    p.add_argument("slide", help="slide file")
    p.add_argument("--out", required=True, help="output tile store, e.g. tiles.zarr")
    p.add_argument("--mpp", type=_positive_float, default=0.5,
                   help="target microns per pixel of the tiles (default 0.5 ≈ 20x)")
    p.add_argument("--tile-px", type=int, default=256, help="tile side in pixels (default 256)")
    p.add_argument("--stride", type=int, default=None, metavar="PX",
                   help="step between tiles in pixels at the target mpp (default: tile size, "
                        "no overlap; smaller overlaps)")
    p.add_argument("--min-tissue", type=_fraction, default=0.5,
                   help="keep tiles with at least this tissue fraction (default 0.5)")
    p.add_argument("--annotations", metavar="GEOJSON",
                   help="keep only tiles inside these polygons (QuPath GeoJSON, level-0 px)")
    p.add_argument("--annotation-class", metavar="NAME",
                   help="use only annotations of this QuPath class (e.g. Tumor)")
    p.add_argument("--export-png", metavar="DIR",
                   help="also write the tiles as PNG files (the input form of train --tiles)")
    p.add_argument("--workers", type=int, default=0, help="decoding threads (default: CPU cores)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    _add_slide_mpp_options(p)
    p.set_defaults(func=cmd_tile)

    p = sub.add_parser("train", parents=[common], help="train HaloAE (or ATAC-Net) on tiles",
                       description="Train a model on tiles of normal (reference) tissue: tile "
                                   "stores written by `tile`, or folders of images (png/jpg/tif, "
                                   "searched recursively). Writes one checkpoint with the model, "
                                   "its training-score calibration and the resolved config.")
    p.add_argument("--tiles", nargs="+", required=True, metavar="DIR|ZARR",
                   help="training tiles (normal tissue): folders of images and/or tile stores")
    p.add_argument("--out", required=True, help="checkpoint to write, e.g. model.pt")
    p.add_argument("--model", choices=("haloae", "atacnet"), default="haloae",
                   help="haloae (normal tiles only, default) or atacnet (normal tiles plus a few "
                        "labelled anomalies: --anomalies)")
    p.add_argument("--anomalies", nargs="+", metavar="DIR|ZARR",
                   help="ATAC-Net: a few labelled anomalous tiles (folders and/or tile stores)")
    p.add_argument("--config",
                   help="preset name (haloae_paper, haloae_fast, atacnet, atacnet_fast) or YAML "
                        "file (default: haloae_paper, or atacnet with --model atacnet)")
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--samples-per-epoch", type=int, help="override train.samples_per_epoch")
    p.add_argument("--batch-size", type=int, help="override train.batch_size (originals per step)")
    p.add_argument("--lr", type=_positive_float, help="override train.lr")
    p.add_argument("--workers", type=int, help="data-loading processes")
    p.add_argument("--backbone-weights", metavar="imagenet|random|FILE",
                   help="VGG19 weights: imagenet (torchvision, default), a local state-dict file, "
                        "or random (tests only)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    p.add_argument("--seed", type=int, help="seed for everything (default from the config: 0)")
    p.add_argument("--mpp", type=_positive_float,
                   help="µm/px of image-folder tiles (tile stores record their own)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted training run")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("score", parents=[common], help="score images or folders of tiles",
                       description="Score image files with a trained model: a CSV of per-image "
                                   "mean and max anomaly scores, and optionally anomaly-map PNGs.")
    p.add_argument("paths", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--model", required=True, help="checkpoint written by `train`")
    p.add_argument("--out", default="scores.csv", help="CSV to write (default scores.csv)")
    p.add_argument("--maps", metavar="DIR", help="also write anomaly-map PNGs here")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=0, help="data-loading processes")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("mvtec", parents=[common], help="MVTec AD benchmark, per category",
                       description="Per MVTec AD category: train on train/good (or load a model "
                                   "with --checkpoint-dir), score the test images and report "
                                   "image AUROC (mean and max scores), pixel AUROC (at the masks' "
                                   "resolution, and at 128×128 as the paper's code did) and "
                                   "AUPRO@0.3 beside the HaloAE paper's Table 1. Writes "
                                   "OUT/<category>/ (model.pt, metrics.json, scores.csv, "
                                   "figures/) and OUT/results.csv, OUT/results.md; categories "
                                   "with a metrics.json are skipped unless --overwrite.")
    p.add_argument("--root", required=True,
                   help="MVTec AD folder (<root>/<category>/train/good, test/<type>, "
                        "ground_truth/<type>), or a single category folder")
    p.add_argument("--category", nargs="+", default=["all"], metavar="C",
                   help="categories to run, or all (default: every category found)")
    p.add_argument("--model", default="haloae",
                   help="model family: haloae, or atacnet (weakly supervised protocol)")
    p.add_argument("--config", default=None,
                   help="preset name (haloae_paper, haloae_fast, atacnet, atacnet_fast) or YAML "
                        "file (default: haloae_paper, or atacnet with --model atacnet)")
    p.add_argument("--out", default="mvtec_results", help="output folder (default mvtec_results/)")
    p.add_argument("--backbone-weights", metavar="imagenet|random|FILE",
                   help="backbone weights (VGG19 for HaloAE, ResNet-50 for ATAC-Net): imagenet "
                        "(default), a local state-dict file, or random (tests only)")
    p.add_argument("--epochs", type=int, help="override train.epochs (atacnet.epochs for atacnet)")
    p.add_argument("--anomalies", type=anomaly_count, metavar="N|paper",
                   help="ATAC-Net: labelled anomalies drawn (with the seed) from each category's "
                        "test anomalies and removed from its test set (default 10); 'paper' "
                        "draws the ATAC-Net paper's own count per category (its Table 1: 1–8)")
    p.add_argument("--setting", choices=("general", "hard"),
                   help="ATAC-Net: general (anomalies of all defect types; default) or hard (one "
                        "--known-type only; all its anomalies leave the test set)")
    p.add_argument("--known-type", metavar="TYPE", help="ATAC-Net, --setting hard: the defect "
                   "type the labelled anomalies come from")
    p.add_argument("--seeds", type=int, metavar="N",
                   help="ATAC-Net: repeat with seeds seed … seed+N-1, report mean ± std "
                        "(default 3)")
    p.add_argument("--seed", type=int, help="seed for everything (default from the config: 0)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    p.add_argument("--checkpoint-dir", metavar="DIR",
                   help="evaluate existing models (DIR/<category>/model.pt or DIR/<category>.pt) "
                        "instead of training")
    p.add_argument("--eval-batch-size", type=int, default=16,
                   help="test images per model call (default 16)")
    p.add_argument("--workers", type=int, help="data-loading processes (training and evaluation)")
    p.add_argument("--figures", type=int, default=4, metavar="N",
                   help="qualitative figures per category (default 4)")
    p.add_argument("--overwrite", action="store_true",
                   help="redo categories that are done (retrain and re-evaluate)")
    p.set_defaults(func=cmd_mvtec)

    p = sub.add_parser("synth", parents=[common], help="write a synthetic slide",
                       description="Write a pyramidal JPEG TIFF with stroma and tumour-like "
                                   "textures, for trying the pipeline and for benchmarks.")
    p.add_argument("out", help="output .tif path")
    p.add_argument("--width", type=int, default=8192, help="level-0 width in px (default 8192)")
    p.add_argument("--height", type=int, default=None, help="level-0 height (default: width)")
    p.add_argument("--slide-mpp", type=_positive_float, default=0.5,
                   help="level-0 microns per pixel written to the file (default 0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("heatmap", parents=[common], help="score slides and draw heatmaps",
                       description="Tile each slide at the model's resolution, score every tissue "
                                   "tile, and write heatmap.png, overlay.png, thumbnail.png, "
                                   "heatmap.ome.zarr, tiles.geojson, top_tiles.png and "
                                   "summary.json to OUT/<slide name>/, plus OUT/summary.csv.")
    p.add_argument("slides", nargs="+", help="slide files, folders of slides, or glob patterns")
    p.add_argument("--model", required=True, help="checkpoint written by `train`")
    p.add_argument("--out", default="results", help="output folder (default results/)")
    p.add_argument("--mpp", type=_positive_float,
                   help="tile resolution, µm/px (default: the model's training resolution)")
    p.add_argument("--min-tissue", type=_fraction, default=0.5,
                   help="score tiles with at least this tissue fraction (default 0.5)")
    p.add_argument("--batch-size", type=int, default=32, help="tiles per model batch (default 32)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    p.add_argument("--keep-maps", action="store_true",
                   help="also store each tile's 64×64 anomaly map in the tile store")
    p.add_argument("--top-k", type=int, default=16, help="tiles in top_tiles.png (default 16)")
    p.add_argument("--cmap", default="coolwarm",
                   help="matplotlib colour map (coolwarm as in the paper; viridis, inferno…)")
    p.add_argument("--workers", type=int, default=None,
                   help="start a local dask cluster of N processes, one slide per task")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="use an existing dask.distributed scheduler (e.g. tcp://host:8786); GPU "
                        "workers should be started with --resources GPU=1")
    p.add_argument("--read-threads", type=int, default=0,
                   help="tile-decoding threads per slide (default: CPU cores)")
    p.add_argument("--skip-errors", action="store_true",
                   help="record a failing slide in summary.csv and go on")
    p.add_argument("--overwrite", action="store_true", help="redo slides that are already done")
    _add_slide_mpp_options(p)
    p.set_defaults(func=cmd_heatmap)

    p = sub.add_parser("demo", parents=[common], help="the whole pipeline on a synthetic slide",
                       description="Write a synthetic slide with known tumour and stroma, train "
                                   "HaloAE on its tumour tiles (fast preset), draw the heatmap "
                                   "of the whole slide and report how well tile scores separate "
                                   "tumour from the rest (AUROC).")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out/)")
    p.add_argument("--size", type=int, default=8192, help="synthetic slide side in px (default 8192)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backbone-weights", default="random",
                   help="VGG19 weights for the demo: random (default: works offline), imagenet "
                        "or a state-dict file")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.set_defaults(func=cmd_demo)
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if getattr(args, "verbose", False) else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s", stream=sys.stderr)
    logging.getLogger("wsi_anomaly").setLevel(
        logging.DEBUG if getattr(args, "verbose", False) else logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _setup_logging(args)
    try:
        return int(args.func(args) or 0)
    except WsiAnomalyError as exc:
        if args.debug:
            raise
        print(f"wsi-anomaly {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"wsi-anomaly {args.command}: interrupted; partial outputs were not kept",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
