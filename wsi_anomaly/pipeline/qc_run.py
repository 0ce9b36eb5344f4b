"""``wsi-anomaly qc``: quality control alone — slides in, QC pictures and tables out, no model.

For each slide: the tissue mask and tile grid as the tiler lays them, every tissue tile decoded
once and measured (:mod:`wsi_anomaly.slide.qc`), then in ``OUT/<slide name>/``:

* ``qc.png``: the slide's thumbnail with the tiles of each artifact class outlined in the class
  colour, and a legend with each class's fraction of the tissue;
* ``qc_tiles.csv``: one row per tissue tile — level-0 x, y, width, height, tissue fraction,
  every measurement and the flags;
* ``summary.json``: the slide, the settings, the fractions, the verdict and its reasons.

``OUT/qc_summary.csv`` is the cohort table: one row per slide with the fraction of tissue per
artifact class, the usable-tissue fraction and the pass / check / fail verdict with its reasons.
Slides are found (:mod:`.discovery`) and their folders named (:mod:`.results`) as for
``heatmap``; the tables and pictures are :mod:`wsi_anomaly.quality`'s.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import NoTissueError, OutputExistsError, OutputLockedError, WsiAnomalyError
from ..outputs import (
    OutputLock,
    atomic_path,
    commit_dir,
    is_owned,
    mark_owned,
    os_errors_as_user_errors,
    remove_path,
    validate_output_name,
    write_json,
)
from ..quality import qc_canvas, tissue_fractions, write_qc_picture, write_qc_table
from ..slide.qc import ARTIFACT_FLAGS, QCSettings, TileQC, slide_verdict
from .discovery import find_slides
from .results import cohort_output_names, output_name

log = logging.getLogger(__name__)

#: Marker kind of a slide's QC folder (only such folders are replaced with --overwrite).
QC_RESULT_KIND = "slide-qc"
QC_SUMMARY_FIELDS = (
    "slide",
    "slide_path",
    "status",
    "verdict",
    "reasons",
    "n_tiles",
    "usable_fraction",
    "any_artifact",
    *ARTIFACT_FLAGS,
    "border",
    "seconds",
    "output",
    "error",
)


@dataclass
class QCRunSettings:
    """What ``wsi-anomaly qc`` does per slide. ``target_mpp`` in µm/px."""

    target_mpp: float = 0.5
    tile_px: int = 256
    min_tissue: float = 0.5
    qc: QCSettings = field(default_factory=QCSettings)
    read_workers: int = 0
    max_px: int = 2048
    slide_mpp: float | None = None
    mpp_csv: str | None = None
    overwrite: bool = False
    progress: bool = True

    def identity(self, slide_mpp: float | None) -> dict[str, Any]:
        """The settings that change a slide's QC results (a finished slide is reused only when
        they match)."""
        return {
            "target_mpp": self.target_mpp,
            "tile_px": self.tile_px,
            "min_tissue": self.min_tissue,
            "slide_mpp": slide_mpp,
            "max_px": self.max_px,
            "qc": self.qc.to_dict(),
        }


# -- one slide -----------------------------------------------------------------------------------
def qc_slide(
    slide_path: str | Path,
    out_root: str | Path,
    settings: QCRunSettings,
    name: str | None = None,
) -> dict[str, Any]:
    """Quality control of one slide into ``out_root/<name>/``; returns its summary."""
    from ..slide import Slide
    from ..slide.resolution import load_mpp_csv, lookup_mpp
    from ..tiles.tiler import TilingSettings, iter_tile_batches, plan_tiles, qc_meter

    slide_path, out_root = Path(slide_path), Path(out_root)
    name = name or output_name(slide_path, out_root)
    final, work = out_root / name, out_root / f".{name}.partial"
    override = settings.slide_mpp
    if override is None and settings.mpp_csv:
        override = lookup_mpp(load_mpp_csv(settings.mpp_csv), slide_path)
    t_start = time.perf_counter()
    with OutputLock(final), Slide(slide_path, override_mpp=override) as slide:
        identity = {
            "slide_path": str(slide_path.resolve()),
            "slide_fingerprint": slide.fingerprint(),
            "settings": settings.identity(override),
        }
        done = _reusable(final, identity, settings.overwrite)
        if done is not None:
            return done
        tiling = TilingSettings(
            target_mpp=settings.target_mpp,
            tile_px=settings.tile_px,
            min_tissue=settings.min_tissue,
            workers=settings.read_workers,
            qc=settings.qc,
        )
        grid, kept, tissue = plan_tiles(slide, tiling)
        if len(kept) == 0:
            raise NoTissueError(
                f"{slide.name}: no tissue — 0 of {len(grid)} tiles have ≥ "
                f"{settings.min_tissue:.0%} tissue at {grid.plan.actual_mpp:.3f} mpp"
            )
        meter = qc_meter(slide, kept, tissue, settings.qc)
        assert meter is not None
        t_tiles = time.perf_counter()
        from tqdm.auto import tqdm

        bar = tqdm(
            total=len(kept), unit="tile", desc=f"qc {slide.name}", disable=not settings.progress
        )
        # Each part of a batch is measured in the thread that decoded it.
        batches = iter_tile_batches(
            slide, kept, 256, settings.read_workers, on_decoded=meter.measure
        )
        for start, tiles in batches:
            meter.ensure_measured(start, tiles)
            bar.update(len(tiles))
        bar.close()
        values, flags = meter.results()  # flagged once, for the whole slide
        tiles_s = time.perf_counter() - t_tiles
        qc = TileQC(values, flags, settings.qc)
        fractions = tissue_fractions(qc, kept.tissue_fraction)
        verdict, reasons = slide_verdict(fractions, settings.qc)
        thumb, thumb_ds = slide.thumbnail(settings.max_px)
        with os_errors_as_user_errors(final):
            remove_path(work)
            work.mkdir(parents=True)
            try:
                tile_l0 = grid.plan.tile_size_l0
                write_qc_table(
                    work / "qc_tiles.csv", kept.coords, tile_l0, kept.tissue_fraction, values, flags
                )
                canvas = qc_canvas(thumb, thumb_ds, kept.coords, tile_l0, flags)
                write_qc_picture(work / "qc.png", canvas, slide.name, fractions, verdict)
                summary = {
                    "slide": slide.name,
                    "status": "ok",
                    "slide_path": str(slide_path.resolve()),
                    "slide_fingerprint": identity["slide_fingerprint"],
                    "identity": identity,
                    "level0_mpp": slide.mpp,
                    "mpp_source": slide.known_resolution().source,
                    "actual_mpp": grid.plan.actual_mpp,
                    "n_grid_tiles": len(grid),
                    "n_tiles": len(kept),
                    "reference_od": meter.reference,
                    "verdict": verdict,
                    "reasons": reasons,
                    "fractions": fractions,
                    "tile_fractions": qc.fractions(),
                    "timings_s": {
                        "tiles_s": tiles_s,
                        "qc_s": meter.seconds,
                        "qc_cpu_s": meter.cpu_seconds,
                        "total_s": time.perf_counter() - t_start,
                    },
                    "outputs": {
                        "picture": str(final / "qc.png"),
                        "tiles_csv": str(final / "qc_tiles.csv"),
                    },
                    "command": " ".join(sys.argv),
                    "software_version": __version__,
                }
                write_json(work / "summary.json", summary)
                mark_owned(work, QC_RESULT_KIND)
                commit_dir(work, final)
            except BaseException:
                remove_path(work)
                raise
    summary["output"] = str(final)
    return summary


def _reusable(final: Path, identity: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    if not final.exists() and not final.is_symlink():
        return None
    if final.is_symlink() or not is_owned(final, (QC_RESULT_KIND,)):
        raise OutputExistsError(
            f"{final} exists and is not a QC folder written by wsi-anomaly; refusing to "
            "replace it (choose another --out)"
        )
    if overwrite:
        return None
    try:
        summary = json.loads((final / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = {}
    if isinstance(summary, dict) and summary.get("identity") == identity:
        summary["status"] = "skipped (done)"
        summary["output"] = str(final)
        return summary
    raise OutputExistsError(
        f"{final} holds QC of other work (slide content or settings differ); pass --overwrite "
        "to replace it, or choose another --out"
    )


# -- a cohort ------------------------------------------------------------------------------------
def _row(summary: dict[str, Any]) -> dict[str, Any]:
    fractions = summary.get("fractions") or {}
    row = {
        "slide": summary.get("slide", ""),
        "slide_path": summary.get("slide_path", ""),
        "status": summary.get("status", ""),
        "verdict": summary.get("verdict", ""),
        "reasons": "; ".join(summary.get("reasons") or []),
        "n_tiles": summary.get("n_tiles", ""),
        "seconds": (summary.get("timings_s") or {}).get("total_s", ""),
        "output": summary.get("output", ""),
        "error": summary.get("error", ""),
    }
    for key in ("usable_fraction", "any_artifact", *ARTIFACT_FLAGS, "border"):
        value = fractions.get(key, "")
        row[key] = f"{value:.4f}" if isinstance(value, float) else value
    return row


def run_qc(
    slides: list[str],
    out_root: str | Path,
    settings: QCRunSettings,
    skip_errors: bool = False,
    recursive: bool = False,
) -> list[dict[str, Any]]:
    """QC of many slides, one after another; writes ``out_root/qc_summary.csv``. Rows have
    ``status`` ok, skipped (done), no tissue, failed or busy."""
    out_root = Path(out_root)
    validate_output_name(out_root)
    if out_root.exists() and not out_root.is_dir():
        raise OutputExistsError(f"--out {out_root} is a file; QC results go into a folder")
    paths = find_slides(slides, recursive, skip=[out_root])
    with os_errors_as_user_errors(out_root):
        out_root.mkdir(parents=True, exist_ok=True)
    rows = []
    for path, name in zip(paths, cohort_output_names(paths, out_root)):
        try:
            rows.append(_row(qc_slide(path, out_root, settings, name)))
        except Exception as exc:
            if not skip_errors:
                raise
            status = (
                "no tissue"
                if isinstance(exc, NoTissueError)
                else "busy"
                if isinstance(exc, OutputLockedError)
                else "failed"
            )
            message = (
                str(exc) if isinstance(exc, WsiAnomalyError) else f"{type(exc).__name__}: {exc}"
            )
            log.warning("%s: %s: %s", path.name, status, message)
            rows.append(
                _row(
                    {
                        "slide": path.name,
                        "slide_path": str(path.resolve()),
                        "status": status,
                        "error": message,
                        "output": str(out_root / name),
                    }
                )
            )
    _write_summary(out_root / "qc_summary.csv", rows)
    return rows


def _write_summary(path: Path, rows: list[dict[str, Any]]) -> None:
    """Merge this run's rows into the cohort table (one row per slide folder, newest wins)."""
    merged: dict[str, dict[str, Any]] = {}
    if path.is_file():
        with path.open(newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                merged[Path(row.get("output") or row.get("slide", "")).name] = row
    for row in rows:
        key = Path(row.get("output") or row.get("slide", "")).name
        if row["status"] == "skipped (done)" and key in merged:
            continue
        merged[key] = row
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(QC_SUMMARY_FIELDS))
        writer.writeheader()
        for key in sorted(merged):
            writer.writerow({k: merged[key].get(k, "") for k in QC_SUMMARY_FIELDS})
