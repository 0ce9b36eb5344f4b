"""Slides in, pictures out: tile → score → stitch, per slide and across a cohort.

Inside one slide, tiles are decoded by a pool of threads a few shards ahead of the model, the
model sees fixed-size batches, and each decoded shard is compressed and written to the slide's
tile store in the background — so the pipeline runs at the pace of its slowest stage. Per-tile
scores are written to the same store as they are computed.

Across slides there is one dask task per slide (never per tile): in-process by default, on a
local cluster with ``workers``, or on an existing dask.distributed cluster with ``scheduler``
(tasks ask for ``resources={"GPU": 1}`` when the cluster's workers declare GPUs).

Each slide's outputs are built in ``results/.<slide>.partial/`` and renamed to
``results/<slide>/`` when complete; a finished slide (its ``summary.json`` present) is skipped
on re-run unless ``overwrite``.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .errors import InputNotFoundError, InvalidInputError, NoTissueError, WsiAnomalyError
from .score import Scorer
from .slide import Slide
from .slide.resolution import load_mpp_csv, lookup_mpp
from .stitch import SlideGeometry, colour_scale, write_slide_outputs
from .tiles.store import TileStore, TileStoreWriter, commit_output, write_score_arrays
from .tiles.tiler import TilingSettings, iter_tile_batches, plan_tiles, store_attributes

log = logging.getLogger(__name__)

SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".tif", ".tiff", ".scn", ".vms", ".vmu", ".bif",
                  ".svslide", ".dcm")
SUMMARY_FIELDS = ("slide", "status", "n_tiles", "score_mean", "score_max", "fraction_anomalous",
                  "tiles_per_s", "seconds", "output", "error")


@dataclass
class HeatmapSettings:
    """Per-slide options. ``target_mpp`` None → the model's training mpp."""

    target_mpp: float | None = None
    min_tissue: float = 0.5
    stride_px: int | None = None
    batch_size: int = 32
    device: str = "auto"
    precision: str = "auto"
    read_workers: int = 0
    keep_maps: bool = False
    top_k: int = 16
    max_px: int = 2048
    cmap: str = "coolwarm"
    slide_mpp: float | None = None
    mpp_csv: str | None = None
    overwrite: bool = False
    progress: bool = True


def find_slides(inputs: Sequence[str | Path]) -> list[Path]:
    """Slides from files, folders (not recursive) and glob patterns, in a stable order."""
    found: list[Path] = []
    for item in map(str, inputs):
        if any(ch in item for ch in "*?[") and not Path(item).exists():
            matches = sorted(glob.glob(item))
            if not matches:
                raise InputNotFoundError(f"no slide matches {item!r}")
            found.extend(Path(m) for m in matches if Path(m).is_file())
        elif Path(item).is_dir():
            found.extend(sorted(p for p in Path(item).iterdir()
                                if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES))
        else:
            found.append(Path(item))  # a missing file is reported per slide, like any error
    seen: set[Path] = set()
    unique = [p for p in found if not (p.resolve() in seen or seen.add(p.resolve()))]
    if not unique:
        raise InvalidInputError(f"no slides found in {', '.join(map(str, inputs))} "
                                f"(looked for {', '.join(SLIDE_SUFFIXES)})")
    return unique


def slide_output_dir(out_root: Path, slide: Path) -> Path:
    return out_root / slide.name


_SCORERS: dict[tuple[str, str, str, int], Scorer] = {}


def _scorer(model: str | Path, settings: HeatmapSettings) -> Scorer:
    """One loaded model per process (dask workers reuse it across their slides)."""
    key = (str(Path(model).resolve()), settings.device, settings.precision, settings.batch_size)
    if key not in _SCORERS:
        _SCORERS[key] = Scorer(model, device=settings.device, precision=settings.precision,
                               batch_size=settings.batch_size)
    return _SCORERS[key]


def _store_matches(store_path: Path, fingerprint: str, plan: dict, min_tissue: float) -> bool:
    """A complete tile store of the same slide, grid and tissue threshold can be reused."""
    try:
        attrs = TileStore(store_path).attrs
    except WsiAnomalyError:
        return False
    keys = ("level", "read_px", "read_stride_px", "tile_px")
    return (attrs.get("slide_fingerprint") == fingerprint
            and all(attrs.get(k) == plan[k] for k in keys)
            and attrs.get("settings", {}).get("min_tissue") == min_tissue)


