"""One slide's heatmap from tile features another tool extracted (TRIDENT, CLAM): no tiling.

``wsi-anomaly heatmap SLIDE --features DIR --model knn.pt`` runs the cohort as every heatmap
does (:func:`wsi_anomaly.pipeline.run_cohort`: discovery, skip-if-done, ``--skip-errors``,
dask, ``summary.csv``); for each slide :func:`process_features_slide` takes the place of tiling
and scoring pixels:

1. the slide's ``.h5`` is found (:func:`~wsi_anomaly.tiles.feature_files.feature_file_for_slide`)
   and read (bounded, untrusted-input safe);
2. its vectors are checked against what the model was fitted on (the checkpoint's
   ``tile_features`` record: encoder, width, patch size and magnification) and its coordinates
   against the slide (level-0 size, inside it, no tile twice, on one tile grid — or, where
   CLAM laid one grid per tissue region, no two tiles overlapping);
3. each vector is scored against the memory bank; the slide is opened only for its
   fingerprint, thumbnail, tissue outline and the few top tiles' pictures;
4. the same outputs as a pixel heatmap are written (:func:`~wsi_anomaly.stitch.
   render_slide_outputs`: heatmap, overlay, thumbnail, NGFF, GeoJSON, tiles.csv, top tiles),
   the tiles ranked, coloured and classed by the score the model's family ranks by
   (``tile_score``), plus ``summary.json``, in a working folder renamed into place when
   complete.

A result is reused only when the slide, the model, the settings and the features file (its
sha256) are the same.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .errors import CheckpointError, InvalidInputError, NoTissueError
from .hashing import sha256_file
from .outputs import OutputLock, commit_dir, mark_owned, remove_path, write_json
from .score import Scorer
from .slide import Slide, slide_fingerprint
from .slide.grid import box_fractions
from .slide.resolution import load_mpp_csv, lookup_mpp
from .slide.tissue import TissueSettings
from .stitch import (
    DisplaySettings,
    SlideGeometry,
    SlideOutputs,
    colour_scale,
    headline_scores,
    render_slide_outputs,
    result_provenance,
    slide_colour_scale,
)
from .tiles.feature_files import feature_file_for_slide, first_overlap
from .tiles.features_h5 import TileFeatures, check_coordinates, read_tile_features
from .tiles.tiler import tissue_mask

log = logging.getLogger(__name__)

#: Tile vectors per forward pass when ``--batch-size`` is auto (vectors are small).
AUTO_VECTOR_BATCH = 4096
#: Side of the top tiles' pictures (px).
GALLERY_TILE_PX = 256


@dataclass(frozen=True)
class FeatureSources:
    """Where the slides' feature files are (folders in TRIDENT or CLAM layout, or ``.h5``
    files named after the slides), and the tile side at level 0 for files that do not record
    it (CLAM's)."""

    sources: tuple[str, ...]
    patch_size_level0: int | None = None


_SCORERS: dict[tuple[str, str, str, int], Scorer] = {}
_SCORERS_LOCK = threading.Lock()


def feature_scorer(model: str | Path, settings: Any) -> Scorer:
    """The model of a features run, loaded once per process; refused (one line) unless it was
    fitted on tile features."""
    batch = settings.batch_size if isinstance(settings.batch_size, int) else AUTO_VECTOR_BATCH
    key = (str(Path(model).resolve()), settings.device, settings.precision, batch)
    with _SCORERS_LOCK:
        if key not in _SCORERS:
            scorer = Scorer(model, device=settings.device, precision=settings.precision,
                            batch_size=batch)  # fmt: skip
            if scorer.family.inputs != "tile features":
                raise InvalidInputError(
                    f"{Path(model).name} is a {scorer.family.title} model, which scores tiles "
                    "of the slide; --features needs a model trained on tile features "
                    "(`wsi-anomaly train --features DIR`)"
                )
            _SCORERS[key] = scorer
        return _SCORERS[key]


def trained_on(scorer: Scorer) -> dict[str, Any]:
    """The checkpoint's record of the vectors it was fitted on, checked (untrusted input)."""
    found = scorer.checkpoint.get("tile_features")
    record: dict[str, Any] = found if isinstance(found, dict) else {}
    dim = record.get("dim")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise CheckpointError(
            f"{scorer.path} does not record the tile features it was fitted on; retrain it "
            "with `wsi-anomaly train --features`"
        )
    out: dict[str, Any] = {"dim": dim}
    for key, kind in (("encoder", str), ("patch_size", float), ("target_magnification", float)):
        value = record.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and kind is float:
            out[key] = float(value) if math.isfinite(value) else None
        else:
            out[key] = value if isinstance(value, kind) else None
    return out


def check_vectors(tiles: TileFeatures, expected: dict[str, Any], model: str) -> None:
    """The file's vectors are of the kind the model was fitted on, or one line saying why not."""
    name = tiles.path.name if tiles.path is not None else "the features file"
    if tiles.dim != expected["dim"]:
        raise InvalidInputError(
            f"{name} holds {tiles.dim}-dimensional vectors, {model} was fitted on "
            f"{expected['dim']}-dimensional ones: features of another encoder"
        )
    if tiles.encoder and expected.get("encoder") and tiles.encoder != expected["encoder"]:
        raise InvalidInputError(
            f"{name} was extracted with {tiles.encoder}, {model} was fitted on "
            f"{expected['encoder']} features"
        )
    for key, what in (("patch_size", "patches of"), ("target_magnification", "magnification")):
        value = tiles.attrs.get(key)
        try:
            number = float(value) if value is not None else None
        except (TypeError, ValueError):
            number = None
        if number is not None and expected.get(key) is not None and number != expected[key]:
            raise InvalidInputError(
                f"{name} has {key} {number:g}, {model} was fitted on {what} "
                f"{expected[key]:g}: extract the slide's features as the training ones were"
            )


def _step_px(tiles: TileFeatures, side: int) -> int:
    """The grid step at level 0: the tile side less TRIDENT's overlap, when it records one."""
    attrs = tiles.attrs
    try:
        overlap = float(attrs.get("overlap") or 0)
        size = float(attrs.get("patch_size") or 0)
    except (TypeError, ValueError):
        return side
    if overlap <= 0 or size <= 0 or not math.isfinite(overlap) or overlap >= size:
        return side
    return max(1, int(round(side * (size - overlap) / size)))


def process_features_slide(
    slide_path: Path, out_root: Path, model: str | Path, settings: Any, name: str
) -> dict[str, Any]:
    """One slide's results from its tile features (see the module's description); returns its
    summary. ``settings`` is the heatmap's :class:`~wsi_anomaly.pipeline.HeatmapSettings`, with
    ``features`` a :class:`FeatureSources`."""
    from .pipeline.results import SlidePlan, _reusable_result
    from .pipeline.settings import display_settings, scoring_settings
    from .pipeline.slide_run import model_sha256

    sources: FeatureSources = settings.features
    h5 = feature_file_for_slide(slide_path, sources.sources)
    with OutputLock(out_root / name) as lock:
        override = settings.slide_mpp
        if override is None and settings.mpp_csv:
            override = lookup_mpp(load_mpp_csv(settings.mpp_csv), slide_path)
        fingerprint = slide_fingerprint(slide_path)
        scoring = scoring_settings(settings, override)
        scoring["features"] = {
            "sha256": sha256_file(h5),
            "patch_size_level0": sources.patch_size_level0,
        }
        identity = {
            "slide_path": str(slide_path.resolve()),
            "slide_fingerprint": fingerprint,
            "model_sha256": model_sha256(model),
            "scoring": scoring,
            "display": display_settings(settings),
        }
        plan = SlidePlan(slide_path, out_root / name, lock.work_path(), override, identity)
        done = _reusable_result(plan, settings)
        if done is not None:
            return done
        for leftover in lock.leftovers():
            remove_path(leftover)
        try:
            return _run(plan, h5, model, settings)
        except Exception:
            remove_path(plan.work)
            raise


def _gallery_tile(slide: Slide, x: int, y: int, side: int) -> np.ndarray:
    """A tile's picture, ``GALLERY_TILE_PX`` square, read at the coarsest level fine enough."""
    from PIL import Image

    level = 0
    for lv in slide.levels:
        if lv.downsample <= side / GALLERY_TILE_PX:
            level = lv.index
    ds = slide.levels[level].downsample
    n = max(1, math.ceil(side / ds))
    region = slide.read_region(x, y, level, n, n)
    return np.asarray(
        Image.fromarray(region).resize((GALLERY_TILE_PX, GALLERY_TILE_PX), Image.Resampling.BOX)
    )


def _run(plan: Any, h5: Path, model: str | Path, settings: Any) -> dict[str, Any]:
    from .pipeline.results import RESULT_KIND
    from .pipeline.summary import package_versions, score_statistics

    t_start = time.perf_counter()
    sources: FeatureSources = settings.features
    scorer = feature_scorer(model, settings)
    expected = trained_on(scorer)
    t0 = time.perf_counter()
    tiles = read_tile_features(h5)
    check_vectors(tiles, expected, Path(model).name)
    read_s = time.perf_counter() - t0
    remove_path(plan.work)
    plan.work.mkdir(parents=True)
    with Slide(plan.slide_path, override_mpp=plan.slide_mpp) as slide:
        width, height = slide.dimensions
        side = sources.patch_size_level0 or tiles.patch_size_level0
        if side is None:
            raise InvalidInputError(
                f"{h5.name} does not record its tile size (a CLAM features file): pass "
                "--patch-size-level0 PX, the tile side in level-0 pixels"
            )
        step = _step_px(tiles, side)
        coords = tiles.coords
        origin = (int(coords[0, 0]) % step, int(coords[0, 1]) % step) if len(coords) else (0, 0)
        check_coordinates(tiles, width, height, sources.patch_size_level0)
        if len(tiles) == 0:
            raise NoTissueError(f"{slide.name}: {h5.name} holds no tiles")
        off_grid = int(((coords - np.asarray(origin)) % step).any(axis=1).sum())
        if off_grid:
            # CLAM lays one grid per tissue region (from the region's corner): tiles off the
            # first tile's grid are fine as long as no two share a cell's worth of slide
            pair = first_overlap(coords, step)
            if pair is not None:
                i, j = pair
                raise InvalidInputError(
                    f"{h5.name}: tiles {i} at {tuple(coords[i].tolist())} and {j} at "
                    f"{tuple(coords[j].tolist())} overlap on a {step} px tile grid: the features "
                    "were cut on another tile grid or tile size"
                )
        # the nearest cell of the first tile's grid (exact for tiles on it), from column/row 0
        grid_index = np.floor((coords - np.asarray(origin)) / step + 0.5).astype(np.int64)
        low = grid_index.min(axis=0)
        grid_index -= low
        origin = (origin[0] + int(low[0]) * step, origin[1] + int(low[1]) * step)
        cols, rows = (int(v) + 1 for v in grid_index.max(axis=0))

        t0 = time.perf_counter()
        scores = np.empty(len(tiles), np.float32)
        max_scores = np.empty(len(tiles), np.float32)
        for start in range(0, len(tiles), scorer.batch_size):
            batch = torch.from_numpy(tiles.features[start : start + scorer.batch_size])
            result = scorer.score(batch, keep_maps=False)
            scores[start : start + len(batch)] = result.mean
            max_scores[start : start + len(batch)] = result.max
        model_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        tissue = tissue_mask(slide, TissueSettings())
        fractions = box_fractions(tissue.mask, tissue.downsample, coords, side)
        display: DisplaySettings = settings.display
        thumb, thumb_ds = slide.thumbnail(display.max_px)
        tile_score = scorer.family.tile_score
        ranked = headline_scores(scores, max_scores, tile_score)
        order = np.argsort(-ranked)[: display.top_k]
        top = [
            (int(i), _gallery_tile(slide, int(coords[i, 0]), int(coords[i, 1]), side))
            for i in order
        ]
        geometry = SlideGeometry(
            width=width,
            height=height,
            mpp=slide.mpp,
            tile_size_l0=side,
            stride_l0=step,
            grid_cols=cols,
            grid_rows=rows,
        )
        scale = colour_scale(scorer.calibration, tile_score, display.cmap)
        if display.scale == "slide":
            scale = slide_colour_scale(ranked, scale)
        identity = scorer.identity
        provenance = result_provenance(
            slide.name,
            plan.identity["slide_fingerprint"],
            identity,
            tiles.encoder or expected.get("encoder"),
            tile_score,
            scale,
            features_file=h5.name,
            features_sha256=plan.identity["scoring"]["features"]["sha256"],
        )
        outputs = render_slide_outputs(
            plan.work,
            SlideOutputs(
                slide_name=slide.name,
                geometry=geometry,
                coords=coords,
                grid_index=grid_index,
                scores=scores,
                max_scores=max_scores,
                thumbnail=thumb,
                thumbnail_downsample=thumb_ds,
                tissue_mask=tissue.mask,
                mask_downsample=tissue.downsample,
                scale=scale,
                top_tiles=top,
                display=display,
                tissue_fraction=fractions,
                provenance=provenance,
                tile_score=tile_score,
            ),
        )
        stitch_s = time.perf_counter() - t0
        total_s = time.perf_counter() - t_start
        summary = {
            "slide": slide.name,
            "status": "ok",
            "slide_path": str(plan.slide_path.resolve()),
            "slide_fingerprint": plan.identity["slide_fingerprint"],
            "identity": plan.identity,
            "slide_dimensions": [width, height],
            "level0_mpp": slide.mpp,
            "mpp_source": slide.known_resolution().source,
            "tile_size_l0": side,
            "stride_l0": step,
            "grid": [cols, rows],
            "n_tiles": len(tiles),
            "n_scored": len(tiles),
            "features": {
                "path": str(h5.resolve()),
                "sha256": plan.identity["scoring"]["features"]["sha256"],
                "encoder": tiles.encoder,
                "dim": tiles.dim,
                "patch_size_level0": side,
                "grid_origin_l0": list(origin),
                "tiles_off_grid": off_grid,
                "attrs": tiles.attrs,
            },
            "tissue_fraction_slide": tissue.tissue_fraction,
            "tissue_fraction_tiles_mean": float(fractions.mean()),
            "tile_score": tile_score,
            **score_statistics(ranked, scale.threshold),
            "qc": {"mode": "off (tile features: no pixels are read)"},
            "colour_scale": asdict(scale),
            "timings_s": {
                "read_features_s": read_s,
                "model_s": model_s,
                "stitch_s": stitch_s,
                "total_s": total_s,
            },
            "tiles_per_s": {
                "end_to_end": len(tiles) / total_s if total_s > 0 else None,
                "model": len(tiles) / model_s if model_s > 0 else None,
            },
            "batch_size": scorer.batch_size,
            "device": str(scorer.device),
            "precision": scorer.precision,
            "model": identity,
            "outputs": {
                key: str(plan.final / Path(path).relative_to(plan.work))
                for key, path in outputs.items()
            },
            "command": " ".join(sys.argv),
            "software_version": __version__,
            "package_versions": package_versions(),
        }
        write_json(plan.work / "summary.json", summary)
        mark_owned(plan.work, RESULT_KIND)
        commit_dir(plan.work, plan.final)
    summary["output"] = str(plan.final)
    log.debug("%s: %d tiles scored from %s", plan.slide_path.name, len(tiles), h5)
    return summary
