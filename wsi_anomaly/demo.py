"""The end-to-end demo on a synthetic slide: tiles → model → heatmap, with a known answer.

1. Write a synthetic slide whose tumour and stroma regions are known.
2. Tile its tumour region only (as a pathologist would from QuPath annotations).
3. Train a model (HaloAE by default) on those tiles with its family's fast preset.
4. Score every tissue tile of the whole slide and draw the heatmap.
5. Measure how well tile scores (each tile's score as the model's family ranks it: the map's
   mean or its maximum, ``tile_score``) separate tumour (like the training tissue) from stroma.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from .config import load_config
from .errors import InvalidInputError
from .models.registry import DEFAULT_FAMILY, family_names, family_sections, get_family
from .pipeline import HeatmapSettings, run_cohort
from .slide.synthetic import SyntheticSlide, write_synthetic_slide
from .stitch import headline_scores, recorded_tile_score
from .tiles import TileStore, TilingSettings, tile_slide
from .tiles.dataset import ZarrTileDataset
from .training import train_model

log = logging.getLogger(__name__)

#: The demo's tiles: 1 µm/px keeps the tile count (and CPU time) small while the textures stay
#: recognisable; its training schedule is the fast preset shortened to about a minute on 2 cores.
DEMO_MPP = 1.0
DEMO_TRAIN = {"calibration_tiles": 24}
#: The schedule, for a family trained over epochs: each key its section has.
DEMO_SCHEDULE = {"epochs": 3, "samples_per_epoch": 8, "batch_size": 2}


def _demo_schedule(section: str) -> dict[str, int]:
    """:data:`DEMO_SCHEDULE`'s keys that the family's schedule ``section`` has (none for a
    family fitted in one pass, without epochs)."""
    settings = dict(family_sections()).get(section)
    own = {f.name for f in fields(settings)} if settings is not None else set()
    return {k: v for k, v in DEMO_SCHEDULE.items() if k in own} if "epochs" in own else {}


@dataclass
class DemoResult:
    slide: Path
    model: Path
    results: Path
    n_tiles: int
    auroc: float
    summary: dict


def tumour_annotations(slide: SyntheticSlide, path: Path, vertices: int = 64) -> Path:
    """The synthetic slide's tumour regions as QuPath GeoJSON polygons (level-0 px)."""
    features = []
    for k, (cx, cy, rx, ry) in enumerate(slide.layout.tumour_ellipses):
        t = np.linspace(0, 2 * math.pi, vertices, endpoint=False)
        ring = [[float(cx + rx * math.cos(a)), float(cy + ry * math.sin(a))] for a in t]
        ring.append(ring[0])
        features.append(
            {
                "type": "Feature",
                "id": f"tumour-{k}",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": "Tumor", "color": [200, 0, 0]},
                },
            }
        )
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def run_demo(
    out: str | Path,
    size_px: int = 8192,
    seed: int = 0,
    backbone_weights: str = "random",
    device: str = "auto",
    progress: bool = True,
    echo=print,
    family: str = DEFAULT_FAMILY,
) -> DemoResult:
    from sklearn.metrics import roc_auc_score

    try:
        entry = get_family(family)
    except ValueError as exc:
        raise InvalidInputError(f"--family: {exc}") from None
    if entry.weakly_supervised or not entry.fast_preset:
        demo_families = [
            n
            for n in family_names()
            if get_family(n).fast_preset and not get_family(n).weakly_supervised
        ]
        raise InvalidInputError(
            f"the demo trains on normal tiles only: --family must be one of "
            f"{', '.join(demo_families)}"
        )

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    slide_path = out / "synthetic_slide.tif"
    echo(f"[1/4] synthetic slide: {size_px} × {size_px} px at 0.5 µm/px → {slide_path}")
    slide = write_synthetic_slide(
        slide_path, width=size_px, height=size_px, mpp=0.5, seed=seed, progress=progress
    )
    regions = tumour_annotations(slide, out / "tumour_regions.geojson")

    store = out / "tumour_tiles.zarr"
    echo(f"[2/4] tiling the known tumour region at {DEMO_MPP:g} µm/px → {store}")
    tiled = tile_slide(
        slide_path,
        store,
        TilingSettings(
            target_mpp=DEMO_MPP, min_tissue=0.5, annotations=str(regions), min_annotation=0.9
        ),
        overwrite=True,
        progress=progress,
    )
    echo(f"      {tiled.n_tiles} tumour tiles")

    model = out / "model.pt"
    config = load_config(
        entry.fast_preset,
        {
            "model": {"backbone_weights": backbone_weights},
            "train": DEMO_TRAIN,
            entry.schedule_section: _demo_schedule(entry.schedule_section),
            "seed": seed,
        },
    )
    echo(f"[3/4] {entry.describe_training(config, tiled.n_tiles, 0)} → {model}")
    trained = train_model(
        ZarrTileDataset(store),
        config,
        model,
        device=device,
        overwrite=True,
        tile_mpp=TileStore(store).mpp,
        source=str(store),
        progress=progress,
    )
    echo(f"      {trained.seconds:.0f} s, {trained.images_per_s:.2f} images/s")

    results = out / "results"
    echo(f"[4/4] heatmap of the whole slide → {results / slide_path.name}")
    # Through the cohort runner, so the results folder has its summary.csv like any run.
    run_cohort(
        [slide_path],
        results,
        model,
        HeatmapSettings(device=device, overwrite=True, progress=progress, batch_size=16),
    )
    summary = json.loads((results / slide_path.name / "summary.json").read_text())
    scored = TileStore(results / slide_path.name / "tiles.zarr")
    assert scored.scores is not None and scored.max_scores is not None  # scored above
    ranked = headline_scores(scored.scores, scored.max_scores, recorded_tile_score(summary))
    fractions = slide.tile_labels(scored.coords, scored.attrs["tile_size_l0"])
    is_tumour = fractions[:, 2] >= 0.5
    labels = (~is_tumour).astype(int)  # anomalous = not the training tissue
    auroc = float(roc_auc_score(labels, ranked)) if 0 < labels.sum() < len(labels) else float("nan")
    return DemoResult(
        slide_path, model, results / slide_path.name, int(len(labels)), auroc, summary
    )