def process_slide(slide_path: str | Path, out_root: str | Path, model: str | Path,
                  settings: HeatmapSettings) -> dict[str, Any]:
    """Tile, score and stitch one slide into ``out_root/<slide name>/``; returns its summary."""
    slide_path, out_root = Path(slide_path), Path(out_root)
    final = slide_output_dir(out_root, slide_path)
    if (final / "summary.json").is_file() and not settings.overwrite:
        summary = json.loads((final / "summary.json").read_text())
        summary["status"] = "skipped (done)"
        return summary
    work = out_root / f".{slide_path.name}.partial"
    t_start = time.perf_counter()
    scorer = _scorer(model, settings)
    target_mpp = settings.target_mpp or scorer.tile_mpp
    if target_mpp is None:
        raise InvalidInputError(f"{model} does not record its tiles' resolution; pass --mpp "
                                "(µm/px the model was trained at)")
    override = settings.slide_mpp
    if override is None and settings.mpp_csv:
        override = lookup_mpp(load_mpp_csv(settings.mpp_csv), slide_path)

    with Slide(slide_path, override_mpp=override) as slide:
        tiling = TilingSettings(target_mpp=target_mpp, tile_px=scorer.tile_px,
                                stride_px=settings.stride_px, min_tissue=settings.min_tissue,
                                workers=settings.read_workers)
        t0 = time.perf_counter()
        grid, kept, tissue = plan_tiles(slide, tiling)
        plan = grid.plan
        if len(kept) == 0:
            raise NoTissueError(f"{slide.name}: no tissue — 0 of {len(grid)} tiles have ≥ "
                                f"{settings.min_tissue:.0%} tissue at {plan.actual_mpp:.3f} mpp")
        fingerprint = slide.fingerprint()
        # A tile store from an interrupted or earlier run of this slide can be reused.
        reusable = next((p for p in (work / "tiles.zarr", final / "tiles.zarr")
                         if _store_matches(p, fingerprint, plan.to_dict(), settings.min_tissue)),
                        None)
        if reusable is not None and reusable.parent != work:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            shutil.copytree(reusable, work / "tiles.zarr")
            reusable = work / "tiles.zarr"
        elif reusable is None:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
        plan_seconds = time.perf_counter() - t0

        # read_s: decoding threads' busy time; read_wait_s: time the model waited for tiles.
        timing = {"plan_s": plan_seconds, "read_s": 0.0, "read_wait_s": 0.0, "model_s": 0.0,
                  "write_s": 0.0}
        if reusable is not None:
            log.info("%s: reusing tile store %s", slide.name, reusable)
            n_scored = _score_store(reusable, scorer, settings, timing, slide.name)
        else:
            attrs = store_attributes(slide_path, slide, grid, tiling, tissue)
            n_scored = _tile_and_score(slide, kept, work / "tiles.zarr", attrs, scorer, settings,
                                       timing)
        pipeline_s = time.perf_counter() - t0 - plan_seconds

        store = TileStore(work / "tiles.zarr")
        scores, max_scores = store.scores, store.max_scores
        t_stitch = time.perf_counter()
        thumb, thumb_ds = slide.thumbnail(settings.max_px)
        order = np.argsort(-scores)[: settings.top_k]
        top = [(int(i), store.read(int(i), int(i) + 1)[0]) for i in order]
        geometry = SlideGeometry(width=slide.dimensions[0], height=slide.dimensions[1],
                                 mpp=slide.mpp, tile_size_l0=plan.tile_size_l0,
                                 stride_l0=plan.stride_l0, grid_cols=grid.cols,
                                 grid_rows=grid.rows)
        scale = colour_scale(scorer.calibration, "mean", settings.cmap)
        outputs = write_slide_outputs(
            work, slide_name=slide.name, geometry=geometry, coords=store.coords,
            grid_index=store.grid_index, scores=scores, max_scores=max_scores, thumbnail=thumb,
            thumbnail_downsample=thumb_ds, tissue_mask=tissue.mask,
            mask_downsample=tissue.downsample, scale=scale, top_tiles=top,
            max_px=settings.max_px,
            maps=np.asarray(store.root["maps"][:]) if settings.keep_maps else None)
        timing["stitch_s"] = time.perf_counter() - t_stitch
        timing["total_s"] = time.perf_counter() - t_start
        summary = {
            "slide": slide.name,
            "status": "ok",
            "slide_path": str(slide_path.resolve()),
            "slide_fingerprint": fingerprint,
            "slide_dimensions": list(slide.dimensions),
            "level0_mpp": slide.mpp,
            "mpp_source": slide.resolution.source,
            "target_mpp": plan.target_mpp,
            "actual_mpp": plan.actual_mpp,
            "level": plan.level,
            "tile_px": plan.tile_px,
            "tile_size_l0": plan.tile_size_l0,
            "grid": [grid.cols, grid.rows],
            "n_grid_tiles": len(grid),
            "n_tiles": int(len(scores)),
            "tissue_fraction_slide": tissue.tissue_fraction,
            "tissue_fraction_tiles_mean": float(store.tissue_fraction.mean()),
            "score_mean": float(np.mean(scores)),
            "score_median": float(np.median(scores)),
            "score_max": float(np.max(scores)),
            "score_quantiles": {f"{q:g}": float(np.quantile(scores, q))
                                for q in (0.01, 0.25, 0.5, 0.75, 0.99)},
            "fraction_anomalous": float(np.mean(scores >= scale.vcenter)),
            "colour_scale": asdict(scale),
            "timings_s": timing,
            "tiles_per_s": {
                "end_to_end": len(scores) / timing["total_s"],
                "pipeline": n_scored / pipeline_s if pipeline_s > 0 else None,
                "read": n_scored / timing["read_s"] if timing["read_s"] > 0 else None,
                "model": n_scored / timing["model_s"] if timing["model_s"] > 0 else None,
                "write": n_scored / timing["write_s"] if timing["write_s"] > 0 else None,
            },
            "batch_size": settings.batch_size,
            "device": str(scorer.device),
            "precision": scorer.precision,
            "model": scorer.identity,
            "outputs": outputs,
            "software_version": __version__,
        }
        _write_json(work / "summary.json", summary)
    commit_output(work, final)
    summary["output"] = str(final)
    return summary


