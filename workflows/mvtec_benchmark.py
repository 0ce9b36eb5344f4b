"""The whole MVTec AD benchmark in one command: 15 categories, resumable, one summary table.

    python workflows/mvtec_benchmark.py --root /data/mvtec_anomaly_detection --out mvtec_results \\
        --config haloae_paper --device cuda

Per category (through ``wsi_anomaly.mvtec.run_benchmark``): train on train/good, evaluate on
test, write ``<out>/<category>/`` (model, metrics.json, scores.csv, figures). A category whose
metrics.json exists is skipped, so an interrupted run continues where it stopped; a category
that fails is recorded and the run goes on (``--stop-on-error`` to stop instead). The run ends
with ``<out>/summary.md``: every category beside the paper's Table 1, means (textures, objects,
all) beside the paper's, and the runtime of each category.

Ablations are configurations: pass a YAML file to ``--config`` (e.g. ``train: {loss_weighting:
equal}`` or ``model: {attention: conv}``) and the summary names the paper's matching row.
``--checkpoint-dir`` re-evaluates existing models without training.

ATAC-Net's weakly supervised protocol runs with an ATAC-Net config: every category × seed draws
its labelled anomalies from the test anomalies, trains, and is evaluated on what is left; the
summary is the mean ± std over seeds beside the ATAC-Net paper's Tables 1 and 2:

    python workflows/mvtec_benchmark.py --root /data/mvtec_anomaly_detection --out atac_results \
        --config atacnet --anomalies paper --seeds 3 --device cuda
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from wsi_anomaly import __version__
from wsi_anomaly.config import load_config
from wsi_anomaly.errors import InvalidInputError, WsiAnomalyError
from wsi_anomaly.models.registry import DEFAULT_FAMILY, get_family
from wsi_anomaly.mvtec import CATEGORIES, BenchmarkSettings, find_categories, run_benchmark
from wsi_anomaly.mvtec.weak import WeakProtocol, anomaly_count, run_weak_benchmark
from wsi_anomaly.outputs import write_text


def machine_description(device: str) -> str:
    if device != "cpu" and torch.cuda.is_available():
        accelerator = f"GPU {torch.cuda.get_device_name(0)}"
    else:
        accelerator = "CPU only"
    return (
        f"{platform.node() or 'unknown host'}: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, {accelerator}; torch {torch.__version__}, "
        f"wsi-anomaly {__version__}"
    )


def schedule_description(config) -> str:
    return get_family(config.model.name).describe_schedule(config)


def runtime_table(records: list[dict]) -> str:
    lines = [
        "| category | status | train s | eval s | total s | train img/s | eval img/s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]

    def fmt(value, decimals):
        return "n/a" if value is None else f"{value:.{decimals}f}"

    total = 0.0
    for r in records:
        t = r.get("timing", {})
        total += t.get("total_seconds") or 0.0
        lines.append(
            f"| {r['category']} | {r['status']} | {fmt(t.get('train_seconds'), 0)} | "
            f"{fmt(t.get('eval_seconds'), 0)} | {fmt(t.get('total_seconds'), 0)} | "
            f"{fmt(t.get('train_images_per_s'), 2)} | {fmt(t.get('eval_images_per_s'), 2)} |"
        )
    lines.append(
        f"\nTotal recorded runtime: {total / 3600:.2f} h (categories skipped in this run "
        "keep the runtime of the run that did them)."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--root", required=True, help="the MVTec AD folder (15 category folders)")
    ap.add_argument("--out", default="mvtec_results")
    ap.add_argument(
        "--config",
        default=get_family(DEFAULT_FAMILY).default_preset,
        help="preset name or YAML file (default: the default family's paper preset)",
    )
    ap.add_argument(
        "--categories",
        nargs="+",
        metavar="C",
        help="run only these (default: all 15, which must be present)",
    )
    ap.add_argument("--backbone-weights", help="imagenet (default), a state-dict file, or random")
    ap.add_argument("--epochs", type=int, help="override train.epochs")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--eval-batch-size", type=int, default=32)
    ap.add_argument(
        "--loader-workers", type=int, help="DataLoader worker processes (training and evaluation)"
    )
    ap.add_argument("--checkpoint-dir", help="evaluate existing models instead of training")
    ap.add_argument("--overwrite", action="store_true", help="redo categories that are done")
    ap.add_argument(
        "--stop-on-error",
        action="store_true",
        help="stop at the first failing category instead of recording it",
    )
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    weak = ap.add_argument_group("ATAC-Net's weakly supervised protocol (with an ATAC-Net config)")
    weak.add_argument(
        "--anomalies",
        type=anomaly_count,
        default=10,
        metavar="N|paper",
        help="labelled test anomalies per category (default 10); 'paper': the "
        "ATAC-Net paper's own count per category",
    )
    weak.add_argument("--setting", choices=("general", "hard"), default="general")
    weak.add_argument("--known-type", metavar="TYPE", help="--setting hard: the defect type")
    weak.add_argument("--seeds", type=int, default=3, help="seeds per category (default 3)")
    args = ap.parse_args(argv)

    started = time.time()
    try:
        overrides: dict = {}
        if args.backbone_weights:
            overrides["model"] = {"backbone_weights": args.backbone_weights}
        if args.epochs is not None:  # the schedule of the config's own model family
            schedule = get_family(load_config(args.config).model.name).schedule_section
            overrides[schedule] = {"epochs": args.epochs}
        if args.loader_workers is not None:
            overrides.setdefault("train", {})["workers"] = args.loader_workers
        if args.seed is not None:
            overrides["seed"] = args.seed
        config = load_config(args.config, overrides)
        categories = args.categories or list(CATEGORIES)
        if args.categories is None:
            missing = [c for c in CATEGORIES if c not in find_categories(args.root)]
            if missing:
                raise InvalidInputError(
                    f"{args.root} lacks {len(missing)} of the 15 MVTec AD "
                    f"categories ({', '.join(missing)}); pass --categories "
                    "to run a subset"
                )
        settings = BenchmarkSettings(
            device=args.device,
            eval_batch_size=args.eval_batch_size,
            workers=config.train.workers,
            overwrite=args.overwrite,
            skip_errors=not args.stop_on_error,
            progress=not args.quiet,
            checkpoint_dir=Path(args.checkpoint_dir) if args.checkpoint_dir else None,
        )

        def report(record: dict) -> None:
            seconds = record.get("timing", {}).get("total_seconds")
            took = f" ({seconds:.0f} s)" if seconds is not None else ""
            print(f"{record['category']}: {record['status']}{took}", flush=True)

        if get_family(config.model.name).weakly_supervised:
            protocol = WeakProtocol(
                n=args.anomalies,
                setting=args.setting,
                known_type=args.known_type,
                n_seeds=args.seeds,
                first_seed=config.seed,
            )
            runs: list[dict] = []

            def report_run(record: dict) -> None:
                runs.append({**record, "category": f"{record['category']} seed {record['seed']}"})
                report(runs[-1])

            result = run_weak_benchmark(
                args.root, categories, config, args.out, settings, protocol, on_run=report_run
            )
            timed = runs
        else:
            result = run_benchmark(
                args.root, categories, config, args.out, settings, on_category=report
            )
            timed = result.records
    except WsiAnomalyError as exc:
        print(f"mvtec_benchmark: error: {exc}", file=sys.stderr)
        return 2

    summary = Path(args.out) / "summary.md"
    write_text(
        summary,
        f"# MVTec AD benchmark: {config.model.name}, config {args.config}\n\n"
        f"Machine: {machine_description(args.device)}.  \n"
        f"Backbone {config.model.backbone_weights}; {schedule_description(config)}, seed "
        f"{config.seed}; finished {time.strftime('%Y-%m-%d %H:%M', time.localtime())} after "
        f"{(time.time() - started) / 60:.1f} min in this run.\n\n"
        f"{result.markdown}\n## Runtime per category\n\n{runtime_table(timed)}\n",
    )
    print()
    print(summary.read_text())
    failed = [r for r in result.records if r["status"].startswith("error")]
    print(
        f"{len(result.records) - len(failed)} of {len(result.records)} categories done; "
        f"summary {summary}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
