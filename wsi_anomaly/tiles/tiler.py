"""Slide → tissue tiles in a zarr store, streamed.

Tiles are decoded by a pool of threads (libjpeg-turbo and OpenSlide release the GIL) one shard
ahead of the writer, so reading and writing overlap and memory stays at about two shards of
tiles whatever the slide size.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..errors import InvalidInputError, NotBrightfieldError, NoTissueError
from ..outputs import (
    OutputLock,
    check_free_space,
    check_replaceable,
    commit_dir,
    mark_owned,
    remove_path,
    validate_output_name,
)
from ..slide.annotations import load_annotations, rasterize
from ..slide.grid import TileGrid, box_fractions, make_grid, plan_read
from ..slide.qc import (
    QCSettings,
    TileQCMeter,
    colour_reference_od,
    reference_od,
    tissue_border_um,
)
from ..slide.reader import Slide
from ..slide.stain import brightfield_problem
from ..slide.tissue import TissueMask, TissueSettings, detect_tissue
from .store import TileStoreWriter, prepare_output

#: Marker kind of a ``--export-png`` folder (only such folders are replaced with --overwrite).
PNG_FOLDER_KIND = "png-tiles"

log = logging.getLogger(__name__)


@dataclass
class TilingSettings:
    """What to tile and how. ``target_mpp`` in µm/px; pixel sizes at the target resolution."""

    target_mpp: float = 0.5
    tile_px: int = 256
    stride_px: int | None = None
    min_tissue: float = 0.5
    tissue: TissueSettings = field(default_factory=TissueSettings)
    annotations: str | None = None
    annotation_class: str | None = None
    min_annotation: float = 0.5
    workers: int = 0  # 0 → one per CPU core available to this process
    #: tissue quality control measured on the decoded tiles (None: no QC arrays)
    qc: QCSettings | None = field(default_factory=QCSettings)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["tissue"] = self.tissue.to_dict()
        out["qc"] = self.qc.to_dict() if self.qc is not None else None
        return out


@dataclass
class TilingResult:
    store: Path
    n_tiles: int
    n_grid: int
    tissue_fraction: float
    seconds: float
    plan: dict

    @property
    def tiles_per_s(self) -> float:
        return self.n_tiles / self.seconds if self.seconds > 0 else float("nan")


def tissue_mask(slide: Slide, settings: TissueSettings) -> TissueMask:
    """Tissue mask on a streamed thumbnail of the slide."""
    thumb, downsample = slide.thumbnail(settings.thumbnail_max_px, settings.thumbnail_mpp)
    if (problem := brightfield_problem(thumb)) is not None:
        raise NotBrightfieldError(f"{slide.name} {problem}")
    mask, threshold = detect_tissue(thumb, slide.mpp * downsample, settings)
    return TissueMask(
        mask, downsample, threshold, reference_od(thumb, mask), colour_reference_od(thumb, mask)
    )


def plan_tiles(slide: Slide, settings: TilingSettings) -> tuple[TileGrid, TileGrid, TissueMask]:
    """The full grid (with tissue fractions) and the tiles to keep."""
    if not 0.0 <= settings.min_tissue <= 1.0:
        raise InvalidInputError(f"--min-tissue {settings.min_tissue} must be between 0 and 1")
    plan = plan_read(slide.levels, settings.target_mpp, settings.tile_px, settings.stride_px)
    lv = slide.levels[plan.level]
    grid = make_grid(plan, (lv.width, lv.height))
    tissue = tissue_mask(slide, settings.tissue)
    grid.tissue_fraction = box_fractions(
        tissue.mask, tissue.downsample, grid.coords, plan.tile_size_l0
    )
    keep = grid.tissue_fraction >= settings.min_tissue
    if settings.min_tissue <= 0:  # "keep everything" must not depend on float round-off
        keep[:] = True
    if settings.annotations:
        polys = load_annotations(settings.annotations, settings.annotation_class)
        region = rasterize(polys, tissue.mask.shape, tissue.downsample)
        inside = box_fractions(region, tissue.downsample, grid.coords, plan.tile_size_l0)
        keep &= inside >= settings.min_annotation
    return grid, grid.select(keep), tissue


def read_tile(slide: Slide, grid: TileGrid, i: int, out: np.ndarray | None = None) -> np.ndarray:
    """Tile ``i`` of ``grid`` as (T, T, 3) uint8 at the plan's resolution (into ``out`` if given)."""
    plan = grid.plan
    x, y = (int(v) for v in grid.level_xy[i])
    if not plan.resize:
        return slide.read_level(plan.level, x, y, plan.read_px, plan.read_px, out)
    region = Image.fromarray(slide.read_level(plan.level, x, y, plan.read_px, plan.read_px))
    # Area averaging, the antialiased downscale wsi.md §2 asks for. An integer factor (0.25 →
    # 0.5 µm/px, the usual case) is an exact mean of k×k blocks: Pillow's reduce does it ~2.5×
    # faster than a BOX resize, which is kept for the other factors.
    factor, rest = divmod(plan.read_px, plan.tile_px)
    if rest == 0:
        tile = np.asarray(region.reduce(factor))
    else:
        tile = np.asarray(region.resize((plan.tile_px, plan.tile_px), Image.Resampling.BOX))
    if out is None:
        return tile
    out[...] = tile
    return out