def _tile_and_score(slide: Slide, kept, store_path: Path, attrs: dict, scorer: Scorer,
                    settings: HeatmapSettings, timing: dict) -> int:
    """Decode tiles once: write them to the store and score them, overlapping the stages."""
    plan = kept.plan
    with TileStoreWriter(store_path, len(kept), plan.tile_px, kept.coords, kept.grid_index,
                         kept.tissue_fraction, attrs) as writer:
        writer.create_scores(settings.keep_maps)
        bar = tqdm(total=len(kept), unit="tile", desc=f"scoring {slide.name}",
                   disable=not settings.progress, leave=False)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-write") as io:
            pending: Future | None = None
            busy = [0.0]
            t_wait = time.perf_counter()
            for start, tiles in iter_tile_batches(slide, kept, writer.shard_tiles,
                                                  settings.read_workers, busy):
                timing["read_wait_s"] += time.perf_counter() - t_wait
                if pending is not None:
                    pending.result()
                pending = io.submit(_timed, timing, "write_s", writer.write, start, tiles)
                _score_batch_of_tiles(scorer, tiles, start, writer.root, settings, timing)
                bar.update(len(tiles))
                t_wait = time.perf_counter()
            if pending is not None:
                pending.result()
        timing["read_s"] = busy[0]
        bar.close()
        writer.close({"model": scorer.identity})
    return len(kept)


def _score_store(store_path: Path, scorer: Scorer, settings: HeatmapSettings, timing: dict,
                 name: str) -> int:
    """Score an existing tile store in place, shard by shard with read-ahead."""
    import zarr

    from .tiles.store import ATTRS_KEY, create_score_arrays

    store = TileStore(store_path)
    root = zarr.open_group(str(store_path), mode="r+")
    n, shard = len(store), store.shard_tiles
    create_score_arrays(root, n, shard, settings.keep_maps)
    bar = tqdm(total=n, unit="tile", desc=f"scoring {name}", disable=not settings.progress,
               leave=False)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="store-read") as pool:
        futures = {s: pool.submit(store.read, s, min(s + shard, n)) for s in range(0, min(n, 2 * shard), shard)}
        for start in range(0, n, shard):
            t0 = time.perf_counter()
            tiles = futures.pop(start).result()
            timing["read_wait_s"] += time.perf_counter() - t0
            nxt = start + 2 * shard
            if nxt < n:
                futures[nxt] = pool.submit(store.read, nxt, min(nxt + shard, n))
            _score_batch_of_tiles(scorer, tiles, start, root, settings, timing)
            bar.update(len(tiles))
    bar.close()
    root.attrs[ATTRS_KEY] = {**store.attrs, "model": scorer.identity}
    return n


def _timed(timing: dict, key: str, fn, *args) -> Any:
    t0 = time.perf_counter()
    try:
        return fn(*args)
    finally:
        timing[key] += time.perf_counter() - t0


