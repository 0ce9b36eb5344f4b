"""One slide: plan → ensure store → score → render → summarise."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..errors import InvalidInputError, NoTissueError
from ..loaded_model import LoadedModel, checkpoint_sha256, load_model
from ..outputs import (
    OutputLock,
    check_free_space,
    commit_dir,
    mark_owned,
    os_errors_as_user_errors,
    remove_path,
    write_json,
)
from ..score import Scorer, score_shards, shared_scorer
from ..slide import Slide, slide_fingerprint
from ..slide.grid import TileGrid
from ..slide.qc import TileQCMeter
from ..slide.resolution import load_mpp_csv, lookup_mpp
from ..slide.tissue import TissueMask
from ..stitch import colour_scale
from ..tiles.store import TileStore, TileStoreWriter
from ..tiles.tiler import (
    TilingSettings,
    plan_tiles,
    qc_meter,
    store_attributes,
    store_bytes_estimate,
    stream_tiles,
)
from .render import redraw_results, render_slide
from .results import RESULT_KIND, SlidePlan, _ensure_work_dir, output_name, reuse_decision
from .settings import HeatmapSettings, ScoringProgress, display_settings, scoring_settings
from .summary import slide_summary

log = logging.getLogger(__name__)


def _scorer(model: LoadedModel, settings: HeatmapSettings) -> Scorer:
    """The process's scorer of ``model`` at the run's device, precision, batch size and
    compile mode."""
    scorer = shared_scorer(
        model,
        device=settings.device,
        precision=settings.precision,
        batch_size=settings.batch_size,
        compile=settings.compile,
        backbone_weights=settings.backbone_weights,
        engine=settings.engine,
    )
    if scorer.family.inputs != "images":
        raise InvalidInputError(
            f"{model.path.name} is a {scorer.family.title} model: it scores tile feature vectors, "
            "not the slide's pixels; pass the slides' TRIDENT or CLAM files with --features DIR"
        )
    return scorer


def _loaded(model: str | Path | LoadedModel) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load_model(model)


def model_sha256(model: str | Path | LoadedModel) -> str:
    """sha256 of a checkpoint file, computed once per file version in a process (the model
    itself is read later, once, by :func:`load_model`, which shares this hash)."""
    if isinstance(model, LoadedModel):
        return model.sha256
    if not Path(model).is_file():
        return load_model(model).sha256  # reports the missing file in one line
    return checkpoint_sha256(model)


@dataclass
class SlideRun:
    """One slide being processed: its plan, the open slide, its grid and tissue, the model (as
    read from its checkpoint) and its scorer, the settings and the stage timings (seconds, filled in as the stages run)."""

    plan: SlidePlan
    slide: Slide
    grid: TileGrid
    tissue: TissueMask
    model: LoadedModel
    scorer: Scorer
    settings: HeatmapSettings
    timing: dict[str, float]


def process_slide(
    slide_path: str | Path,
    out_root: str | Path,
    model: str | Path | LoadedModel,
    settings: HeatmapSettings,
    name: str | None = None,
) -> dict[str, Any]:
    """Tile, score and stitch one slide into ``out_root/<name>/``; returns its summary.

    ``model``: a checkpoint file (read once per process, see :func:`load_model`) or the model
    read from one. The slide is opened once, after the reuse check.

    ``name`` defaults to :func:`output_name`. Only one run works on a slide's results at a time
    (a lock file beside them). Finished results are reused only when they are the same work —
    same slide content, model file and scoring settings; when only the display settings differ
    they are re-drawn from their stored scores (no tile is scored); results of other work are
    refused unless ``settings.overwrite``.
    """
    slide_path, out_root = Path(slide_path), Path(out_root)
    name = name or output_name(slide_path, out_root)
    if settings.features is not None:  # the slide's tile vectors exist already: no tiling
        from ..features_run import process_features_slide

        path = model.path if isinstance(model, LoadedModel) else model
        return process_features_slide(slide_path, out_root, path, settings, name)
    with OutputLock(out_root / name) as lock:
        plan = _plan(slide_path, out_root, name, model, settings, lock.work_path())
        decision, done = reuse_decision(plan, settings)
        if decision == "done" and "tile_score" not in done:
            # Results written before the tile score was recorded ranked tiles by their mean:
            # the same scores, re-drawn when the model's family ranks them otherwise.
            if _loaded(model).family.tile_score != "mean":
                decision = "redraw"
        if decision == "done":
            return done
        if decision == "redraw":  # the same scores, drawn otherwise: no tile is scored
            log.info("%s: re-drawing the results from their stored scores", slide_path.name)
            loaded = _loaded(model)
            tile_score = loaded.family.tile_score
            return redraw_results(
                plan.final,
                settings.display,
                colour_scale(loaded.calibration, tile_score, settings.cmap),
                plan.identity,
                slide_path,
                settings.qc_settings,
                tile_score,
            )
        try:
            return _run(plan, model, settings, lock.leftovers())
        except Exception:
            # A failed run leaves nothing; an interrupted one (Ctrl-C) keeps its working folder
            # so that the next run can take over its finished tile store.
            remove_path(plan.work)
            raise


def _plan(
    slide_path: Path,
    out_root: Path,
    name: str,
    model: str | Path | LoadedModel,
    settings: HeatmapSettings,
    work: Path,
) -> SlidePlan:
    """The slide's identity (its file's fingerprint, the model file's sha256, the scoring
    settings); neither the slide nor the model is opened yet."""
    override = settings.slide_mpp
    if override is None and settings.mpp_csv:
        override = lookup_mpp(load_mpp_csv(settings.mpp_csv), slide_path)
    fingerprint = slide_fingerprint(slide_path)
    identity = {
        "slide_path": str(slide_path.resolve()),
        "slide_fingerprint": fingerprint,
        "model_sha256": model_sha256(model),
        "scoring": scoring_settings(settings, override),
        "display": display_settings(settings),
    }
    return SlidePlan(slide_path, out_root / name, work, override, identity)


def _run(
    plan: SlidePlan,
    model_file: str | Path | LoadedModel,
    settings: HeatmapSettings,
    leftovers: list[Path],
) -> dict[str, Any]:
    t_start = time.perf_counter()
    with (
        os_errors_as_user_errors(plan.final),
        Slide(plan.slide_path, override_mpp=plan.slide_mpp) as slide,
    ):
        # The slide is opened first: a file that is not a slide is named before the model.
        model = _loaded(model_file)
        scorer = _scorer(model, settings)
        target_mpp = settings.target_mpp or model.tile_mpp
        if target_mpp is None:
            raise InvalidInputError(
                f"{model.path} does not record its tiles' resolution; pass --mpp "
                "(µm/px the model was trained at)"
            )
        tiling = TilingSettings(
            target_mpp=target_mpp,
            tile_px=model.tile_px,
            stride_px=settings.stride_px,
            min_tissue=settings.min_tissue,
            workers=settings.read_workers,
            qc=settings.qc_settings if settings.qc != "off" else None,
        )
        t0 = time.perf_counter()
        grid, kept, tissue = plan_tiles(slide, tiling)
        if len(kept) == 0:
            raise NoTissueError(
                f"{slide.name}: no tissue — 0 of {len(grid)} tiles have ≥ "
                f"{settings.min_tissue:.0%} tissue at "
                f"{grid.plan.actual_mpp:.3f} mpp"
            )
        reusable = _ensure_work_dir(plan, grid.plan.to_dict(), settings.min_tissue, leftovers)
        if reusable is None:
            check_free_space(
                plan.work.parent,
                store_bytes_estimate(len(kept), grid.plan.tile_px) + (64 << 20),
                f"the results of {slide.name}",
            )
        timing = {
            "plan_s": time.perf_counter() - t0,
            "read_s": 0.0,
            "read_wait_s": 0.0,
            "model_s": 0.0,
            "write_s": 0.0,
        }
        store_path = plan.work / "tiles.zarr"
        meter = qc_meter(slide, kept, tissue, tiling.qc)
        if reusable is not None:
            log.info("%s: reusing the tile store of an earlier run", slide.name)
            store = TileStore(store_path, mode="r+")
            n_scored = _score_store(store, scorer, settings, timing, slide.name, meter)
        else:
            attrs = store_attributes(plan.slide_path, slide, grid, tiling, tissue)
            n_scored = _tile_and_score(
                slide, kept, store_path, attrs, scorer, settings, timing, meter
            )
            store = TileStore(store_path)
        if meter is not None:
            timing["qc_s"] = meter.seconds
        pipeline_s = time.perf_counter() - t0 - timing["plan_s"]
        run = SlideRun(plan, slide, grid, tissue, model, scorer, settings, timing)
        outputs, scale = render_slide(run, store)
        timing["total_s"] = time.perf_counter() - t_start
        summary = slide_summary(run, store, scale, n_scored, pipeline_s, outputs)
        write_json(plan.work / "summary.json", summary)
        mark_owned(plan.work, RESULT_KIND)
        commit_dir(plan.work, plan.final)
    summary["output"] = str(plan.final)
    return summary


def _tile_and_score(
    slide: Slide,
    kept,
    store_path: Path,
    attrs: dict,
    scorer: Scorer,
    settings: HeatmapSettings,
    timing: dict,
    meter: TileQCMeter | None = None,
) -> int:
    """Decode tiles once: write them to the store and score them, overlapping the stages (and
    measure their quality on the way, with ``meter``)."""
    with TileStoreWriter.for_tiles(store_path, kept, attrs) as writer:
        writer.create_scores(settings.keep_maps, scorer.map_px)
        if meter is not None:
            writer.create_qc(meter.record())
        shards: Iterable[tuple[int, np.ndarray]] = stream_tiles(
            slide,
            kept,
            writer,
            settings.read_workers,
            timing=timing,
            desc="scoring",
            progress=False,  # the scoring bar below moves per scored batch
            # each part of a shard has its quality measured in the thread that decoded it
            on_decoded=meter.measure if meter is not None else None,
        )
        skip: dict[int, np.ndarray] = {}
        if meter is not None:
            shards = _measured(shards, meter, skip if settings.qc == "exclude" else None)
        _score_shards(scorer, shards, writer, settings, timing, skip, len(kept), slide.name)
        if meter is not None:  # every tile's QC row, at once (a write per shard costs more)
            writer.write_qc(0, *meter.results())
        writer.close({"model": scorer.identity, "tile_score": scorer.family.tile_score})
    return len(kept) - sum(int(m.sum()) for m in skip.values())


def _measured(
    shards: Iterable[tuple[int, np.ndarray]],
    meter: TileQCMeter,
    skip: dict[int, np.ndarray] | None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Pass shards through, measuring each one's QC (kept in ``meter``); with ``skip``, record
    there which of the shard's tiles are flagged (not to be scored)."""
    for start, tiles in shards:
        if skip is not None:
            skip[start] = meter(start, tiles)[1] != 0
        else:
            meter.ensure_measured(start, tiles)
        yield start, tiles


