"""Slides in, pictures out: tile → score → stitch, per slide and across a cohort.

Inside one slide, tiles are decoded by a pool of threads a few shards ahead of the model, the
model sees fixed-size batches, and each decoded shard is compressed and written to the slide's
tile store in the background — so the pipeline runs at the pace of its slowest stage. Per-tile
scores are written to the same store as they are computed.

Across slides there is one dask task per slide (never per tile): in-process by default, on a
local cluster with ``workers``, or on an existing dask.distributed cluster with ``scheduler``
(tasks ask for ``resources={"GPU": 1}`` when the cluster's workers declare GPUs).

Each slide's outputs are built in ``results/.<name>.partial/`` and renamed to
``results/<name>/`` when complete (``name`` is the slide's file name, plus a short hash of its
path when two slides share a name). A lock file beside them keeps two runs from working on one
slide at once. A finished slide is skipped on re-run only when it is the same work — same slide
content, model file and scoring settings; results of other work are refused unless
``overwrite``.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import logging
import os
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from . import __version__
from .checkpoint import file_hash
from .errors import (
    InputNotFoundError,
    InvalidInputError,
    NoTissueError,
    OutputExistsError,
    OutputLockedError,
    WsiAnomalyError,
)
from .outputs import (
    OutputLock,
    atomic_path,
    check_free_space,
    commit_dir,
    is_owned,
    mark_owned,
    os_errors_as_user_errors,
    remove_path,
    validate_output_name,
    write_json,
)
from .score import AUTO_BATCH, ScoreBatch, Scorer
from .slide import Slide
from .slide.grid import TileGrid
from .slide.qc import QCSettings, TileQC, TileQCMeter, artifact_mask, qc_record
from .slide.resolution import load_mpp_csv, lookup_mpp
from .slide.tissue import TissueMask
from .stitch import (
    SCALE_BASES,
    SlideGeometry,
    colour_scale,
    slide_colour_scale,
    write_slide_outputs,
)
from .tiles.store import TileStore, TileStoreWriter
from .tiles.tiler import (
    TilingSettings,
    plan_tiles,
    qc_meter,
    store_attributes,
    store_bytes_estimate,
    stream_tiles,
)

log = logging.getLogger(__name__)

#: Marker kind of a slide's results folder (only such folders are replaced with --overwrite).
RESULT_KIND = "slide-results"

SLIDE_SUFFIXES = (
    ".svs",
    ".ndpi",
    ".mrxs",
    ".tif",
    ".tiff",
    ".scn",
    ".vms",
    ".vmu",
    ".bif",
    ".svslide",
    ".dcm",
)
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
)


@dataclass(frozen=True)
class ScoringProgress:
    """Where a slide's scoring stands, after each scored model batch."""

    slide: str  # the slide's file name
    done: int  # tiles scored so far
    total: int  # tiles to score
    seconds: float  # since the slide's scoring began

    @property
    def tiles_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else float("nan")

    @property
    def eta_s(self) -> float:
        """Seconds left at the speed so far (NaN before the first batch)."""
        rate = self.tiles_per_s
        return (self.total - self.done) / rate if rate > 0 else float("nan")


@dataclass
class HeatmapSettings:
    """Per-slide options. ``target_mpp`` None → the model's training mpp."""

    target_mpp: float | None = None
    min_tissue: float = 0.5
    stride_px: int | None = None
    batch_size: int | str = AUTO_BATCH  # auto → 32 on a CPU, the largest that fits on a GPU
    device: str = "auto"
    precision: str = "auto"
    compile: str = "off"  # off | default | max-autotune | reduce-overhead (torch.compile)
    backbone_weights: str | None = None  # for models whose checkpoint records the backbone's hash
    read_workers: int = 0
    keep_maps: bool = False
    top_k: int = 16
    max_px: int = 2048
    cmap: str = "coolwarm"
    scale: str = "fixed"  # fixed: the model's training scale | slide: this slide's percentiles
    alpha: float = 0.5  # opacity of the heat colours in overlay.png
    slide_mpp: float | None = None
    mpp_csv: str | None = None
    overwrite: bool = False
    progress: bool = True
    #: called after every scored model batch with a ScoringProgress (in this process only:
    #: dask workers in other processes get no callback)
    on_progress: Callable[[ScoringProgress], None] | None = None
    slides_in_flight: int = 0  # 0 → two on a GPU, one on a CPU (see slides_in_flight)
    #: tissue QC: flag (every output carries the flags), exclude (flagged tiles are not
    #: scored) or off
    qc: str = "flag"
    qc_settings: QCSettings = field(default_factory=QCSettings)
    #: score tile features another tool extracted instead of tiling the slides
    #: (:class:`wsi_anomaly.features_run.FeatureSources`); None: tile and score pixels
    features: Any | None = None

    def __post_init__(self) -> None:
        from .score import check_batch_size, check_compile_mode

        check_batch_size(self.batch_size)
        check_compile_mode(self.compile)
        if self.scale not in SCALE_BASES:
            raise InvalidInputError(
                f"--scale must be one of {', '.join(SCALE_BASES)}, got {self.scale!r}"
            )
        if not 0.0 <= self.alpha <= 1.0:
            raise InvalidInputError(f"--alpha must be between 0 and 1, got {self.alpha}")
        if self.qc not in QC_MODES:
            raise InvalidInputError(f"--qc must be one of {', '.join(QC_MODES)}, got {self.qc!r}")


