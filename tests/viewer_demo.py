"""A demo results folder for the viewer tests: a synthetic slide with a known tumour run through
the real ``heatmap`` pipeline (tiling, stitching, summaries) with a stand-in model that scores in
milliseconds, then given known scores (tumour tiles at the top of the colour scale, the rest at
its bottom) so that what the viewer draws can be checked."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from wsi_anomaly.score import BatchChoice
from wsi_anomaly.slide.synthetic import SyntheticLayout, write_synthetic_slide

#: Slide size, level-0 px at 0.5 µm/px, and the tumour: an ellipse in the left half.
WIDTH, HEIGHT = 2048, 1536
TUMOUR = (620.0, 760.0, 360.0, 420.0)
_BUILT: dict[str, Path] = {}


class _Result:
    def __init__(self, x):
        if hasattr(x, "numpy"):  # a float (n, 3, T, T) tensor in [0, 1]
            grey = x.mean(dim=1).numpy()
        else:  # uint8 (n, T, T, 3) tiles as stored
            grey = np.asarray(x, np.float32).mean(axis=-1) / 255.0
        self.mean = 1.0 - grey.mean(axis=(1, 2))
        self.max = 1.0 - grey.min(axis=(1, 2))
        n, t = grey.shape[0], grey.shape[1]
        self.maps = 1.0 - grey.reshape(n, 64, t // 64, 64, t // 64).mean(axis=(2, 4))


class StandInFamily:
    """What the pipeline asks of a model family: which value is a tile's score."""

    tile_score = "mean"


class StandInModel:
    """What the pipeline asks of a checkpoint, answered without one."""

    tile_px = 256
    tile_mpp = 0.5
    family = StandInFamily()

    def __init__(self, path: Path):
        from wsi_anomaly.hashing import sha256_file

        self.path = path
        self.sha256 = sha256_file(path)
        self.calibration = {
            "score_quantiles": {"0.5": 0.2, "0.99": 0.4},
            "max_score_quantiles": {"0.5": 0.2, "0.99": 0.4},
        }
        self.identity = {"path": str(path), "model_sha256": "stand-in", "family": "stand-in"}


class StandInScorer:
    """What the pipeline asks of a model, answered without one (darker tiles score higher)."""

    tile_px = 256
    tile_mpp = 0.5
    batch_size = 8
    device = "cpu"
    precision = "fp32"
    compile_mode = "off"
    engine = "torch"
    batch_choice = BatchChoice(setting=8, batch_size=8)
    map_px = 64  # the side of its maps, as a family declares it
    family = StandInFamily()

    def __init__(self, path: Path):
        self.calibration = {
            "score_quantiles": {"0.5": 0.2, "0.99": 0.4},
            "max_score_quantiles": {"0.5": 0.2, "0.99": 0.4},
        }
        self.identity = {"path": str(path), "model_sha256": "stand-in", "family": "stand-in"}

    def score(self, x, keep_maps: bool = False) -> _Result:
        return _Result(x)

    def score_batches(self, batches, keep_maps: bool = False):
        return (_Result(x) for x in batches)


def build_demo_results(folder: Path) -> Path:
    """Write slide + results under ``folder``; returns the results folder. Built once."""
    if "results" in _BUILT:
        return _BUILT["results"]
    import pytest

    from wsi_anomaly.pipeline import HeatmapSettings, run_cohort
    from wsi_anomaly.pipeline import slide_run as pipeline
    from wsi_anomaly.tiles import TileStore

    model = folder / "stand-in.pt"
    model.write_bytes(b"stand-in model")

    layout = SyntheticLayout(
        width=WIDTH,
        height=HEIGHT,
        tissue_ellipses=((1024.0, 768.0, 900.0, 640.0),),
        tumour_ellipses=(TUMOUR,),
        boundary_wave=0.0,
    )
    slide = write_synthetic_slide(
        folder / "demo.tif", width=WIDTH, height=HEIGHT, mpp=0.5, layout=layout, seed=3
    )
    results = folder / "results"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "load_model", lambda path: StandInModel(Path(path)))
        patch.setattr(pipeline, "_scorer", lambda model, settings: StandInScorer(model.path))
        run_cohort(
            [slide.path, folder / "missing.tif"],
            results,
            model,
            HeatmapSettings(device="cpu", batch_size=8, progress=False, keep_maps=True),
            skip_errors=True,
        )
    out = results / "demo.tif"
    summary = json.loads((out / "summary.json").read_text())
    scale = summary["colour_scale"]
    store = TileStore(out / "tiles.zarr", mode="r+")
    tumour = slide.tile_labels(store.coords, store.attrs["tile_size_l0"])[:, 2] >= 0.5
    scores = np.where(tumour, scale["vmax"], scale["vmin"]).astype(np.float32)
    rng = np.random.default_rng(0)
    scores += rng.uniform(0, 1e-3, len(scores)).astype(np.float32)  # distinct values
    maps = np.repeat(scores[:, None, None], 64 * 64, axis=1).reshape(-1, 64, 64)
    store.write_scores(0, scores, scores + 0.01, maps.astype(np.float32))
    _BUILT["results"] = results
    _BUILT["slide"] = slide.path
    return results


def tumour_mask(coords: np.ndarray, tile_size_l0: float) -> np.ndarray:
    """Which tiles (top-left level-0 coords) have their centre in the tumour ellipse."""
    cx, cy, rx, ry = TUMOUR
    centres = coords + tile_size_l0 / 2
    return ((centres[:, 0] - cx) / rx) ** 2 + ((centres[:, 1] - cy) / ry) ** 2 <= 1.0


def summary_rows(results: Path) -> list[dict[str, str]]:
    with (results / "summary.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))
