"""A scored slide's pictures, NGFF, GeoJSON and tile table: the slide run gathers what they are
drawn from into one :class:`~wsi_anomaly.stitch.SlideOutputs`, and :mod:`wsi_anomaly.stitch`
draws them."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import __version__
from ..errors import InvalidInputError, OutputExistsError
from ..outputs import os_errors_as_user_errors, remove_path, write_json
from ..slide import Slide, slide_fingerprint
from ..slide.grid import TileGrid
from ..slide.qc import QCSettings, TileQC
from ..slide.tissue import TissueMask
from ..stitch import (
    ColourScale,
    DisplaySettings,
    SlideGeometry,
    SlideOutputs,
    colour_scale,
    headline_scores,
    recorded_tile_score,
    render_slide_outputs,
    result_provenance,
    slide_colour_scale,
)
from ..tiles.store import TileStore
from ..tiles.tiler import TilingSettings, plan_tiles
from .settings import DISPLAY_KEYS, HeatmapSettings

if TYPE_CHECKING:
    from .slide_run import SlideRun


def slide_outputs(run: SlideRun, store: TileStore) -> SlideOutputs:
    """What a scored slide's outputs are drawn from: the store's scores, the slide's thumbnail
    and tissue, the model's colour scale and the run's display settings; the tiles' score is
    the one the model's family ranks by (its ``tile_score``), on the calibration's quantiles
    of it."""
    tile_score = run.model.family.tile_score
    fixed = colour_scale(run.model.calibration, tile_score, run.settings.cmap)
    return _outputs(
        run.slide,
        run.grid,
        run.tissue,
        store,
        run.settings.display,
        fixed,
        run.plan.identity["slide_fingerprint"],
        run.model.identity,
        run.settings.keep_maps,
        _tile_qc(store, run.settings),
        tile_score,
    )


def _outputs(
    slide: Slide,
    grid: TileGrid,
    tissue: TissueMask,
    store: TileStore,
    display: DisplaySettings,
    fixed: ColourScale,
    fingerprint: str,
    model_identity: dict[str, Any],
    keep_maps: bool,
    qc: TileQC | None,
    tile_score: str,
) -> SlideOutputs:
    gp = grid.plan
    scores, max_scores = store.scores, store.max_scores
    assert scores is not None and max_scores is not None  # the store has been scored
    ranked = headline_scores(scores, max_scores, tile_score)
    thumb, thumb_ds = slide.thumbnail(display.max_px)
    order = np.argsort(-ranked)
    order = order[np.isfinite(ranked[order])]  # tiles left out by --qc exclude are not ranked
    if qc is not None:  # with QC, tiles with no flag (artifact or tissue edge) come first
        clean = qc.flags[order] == 0
        order = np.concatenate([order[clean], order[~clean]])
    order = order[: display.top_k]
    top = [(int(i), store.read(int(i), int(i) + 1)[0]) for i in order]
    geometry = SlideGeometry(
        width=slide.dimensions[0],
        height=slide.dimensions[1],
        mpp=slide.mpp,
        tile_size_l0=gp.tile_size_l0,
        stride_l0=gp.stride_l0,
        grid_cols=grid.cols,
        grid_rows=grid.rows,
    )
    scale = replace(fixed, cmap=display.cmap)
    if display.scale == "slide":
        scale = slide_colour_scale(ranked, scale)
    provenance = result_provenance(
        slide.name,
        fingerprint,
        model_identity,
        model_identity.get("backbone"),
        tile_score,
        scale,
    )
    return SlideOutputs(
        slide_name=slide.name,
        geometry=geometry,
        coords=store.coords,
        grid_index=store.grid_index,
        scores=scores,
        max_scores=max_scores,
        thumbnail=thumb,
        thumbnail_downsample=thumb_ds,
        tissue_mask=tissue.mask,
        mask_downsample=tissue.downsample,
        scale=scale,
        top_tiles=top,
        display=display,
        maps=store.maps if keep_maps else None,
        tissue_fraction=store.tissue_fraction,
        provenance=provenance,
        qc=qc,
        tile_score=tile_score,
    )


def render_slide(run: SlideRun, store: TileStore) -> tuple[dict[str, str], ColourScale]:
    """Write the outputs of a scored store into the run's working folder; returns the output
    paths and the colour scale they were drawn on."""
    t0 = time.perf_counter()
    outputs = slide_outputs(run, store)
    paths = render_slide_outputs(run.plan.work, outputs)
    flags = store.qc_flags if run.settings.qc != "off" else None
    if flags is not None:
        from ..quality import write_qc_labels

        write_qc_labels(
            Path(paths["ngff"]), (run.grid.rows, run.grid.cols), store.grid_index, flags
        )
    run.timing["stitch_s"] = time.perf_counter() - t0
    return paths, outputs.scale


def _tile_qc(store: TileStore, settings: HeatmapSettings) -> TileQC | None:
    """The store's QC of its tiles, unless ``--qc off``."""
    values, flags = store.qc_values, store.qc_flags
    if settings.qc == "off" or values is None or flags is None:
        return None
    return TileQC(values, flags, settings.qc_settings)