def _score_batch_of_tiles(scorer: Scorer, tiles: np.ndarray, start: int, root, settings:
                          HeatmapSettings, timing: dict) -> None:
    """Score a shard of (n, T, T, 3) uint8 tiles in model batches; write the scores."""
    t0 = time.perf_counter()
    means, maxes, maps = [], [], []
    for b in range(0, len(tiles), scorer.batch_size):
        x = torch.from_numpy(tiles[b:b + scorer.batch_size]).permute(0, 3, 1, 2).float().div_(255)
        result = scorer.score(x, keep_maps=settings.keep_maps)
        means.append(result.mean)
        maxes.append(result.max)
        if settings.keep_maps:
            maps.append(result.maps)
    timing["model_s"] += time.perf_counter() - t0
    write_score_arrays(root, start, np.concatenate(means), np.concatenate(maxes),
                       np.concatenate(maps) if maps else None)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default))
    os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _row(summary: dict[str, Any]) -> dict[str, Any]:
    speed = summary.get("tiles_per_s") or {}
    return {
        "slide": summary.get("slide", ""),
        "status": summary.get("status", ""),
        "n_tiles": summary.get("n_tiles", ""),
        "score_mean": summary.get("score_mean", ""),
        "score_max": summary.get("score_max", ""),
        "fraction_anomalous": summary.get("fraction_anomalous", ""),
        "tiles_per_s": speed.get("end_to_end", "") if isinstance(speed, dict) else "",
        "seconds": (summary.get("timings_s") or {}).get("total_s", ""),
        "output": summary.get("output", ""),
        "error": summary.get("error", ""),
    }


def _slide_task(slide: str, out_root: str, model: str, settings: HeatmapSettings,
                skip_errors: bool) -> dict[str, Any]:
    """One dask task: a slide end to end. Errors become a failed row with ``skip_errors``."""
    try:
        summary = process_slide(slide, out_root, model, settings)
        summary.setdefault("output", str(slide_output_dir(Path(out_root), Path(slide))))
        return _row(summary)
    except WsiAnomalyError as exc:
        shutil.rmtree(Path(out_root) / f".{Path(slide).name}.partial", ignore_errors=True)
        if not skip_errors:
            raise
        status = "no tissue" if isinstance(exc, NoTissueError) else "failed"
        log.warning("%s: %s: %s", Path(slide).name, status, exc)
        return _row({"slide": Path(slide).name, "status": status, "error": str(exc)})


def run_cohort(slides: Sequence[str | Path], out_root: str | Path, model: str | Path,
               settings: HeatmapSettings, scheduler: str | None = None,
               workers: int | None = None, skip_errors: bool = False) -> list[dict[str, Any]]:
    """Heatmaps for many slides, one dask task per slide; writes ``out_root/summary.csv``."""
    import dask
    from dask import delayed

    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    paths = [str(p) for p in find_slides(slides)]
    if not Path(model).is_file():
        raise InputNotFoundError(f"model checkpoint not found: {model}")
    rows: list[dict[str, Any]]
    if scheduler or (workers and workers > 1):
        from dask.distributed import Client, LocalCluster

        cluster = None
        if scheduler:
            client = Client(scheduler)
        else:
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None)
            client = Client(cluster)
        try:
            has_gpus = any("GPU" in (w.get("resources") or {})
                           for w in client.scheduler_info()["workers"].values())
            futures = [client.submit(_slide_task, p, str(out_root), str(model),
                                     _quiet(settings), skip_errors, pure=False,
                                     resources={"GPU": 1} if has_gpus else None)
                       for p in paths]
            rows = client.gather(futures)
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
    else:
        tasks = [delayed(_slide_task)(p, str(out_root), str(model), settings, skip_errors)
                 for p in paths]
        rows = list(dask.compute(*tasks, scheduler="synchronous"))
    _write_cohort_summary(out_root / "summary.csv", rows)
    return rows


def _quiet(settings: HeatmapSettings) -> HeatmapSettings:
    """Progress bars from many worker processes would interleave: turn them off."""
    from dataclasses import replace

    return replace(settings, progress=False)


def _write_cohort_summary(path: Path, rows: list[dict[str, Any]]) -> None:
    """Merge this run's rows into the cohort table (one row per slide, newest wins)."""
    merged: dict[str, dict[str, Any]] = {}
    if path.is_file():
        with path.open(newline="") as fh:
            for row in csv.DictReader(fh):
                merged[row["slide"]] = row
    for row in rows:
        if row["status"] == "skipped (done)" and row["slide"] in merged:
            continue
        merged[row["slide"]] = row
    tmp = path.with_name(f".{path.name}.partial")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(SUMMARY_FIELDS))
        writer.writeheader()
        for name in sorted(merged):
            writer.writerow({k: merged[name].get(k, "") for k in SUMMARY_FIELDS})
    os.replace(tmp, path)
