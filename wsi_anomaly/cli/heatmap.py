"""``wsi-anomaly heatmap SLIDE… --model model.pt --out results/``: score slides, draw heatmaps."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import EXIT_SLIDES_FAILED
from ..words import count
from . import options as opt

HELP = "score slides and draw heatmaps"
DESCRIPTION = f"""Tile each slide at the model's resolution, score every tissue tile, and write
heatmap.png, overlay.png, thumbnail.png, heatmap.ome.zarr, tiles.geojson, top_tiles.png and
summary.json to OUT/<slide name>/, plus OUT/summary.csv. Exit status {EXIT_SLIDES_FAILED} when
--skip-errors recorded failed slides."""
EXAMPLES = (
    "wsi-anomaly heatmap slide.svs --model model.pt --out results/",
    "wsi-anomaly heatmap /data/cohort/ --model model.pt --out results/ --skip-errors",
    "wsi-anomaly heatmap /data/cohort/ --features trident/20x_256px_0px_overlap/ "
    "--model knn.pt --out results/",
)


def add_parser(sub, parents: list[argparse.ArgumentParser]) -> None:
    p = opt.add_command(
        sub, parents, "heatmap", HELP, DESCRIPTION, run, EXAMPLES, interrupted=interrupted
    )
    opt.add_slides_arguments(p)
    opt.add_model_option(p)
    opt.add_out_folder_option(p, "results")
    p.add_argument(
        "--mpp",
        type=opt.mpp,
        help="tile resolution, µm/px (default: the model's training resolution)",
    )
    p.add_argument(
        "--features",
        nargs="+",
        metavar="DIR|H5",
        help="score the tile features TRIDENT or CLAM already extracted instead of tiling the "
        "slides: folders in their layouts (features_<encoder>/, h5_files/) or .h5 files named "
        "after the slides; needs a model trained with `train --features`",
    )
    p.add_argument(
        "--patch-size-level0",
        type=opt.positive_int,
        metavar="PX",
        help="with --features: the tile side in level-0 pixels, for files that do not record "
        "it (CLAM's)",
    )
    opt.add_min_tissue_option(p, "score")
    opt.add_scoring_options(p, "tiles per model batch")
    opt.add_device_option(p)
    opt.add_precision_option(p)
    opt.add_runtime_option(p)
    p.add_argument(
        "--keep-maps",
        action="store_true",
        help="also store each tile's 64×64 anomaly map in the tile store",
    )
    p.add_argument(
        "--coords-h5",
        action="store_true",
        help="also write each slide's tile coordinates for TRIDENT, CLAM and wsinfer under "
        "OUT/coords/ (trident/patches/<slide>_patches.h5, clam/patches/<slide>.h5, "
        "wsinfer/patches/<slide>.h5; needs h5py: pip install 'wsi-anomaly[export]')",
    )
    opt.add_count_option(p, "--top-k", "tiles in top_tiles.png", 16, metavar="TOP_K")
    p.add_argument(
        "--cmap",
        type=opt.colormap,
        default="coolwarm",
        help="matplotlib colour map (coolwarm as in the paper; viridis, inferno…)",
    )
    p.add_argument(
        "--scale",
        choices=["fixed", "slide"],
        default="fixed",
        help="colour scale: fixed = the model's calibration, the median (blue) and 99th "
        "percentile (white) of normal tiles held out of training (of the training tiles when "
        "too few were given), the same on every slide; slide = this slide's own median and 99th "
        "percentile, for slides that come out all red (default fixed; the Anomalous class "
        "in tiles.csv and tiles.geojson keeps the model's threshold)",
    )
    p.add_argument(
        "--alpha",
        type=opt.fraction,
        default=0.5,
        help="opacity of the heat colours in overlay.png, 0 to 1 (default 0.5)",
    )
    p.add_argument(
        "--qc",
        choices=["flag", "exclude", "off"],
        default="flag",
        help="tissue quality control of every tile (blur, pen, folds, bubbles, exposure, "
        "tissue border): flag = score every tile and mark the flagged ones in every output "
        "(default); exclude = do not score flagged tiles (they count in neither "
        "fraction_anomalous nor the top tiles); off = no QC",
    )
    opt.add_qc_config_option(p)
    opt.add_count_option(
        p,
        "--workers",
        "dask worker processes: a local cluster of N processes, one slide per task",
        shown="default: slides one after another in this process",
    )
    p.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="use an existing dask.distributed scheduler (e.g. tcp://host:8786); GPU "
        "workers should be started with --resources GPU=1",
    )
    opt.add_read_threads_option(p, "slide-decoding threads per slide", workers_moved=False)
    p.add_argument(
        "--skip-errors",
        action="store_true",
        help="record a failing slide in summary.csv and go on (exit status "
        f"{EXIT_SLIDES_FAILED} if any failed)",
    )
    opt.add_overwrite_option(p, "redo slides that are already done")
    opt.add_slide_mpp_options(p)
    _add_slurm_options(p)


#: The options of the SLURM jobs: flag, the SlurmOptions field it sets, metavar, further
#: add_argument settings, help. (--slurm-jobs, N or MIN:MAX, sets jobs or minimum_jobs and
#: maximum_jobs: parse_jobs.)
_SLURM_OPTIONS: tuple[tuple[str, str, str, dict[str, Any], str], ...] = (
    (
        "--slurm-partition",
        "partition",
        "NAME",
        {},
        "partition (queue) for the worker jobs (default: the site's default)",
    ),
    (
        "--slurm-cores",
        "cores",
        "N",
        {"type": opt.positive_int, "default": 4},
        "CPU cores per job (default 4)",
    ),
    (
        "--slurm-memory",
        "memory",
        "SIZE",
        {"default": "16GB"},
        "memory per job, e.g. 16GB (default 16GB)",
    ),
    (
        "--slurm-walltime",
        "walltime",
        "TIME",
        {"default": "04:00:00"},
        "time limit per job, HH:MM:SS or D-HH:MM:SS (default 04:00:00)",
    ),
    (
        "--slurm-gpus",
        "gpus",
        "N",
        {"type": int, "default": 0},
        "GPUs per job (--gres=gpu:N); one worker process per GPU (default 0)",
    ),
    (
        "--slurm-processes",
        "processes",
        "N",
        {"type": opt.positive_int},
        "worker processes per job, one slide each at a time (default 1, or one per GPU)",
    ),
    (
        "--slurm-jobs",
        "jobs",
        "N|MIN:MAX",
        {"default": "1"},
        "N jobs for the whole run, or MIN:MAX to follow the work (jobs are "
        "submitted while slides wait and cancelled when idle; default 1)",
    ),
    (
        "--slurm-extra",
        "extra_directives",
        "DIRECTIVE",
        {"action": "append", "default": []},
        "another #SBATCH option, e.g. --slurm-extra=--account=lab (repeatable)",
    ),
    (
        "--slurm-prologue",
        "prologue",
        "LINE",
        {"action": "append", "default": []},
        "a shell line run in the job before the workers, e.g. 'module load cuda' (repeatable)",
    ),
    (
        "--slurm-log-dir",
        "log_directory",
        "DIR",
        {},
        "folder for the jobs' output files (default: the current folder)",
    ),
    (
        "--slurm-local-dir",
        "local_directory",
        "DIR",
        {},
        "node-local scratch folder for the workers, e.g. /tmp or $TMPDIR",
    ),
    (
        "--slurm-python",
        "python",
        "PATH",
        {},
        "Python on the compute nodes (default: this one, which must be visible there)",
    ),
    (
        "--slurm-interface",
        "interface",
        "NAME",
        {},
        "network interface the nodes reach each other on, e.g. ib0",
    ),
)


def _add_slurm_options(p: argparse.ArgumentParser) -> None:
    slurm = p.add_argument_group(
        "SLURM",
        "--cluster slurm runs the slides as dask workers in SLURM jobs "
        "(pip install 'wsi-anomaly[cluster]'); OUT must be on a filesystem the compute "
        "nodes share",
    )
    slurm.add_argument(
        "--cluster", choices=["slurm"], help="start workers on this cluster scheduler"
    )
    for flag, _, metavar, settings, help in _SLURM_OPTIONS:
        slurm.add_argument(flag, metavar=metavar, help=help, **settings)


def _slurm_cluster(args: argparse.Namespace):
    """The SLURM workers the --slurm-* options describe (dask-jobqueue)."""
    import logging

    from ..cluster import SlurmOptions, make_slurm_cluster, parse_jobs
    from ..errors import InvalidInputError

    if args.workers or args.scheduler:
        raise InvalidInputError(
            "--cluster slurm starts its own workers; drop --workers and --scheduler"
        )
    fields = {
        field: getattr(args, flag[2:].replace("-", "_")) for flag, field, *_ in _SLURM_OPTIONS
    }
    fields.update(parse_jobs(fields.pop("jobs")))
    options = SlurmOptions(**fields)
    import distributed  # noqa: F401  (sets up its loggers on import; quiet them unless -v)

    if not getattr(args, "verbose", False):
        logging.getLogger("distributed").setLevel(logging.WARNING)
    return make_slurm_cluster(options)


def _failed(rows: list[dict]) -> list[dict]:
    """Slides that produced no heatmap: failures, and a lone slide without tissue."""
    bad = {"failed", "busy"} | ({"no tissue"} if len(rows) == 1 else set())
    return [r for r in rows if r["status"] in bad]


def _write_coords(rows: list[dict], folder: Path) -> None:
    """Coordinate files for the slides done, from the tile store in each result folder."""
    from ..tiles import TileStore
    from ..tiles.export import write_coords_files

    for row in rows:
        store = Path(row["output"]) / "tiles.zarr"
        if store.is_dir():
            for line in write_coords_files(TileStore(store), folder).lines():
                print(f"{row['slide']}: {line}")


def run(args: argparse.Namespace) -> int:
    from ..pipeline import HeatmapSettings, run_cohort

    out = opt.check_output_folder(args.out)
    if args.coords_h5:
        from ..tiles.export import require_h5py

        require_h5py()  # before any slide work
    if args.mpp_csv:
        from ..slide.resolution import load_mpp_csv

        load_mpp_csv(args.mpp_csv)  # a bad file stops the run before any slide work
    if args.scheduler:
        from ..cluster import check_scheduler

        check_scheduler(args.scheduler)
    from ..slide.qc import load_qc_settings

    features = None
    if args.features:
        from ..features_run import FeatureSources

        features = FeatureSources(tuple(args.features), args.patch_size_level0)
    elif args.patch_size_level0 is not None:
        from ..errors import InvalidInputError

        raise InvalidInputError("--patch-size-level0 goes with --features")

    settings = HeatmapSettings(
        qc=args.qc,
        qc_settings=load_qc_settings(args.qc_config),
        target_mpp=args.mpp,
        min_tissue=args.min_tissue,
        keep_maps=args.keep_maps,
        top_k=args.top_k,
        cmap=args.cmap,
        scale=args.scale,
        alpha=args.alpha,
        slide_mpp=args.slide_mpp,
        mpp_csv=args.mpp_csv,
        overwrite=args.overwrite,
        progress=not args.quiet,
        read_workers=args.read_threads or 0,
        features=features,
        **opt.scoring_settings(args),
    )
    cluster = _slurm_cluster(args) if args.cluster == "slurm" else None
    try:
        rows = run_cohort(
            args.slides,
            out,
            args.model,
            settings,
            scheduler=args.scheduler,
            workers=args.workers,
            skip_errors=args.skip_errors,
            cluster=cluster,
            recursive=args.recursive,
        )
    finally:
        if cluster is not None:
            cluster.close()  # cancels the worker jobs
    for row in rows:
        if row["status"] in ("ok", "redrawn", "skipped (done)"):
            of_what = " of map maxima" if row.get("tile_score") == "max" else ""
            print(
                f"{row['slide']}: {row['status']}, {count(int(row['n_tiles']), 'tile')}, "
                f"{float(row['fraction_anomalous'] or 0):.1%} above the training 99th "
                f"percentile{of_what} → {row['output']}"
            )
        else:  # the one report of a failed slide
            print(f"{row['slide']}: {row['status']}: {row['error']}", file=sys.stderr)
    done = [r for r in rows if r["status"] in ("ok", "redrawn", "skipped (done)")]
    if args.coords_h5:
        _write_coords(done, Path(out) / "coords")
    summary = Path(out) / "summary.csv"
    print(f"{len(done)} of {len(rows)} slides done; cohort table {summary}")
    failed = _failed(rows)
    if failed:
        print(f"{len(failed)} of {len(rows)} slides failed (see {summary})", file=sys.stderr)
        return EXIT_SLIDES_FAILED
    return 0


def interrupted(args: argparse.Namespace) -> str:
    """After Ctrl-C: which slides are finished, which were in progress, what a re-run reuses."""
    out = Path(args.out)
    folders = [p for p in out.iterdir() if p.is_dir()] if out.is_dir() else []
    done = [p for p in folders if not p.name.startswith(".") and (p / "summary.json").is_file()]
    partial = sorted(p.name for p in folders if p.name.endswith(".partial"))
    said = [f"{count(len(done), 'finished slide')} in {out}"]
    if partial:
        shown = ", ".join(partial[:3]) + (
            f" and {len(partial) - 3} more" if len(partial) > 3 else ""
        )
        said.append(f"unfinished work kept in {out}: {shown}")
    return (
        "; ".join(said)
        + ". Running the same command again skips the finished slides and reuses a slide's "
        "tiles when all of them had been cut; its scores are computed again"
    )
