"""A slide's summary.json: inputs, identity, counts, score statistics, timings, versions."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import __version__
from ..slide.qc import artifact_mask
from ..stitch import colour_scale, headline_scores
from ..tiles.store import TileStore
from .render import _tile_qc
from .settings import HeatmapSettings

if TYPE_CHECKING:
    from .slide_run import SlideRun


def slide_summary(
    run: SlideRun,
    store: TileStore,
    scale,
    n_scored: int,
    pipeline_s: float,
    outputs: dict[str, str],
) -> dict[str, Any]:
    """summary.json: inputs, identity, counts, score statistics, timings; output paths point to
    the final folder (where they will be once it is renamed into place). The statistics and
    ``fraction_anomalous`` are of the tiles' scores as the model's family ranks them
    (``tile_score``: the map's mean or its maximum)."""
    gp = run.grid.plan
    tile_score = run.model.family.tile_score
    assert store.scores is not None and store.max_scores is not None  # the store is scored
    all_scores = headline_scores(store.scores, store.max_scores, tile_score)
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
        "tile_score": tile_score,
        **score_statistics(scores, scale.threshold),
        "qc": _qc_summary(store, run.settings),
        "colour_scale": asdict(scale),
        # the model's own scale, which a re-draw on another --scale or --cmap starts from
        "model_colour_scale": asdict(colour_scale(run.model.calibration, tile_score, scale.cmap)),
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
        "runtime": run.scorer.engine,
        "model": run.model.identity,
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
    from ..quality import tissue_fractions
    from ..slide.qc import slide_verdict

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


def score_statistics(scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """summary.json's statistics of a slide's (finite) tile scores — each tile's score as its
    model's family ranks it (``tile_score``) — and the fraction of its tiles at or above the
    model's "Anomalous" ``threshold`` (of the same score)."""
    return {
        "score_mean": float(np.mean(scores)),
        "score_median": float(np.median(scores)),
        "score_max": float(np.max(scores)),
        "score_quantiles": {
            f"{q:g}": float(np.quantile(scores, q)) for q in (0.01, 0.25, 0.5, 0.75, 0.99)
        },
        "fraction_anomalous": float(np.mean(scores >= threshold)),
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
