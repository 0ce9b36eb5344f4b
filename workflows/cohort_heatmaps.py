"""Heatmaps for a whole cohort on a dask cluster: one task per slide.

Three ways to get workers, all ending in ``wsi_anomaly.pipeline.run_cohort``:

* ``--local N`` — a local cluster of N worker processes on this machine (tested);
* ``--scheduler tcp://host:8786`` — an existing dask.distributed cluster. Start GPU workers with
  ``dask worker tcp://host:8786 --nthreads 1 --resources GPU=1`` so that each holds one slide at
  a time on its GPU;
* ``--slurm N`` — N one-GPU SLURM jobs through dask-jobqueue (``pip install
  'wsi-anomaly[cluster]'``), built by ``wsi_anomaly.cluster.make_slurm_cluster``; for every
  SLURM option use ``wsi-anomaly heatmap --cluster slurm`` (see the README)::

      python workflows/cohort_heatmaps.py /data/cohort/ --model model.pt --out results/ \\
          --slurm 8 --partition gpu --walltime 04:00:00

Finished slides are skipped on re-run, failures are recorded in ``results/summary.csv`` and the
cohort goes on; the exit status is then 5 (``wsi_anomaly.errors.EXIT_SLIDES_FAILED``), as for
``wsi-anomaly heatmap --skip-errors``.
"""

from __future__ import annotations

import argparse
import sys

from wsi_anomaly.cluster import SlurmOptions, check_scheduler, make_slurm_cluster
from wsi_anomaly.errors import EXIT_SLIDES_FAILED, WsiAnomalyError
from wsi_anomaly.pipeline import HeatmapSettings, run_cohort


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("slides", nargs="+", help="slide files, folders or globs")
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", default="results")
    where = ap.add_mutually_exclusive_group()
    where.add_argument(
        "--local", type=positive_int, metavar="N", help="local cluster of N processes"
    )
    where.add_argument("--scheduler", metavar="ADDRESS", help="existing dask scheduler")
    where.add_argument(
        "--slurm", type=positive_int, metavar="JOBS", help="SLURM jobs via dask-jobqueue"
    )
    ap.add_argument("--partition", default="gpu")
    ap.add_argument("--walltime", default="04:00:00")
    ap.add_argument(
        "--batch-size",
        type=lambda text: "auto" if text == "auto" else positive_int(text),
        default="auto",
        help="tiles per model batch, or auto (default: the largest that fits on the GPU)",
    )
    ap.add_argument(
        "--read-threads",
        type=positive_int,
        metavar="N",
        help="slide-decoding threads per slide (default: one per CPU core available)",
    )
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)

    settings = HeatmapSettings(
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        read_workers=args.read_threads or 0,
        progress=False,
    )
    cluster = None
    scheduler = args.scheduler
    try:
        if scheduler:
            check_scheduler(scheduler)
        if args.slurm:
            cluster = make_slurm_cluster(
                SlurmOptions(
                    partition=args.partition,
                    walltime=args.walltime,
                    gpus=1,
                    cores=8,
                    memory="64GB",
                    jobs=args.slurm,
                )
            )
        rows = run_cohort(
            args.slides,
            args.out,
            args.model,
            settings,
            scheduler=scheduler,
            workers=args.local,
            skip_errors=True,
            cluster=cluster,
        )
    except WsiAnomalyError as exc:
        print(f"cohort_heatmaps: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if cluster is not None:
            cluster.close()
    done = [r for r in rows if r["status"] in ("ok", "skipped (done)")]
    for row in rows:
        if row not in done:
            print(f"{row['slide']}: {row['status']}: {row['error']}", file=sys.stderr)
    print(f"{len(done)} of {len(rows)} slides done; see {args.out}/summary.csv")
    return EXIT_SLIDES_FAILED if len(done) < len(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