def _score_store(
    store: TileStore,
    scorer: Scorer,
    settings: HeatmapSettings,
    timing: dict,
    name: str,
    meter: TileQCMeter | None = None,
) -> int:
    """Score an existing tile store in place, shard by shard with read-ahead (measuring the
    tiles' quality again from the store with ``meter``: its settings may differ)."""
    n, shard = len(store), store.shard_tiles
    store.reset_scores(settings.keep_maps, scorer.map_px)
    if meter is not None:
        store.reset_qc(meter.record())

    def shards(pool: ThreadPoolExecutor) -> Iterator[tuple[int, np.ndarray]]:
        futures = {
            s: pool.submit(store.read, s, min(s + shard, n))
            for s in range(0, min(n, 2 * shard), shard)
        }
        for start in range(0, n, shard):
            t0 = time.perf_counter()
            tiles = futures.pop(start).result()
            timing["read_wait_s"] += time.perf_counter() - t0
            nxt = start + 2 * shard
            if nxt < n:
                futures[nxt] = pool.submit(store.read, nxt, min(nxt + shard, n))
            yield start, tiles

    skip: dict[int, np.ndarray] = {}
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="store-read") as pool:
        source: Iterable[tuple[int, np.ndarray]] = shards(pool)
        if meter is not None:
            source = _measured(source, meter, skip if settings.qc == "exclude" else None)
        _score_shards(scorer, source, store, settings, timing, skip, n, name)
    if meter is not None:
        store.write_qc(0, *meter.results())
    store.set_model(scorer.identity, scorer.family.tile_score)
    return n - sum(int(m.sum()) for m in skip.values())