#: Batch arrays in circulation: two being decoded ahead, up to four held by the consumer
#: (the batch in hand and up to two still being written, see ``tile_slide``).
RING_BUFFERS = 6
#: Shard writes in flight in the tiler (each holds one batch array until written).
WRITE_THREADS = 2


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask: a SLURM job's or container's
    share of the machine, not every core of the machine)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def iter_tile_batches(
    slide: Slide,
    grid: TileGrid,
    batch: int,
    workers: int = 0,
    busy: list[float] | None = None,
    on_decoded: Callable[[int, np.ndarray], None] | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, tiles)`` in order, decoding the next batches while the caller works.

    ``tiles`` is reused for a later batch once four more batches have been yielded: copy it to
    keep it longer. ``busy``, a one-element list, accumulates the decoding threads' busy seconds.
    ``on_decoded(start, tiles)`` is called in the decoding thread on each part of a batch as
    soon as it is decoded (disjoint parts, from several threads at once): per-tile work there
    runs in parallel with decoding instead of in the caller's thread.
    """
    n = len(grid)
    workers = workers or available_cores()

    # Each batch is split into `workers` contiguous parts so each thread stays within a few
    # neighbouring TIFF tiles (good for the decoded-tile cache); threads fill one preallocated
    # batch array in place, so no copy is made when parts are joined.
    #
    # Batch arrays are recycled from a ring of RING_BUFFERS: fresh 50 MB arrays cost more in page
    # faults than decoding the tiles. A yielded array stays valid until four more were yielded.
    tile_px = grid.plan.tile_px
    ring: list[np.ndarray] = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tile-read") as pool:

        def submit(start: int) -> tuple[np.ndarray, list[Future]]:
            stop = min(start + batch, n)
            slot = (start // batch) % RING_BUFFERS
            if len(ring) <= slot:
                ring.append(np.empty((min(batch, n), tile_px, tile_px, 3), np.uint8))
            out = ring[slot][: stop - start]
            step = math.ceil((stop - start) / workers)
            return out, [
                pool.submit(
                    _load_range, slide, grid, s, min(s + step, stop), out, start, busy, on_decoded
                )
                for s in range(start, stop, step)
            ]

        pending: list[tuple[int, tuple[np.ndarray, list[Future]]]] = []
        starts = iter(range(0, n, batch))
        for s in starts:
            pending.append((s, submit(s)))
            if len(pending) == 2:
                break
        while pending:
            start, (out, futures) = pending.pop(0)
            nxt = next(starts, None)
            if nxt is not None:
                pending.append((nxt, submit(nxt)))
            for f in futures:
                f.result()
            yield start, out


def _load_range(
    slide: Slide,
    grid: TileGrid,
    start: int,
    stop: int,
    out: np.ndarray,
    offset: int,
    busy: list[float] | None = None,
    on_decoded: Callable[[int, np.ndarray], None] | None = None,
) -> None:
    t0 = time.perf_counter()
    for k in range(start, stop):
        read_tile(slide, grid, k, out[k - offset])
    if busy is not None:
        busy[0] += time.perf_counter() - t0  # a float add under the GIL: safe across threads
    if on_decoded is not None and stop > start:
        on_decoded(start, out[start - offset : stop - offset])


def _export_png(tiles: np.ndarray, coords: np.ndarray, folder: Path, stem: str) -> None:
    for tile, (x, y) in zip(tiles, coords):
        Image.fromarray(tile).save(folder / f"{stem}_x{int(x)}_y{int(y)}.png", compress_level=1)


def store_attributes(
    slide_path: str | Path,
    slide: Slide,
    grid: TileGrid,
    settings: TilingSettings,
    tissue: TissueMask,
) -> dict:
    """Provenance recorded in a tile store: the slide, its resolution, the grid and settings."""
    plan = grid.plan
    return {
        "slide_path": str(Path(slide_path).resolve()),
        "slide_name": slide.name,
        "slide_format": slide.format,
        "slide_reader": slide.backend,
        "slide_size_bytes": Path(slide_path).stat().st_size,
        "slide_fingerprint": slide.fingerprint(),
        "slide_dimensions": list(slide.dimensions),
        "level0_mpp": slide.mpp,
        "mpp_source": slide.known_resolution().source,
        **plan.to_dict(),
        "tile_size_l0": plan.tile_size_l0,
        "stride_l0": plan.stride_l0,
        "grid_cols": grid.cols,
        "grid_rows": grid.rows,
        "n_grid_tiles": len(grid),
        "settings": settings.to_dict(),
        "tissue_threshold": tissue.threshold,
        "tissue_fraction_slide": tissue.tissue_fraction,
    }


def stream_to_store(
    slide: Slide,
    grid: TileGrid,
    writer: TileStoreWriter,
    read_threads: int = 0,
    on_batch: Callable[[int, np.ndarray], None] | None = None,
    timing: dict[str, float] | None = None,
    desc: str = "tiling",
    progress: bool = True,
    on_decoded: Callable[[int, np.ndarray], None] | None = None,
) -> None:
    """Decode the tiles of ``grid`` once and write them to ``writer``, calling ``on_batch(start,
    tiles)`` on each shard while it is written (see :func:`stream_tiles`)."""
    for start, tiles in stream_tiles(
        slide, grid, writer, read_threads, timing, desc, progress, on_decoded
    ):
        if on_batch is not None:
            on_batch(start, tiles)


def stream_tiles(
    slide: Slide,
    grid: TileGrid,
    writer: TileStoreWriter,
    read_threads: int = 0,
    timing: dict[str, float] | None = None,
    desc: str = "tiling",
    progress: bool = True,
    on_decoded: Callable[[int, np.ndarray], None] | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Decode the tiles of ``grid`` once, write them to ``writer`` and yield each shard as
    ``(start, tiles)``: the one streaming loop behind ``tile`` and ``heatmap``.

    Decoding threads work a few shards ahead; each decoded shard is compressed and written in
    the background (two at a time: zarr's write path is partly serial) while the caller — the
    scorer, for ``heatmap`` — works on it, so the loop runs at the pace of its slowest stage.
    ``tiles`` stays valid until four more shards have been yielded. ``timing`` (when given)
    accumulates ``read_s`` (decoding threads' busy time), ``read_wait_s`` (time the caller
    waited for tiles) and ``write_s``. ``on_decoded``: see :func:`iter_tile_batches`.
    """
    timing = timing if timing is not None else {}
    for key in ("read_s", "read_wait_s", "write_s"):
        timing.setdefault(key, 0.0)
    busy = [0.0]
    bar = tqdm(
        total=len(grid), unit="tile", desc=f"{desc} {slide.name}", disable=not progress, leave=False
    )
    with ThreadPoolExecutor(max_workers=WRITE_THREADS, thread_name_prefix="tile-write") as io:
        pending: list[Future] = []
        t_wait = time.perf_counter()
        batches = iter_tile_batches(slide, grid, writer.shard_tiles, read_threads, busy, on_decoded)
        for start, tiles in batches:
            timing["read_wait_s"] += time.perf_counter() - t_wait
            while len(pending) >= WRITE_THREADS:
                pending.pop(0).result()
            pending.append(io.submit(_timed_write, timing, writer, start, tiles))
            yield start, tiles
            bar.update(len(tiles))
            t_wait = time.perf_counter()
        for future in pending:
            future.result()
    bar.close()
    timing["read_s"] += busy[0]


