"""Many slides: one dask task per slide, and the cohort table."""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import (
    InputNotFoundError,
    NoTissueError,
    OutputExistsError,
    OutputLockedError,
    WsiAnomalyError,
)
from ..outputs import atomic_path, check_free_space, os_errors_as_user_errors, validate_output_name
from .discovery import _real_path, find_slides
from .results import cohort_output_names, output_name
from .settings import HeatmapSettings
from .slide_run import process_slide

log = logging.getLogger(__name__)

SUMMARY_FIELDS = (
    "slide",
    "slide_path",
    "status",
    "n_tiles",
    "score_mean",
    "score_max",
    "fraction_anomalous",
    "tiles_per_s",
    "seconds",
    "output",
    "error",
    # which of each tile's values score_mean, score_max and fraction_anomalous are of: the
    # anomaly map's mean or its maximum (the model family's tile score)
    "tile_score",
)


def slides_in_flight(settings: HeatmapSettings) -> int:
    """Slides one process works on at once: two on a GPU — the next slide is planned, decoded
    and tiled on the CPU while the current one is scored, so the GPU does not wait between
    slides — and one on a CPU, where the model already uses every core. With CUDA graphs
    (``compile="reduce-overhead"``) one: their recorded graphs belong to the thread that
    recorded them."""
    if settings.slides_in_flight:
        return settings.slides_in_flight
    from ..runtime import resolve_device

    if settings.compile == "reduce-overhead":
        return 1
    return 2 if resolve_device(settings.device).type == "cuda" else 1


def _row(summary: dict[str, Any]) -> dict[str, Any]:
    speed = summary.get("tiles_per_s") or {}
    return {
        "slide": summary.get("slide", ""),
        "slide_path": summary.get("slide_path", ""),
        "status": summary.get("status", ""),
        "n_tiles": summary.get("n_tiles", ""),
        "score_mean": summary.get("score_mean", ""),
        "score_max": summary.get("score_max", ""),
        "fraction_anomalous": summary.get("fraction_anomalous", ""),
        "tiles_per_s": speed.get("end_to_end", "") if isinstance(speed, dict) else "",
        "seconds": (summary.get("timings_s") or {}).get("total_s", ""),
        "output": summary.get("output", ""),
        "error": summary.get("error", ""),
        "tile_score": summary.get("tile_score", ""),
    }


def _slide_task(
    slide: str,
    out_root: str,
    model: str,
    settings: HeatmapSettings,
    skip_errors: bool,
    name: str | None = None,
) -> dict[str, Any]:
    """One dask task: a slide end to end. With ``skip_errors`` a failure of any kind becomes a
    failed row (with the error) instead of stopping the cohort."""
    name = name or output_name(Path(slide), Path(out_root))
    try:
        summary = process_slide(slide, out_root, model, settings, name=name)
        return _row(summary)
    except Exception as exc:
        if not skip_errors:
            raise
        if isinstance(exc, NoTissueError):
            status = "no tissue"
        elif isinstance(exc, OutputLockedError):
            status = "busy"
        else:
            status = "failed"
        message = (
            str(exc) if isinstance(exc, WsiAnomalyError) else f"{exc.__class__.__name__}: {exc}"
        )
        # Reported once, by the caller, from the returned row (a dask worker's log may be in
        # another process or on another node).
        log.debug("%s: %s: %s", Path(slide).name, status, message, exc_info=True)
        return _row(
            {
                "slide": Path(slide).name,
                "slide_path": str(_real_path(Path(slide))),
                "status": status,
                "error": message,
                "output": str(Path(out_root) / name),
            }
        )