#: ``--qc`` choices.
QC_MODES = ("flag", "exclude", "off")


def find_slides(
    inputs: Sequence[str | Path],
    recursive: bool = False,
    skip: Sequence[str | Path] = (),
) -> list[Path]:
    """Slides from files, folders and glob patterns (``**`` matches any depth), in a stable
    order, each file once.

    Folders are read one level deep unless ``recursive``; a recursive search, and a ``**``
    pattern, never enter hidden folders, the folders in ``skip`` (the results folder) or this
    tool's own work folders (``*.partial``, tile stores ``*.zarr``).
    """
    skipped = {Path(s).resolve() for s in skip}
    found: list[Path] = []
    for item in map(str, inputs):
        if any(ch in item for ch in "*?[") and not Path(item).exists():
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise InputNotFoundError(f"no slide matches {item!r}")
            found.extend(
                Path(m)
                for m in matches
                if Path(m).is_file()
                and ("**" not in item or not _in_skipped(Path(m), item, skipped))
            )
        elif Path(item).is_dir():
            found.extend(_slides_in_folder(Path(item), recursive, skipped))
        else:
            found.append(Path(item))  # a missing file is reported per slide, like any error
    seen: set[Path] = set()
    unique: list[Path] = []
    for p in found:
        real = _real_path(p)
        if real not in seen:
            seen.add(real)
            unique.append(p)
    if not unique:
        raise InvalidInputError(
            f"no slides found in {', '.join(map(str, inputs))} "
            f"(looked for {', '.join(SLIDE_SUFFIXES)})"
        )
    return unique


def _real_path(path: Path) -> Path:
    """``path`` resolved; as given (absolute) when it cannot be — a symlink loop, reported per
    slide like any other unreadable slide."""
    try:
        return path.resolve()
    except (RuntimeError, OSError):
        return path.absolute()


def _not_entered(folder: Path, skipped: set[Path]) -> bool:
    """A folder discovery does not search: hidden, a results or work folder of ours."""
    name = folder.name
    return (
        name.startswith(".") or name.endswith((".partial", ".zarr")) or folder.resolve() in skipped
    )


def _in_skipped(path: Path, pattern: str, skipped: set[Path]) -> bool:
    """Whether a glob match lies inside a folder that discovery does not enter, below the
    pattern's fixed start (``/data/.cohort/**/*.svs`` may search a hidden folder it names)."""
    base = Path(pattern)
    while any(ch in str(base) for ch in "*?[") and base != base.parent:
        base = base.parent
    return any(
        _not_entered(parent, skipped)
        for parent in path.parents
        if parent != base and parent.is_relative_to(base)
    )


def _slides_in_folder(
    folder: Path, recursive: bool, skipped: set[Path], visited: set[Path] | None = None
) -> list[Path]:
    """The slides in ``folder`` (and, when ``recursive``, its sub-folders), sorted by path.
    A folder reached twice (a symbolic link back up the tree) is searched once."""
    visited = set() if visited is None else visited
    visited.add(folder.resolve())
    slides: list[Path] = []
    with os_errors_as_user_errors(folder):
        entries = sorted(folder.iterdir())
    for p in entries:
        if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES:
            slides.append(p)
        elif (
            recursive and p.is_dir() and not _not_entered(p, skipped) and p.resolve() not in visited
        ):
            slides.extend(_slides_in_folder(p, recursive, skipped, visited))
    return sorted(slides)