def _score_shards(
    scorer: Scorer,
    shards: Iterable[tuple[int, np.ndarray]],
    sink: TileStore | TileStoreWriter,
    settings: HeatmapSettings,
    timing: dict,
    skip: dict[int, np.ndarray] | None = None,
    total: int = 0,
    name: str = "",
) -> None:
    """Score consecutive shards of (n, T, T, 3) uint8 tiles, ``(start, tiles)`` in order (the
    scorer's :func:`~wsi_anomaly.score.score_shards` re-chunks them into model batches) and
    write each shard's scores to ``sink`` once all its tiles are scored. ``timing["model_s"]`` accumulates the time spent
    waiting for scores, less the time spent waiting for shards.

    ``skip``: shard start → (n,) bool, the tiles not to score (filled in by the time the
    shard is drawn from ``shards``); their scores stay NaN. Progress (``total`` tiles of slide
    ``name``: the bar, ``settings.on_progress``) moves with every scored batch; skipped tiles
    count as done when their shard is drawn."""
    timing.setdefault("model_s", 0.0)
    bar = tqdm(
        total=total, unit="tile", desc=f"scoring {name}", disable=not settings.progress, leave=False
    )
    started = time.perf_counter()
    shown = [0]

    def on_batch(done: int, scored: int, seconds: float) -> None:
        timing["model_s"] += seconds
        if done > shown[0]:
            bar.update(done - shown[0])
            shown[0] = done
        if scored and settings.on_progress is not None:
            settings.on_progress(ScoringProgress(name, done, total, time.perf_counter() - started))

    for start, scores in score_shards(scorer, shards, skip, settings.keep_maps, on_batch):
        sink.write_scores(start, scores.mean, scores.max, scores.maps)
    bar.close()
