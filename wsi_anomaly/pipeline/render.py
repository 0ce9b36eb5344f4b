"""A scored slide's pictures, NGFF, GeoJSON and tile table: the slide run gathers what they are
drawn from into one :class:`~wsi_anomaly.stitch.SlideOutputs`, and :mod:`wsi_anomaly.stitch`
draws them."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import __version__
from ..slide.qc import TileQC
from ..stitch import (
    ColourScale,
    SlideGeometry,
    SlideOutputs,
    colour_scale,
    render_slide_outputs,
    slide_colour_scale,
)
from ..tiles.store import TileStore
from .settings import HeatmapSettings

if TYPE_CHECKING:
    from .slide_run import SlideRun


def slide_outputs(run: SlideRun, store: TileStore) -> SlideOutputs:
    """What a scored slide's outputs are drawn from: the store's scores, the slide's thumbnail
    and tissue, the model's colour scale and the run's display settings."""
    display = run.settings.display
    gp = run.grid.plan
    scores, max_scores = store.scores, store.max_scores
    assert scores is not None and max_scores is not None  # the store has been scored
    thumb, thumb_ds = run.slide.thumbnail(display.max_px)
    order = np.argsort(-scores)[: display.top_k]
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
    scale = colour_scale(run.model.calibration, "mean", display.cmap)
    if display.scale == "slide":
        scale = slide_colour_scale(scores, scale)
    identity = run.model.identity
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
    return SlideOutputs(
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
        display=display,
        maps=store.maps if run.settings.keep_maps else None,
        tissue_fraction=store.tissue_fraction,
        provenance=provenance,
        qc=_tile_qc(store, run.settings),
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