def output_name(slide: Path, out_root: Path, clash: bool = False) -> str:
    """The slide's results folder name under ``out_root``: its file name, unless another slide of
    the same name is in the same run (``clash``) or already owns that folder — then the name
    plus a short hash of the slide's full path, so two slides never share a folder."""
    slide = Path(slide)
    mine = str(_real_path(slide))
    hashed = f"{slide.name}-{hashlib.sha1(mine.encode()).hexdigest()[:8]}"
    if _recorded_slide_path(out_root / hashed) == mine:
        return hashed  # where an earlier run put it
    if not clash:
        owner = _recorded_slide_path(out_root / slide.name)
        if owner is None or owner == mine:
            return slide.name
    return hashed


def slide_output_dir(out_root: Path, slide: Path) -> Path:
    return Path(out_root) / output_name(Path(slide), Path(out_root))


def _is_results_folder(folder: Path) -> bool:
    """A slide results folder this tool wrote: its marker, or (older versions) its summary."""
    if is_owned(folder, (RESULT_KIND,)):
        return True
    try:
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(summary, dict)
        and "slide_fingerprint" in summary
        and "software_version" in summary
    )


def _recorded_slide_path(folder: Path) -> str | None:
    """The slide path a results folder records, or None when there is no readable record."""
    try:
        return json.loads((folder / "summary.json").read_text(encoding="utf-8")).get("slide_path")
    except (OSError, ValueError, AttributeError):
        return None


_SCORERS: dict[tuple[str, str, str, int | str, str, str | None], Scorer] = {}
_SCORERS_LOCK = threading.Lock()


def _scorer(model: str | Path, settings: HeatmapSettings) -> Scorer:
    """One loaded model per process (dask workers reuse it across their slides, and slides in
    flight in one process share it)."""
    key = (
        str(Path(model).resolve()),
        settings.device,
        settings.precision,
        settings.batch_size,
        settings.compile,
        settings.backbone_weights,
    )
    with _SCORERS_LOCK:
        if key not in _SCORERS:
            _SCORERS[key] = Scorer(
                model,
                device=settings.device,
                precision=settings.precision,
                batch_size=settings.batch_size,
                compile=settings.compile,
                backbone_weights=settings.backbone_weights,
            )
        scorer = _SCORERS[key]
    if scorer.family.inputs != "images":
        raise InvalidInputError(
            f"{Path(model).name} is a {scorer.family.title} model: it scores tile feature vectors, "
            "not the slide's pixels; pass the slides' TRIDENT or CLAM files with --features DIR"
        )
    return scorer


def slides_in_flight(settings: HeatmapSettings) -> int:
    """Slides one process works on at once: two on a GPU — the next slide is planned, decoded
    and tiled on the CPU while the current one is scored, so the GPU does not wait between
    slides — and one on a CPU, where the model already uses every core. With CUDA graphs
    (``compile="reduce-overhead"``) one: their recorded graphs belong to the thread that
    recorded them."""
    if settings.slides_in_flight:
        return settings.slides_in_flight
    from .runtime import resolve_device

    if settings.compile == "reduce-overhead":
        return 1
    return 2 if resolve_device(settings.device).type == "cuda" else 1


@lru_cache(maxsize=64)
def _model_sha256(path: str, mtime_ns: int, size: int) -> str:
    return file_hash(path)


def model_sha256(model: str | Path) -> str:
    """sha256 of a checkpoint file, computed once per file version."""
    st = Path(model).stat()
    return _model_sha256(str(Path(model).resolve()), st.st_mtime_ns, st.st_size)


def scoring_settings(settings: HeatmapSettings, slide_mpp: float | None) -> dict[str, Any]:
    """The settings that change a slide's results: a result is reused only when these, the
    slide's content and the model all match. The device, precision, runtime and batch size
    are not among them: they change scores only within the agreement measured for bf16
    (Spearman ≥ 0.999, ≤ 0.5 % of calls), and summary.json records them."""
    return {
        "target_mpp": settings.target_mpp,
        "min_tissue": settings.min_tissue,
        "stride_px": settings.stride_px,
        "slide_mpp": slide_mpp,
        "keep_maps": settings.keep_maps,
        "top_k": settings.top_k,
        "max_px": settings.max_px,
        "cmap": settings.cmap,
        "scale": settings.scale,
        "alpha": settings.alpha,
        "qc": settings.qc,
        "qc_settings": settings.qc_settings.to_dict() if settings.qc != "off" else None,
    }