def _timed_write(
    timing: dict[str, float], writer: TileStoreWriter, start: int, tiles: np.ndarray
) -> None:
    t0 = time.perf_counter()
    try:
        writer.write(start, tiles)
    finally:
        timing["write_s"] += time.perf_counter() - t0  # a float add under the GIL


def qc_meter(
    slide: Slide, kept: TileGrid, tissue: TissueMask, settings: QCSettings | None
) -> TileQCMeter | None:
    """The QC meter of the tiles ``kept`` (their tissue-border distances come from the tissue
    mask), or None when ``settings`` is None."""
    if settings is None:
        return None
    border = tissue_border_um(tissue, slide.mpp, kept.coords, kept.plan.tile_size_l0)
    return TileQCMeter(settings, border, tissue.reference_od, tissue.colour_reference_od)


def store_bytes_estimate(n_tiles: int, tile_px: int) -> int:
    """Disk space a store of ``n_tiles`` needs: the raw bytes (lz4 keeps 80–95 % of tissue)
    plus room for the small arrays."""
    return n_tiles * tile_px * tile_px * 3 + (16 << 20)


def tile_slide(
    slide_path: str | Path,
    out: str | Path,
    settings: TilingSettings | None = None,
    slide_mpp: float | None = None,
    overwrite: bool = False,
    export_png: str | Path | None = None,
    progress: bool = True,
) -> TilingResult:
    """Tile one slide into a zarr store at ``out``.

    Only one run writes ``out`` at a time (a lock file next to it); ``overwrite`` replaces only a
    tile store (and PNG folder) this tool wrote.

    Raises:
        NoTissueError when no tile passes the tissue (and annotation) filters; the typed errors
        of :class:`Slide`; OutputExistsError when ``out`` exists and not ``overwrite``, or is not
        a tile store; OutputLockedError when another run is writing ``out``.
    """
    out = Path(out)
    validate_output_name(out)
    settings = settings if settings is not None else TilingSettings()
    t_start = time.perf_counter()
    # Refuse early, before any work, if the output is there already (nothing is touched here).
    prepare_output(out, overwrite)
    png_dir = Path(export_png) if export_png else None
    if png_dir is not None:
        check_replaceable(png_dir, overwrite, (PNG_FOLDER_KIND,), "PNG tile folder")
    with contextlib.ExitStack() as held:
        # The lock comes first: a run refused here has created and removed nothing.
        lock = held.enter_context(OutputLock(out))
        prepare_output(out, overwrite)  # again: another run may have finished it meanwhile
        lock.remove_leftovers()
        png_tmp = None
        if png_dir is not None:
            png_lock = held.enter_context(OutputLock(png_dir))
            png_lock.remove_leftovers()
            png_tmp = png_lock.work_path()
            held.callback(remove_path, png_tmp)
        work = lock.work_path()
        held.callback(remove_path, work)  # this run's own: whatever stopped it, it goes
        return _tile_slide(
            slide_path,
            out,
            settings,
            slide_mpp,
            overwrite,
            png_dir,
            png_tmp,
            progress,
            t_start,
            work,
        )


