"""A synthetic cohort scored in-process and through SLURM: wall time, tiles/s, the scores agree.

Needs a running SLURM controller with an idle node (``sudo bash .ci/install_slurm.sh`` starts a
single-node one on Debian) and the ``cluster`` extra. A HaloAE checkpoint with random weights is
built and calibrated on a few tiles (the speed of scoring does not depend on the weights); the
same cohort is then run by ``run_cohort`` in this process and on ``--jobs`` SLURM jobs of
``--cores`` cores each, and the two runs' tile scores are compared.

    python benchmarks/bench_slurm.py --slides 3 --size 1024 --jobs 2
    python benchmarks/bench_slurm.py --slides 8 --size 4096 --jobs 4 --partition gpu --cores 8
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--slides", type=int, default=3, help="synthetic slides in the cohort")
    ap.add_argument("--size", type=int, default=1024, help="synthetic slide side, px (0.5 µm/px)")
    ap.add_argument("--jobs", type=int, default=2, help="SLURM jobs (one worker each)")
    ap.add_argument("--cores", type=int, default=1, help="cores per SLURM job")
    ap.add_argument("--memory", default="3GB", help="memory per SLURM job")
    ap.add_argument("--partition", default="debug")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workdir", default="/tmp/wsi-anomaly-bench-slurm")
    args = ap.parse_args()
    from wsi_anomaly.cluster import slurm_node_ready

    if not slurm_node_ready():
        sys.exit(
            "error: no SLURM node is idle (sinfo); start one, e.g. sudo bash .ci/install_slurm.sh"
        )

    from wsi_anomaly.cluster import SlurmOptions, make_slurm_cluster
    from wsi_anomaly.config import load_config
    from wsi_anomaly.pipeline import HeatmapSettings, run_cohort
    from wsi_anomaly.slide.synthetic import write_synthetic_slide
    from wsi_anomaly.tiles import TileStore, TilingSettings, tile_slide
    from wsi_anomaly.tiles.dataset import ZarrTileDataset
    from wsi_anomaly.training import train_model

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    cohort = work / "cohort"
    cohort.mkdir(parents=True)
    names = [f"slide{i:02d}.tif" for i in range(args.slides)]
    for seed, name in enumerate(names, start=11):
        write_synthetic_slide(cohort / name, width=args.size, height=args.size, mpp=0.5, seed=seed)
    model = work / "model.pt"
    calib = work / "calibration.zarr"
    tile_slide(cohort / names[0], calib, TilingSettings(target_mpp=0.5), progress=False)
    config = load_config(
        "haloae_fast",
        {
            "model": {"backbone_weights": "random"},
            "haloae": {"epochs": 1, "samples_per_epoch": 1, "batch_size": 1},
            "train": {"calibration_tiles": 8, "workers": 0},
        },
    )
    train_model(ZarrTileDataset(calib), config, model, device="cpu", tile_mpp=0.5, progress=False)
    settings = HeatmapSettings(device="cpu", batch_size=args.batch_size, progress=False)

    def scores(out: Path) -> dict[str, np.ndarray]:
        return {n: np.asarray(TileStore(out / n / "tiles.zarr").scores) for n in names}

    t0 = time.perf_counter()
    rows = run_cohort([cohort], work / "in-process", model, settings)
    local_s = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if any(r["status"] != "ok" for r in rows):
        sys.exit(f"error: the in-process run failed: {[r.get('error') for r in rows]}")
    n_tiles = sum(int(r["n_tiles"]) for r in rows)

    options = SlurmOptions(
        partition=args.partition,
        cores=args.cores,
        memory=args.memory,
        walltime="00:30:00",
        jobs=args.jobs,
        python=sys.executable,
        log_directory=str(work / "slurm-logs"),
        local_directory=str(work / "worker-space"),
    )
    cluster = make_slurm_cluster(options)
    t0 = time.perf_counter()
    try:
        rows = run_cohort([cohort], work / "slurm", model, settings, cluster=cluster)
    finally:
        slurm_s = time.perf_counter() - t0
        cluster.close()
    if any(r["status"] != "ok" for r in rows):
        sys.exit(f"error: the SLURM run failed: {[r.get('error') for r in rows]}")
    local, remote = scores(work / "in-process"), scores(work / "slurm")
    worst = max(float(np.max(np.abs(local[n] - remote[n]), initial=0.0)) for n in names)

    machine = f"{platform.machine()}, {os.cpu_count()} cores, CPU"
    print(
        f"\ncohort of {args.slides} synthetic {args.size}² slides ({n_tiles} tissue tiles at "
        f"0.5 µm/px), HaloAE fast preset with random weights, batch {args.batch_size}, "
        f"{machine}\n"
    )
    print("| run | wall (s) | tiles/s | peak RSS of this process (MB) |")
    print("|---|---|---|---|")
    print(f"| in-process | {local_s:.1f} | {n_tiles / local_s:.1f} | {peak_mb:.0f} |")
    print(
        f"| SLURM, {args.jobs} jobs × {args.cores} core(s) | {slurm_s:.1f} | "
        f"{n_tiles / slurm_s:.1f} | (workers in their jobs) |"
    )
    print(f"\nlargest difference between the two runs' tile scores: {worst:.2g}")


if __name__ == "__main__":
    main()