# -- one slide: plan → ensure store → score → render → summarise ---------------------------------


@dataclass
class SlidePlan:
    """What one slide's run will do, decided before any tile is read."""

    slide_path: Path
    final: Path  # results/<name>/
    work: Path  # results/.<name>.<run>.partial/, renamed to ``final`` when complete
    slide_mpp: float | None  # the user's level-0 mpp override, if any
    identity: dict[str, Any]  # slide fingerprint + model sha256 + scoring settings


@dataclass
class SlideRun:
    """One slide being processed: its plan, the open slide, its grid and tissue, the model, the
    settings and the stage timings (seconds, filled in as the stages run)."""

    plan: SlidePlan
    slide: Slide
    grid: TileGrid
    tissue: TissueMask
    scorer: Scorer
    settings: HeatmapSettings
    timing: dict[str, float]


def process_slide(
    slide_path: str | Path,
    out_root: str | Path,
    model: str | Path,
    settings: HeatmapSettings,
    name: str | None = None,
) -> dict[str, Any]:
    """Tile, score and stitch one slide into ``out_root/<name>/``; returns its summary.

    ``name`` defaults to :func:`output_name`. Only one run works on a slide's results at a time
    (a lock file beside them). Finished results are reused only when they are the same work —
    same slide content, model file and scoring settings; results of other work are refused
    unless ``settings.overwrite``.
    """
    slide_path, out_root = Path(slide_path), Path(out_root)
    name = name or output_name(slide_path, out_root)
    if settings.features is not None:  # the slide's tile vectors exist already: no tiling
        from .features_run import process_features_slide

        return process_features_slide(slide_path, out_root, model, settings, name)
    with OutputLock(out_root / name) as lock:
        plan = _plan(slide_path, out_root, name, model, settings, lock.work_path())
        done = _reusable_result(plan, settings)
        if done is not None:
            return done
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
    model: str | Path,
    settings: HeatmapSettings,
    work: Path,
) -> SlidePlan:
    override = settings.slide_mpp
    if override is None and settings.mpp_csv:
        override = lookup_mpp(load_mpp_csv(settings.mpp_csv), slide_path)
    with Slide(slide_path, override_mpp=override) as slide:
        fingerprint = slide.fingerprint()
    identity = {
        "slide_path": str(slide_path.resolve()),
        "slide_fingerprint": fingerprint,
        "model_sha256": model_sha256(model),
        "scoring": scoring_settings(settings, override),
    }
    return SlidePlan(slide_path, out_root / name, work, override, identity)