def run_cohort(
    slides: Sequence[str | Path],
    out_root: str | Path,
    model: str | Path,
    settings: HeatmapSettings,
    scheduler: str | None = None,
    workers: int | None = None,
    skip_errors: bool = False,
    cluster: Any | None = None,
    recursive: bool = False,
) -> list[dict[str, Any]]:
    """Heatmaps for many slides, one dask task per slide; writes ``out_root/summary.csv``.

    Rows have ``status`` ok, redrawn (only the display settings differed: drawn again from the
    stored scores), skipped (done), no tissue, failed or busy (another run holds the
    slide's lock). With ``skip_errors`` every slide is attempted and the table is written even
    when some fail. ``recursive`` searches folders in ``slides`` to any depth (never
    ``out_root`` itself).
    """
    import dask
    from dask import delayed

    out_root = Path(out_root)
    validate_output_name(out_root)
    if out_root.exists() and not out_root.is_dir():
        raise OutputExistsError(f"--out {out_root} is a file; results go into a folder")
    paths = [str(p) for p in find_slides(slides, recursive, skip=[out_root])]
    if not Path(model).is_file():
        raise InputNotFoundError(f"model checkpoint not found: {model}")
    with os_errors_as_user_errors(out_root):
        out_root.mkdir(parents=True, exist_ok=True)
    check_free_space(out_root, 64 << 20, "results")
    names = cohort_output_names(paths, out_root)
    rows: list[dict[str, Any]]
    if cluster is not None or scheduler or (workers and workers > 1):
        from dask.distributed import Client, LocalCluster

        own_cluster = None
        if cluster is not None:
            client = Client(cluster)
        elif scheduler:
            client = Client(scheduler)
        else:
            own_cluster = LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
            )
            client = Client(own_cluster)
        try:
            has_gpus = _declares_gpus(cluster) or any(
                "GPU" in (w.get("resources") or {})
                for w in client.scheduler_info()["workers"].values()
            )
            futures = [
                client.submit(
                    _slide_task,
                    p,
                    str(out_root),
                    str(model),
                    _quiet(settings),
                    skip_errors,
                    name,
                    pure=False,
                    resources={"GPU": 1} if has_gpus else None,
                )
                for p, name in zip(paths, names)
            ]
            rows = client.gather(futures)
        finally:
            client.close()
            if own_cluster is not None:
                own_cluster.close()
    else:
        tasks = [
            delayed(_slide_task)(p, str(out_root), str(model), settings, skip_errors, name)
            for p, name in zip(paths, names)
        ]
        in_flight = min(slides_in_flight(settings), len(tasks))
        if in_flight > 1:
            rows = list(dask.compute(*tasks, scheduler="threads", num_workers=in_flight))
        else:
            rows = list(dask.compute(*tasks, scheduler="synchronous"))
    _write_cohort_summary(out_root / "summary.csv", rows)
    return rows


def _declares_gpus(cluster: Any | None) -> bool:
    """Whether a dask-jobqueue cluster's workers will declare GPUs: its jobs may still wait in
    the queue when the slides are submitted, so the connected workers cannot tell yet."""
    options = (getattr(cluster, "new_spec", None) or {}).get("options") or {}
    return any("GPU=" in str(arg) for arg in options.get("worker_extra_args") or [])


def _quiet(settings: HeatmapSettings) -> HeatmapSettings:
    """Progress bars from many worker processes would interleave: turn them off."""
    return replace(settings, progress=False, on_progress=None)


def _write_cohort_summary(path: Path, rows: list[dict[str, Any]]) -> None:
    """Merge this run's rows into the cohort table (one row per results folder, newest wins)."""
    merged: dict[str, dict[str, Any]] = {}
    if path.is_file():
        with path.open(newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                merged[_row_key(row)] = row
    for row in rows:
        if row["status"] == "skipped (done)" and _row_key(row) in merged:
            continue
        merged[_row_key(row)] = row
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(SUMMARY_FIELDS))
        writer.writeheader()
        for key in sorted(merged):
            writer.writerow({k: merged[key].get(k, "") for k in SUMMARY_FIELDS})


def _row_key(row: dict[str, Any]) -> str:
    return Path(row.get("output") or row.get("slide", "")).name or row.get("slide", "")