def _tile_slide(
    slide_path, out, settings, slide_mpp, overwrite, png_dir, png_tmp, progress, t_start, work
) -> TilingResult:
    with Slide(slide_path, override_mpp=slide_mpp) as slide:
        grid, kept, tissue = plan_tiles(slide, settings)
        plan = grid.plan
        if len(kept) == 0:
            what = "inside the annotations " if settings.annotations else ""
            raise NoTissueError(
                f"{slide.name}: no tissue {what}— 0 of {len(grid)} tiles have ≥ "
                f"{settings.min_tissue:.0%} tissue at {plan.actual_mpp:.3f} mpp (all background?)"
            )
        log.info(
            "%s: %d of %d grid tiles kept (level %d, %.3f mpp)",
            slide.name,
            len(kept),
            len(grid),
            plan.level,
            plan.actual_mpp,
        )
        need = store_bytes_estimate(len(kept), plan.tile_px) * (2 if png_tmp is not None else 1)
        check_free_space(out.parent, need, f"the tile store of {slide.name}")
        attrs = store_attributes(slide_path, slide, grid, settings, tissue)
        if png_tmp is not None:
            png_tmp.mkdir(parents=True)
            mark_owned(png_tmp, PNG_FOLDER_KIND)
        stem = Path(slide.name).stem

        meter = qc_meter(slide, kept, tissue, settings.qc)

        def export(start: int, tiles: np.ndarray) -> None:
            if meter is not None:  # the decoding threads measured it already, as a rule
                meter.ensure_measured(start, tiles)
            if png_tmp is not None:
                _export_png(tiles, kept.coords[start : start + len(tiles)], png_tmp, stem)

        with TileStoreWriter.for_tiles(out, kept, attrs, overwrite=overwrite, work=work) as writer:
            if meter is not None:
                writer.create_qc(meter.record())
            stream_to_store(
                slide,
                kept,
                writer,
                settings.workers,
                on_batch=export,
                desc="tiling",
                progress=progress,
                # QC measures each part of a shard in the thread that decoded it.
                on_decoded=meter.measure if meter is not None else None,
            )
            if meter is not None:
                # Flagged and written once for the whole slide (N × K floats): per shard, the
                # small writes cost more than measuring. The store is complete, and so open
                # to reuse, only once closed below, so no store holds tiles without their QC.
                writer.write_qc(0, *meter.results())
            seconds = time.perf_counter() - t_start
            writer.close(
                {
                    "tiling_seconds": seconds,
                    "qc_seconds": meter.seconds if meter else None,
                    "qc_cpu_seconds": meter.cpu_seconds if meter else None,
                }
            )
        if png_tmp is not None and png_dir is not None:
            commit_dir(png_tmp, png_dir)
    return TilingResult(
        out, len(kept), len(grid), float(kept.tissue_fraction.mean()), seconds, plan.to_dict()
    )
