"""``wsi-anomaly train --tiles … --out model.pt``: train a model family on tiles."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

from ..errors import InvalidInputError
from ..models.registry import DEFAULT_FAMILY, family_names
from ..words import count
from . import options as opt

if TYPE_CHECKING:
    from ..training import DurationEstimate

log = logging.getLogger("wsi_anomaly")

HELP = "train a model (HaloAE, ATAC-Net or PatchCore) on tiles, or on TRIDENT/CLAM features"
DESCRIPTION = """Train a model on tiles of normal (reference) tissue: tile stores written by
`tile`, or folders of images (png/jpg/tif, searched recursively); or on the tile features
TRIDENT or CLAM extracted from normal slides (--features). Writes one checkpoint with the
model, its training-score calibration and the resolved config."""
EXAMPLES = (
    "wsi-anomaly train --tiles tumour.zarr --out model.pt --config haloae_fast",
    "wsi-anomaly train --features trident/20x_256px_0px_overlap/features_uni_v1/ --out knn.pt",
    "wsi-anomaly train --tiles tumour.zarr --out model.pt --resume --yes  # continue a long run from a batch job",
)


def add_parser(sub, parents: list[argparse.ArgumentParser]) -> None:
    p = opt.add_command(
        sub, parents, "train", HELP, DESCRIPTION, run, EXAMPLES, interrupted=interrupted
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--tiles",
        nargs="+",
        metavar="DIR|ZARR",
        help="training tiles (normal tissue): folders of images and/or tile stores",
    )
    source.add_argument(
        "--features",
        nargs="+",
        metavar="DIR|H5",
        help="instead of tiles, the tile features TRIDENT or CLAM extracted from normal slides "
        "(their .h5 files, or folders of them): fits a memory bank of tile vectors "
        "(family features-knn)",
    )
    p.add_argument("--out", required=True, help="checkpoint to write, e.g. model.pt")
    opt.add_family_option(
        p,
        help=f"model family: {', '.join(family_names())} (a weakly supervised one also takes "
        "a few labelled anomalies: --anomalies; a tile-feature one takes --features); default: the family the --config preset "
        f"names, else {DEFAULT_FAMILY}",
    )
    p.add_argument(
        "--anomalies",
        nargs="+",
        metavar="DIR|ZARR",
        help="ATAC-Net: a few labelled anomalous tiles (folders and/or tile stores)",
    )
    opt.add_config_option(p)
    p.add_argument("--epochs", type=opt.positive_int, help="override <family>.epochs")
    p.add_argument(
        "--samples-per-epoch",
        type=opt.positive_int,
        help="override <family>.samples_per_epoch (families that draw samples per epoch)",
    )
    opt.add_batch_size_option(p, None, "override <family>.batch_size (originals per step)")
    p.add_argument("--lr", type=opt.positive_float, help="override <family>.lr")
    opt.add_loader_workers_option(p)
    p.add_argument(
        "--backbone-weights",
        metavar="imagenet|random|FILE",
        help="VGG19 weights: imagenet (torchvision, default), a local state-dict file, "
        "or random (tests only)",
    )
    opt.add_device_option(p)
    opt.add_seed_option(p)
    p.add_argument(
        "--mpp",
        type=opt.mpp,
        help="µm/px of image-folder tiles (tile stores record their own)",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted training run")
    p.add_argument(
        "--yes",
        action="store_true",
        help="start a run estimated to take over a day on the CPU without asking",
    )
    opt.add_overwrite_option(p, "replace an existing checkpoint")


def _family_defaults(family: str) -> tuple[str, str]:
    """(preset used without --config, config section of the schedule knobs) of a family."""
    entry = opt.model_family(family)
    return entry.default_preset, entry.schedule_section


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..tiles.dataset import open_training_tiles
    from ..training import train_model

    opt.check_output_file(args.out)
    if args.features and args.family is None and not args.config:
        args.family = opt.family_for_inputs("tile features")
    args.family = opt.family_of_run(args)
    preset, schedule = _family_defaults(args.family)
    config = load_config(args.config or preset, opt.config_overrides(args, schedule))
    from ..models.registry import family_names, get_family

    family = get_family(config.model.name)
    if args.features and family.inputs != "tile features":
        raise InvalidInputError(
            f"--features gives tile vectors, and {family.title} is trained on tiles: pass "
            f"--family {opt.family_for_inputs('tile features')} (or leave out --family)"
        )
    if args.tiles and family.inputs != "images":
        raise InvalidInputError(
            f"{family.title} is trained on tile features: pass --features with the TRIDENT or "
            "CLAM .h5 files (or their folder) instead of --tiles"
        )
    if args.features:
        from ..tiles.feature_files import open_training_features

        dataset, tile_mpp = open_training_features(args.features), args.mpp
    else:
        dataset, tile_mpp = open_training_tiles(args.tiles, config.tile_px, args.mpp)
    anomalies = None
    if args.anomalies:
        if not family.weakly_supervised:
            weak = [name for name in family_names() if get_family(name).weakly_supervised]
            raise InvalidInputError(
                f"--anomalies is for a weakly supervised family: add --family {' or '.join(weak)}"
            )
        anomalies, _ = open_training_tiles(args.anomalies, config.tile_px, args.mpp)
    print(
        family.describe_training(
            config, len(dataset), len(anomalies) if anomalies is not None else 0
        )
    )
    result = train_model(
        dataset,
        config,
        args.out,
        device=args.device,
        resume=args.resume,
        overwrite=args.overwrite,
        tile_mpp=tile_mpp,
        source=", ".join(args.tiles or args.features),
        progress=not args.quiet,
        anomalies=anomalies,
        on_estimate=lambda estimate: confirm_duration(estimate, args.yes, family.fast_preset),
    )
    last = result.history[-1] if result.history else {}
    q = result.score_quantiles
    detail = ", ".join(f"{k} {last.get(k, float('nan')):.3f}" for k in family.loss_terms)
    print(
        f"trained {count(result.epochs, 'epoch')} in {result.seconds:.0f} s "
        f"({result.images_per_s:.1f} images/s); final loss {last.get('loss', float('nan')):.4f} "
        f"({detail})"
    )
    print(
        f"training scores: median {q.get('0.5', float('nan')):.4g}, "
        f"99th percentile {q.get('0.99', float('nan')):.4g} → {result.checkpoint}"
    )
    return 0


#: A run estimated to take longer than this on a CPU asks first (or needs --yes).
ASK_ABOVE_S = 24 * 3600


def confirm_duration(estimate: DurationEstimate, yes: bool, fast_preset: str) -> None:
    """Print the estimate; on a CPU, when it is over a day, ask on a terminal (or go on with
    ``--yes``) and refuse in one line anywhere else."""
    print(f"estimated time to the end of training on this machine: {estimate.describe()}")
    sys.stdout.flush()
    if yes or not estimate.on_cpu or estimate.seconds <= ASK_ABOVE_S:
        return
    shorter = f"--config {fast_preset} or fewer --epochs" if fast_preset else "fewer --epochs"
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise InvalidInputError(
            f"training on the CPU is estimated at {estimate.describe()}, over a day; add --yes "
            f"to run it anyway, use a GPU (--device cuda), or shorten it ({shorter})"
        )
    answer = input(f"over a day on the CPU; continue? (or shorten it: {shorter}) [y/N] ")
    if answer.strip().lower() not in ("y", "yes"):
        raise InvalidInputError(
            f"not continued: training on the CPU is estimated at {estimate.describe()}; "
            "no model was written"
        )


def interrupted(args: argparse.Namespace) -> str:
    """After Ctrl-C: whether a resumable checkpoint is there to continue from."""
    from pathlib import Path

    from ..training import describe_resume_point, resume_path

    resume = resume_path(Path(args.out))
    if resume.is_file():
        held = describe_resume_point(Path(args.out))
        reuses = f"; a re-run with --resume reuses {held} and goes on from there" if held else ""
        return (
            f"{args.out} was not written; the last resumable checkpoint, {resume}, is kept: "
            f"add --resume to the same command to continue from it{reuses}"
        )
    return (
        f"{args.out} was not written and no resumable checkpoint had been written yet; "
        "a re-run starts from the first epoch"
    )
