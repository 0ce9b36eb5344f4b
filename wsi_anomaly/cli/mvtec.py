"""``wsi-anomaly mvtec --root DIR``: the MVTec AD benchmark, per category."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InvalidInputError
from ..models.registry import DEFAULT_FAMILY, family_names
from ..words import count
from . import options as opt

HELP = "MVTec AD benchmark, per category"
DESCRIPTION = """Per MVTec AD category: train on train/good (or load a model with
--checkpoint-dir), score the test images and report image AUROC (mean and max scores), pixel
AUROC (at the masks' resolution, and at 128×128 as the paper's code did) and AUPRO@0.3 beside the
HaloAE paper's Table 1. Writes OUT/<category>/ (model.pt, metrics.json, scores.csv, figures/) and
OUT/results.csv, OUT/results.md; categories with a metrics.json are skipped unless --overwrite."""
EXAMPLES = (
    "wsi-anomaly mvtec --root /data/mvtec_anomaly_detection --category hazelnut --out mvtec_results",
)


def add_parser(sub, parents: list[argparse.ArgumentParser]) -> None:
    p = opt.add_command(
        sub, parents, "mvtec", HELP, DESCRIPTION, run, EXAMPLES, interrupted=interrupted
    )
    p.add_argument(
        "--root",
        required=True,
        help="MVTec AD folder (<root>/<category>/train/good, test/<type>, "
        "ground_truth/<type>), or a single category folder",
    )
    p.add_argument(
        "--category",
        nargs="+",
        default=["all"],
        metavar="C",
        help="categories to run, or all (default: every category found)",
    )
    opt.add_family_option(
        p,
        help=f"model family: {', '.join(family_names())} (a weakly supervised one runs the "
        f"weakly supervised protocol; default {DEFAULT_FAMILY})",
    )
    opt.add_config_option(p)
    opt.add_out_folder_option(p, "mvtec_results")
    p.add_argument(
        "--backbone-weights",
        metavar="imagenet|random|FILE",
        help="backbone weights (VGG19 for HaloAE, ResNet-50 for ATAC-Net): imagenet "
        "(default), a local state-dict file, or random (tests only)",
    )
    p.add_argument(
        "--epochs",
        type=opt.positive_int,
        help="override <family>.epochs (the family's own section)",
    )
    p.add_argument(
        "--anomalies",
        type=anomaly_count,
        metavar="N|paper",
        help="ATAC-Net: labelled anomalies drawn (with the seed) from each category's "
        "test anomalies and removed from its test set (default 10); 'paper' "
        "draws the ATAC-Net paper's own count per category (its Table 1: 1–8)",
    )
    p.add_argument(
        "--setting",
        choices=("general", "hard"),
        help="ATAC-Net: general (anomalies of all defect types; default) or hard (one "
        "--known-type only; all its anomalies leave the test set)",
    )
    p.add_argument(
        "--known-type",
        metavar="TYPE",
        help="ATAC-Net, --setting hard: the defect type the labelled anomalies come from",
    )
    opt.add_count_option(
        p,
        "--seeds",
        "ATAC-Net: repeat with seeds seed … seed+N-1, report mean ± std",
        shown="default 3",
    )
    opt.add_seed_option(p)
    opt.add_device_option(p)
    p.add_argument(
        "--checkpoint-dir",
        metavar="DIR",
        help="evaluate existing models (DIR/<category>/model.pt or DIR/<category>.pt) "
        "instead of training",
    )
    opt.add_count_option(p, "--eval-batch-size", "test images per model call", 16)
    opt.add_loader_workers_option(p, what="DataLoader worker processes (training and evaluation)")
    opt.add_count_option(
        p, "--figures", "qualitative figures per category", 4, type=opt.non_negative_int
    )
    opt.add_overwrite_option(p, "redo categories that are done (retrain and re-evaluate)")


def anomaly_count(text: str) -> int | str:
    """argparse type of ``--anomalies``: a number of labelled anomalies, or ``paper``."""
    from ..mvtec.weak import anomaly_count as parse

    try:
        return parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _family_defaults(family: str) -> tuple[bool, str, str]:
    """(weakly supervised protocol?, preset used without --config, config section of the
    schedule knobs) of a family."""
    entry = opt.model_family(family, inputs="images")
    return entry.weakly_supervised, entry.default_preset, entry.schedule_section


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..mvtec.benchmark import BenchmarkSettings, run_benchmark

    opt.check_output_folder(args.out)
    args.family = opt.family_of_run(args)
    weak, preset, schedule = _family_defaults(args.family)
    if not weak:
        for flag, value in (
            ("--anomalies", args.anomalies),
            ("--setting", args.setting),
            ("--known-type", args.known_type),
            ("--seeds", args.seeds),
        ):
            if value is not None:
                raise InvalidInputError(
                    f"{flag} is for the weakly supervised protocol of a "
                    "family trained with labelled anomalies, such as "
                    + " or ".join(f"--family {n}" for n in _weak_families())
                )
    config = load_config(args.config or preset, opt.config_overrides(args, schedule))
    settings = BenchmarkSettings(
        device=args.device,
        eval_batch_size=args.eval_batch_size,
        workers=config.train.workers,
        n_figures=args.figures,
        overwrite=args.overwrite,
        progress=not args.quiet,
        checkpoint_dir=Path(args.checkpoint_dir) if args.checkpoint_dir else None,
    )

    def report(record: dict) -> None:
        if "metrics" not in record:
            print(f"{record['category']}: {record['status']}")
            return
        m = record["metrics"]
        image = ", ".join(f"{name} {_percent(v)}" for name, v in m["image_auroc"].items())
        print(
            f"{record['category']}: {record['status']}; image AUROC % {image}; pixel AUROC % "
            f"{_percent(m['pixel_auroc'])} (128² paper protocol {_percent(m['pixel_auroc_128_paper'])}); "
            f"AUPRO@{m['aupro_fpr_limit']:g} % {_percent(m['aupro'])}; "
            f"eval {record['timing']['eval_images_per_s']:.1f} images/s"
        )

    if weak:
        from ..mvtec.weak import WeakProtocol, run_weak_benchmark

        protocol = WeakProtocol(
            n=10 if args.anomalies is None else args.anomalies,
            setting=args.setting or "general",
            known_type=args.known_type,
            n_seeds=3 if args.seeds is None else args.seeds,
            first_seed=config.seed,
        )

        def report_run(record: dict) -> None:
            if "metrics" not in record:
                print(f"{record['category']} seed {record['seed']}: {record['status']}")
                return
            auroc = next(iter(record["metrics"]["image_auroc"].values()))
            print(
                f"{record['category']} seed {record['seed']}: {record['status']}; "
                f"image AUROC {'n/a' if auroc is None else f'{auroc:.3f}'} "
                f"({record['n_test']} test images, {record['n_labelled_anomalies']} labelled "
                "anomalies in training)"
            )

        result = run_weak_benchmark(
            args.root, args.category, config, args.out, settings, protocol, on_run=report_run
        )
    else:
        result = run_benchmark(
            args.root, args.category, config, args.out, settings, on_category=report
        )
    print()
    print(result.markdown, end="")
    print(f"\ntables: {result.table_csv}, {result.table_md}")
    return 0


def _weak_families() -> list[str]:
    from ..models.registry import family_names, get_family

    return [name for name in family_names() if get_family(name).weakly_supervised]


def interrupted(args: argparse.Namespace) -> str:
    """After Ctrl-C: the categories that are finished, and that a re-run skips them."""
    from pathlib import Path

    from ..mvtec.benchmark import METRICS_NAME

    done = sorted({p.parent.name for p in Path(args.out).glob(f"**/{METRICS_NAME}")})
    return (
        f"{count(len(done), 'finished category', 'finished categories')} in {args.out} "
        "(those with a metrics.json); running the same command again skips them and redoes "
        "the others from the start"
    )