#: Prefix of the folder inside a results folder that a re-draw draws into.
REDRAW_PREFIX = ".redraw."


def redraw_results(
    final: Path,
    display: DisplaySettings,
    fixed: ColourScale | None = None,
    identity: dict[str, Any] | None = None,
    slide_path: Path | None = None,
    qc_settings: QCSettings | None = None,
    tile_score: str | None = None,
) -> dict[str, Any]:
    """Re-draw a slide results folder's pictures, NGFF, GeoJSON and tile table from its stored
    scores with ``display``; no tile is scored. Returns the rewritten summary.

    ``fixed``: the model's colour scale (from its calibration, of ``tile_score``); None → the
    one summary.json records. ``identity``: the identity to record (the heatmap run's; None →
    the folder's, with ``display``). ``slide_path``: the slide (None → the one summary.json
    records; its content must be what was scored). ``tile_score``: which stored value is the
    tiles' score (the model family's); None → the one summary.json records ("mean" when it
    records none: results written before it was recorded).

    Safe against interruption: summary.json is first marked stale (``status`` "redrawing",
    no display in its identity, so any later run re-draws), the outputs are drawn into a
    hidden folder inside the results folder and each renamed into place, and summary.json is
    written last. The caller holds the folder's lock. The summary returned has ``status``
    "redrawn" (the one written says "ok")."""
    from .results import recorded_identity
    from .summary import score_statistics

    final = Path(final)
    t0 = time.perf_counter()
    summary_path = final / "summary.json"
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        store = TileStore(final / "tiles.zarr")
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"{final} is not a slide results folder ({exc})") from None
    if not isinstance(summary, dict) or store.scores is None:
        raise InvalidInputError(f"{final} is not a slide results folder with scores")
    recorded = recorded_identity(summary)
    scoring = recorded.get("scoring") or {}
    if tile_score is None:
        tile_score = recorded_tile_score(summary, str(summary_path))
    if fixed is None:
        fixed = recorded_model_scale(summary, final, tile_score)
    slide_path = Path(slide_path or summary.get("slide_path") or "")
    if not slide_path.is_file():
        raise InvalidInputError(
            f"{final}: its slide {slide_path} is not there; re-drawing needs the slide's "
            "thumbnail and tissue"
        )
    if slide_path != Path(summary.get("slide_path") or "") or identity is None:
        if slide_fingerprint(slide_path) != recorded.get("slide_fingerprint"):
            raise OutputExistsError(
                f"{final}: {slide_path} is not the slide these scores are of (its content "
                "differs); score it again with heatmap --overwrite"
            )
    qc_mode = scoring.get("qc") or "off"
    if qc_settings is None and qc_mode != "off" and scoring.get("qc_settings"):
        qc_settings = QCSettings.from_dict(scoring["qc_settings"], f"{summary_path}: qc")
    settings = HeatmapSettings(qc=qc_mode, qc_settings=qc_settings or QCSettings())
    if identity is None:
        identity = {**recorded, "display": {k: getattr(display, k) for k in DISPLAY_KEYS}}
    with (
        os_errors_as_user_errors(final),
        Slide(slide_path, override_mpp=scoring.get("slide_mpp")) as slide,
    ):
        tiling = TilingSettings(
            target_mpp=float(summary["target_mpp"]),
            tile_px=int(summary["tile_px"]),
            stride_px=scoring.get("stride_px"),
            min_tissue=float(scoring.get("min_tissue", 0.5)),
            qc=None,
        )
        grid, _, tissue = plan_tiles(slide, tiling)
        outputs = _outputs(
            slide,
            grid,
            tissue,
            store,
            display,
            fixed,
            recorded["slide_fingerprint"],
            summary.get("model") or {},
            bool(scoring.get("keep_maps")),
            _tile_qc(store, settings),
            tile_score,
        )
        for old in final.glob(REDRAW_PREFIX + "*"):
            remove_path(old)
        stale = {**summary, "status": "redrawing", "identity": {**recorded, "display": None}}
        write_json(summary_path, stale)
        work = final / f"{REDRAW_PREFIX}{os.getpid()}"
        work.mkdir()
        paths = render_slide_outputs(work, outputs)
        flags = store.qc_flags if qc_mode != "off" else None
        if flags is not None:
            from ..quality import write_qc_labels

            write_qc_labels(Path(paths["ngff"]), (grid.rows, grid.cols), store.grid_index, flags)
        for entry in sorted(work.iterdir()):
            target = final / entry.name
            if target.is_dir() and not target.is_symlink():
                remove_path(target)
            os.replace(entry, target)
        remove_path(work)
    scale = outputs.scale
    scores = outputs.headline[np.isfinite(outputs.headline)]
    summary.update(
        {
            "status": "ok",
            "identity": identity,
            "tile_score": tile_score,
            "colour_scale": asdict(scale),
            "model_colour_scale": asdict(replace(fixed, cmap=display.cmap)),
            **(score_statistics(scores, scale.threshold) if len(scores) else {}),
            "redrawn": {"software_version": __version__, "seconds": time.perf_counter() - t0},
        }
    )
    if not len(scores):
        summary["fraction_anomalous"] = float("nan")
    write_json(summary_path, summary)
    summary["status"] = "redrawn"  # in the cohort table; summary.json says ok
    summary["output"] = str(final)
    return summary