def _reusable_result(plan: SlidePlan, settings: HeatmapSettings) -> dict[str, Any] | None:
    """The finished summary when ``plan.final`` holds this very work; None when there is nothing
    to reuse (or ``overwrite``); raises when it holds other work and not ``overwrite``."""
    final = plan.final
    if not final.exists() and not final.is_symlink():
        return None
    if final.is_symlink() or not final.is_dir() or not _is_results_folder(final):
        raise OutputExistsError(
            f"{final} exists and is not a slide results folder written by "
            "wsi-anomaly; refusing to replace it (choose another --out)"
        )
    if settings.overwrite:
        return None
    try:
        summary = json.loads((final / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = {}
    recorded = summary.get("identity") or {}
    differs = [
        label
        for key, label in (
            ("slide_fingerprint", "slide content"),
            ("model_sha256", "model"),
            ("scoring", "settings"),
        )
        if recorded.get(key) != plan.identity[key]
    ]
    if not differs:
        summary["status"] = "skipped (done)"
        summary["output"] = str(final)
        return summary
    raise OutputExistsError(
        f"{final} holds results of other work ({', '.join(differs)} differ); pass --overwrite "
        "to replace them, or choose another --out"
    )


def _run(
    plan: SlidePlan, model: str | Path, settings: HeatmapSettings, leftovers: list[Path]
) -> dict[str, Any]:
    t_start = time.perf_counter()
    scorer = _scorer(model, settings)
    target_mpp = settings.target_mpp or scorer.tile_mpp
    if target_mpp is None:
        raise InvalidInputError(
            f"{model} does not record its tiles' resolution; pass --mpp "
            "(µm/px the model was trained at)"
        )
    with (
        os_errors_as_user_errors(plan.final),
        Slide(plan.slide_path, override_mpp=plan.slide_mpp) as slide,
    ):
        tiling = TilingSettings(
            target_mpp=target_mpp,
            tile_px=scorer.tile_px,
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
        run = SlideRun(plan, slide, grid, tissue, scorer, settings, timing)
        outputs, scale = _render(run, store)
        timing["total_s"] = time.perf_counter() - t_start
        summary = _summarise(run, store, scale, n_scored, pipeline_s, outputs)
        write_json(plan.work / "summary.json", summary)
        mark_owned(plan.work, RESULT_KIND)
        commit_dir(plan.work, plan.final)
    summary["output"] = str(plan.final)
    return summary


def _ensure_work_dir(
    plan: SlidePlan, grid_plan: dict, min_tissue: float, leftovers: list[Path]
) -> Path | None:
    """Create this run's ``plan.work`` folder, taking over a matching, complete tile store (same
    content, grid and tissue threshold) from what an interrupted run left (``leftovers``,
    working folders of runs that are gone) or from the finished results; everything else the
    interrupted runs left is removed. Returns the reused store or None."""
    fingerprint = plan.identity["slide_fingerprint"]
    candidates = [p / "tiles.zarr" for p in leftovers if p.is_dir() and not p.is_symlink()]
    reusable = next(
        (
            p
            for p in (*candidates, plan.final / "tiles.zarr")
            if _store_matches(p, fingerprint, grid_plan, min_tissue)
        ),
        None,
    )
    remove_path(plan.work)
    plan.work.mkdir(parents=True)
    store = plan.work / "tiles.zarr"
    if reusable is not None and reusable.parent == plan.final:
        shutil.copytree(reusable, store)
    elif reusable is not None:
        os.replace(reusable, store)  # only the complete store moves over, nothing else
    for leftover in leftovers:
        remove_path(leftover)
    return store if reusable is not None else None


def _store_matches(store_path: Path, fingerprint: str, plan: dict, min_tissue: float) -> bool:
    """A complete tile store of the same slide, grid and tissue threshold can be reused."""
    try:
        attrs = TileStore(store_path).attrs
    except WsiAnomalyError:
        return False
    keys = ("level", "read_px", "read_stride_px", "tile_px")
    return (
        attrs.get("slide_fingerprint") == fingerprint
        and all(attrs.get(k) == plan[k] for k in keys)
        and attrs.get("settings", {}).get("min_tissue") == min_tissue
    )


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
            writer.create_qc(qc_record(meter.settings, meter.reference))
        shards: Iterable[tuple[int, np.ndarray]] = stream_tiles(
            slide,
            kept,
            writer,
            settings.read_workers,
            timing=timing,
            desc="scoring",
            progress=False,  # the scoring bar below moves per scored batch
        )
        skip: dict[int, np.ndarray] = {}
        if meter is not None:
            shards = _measured(shards, meter, writer, skip if settings.qc == "exclude" else None)
        _score_shards(scorer, shards, writer, settings, timing, skip, len(kept), slide.name)
        writer.close({"model": scorer.identity})
    return len(kept) - sum(int(m.sum()) for m in skip.values())


def _measured(
    shards: Iterable[tuple[int, np.ndarray]],
    meter: TileQCMeter,
    sink: TileStore | TileStoreWriter,
    skip: dict[int, np.ndarray] | None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Pass shards through, measuring each one's QC and writing it to ``sink``; with ``skip``,
    record there which of the shard's tiles are flagged (not to be scored)."""
    for start, tiles in shards:
        values, flags = meter(start, tiles)
        sink.write_qc(start, values, flags)
        if skip is not None:
            skip[start] = flags != 0
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
        store.reset_qc(qc_record(meter.settings, meter.reference))

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
            source = _measured(source, meter, store, skip if settings.qc == "exclude" else None)
        _score_shards(scorer, source, store, settings, timing, skip, n, name)
    store.set_model(scorer.identity)
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
    """Score consecutive shards of (n, T, T, 3) uint8 tiles, ``(start, tiles)`` in order, in
    model batches of the scorer's batch size (a batch may span shards); write each shard's
    scores once all its tiles are scored. ``timing["model_s"]`` accumulates the time spent
    waiting for scores, less the time spent waiting for shards.

    ``skip``: shard start → (n,) bool, the tiles not to score (filled in by the time the
    shard is drawn from ``shards``); their scores stay NaN. Progress (``total`` tiles of slide
    ``name``: the bar, ``settings.on_progress``) moves with every scored batch; skipped tiles
    count as done when their shard is drawn."""
    timing.setdefault("model_s", 0.0)
    skip = skip if skip is not None else {}
    # shards whose tiles are being scored: start, tiles, tiles to score, the mask of skipped
    pending: deque[tuple[int, int, int, np.ndarray | None]] = deque()
    upstream = [0.0]  # seconds spent waiting for shards
    passed = [0]  # tiles skipped so far (they count as done for progress)

    def batches() -> Iterator[np.ndarray]:
        held: list[np.ndarray] = []  # tiles not yet in a batch (views of the shards)
        count = 0
        source = iter(shards)
        while True:
            t0 = time.perf_counter()
            item = next(source, None)
            upstream[0] += time.perf_counter() - t0
            if item is None:
                break
            start, tiles = item
            skipped = skip.get(start)
            if skipped is not None and skipped.any():
                tiles = tiles[~skipped]
                passed[0] += int(skipped.sum())
            else:
                skipped = None
            pending.append(
                (start, len(skipped) if skipped is not None else len(tiles), len(tiles), skipped)
            )
            if len(tiles):
                held.append(tiles)
                count += len(tiles)
            while count >= scorer.batch_size:
                joined = held[0] if len(held) == 1 else np.concatenate(held)
                # uint8 as stored: conversion and normalisation happen on the scoring device.
                yield joined[: scorer.batch_size]
                rest = joined[scorer.batch_size :]
                held, count = ([rest] if len(rest) else []), len(rest)
        if count:
            yield held[0] if len(held) == 1 else np.concatenate(held)

    parts: list[ScoreBatch] = []
    have = done = 0
    bar = tqdm(
        total=total, unit="tile", desc=f"scoring {name}", disable=not settings.progress, leave=False
    )
    started = time.perf_counter()
    shown = [0]

    def report(scored: int) -> None:
        now = done + passed[0]
        if now > shown[0]:
            bar.update(now - shown[0])
            shown[0] = now
        if scored and settings.on_progress is not None:
            settings.on_progress(ScoringProgress(name, now, total, time.perf_counter() - started))

    results = scorer.score_batches(batches(), keep_maps=settings.keep_maps)
    while True:
        t0, before = time.perf_counter(), upstream[0]
        result = next(results, None)
        timing["model_s"] += time.perf_counter() - t0 - (upstream[0] - before)
        if result is None:
            break
        parts.append(result)
        have += len(result.mean)
        while pending and have >= pending[0][2]:
            parts, have = _write_shard(sink, pending.popleft(), parts, have)
        done += len(result.mean)
        report(len(result.mean))
    while pending and pending[0][2] == 0:  # shards at the end with every tile skipped
        parts, have = _write_shard(sink, pending.popleft(), parts, have)
    report(0)
    bar.close()
    assert not pending and have == 0, "every shard's tiles were scored"


def _write_shard(
    sink: TileStore | TileStoreWriter,
    shard: tuple[int, int, int, np.ndarray | None],
    parts: list[ScoreBatch],
    have: int,
) -> tuple[list[ScoreBatch], int]:
    """Write the scores of one shard (the first ``n`` of ``parts``; NaN for its skipped tiles);
    returns the scores left over and their count."""
    start, n_tiles, n, skipped = shard
    if n == 0:
        nan = np.full(n_tiles, np.nan, np.float32)
        sink.write_scores(start, nan, nan)
        return parts, have
    merged = _concat_scores(parts)
    mean, peak = merged.mean[:n], merged.max[:n]
    maps = merged.maps[:n] if merged.maps is not None else None
    if skipped is not None:
        mean, peak = _spread(mean, skipped), _spread(peak, skipped)
        maps = _spread(maps, skipped) if maps is not None else None
    sink.write_scores(start, mean, peak, maps)
    rest = ScoreBatch(
        merged.mean[n:],
        merged.max[n:],
        merged.maps[n:] if merged.maps is not None else None,
    )
    return ([rest] if len(rest.mean) else []), have - n


def _spread(scored: np.ndarray, skipped: np.ndarray) -> np.ndarray:
    """Values of the scored tiles back in their shard's places, NaN for the skipped ones."""
    out = np.full((len(skipped), *scored.shape[1:]), np.nan, np.float32)
    out[~skipped] = scored
    return out


def _concat_scores(parts: Sequence[ScoreBatch]) -> ScoreBatch:
    if len(parts) == 1:
        return parts[0]
    maps = [p.maps for p in parts if p.maps is not None]
    return ScoreBatch(
        np.concatenate([p.mean for p in parts]),
        np.concatenate([p.max for p in parts]),
        np.concatenate(maps) if len(maps) == len(parts) else None,
    )


def _render(run: SlideRun, store: TileStore) -> tuple[dict[str, str], Any]:
    """The pictures, NGFF, GeoJSON and tile table of a scored store."""
    t0 = time.perf_counter()
    gp = run.grid.plan
    scores, max_scores = store.scores, store.max_scores
    assert scores is not None and max_scores is not None  # the store has been scored
    flags = store.qc_flags if run.settings.qc != "off" else None
    thumb, thumb_ds = run.slide.thumbnail(run.settings.max_px)
    order = np.argsort(-scores)[: run.settings.top_k]
    order = order[np.isfinite(scores[order])]  # tiles left out by --qc exclude are not ranked
    top = [(int(i), store.read(int(i), int(i) + 1)[0]) for i in order]
    geometry = SlideGeometry(
        width=run.slide.dimensions[0],
        height=run.slide.dimensions[1],
        mpp=run.slide.mpp,
        tile_size_l0=gp.tile_size_l0,
        stride_l0=gp.stride_l0,
        grid_cols=run.grid.cols,
        grid_rows=run.grid.rows,
    )
    scale = colour_scale(run.scorer.calibration, "mean", run.settings.cmap)
    if run.settings.scale == "slide":
        scale = slide_colour_scale(scores, scale)
    identity = run.scorer.identity
    model_path = identity.get("model_path")
    provenance = {
        "slide_name": run.slide.name,
        "slide_fingerprint": run.plan.identity["slide_fingerprint"],
        "model_sha256": identity.get("model_sha256"),
        "model_name": identity.get("model_name"),
        "model_file": Path(model_path).name if model_path else None,
        "backbone": identity.get("backbone"),
        "colour_scale": asdict(scale),
        "software_version": __version__,
    }
    outputs = write_slide_outputs(
        run.plan.work,
        slide_name=run.slide.name,
        geometry=geometry,
        coords=store.coords,
        grid_index=store.grid_index,
        scores=scores,
        max_scores=max_scores,
        thumbnail=thumb,
        thumbnail_downsample=thumb_ds,
        tissue_mask=run.tissue.mask,
        mask_downsample=run.tissue.downsample,
        scale=scale,
        top_tiles=top,
        max_px=run.settings.max_px,
        maps=store.maps if run.settings.keep_maps else None,
        tissue_fraction=store.tissue_fraction,
        provenance=provenance,
        alpha=run.settings.alpha,
        qc=_tile_qc(store, run.settings),
    )
    if flags is not None:
        from .quality import write_qc_labels

        write_qc_labels(
            Path(outputs["ngff"]), (run.grid.rows, run.grid.cols), store.grid_index, flags
        )
    run.timing["stitch_s"] = time.perf_counter() - t0
    return outputs, scale


def _tile_qc(store: TileStore, settings: HeatmapSettings) -> TileQC | None:
    """The store's QC of its tiles, unless ``--qc off``."""
    values, flags = store.qc_values, store.qc_flags
    if settings.qc == "off" or values is None or flags is None:
        return None
    return TileQC(values, flags, settings.qc_settings)


def _summarise(
    run: SlideRun,
    store: TileStore,
    scale,
    n_scored: int,
    pipeline_s: float,
    outputs: dict[str, str],
) -> dict[str, Any]:
    """summary.json: inputs, identity, counts, score statistics, timings; output paths point to
    the final folder (where they will be once it is renamed into place)."""
    gp = run.grid.plan
    all_scores = store.scores
    assert all_scores is not None  # the store has been scored
    # Tiles left out by --qc exclude have no score: statistics are of the scored tiles.
    scores = all_scores[np.isfinite(all_scores)]
    if len(scores) == 0:
        scores = np.full(1, np.nan, np.float32)

    def rate(seconds: float) -> float | None:
        return n_scored / seconds if seconds > 0 else None

    return {
        "slide": run.slide.name,
        "status": "ok",
        "slide_path": str(run.plan.slide_path.resolve()),
        "slide_fingerprint": run.plan.identity["slide_fingerprint"],
        "identity": run.plan.identity,
        "slide_dimensions": list(run.slide.dimensions),
        "level0_mpp": run.slide.mpp,
        "mpp_source": run.slide.known_resolution().source,
        "target_mpp": gp.target_mpp,
        "actual_mpp": gp.actual_mpp,
        "level": gp.level,
        "tile_px": gp.tile_px,
        "tile_size_l0": gp.tile_size_l0,
        "grid": [run.grid.cols, run.grid.rows],
        "n_grid_tiles": len(run.grid),
        "n_tiles": int(len(all_scores)),
        "n_scored": int(np.isfinite(all_scores).sum()),
        "tissue_fraction_slide": run.tissue.tissue_fraction,
        "tissue_fraction_tiles_mean": float(store.tissue_fraction.mean()),
        "score_mean": float(np.mean(scores)),
        "score_median": float(np.median(scores)),
        "score_max": float(np.max(scores)),
        "score_quantiles": {
            f"{q:g}": float(np.quantile(scores, q)) for q in (0.01, 0.25, 0.5, 0.75, 0.99)
        },
        "fraction_anomalous": float(np.mean(scores >= scale.threshold)),
        "qc": _qc_summary(store, run.settings),
        "colour_scale": asdict(scale),
        "timings_s": run.timing,
        "tiles_per_s": {
            "end_to_end": len(all_scores) / run.timing["total_s"],
            "pipeline": rate(pipeline_s),
            "read": rate(run.timing["read_s"]),
            "model": rate(run.timing["model_s"]),
            "write": rate(run.timing["write_s"]),
        },
        "batch_size": run.scorer.batch_size,
        "batch_size_choice": run.scorer.batch_choice.to_dict(),
        "compile": run.scorer.compile_mode,
        "device": str(run.scorer.device),
        "precision": run.scorer.precision,
        "model": run.scorer.identity,
        "outputs": {
            key: str(run.plan.final / Path(path).relative_to(run.plan.work))
            for key, path in outputs.items()
        },
        "command": " ".join(sys.argv),
        "software_version": __version__,
        "package_versions": package_versions(),
    }


def _qc_summary(store: TileStore, settings: HeatmapSettings) -> dict[str, Any]:
    """summary.json's ``qc``: the mode, the settings, the fraction of tiles and of tissue per
    flag, the verdict and how many tiles were left unscored."""
    qc = _tile_qc(store, settings)
    if qc is None:
        return {"mode": settings.qc}
    from .quality import tissue_fractions
    from .slide.qc import slide_verdict

    tissue = tissue_fractions(qc, store.tissue_fraction)
    verdict, reasons = slide_verdict(tissue, settings.qc_settings)
    scores = store.scores
    return {
        "mode": settings.qc,
        "settings": settings.qc_settings.to_dict(),
        "tile_fractions": qc.fractions(),
        "tissue_fractions": tissue,
        "n_flagged": int((qc.flags != 0).sum()),
        "n_artifact": int(artifact_mask(qc.flags).sum()),
        "n_excluded": int((~np.isfinite(scores)).sum()) if scores is not None else 0,
        "verdict": verdict,
        "reasons": reasons,
    }


def package_versions() -> dict[str, str]:
    """Versions of the libraries that shape the results, recorded with them."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in (
        "torch",
        "torchvision",
        "numpy",
        "zarr",
        "openslide-python",
        "openslide-bin",
        "tifffile",
        "imagecodecs",
        "scikit-image",
        "pillow",
    ):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


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


def cohort_output_names(paths: Sequence[str | Path], out_root: Path) -> list[str]:
    """One results folder name per slide: unique in the run and never another slide's folder."""
    counts: dict[str, int] = {}
    for p in paths:
        counts[Path(p).name] = counts.get(Path(p).name, 0) + 1
    return [output_name(Path(p), out_root, clash=counts[Path(p).name] > 1) for p in paths]


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

    Rows have ``status`` ok, skipped (done), no tissue, failed or busy (another run holds the
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
    from dataclasses import replace

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
