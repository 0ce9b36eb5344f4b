"""The Python API: a slide to tiles, tiles to a model, a model to scores and heatmaps.

Reached as ``import wsi_anomaly as wa``; each function is the library side of one command
(``tile``, ``train``, ``heatmap``) with the same checks, outputs and guarantees:

    slide = wa.open_slide("slide.svs")                      # a Slide (use it in a with block)
    wa.tile("normal.svs", "normal.zarr", mpp=1.0)           # tissue tiles into a zarr store
    wa.train(["normal.zarr"], "model.pt")                   # a checkpoint, calibrated
    wa.Scorer("model.pt").score(tiles)                      # scores of uint8 B×256×256×3 tiles
    wa.heatmap(["slide.svs"], "model.pt", out="results")    # pictures, NGFF, GeoJSON, tables
    wa.train_on_features(["trident/features_uni_v1"], "knn.pt")   # TRIDENT/CLAM tile vectors
    wa.heatmap(["slide.svs"], "knn.pt", features=["trident/features_uni_v1"])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import _API
from .config import load_config
from .models.registry import DEFAULT_FAMILY, get_family
from .pipeline import HeatmapSettings, run_cohort
from .score import Scorer as Scorer
from .slide import Slide as Slide
from .slide.synthetic import write_synthetic_slide
from .tiles.dataset import open_training_tiles
from .tiles.store import TileStore as TileStore
from .tiles.tiler import TilingResult, TilingSettings, tile_slide
from .training import TrainResult, train_model

__all__ = list(_API)


def open_slide(path: str | Path, mpp: float | None = None) -> Slide:
    """Open a whole-slide image (any format OpenSlide or tifffile reads). ``mpp`` overrides
    the level-0 resolution (µm/px) when the file has none. Close it, or use ``with``."""
    return Slide(path, override_mpp=mpp)


def synthetic_slide(path: str | Path, size: int = 4096, seed: int = 0) -> Path:
    """Write a synthetic ``size``×``size`` slide at 0.5 µm/px (tissue with tumour regions) to
    ``path`` as a pyramidal TIFF; returns its path."""
    return write_synthetic_slide(path, width=size, height=size, mpp=0.5, seed=seed).path


def tile(
    slide: str | Path,
    out: str | Path,
    mpp: float,
    *,
    min_tissue: float = 0.5,
    annotations: str | Path | None = None,
    slide_mpp: float | None = None,
    overwrite: bool = False,
    progress: bool = False,
    **settings: Any,
) -> TilingResult:
    """Tile ``slide``'s tissue at ``mpp`` µm/px into the zarr store ``out`` (as ``wsi-anomaly
    tile``). ``annotations``: QuPath GeoJSON regions to keep; more :class:`TilingSettings`
    fields as keywords."""
    tiling = TilingSettings(
        target_mpp=mpp,
        min_tissue=min_tissue,
        annotations=str(annotations) if annotations is not None else None,
        **settings,
    )
    return tile_slide(
        slide, out, tiling, slide_mpp=slide_mpp, overwrite=overwrite, progress=progress
    )


def train(
    tiles: Sequence[str | Path],
    out: str | Path,
    *,
    config: Any = None,
    overrides: Mapping[str, Any] | None = None,
    device: str = "auto",
    mpp: float | None = None,
    anomalies: Sequence[str | Path] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> TrainResult:
    """Train on normal tiles (tile stores and/or folders of images) and write the checkpoint
    ``out`` (as ``wsi-anomaly train``). ``config``: a preset name, a YAML file or a resolved
    config (:func:`load_config`; default: the default family's fast preset); ``overrides``:
    nested values on top of it. ``anomalies``: labelled anomalous tiles, for a weakly supervised
    family."""
    if config is None:
        config = get_family(DEFAULT_FAMILY).fast_preset
    if isinstance(config, str | Path):
        config = load_config(str(config), dict(overrides or {}))
    elif overrides:
        raise ValueError("overrides apply to a preset or a YAML file, not to a resolved config")
    dataset, tile_mpp = open_training_tiles(tiles, config.tile_px, mpp)
    anomalous = open_training_tiles(anomalies, config.tile_px, mpp)[0] if anomalies else None
    return train_model(
        dataset,
        config,
        out,
        device=device,
        resume=resume,
        overwrite=overwrite,
        tile_mpp=tile_mpp,
        source=", ".join(str(t) for t in tiles),
        progress=progress,
        anomalies=anomalous,
    )


def train_on_features(
    features: Sequence[str | Path],
    out: str | Path,
    *,
    config: Any = None,
    overrides: Mapping[str, Any] | None = None,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = False,
) -> TrainResult:
    """Fit a memory bank of normal tile vectors on TRIDENT or CLAM features files (``.h5``
    files, or folders in their layouts) and write the checkpoint ``out`` (as ``wsi-anomaly
    train --features``); score slides with :func:`heatmap` and ``features=``."""
    from .models.registry import family_names, get_family
    from .tiles.feature_files import open_training_features

    if config is None:  # the preset of the family that takes tile features
        config = next(
            get_family(n).default_preset
            for n in family_names()
            if get_family(n).inputs == "tile features"
        )
    if isinstance(config, str | Path):
        config = load_config(str(config), dict(overrides or {}))
    elif overrides:
        raise ValueError("overrides apply to a preset or a YAML file, not to a resolved config")
    return train_model(
        open_training_features(features),
        config,
        out,
        device=device,
        overwrite=overwrite,
        source=", ".join(str(f) for f in features),
        progress=progress,
    )


def heatmap(
    slides: Sequence[str | Path] | str | Path,
    model: str | Path,
    out: str | Path = "results",
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    skip_errors: bool = False,
    progress: bool = False,
    features: Sequence[str | Path] | None = None,
    patch_size_level0: int | None = None,
    **settings: Any,
) -> list[dict[str, Any]]:
    """Score and draw every slide (files, folders, glob patterns) into ``out/<slide>/`` (as
    ``wsi-anomaly heatmap``); returns one row per slide, as in ``out/summary.csv``. Keywords
    are :class:`HeatmapSettings` fields (``mpp`` for ``target_mpp``, ``batch_size``,
    ``device``, ``keep_maps``, ``cmap``, ``overwrite``, …); ``on_progress=callback`` is called
    after every scored model batch with a :class:`~wsi_anomaly.pipeline.ScoringProgress`
    (``slide``, ``done``, ``total``, ``seconds``, ``tiles_per_s``, ``eta_s``). ``features``:
    score the slides' TRIDENT or CLAM tile features (folders or ``.h5`` files) instead of their
    pixels, with a model from :func:`train_on_features` (``patch_size_level0``: the tile side
    for files that do not record it)."""
    if features is not None:
        from .features_run import FeatureSources

        settings["features"] = FeatureSources(tuple(map(str, features)), patch_size_level0)
    if "mpp" in settings:
        settings["target_mpp"] = settings.pop("mpp")
    if isinstance(slides, str | Path):
        slides = [slides]
    return run_cohort(
        list(slides),
        out,
        model,
        HeatmapSettings(progress=progress, **settings),
        scheduler=scheduler,
        workers=workers,
        skip_errors=skip_errors,
    )