def recorded_model_scale(
    summary: dict[str, Any], final: Path, tile_score: str = "mean"
) -> ColourScale:
    """The model's fixed colour scale that a results folder records: ``model_colour_scale``, or
    (older results) ``colour_scale`` when it was the model's. Results drawn on the slide's own
    scale by an older version need the model: its checkpoint at the path they record (its
    calibration's quantiles of ``tile_score``)."""
    for key in ("model_colour_scale", "colour_scale"):
        value = summary.get(key)
        if isinstance(value, dict) and value.get("basis") == "training":
            try:
                return ColourScale(**value)
            except TypeError:
                continue
    model_path = (summary.get("model") or {}).get("model_path")
    if model_path and Path(model_path).is_file():
        from ..loaded_model import load_model

        model = load_model(model_path)
        if model.sha256 == (summary.get("identity") or {}).get("model_sha256"):
            return colour_scale(model.calibration, tile_score)
    raise InvalidInputError(
        f"{final} does not record its model's colour scale and its model is not at "
        f"{model_path}; re-draw it with heatmap and the model"
    )


def redraw_folder(folder: str | Path, **changes: Any) -> dict[str, Any]:
    """Re-draw one slide results folder in place with its recorded display settings, changed
    by ``changes`` (``cmap``, ``scale``, ``alpha``, ``max_px``, ``top_k``; None → as recorded),
    on the model's colour scale that the folder records. Returns the rewritten summary."""
    from ..outputs import OutputLock
    from ..stitch import SCALE_BASES
    from .results import _is_results_folder, recorded_identity

    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink() or not _is_results_folder(folder):
        raise InvalidInputError(f"{folder} is not a slide results folder (no summary.json)")
    if not (folder / "tiles.zarr").is_dir():
        raise InvalidInputError(
            f"{folder} has no tile store (results of tile features are drawn by heatmap)"
        )
    with OutputLock(folder):
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
        recorded = recorded_identity(summary).get("display") or {}
        base = {k: v for k, v in recorded.items() if k in DISPLAY_KEYS}
        base.update({k: v for k, v in changes.items() if v is not None})
        display = DisplaySettings(**base)
        if display.scale not in SCALE_BASES:
            raise InvalidInputError(f"--scale must be one of {', '.join(SCALE_BASES)}")
        return redraw_results(folder, display)


def results_folders(paths: list[str | Path]) -> list[Path]:
    """The slide results folders ``paths`` name: each one itself when it is one, else the
    slide results folders inside it (a results root); one line of error for a path that is
    neither."""
    from .results import _is_results_folder

    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir() and _is_results_folder(p):
            out.append(p)
            continue
        inside = (
            sorted(c for c in p.iterdir() if c.is_dir() and _is_results_folder(c))
            if p.is_dir()
            else []
        )
        if not inside:
            raise InvalidInputError(
                f"{p} is not a slide results folder (no summary.json of a heatmap run) "
                "nor a folder of them"
            )
        out.extend(inside)
    return out
