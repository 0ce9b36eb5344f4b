"""napari reader: a slide's results folder as layers in one coordinate system (micrometres).

Opening ``results/<slide>/`` (or its ``heatmap.ome.zarr``) in napari gives:

- the original slide as a multiscale RGB image, read lazily tile by tile from the slide file
  recorded in ``summary.json`` (when it is still there);
- the tile anomaly scores (``heatmap.ome.zarr``: each tile's score as the model's family ranks
  it, its map's mean or maximum — ``summary.json``'s ``tile_score``) on the model's fixed colour
  scale, with the contrast limits of that scale, half transparent over the slide;
- the pixel-level anomaly map when the run kept it (hidden at first);
- the tiles as a labels layer over the tile grid (label = tile number, drawn as outlines, red
  where the tile is "Anomalous" by its tile score), carrying each tile's score (the map's mean),
  max and tissue fraction as features (hidden at first; built from ``tiles.csv`` in one vectorised pass, so it costs next
  to nothing even for tens of thousands of tiles).

Every layer says its units are micrometres (napari's ``units``), so it mixes with other
physical-unit layers (an NGFF image from another reader) without napari switching units off.

napari offers every reader that accepts folders for any folder (npe2 ignores filename patterns
for folders), and asks the user to choose between them unless a reader preference matches the
folder's path. :func:`prefer_for_results_folders` records such preferences for the names results
folders have (``<slide file name>`` or ``<slide file name>-<hash>``), and the folder's marker file
``.wsi-anomaly`` is a file only this reader claims.

The tissue QC flags (``heatmap.ome.zarr/labels/qc``) come as one label per tile in its flag's
colour (hidden at first: show it to see which tiles are artifacts rather than findings).

All layers use slide micrometres: a level-0 slide pixel (x, y) covers [x·mpp, (x+1)·mpp) ×
[y·mpp, (y+1)·mpp), and napari places a pixel's centre at ``index·scale + translate``, so the
slide gets a half-pixel translation and the score grids the translations written in their NGFF
metadata. The NGFF translations are read here rather than left to a generic NGFF reader, some of
which drop them (and place the heatmap half a tile up and left).
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

import numpy as np

log = logging.getLogger(__name__)

LayerData = tuple[Any, dict[str, Any], str]

#: napari's units for every layer: slide micrometres (a pint unit name).
UNITS = ("micrometer", "micrometer")

#: The file marking a folder the tool wrote (``outputs.MARKER``); only this reader claims it.
MARKER_NAME = ".wsi-anomaly"

#: Side of the lazily read slide chunks, in pixels of each level.
CHUNK_PX = 1024


def get_reader(path: str | list[str]) -> Any:
    """napari's reader hook: a callable for a results folder, None for anything else."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    return read_results if results_folder(Path(path)) is not None else None


def results_folder(path: Path) -> Path | None:
    """The slide results folder ``path`` is, or holds the heatmap of; None otherwise."""
    if path.name in ("heatmap.ome.zarr", MARKER_NAME):
        path = path.parent
    if (path / "summary.json").is_file() and (path / "heatmap.ome.zarr").is_dir():
        return path
    return None


def read_results(path: str | list[str]) -> list[LayerData]:
    """The layers of one slide's results (see the module docstring)."""
    folder = results_folder(Path(path[0] if isinstance(path, list) else path))
    if folder is None:
        raise ValueError(f"{path} is not a wsi-anomaly slide results folder")
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    from .stitch import recorded_tile_score

    tile_score = recorded_tile_score(summary, str(folder / "summary.json"))
    label = "anomaly score (map max)" if tile_score == "max" else "anomaly score"
    layers: list[LayerData] = []
    slide_layer = _slide_layer(summary)
    if slide_layer is not None:
        layers.append(slide_layer)
    scale = _colour_scale(summary)
    layers.append(
        _score_layer(folder / "heatmap.ome.zarr", ".", scale, summary["slide"], label, visible=True)
    )
    if (folder / "heatmap.ome.zarr" / "pixel" / "zarr.json").is_file():
        layers.append(
            _score_layer(
                folder / "heatmap.ome.zarr",
                "pixel",
                scale,
                summary["slide"],
                "pixel anomaly map",
                visible=False,
            )
        )
    if (folder / "heatmap.ome.zarr" / "labels" / "qc" / "zarr.json").is_file():
        layers.append(_qc_layer(folder / "heatmap.ome.zarr" / "labels" / "qc", summary["slide"]))
    if (folder / "tiles.csv").is_file():
        layers.append(
            _tiles_layer(
                folder / "tiles.csv", float(summary["level0_mpp"]), summary["slide"], tile_score
            )
        )
    return layers


def _qc_layer(labels: Path, slide_name: str) -> LayerData:
    """The QC labels image: label k + 1 is flag k, in its colour (see ``image-label``)."""
    import zarr

    from .tiles.store import zarr_array

    group = zarr.open_group(str(labels), mode="r")
    ome = cast(dict[str, Any], group.attrs["ome"])
    dataset = ome["multiscales"][0]["datasets"][0]
    transforms = {t["type"]: t for t in dataset["coordinateTransformations"]}
    info = ome.get("image-label", {})
    colours: dict[int | None, Any] = {None: (0, 0, 0, 0), 0: (0, 0, 0, 0)}
    for entry in info.get("colors", []):
        colours[int(entry["label-value"])] = tuple(v / 255 for v in entry["rgba"])
    names = {int(p["label-value"]): p["class"] for p in info.get("properties", [])}
    kwargs = {
        "name": f"{slide_name} QC flags",
        "scale": tuple(transforms["scale"]["scale"]),
        "translate": tuple(transforms.get("translation", {}).get("translation", (0.0, 0.0))),
        "units": UNITS,
        "colormap": colours,
        "opacity": 0.6,
        "visible": False,
        "metadata": {"qc_classes": names},
    }
    return np.asarray(zarr_array(group, dataset["path"])[...]), kwargs, "labels"


def _colour_scale(summary: dict[str, Any]) -> Any:
    from .stitch import ColourScale

    return ColourScale.from_dict(summary["colour_scale"])


def fixed_scale_colormap(scale: Any, steps: int = 256) -> Any:
    """A napari colormap that, over contrast limits (vmin, vmax), shows each score in the colour
    the PNG heatmaps give it (the fixed scale bends at the training 99th percentile)."""
    from matplotlib import colormaps
    from napari.utils.colormaps import Colormap

    controls = np.linspace(0.0, 1.0, steps + 1)
    values = scale.vmin + controls * (scale.vmax - scale.vmin)
    colours = colormaps[scale.cmap](scale.normalise(values))
    basis = "slide" if getattr(scale, "basis", "training") == "slide" else "fixed"
    return Colormap(colors=colours, controls=controls, name=f"wsi-anomaly {scale.cmap} ({basis})")


def _score_layer(
    ngff: Path, image: str, scale: Any, slide_name: str, label: str, visible: bool
) -> LayerData:
    import zarr

    from .tiles.store import zarr_array

    group = zarr.open_group(str(ngff / image) if image != "." else str(ngff), mode="r")
    ome = cast(dict[str, Any], group.attrs["ome"])
    dataset = ome["multiscales"][0]["datasets"][0]
    transforms = {t["type"]: t for t in dataset["coordinateTransformations"]}
    data = zarr_array(group, dataset["path"])
    kwargs = {
        "name": f"{slide_name} {label}",
        "scale": tuple(transforms["scale"]["scale"]),
        "translate": tuple(transforms.get("translation", {}).get("translation", (0.0, 0.0))),
        "colormap": fixed_scale_colormap(scale),
        "contrast_limits": (scale.vmin, scale.vmax),
        "units": UNITS,
        "opacity": 0.5,
        "blending": "translucent",
        "visible": visible,
        "metadata": {
            "wsi_anomaly": dict(cast(dict[str, Any], group.attrs.get("wsi_anomaly", {}))),
            "colour_scale": {
                "vmin": scale.vmin,
                "vcenter": scale.vcenter,
                "vmax": scale.vmax,
                "cmap": scale.cmap,
                "basis": scale.basis,
            },
        },
    }
    return np.asarray(data[...]), kwargs, "image"


@lru_cache(maxsize=8)
def _open_slide(path: str, mpp: float) -> Any:
    from .slide import Slide

    return Slide(path, override_mpp=mpp)


def _slide_layer(summary: dict[str, Any]) -> LayerData | None:
    """The original slide, lazily, as a multiscale image in µm; None when it cannot be read."""
    import dask.array as da

    from .errors import WsiAnomalyError

    path, mpp = summary.get("slide_path"), float(summary["level0_mpp"])
    try:
        slide = _open_slide(str(path), mpp)
    except (WsiAnomalyError, OSError) as exc:
        log.warning("slide not shown: %s", exc)
        return None
    levels = []
    for level in slide.levels:
        chunks = (_chunks(level.height), _chunks(level.width), (3,))
        levels.append(
            da.map_blocks(
                _read_block,
                dtype=np.uint8,
                chunks=chunks,
                slide_path=str(path),
                mpp=mpp,
                level=level.index,
                meta=np.empty((0, 0, 0), np.uint8),
            )
        )
    # napari infers each level's scale from its shape; drop levels too small to matter.
    levels = [lv for lv in levels if min(lv.shape[:2]) >= 16] or levels[:1]
    kwargs = {
        "name": summary["slide"],
        "rgb": True,
        "multiscale": len(levels) > 1,
        "scale": (mpp, mpp),
        "translate": (0.5 * mpp, 0.5 * mpp),
        "units": UNITS,
        "metadata": {"slide_path": path, "level0_mpp": mpp},
    }
    return (levels if len(levels) > 1 else levels[0]), kwargs, "image"


def _chunks(n: int) -> tuple[int, ...]:
    full, rest = divmod(n, CHUNK_PX)
    return (CHUNK_PX,) * full + ((rest,) if rest else ())


def _read_block(
    slide_path: str, mpp: float, level: int, block_info: dict | None = None
) -> np.ndarray:
    assert block_info is not None
    (y0, y1), (x0, x1), _ = block_info[None]["array-location"]
    return _open_slide(slide_path, mpp).read_level(level, x0, y0, x1 - x0, y1 - y0)


def _tiles_layer(table: Path, mpp: float, slide_name: str, tile_score: str = "mean") -> LayerData:
    """The tiles as a labels layer on the tile grid: label k + 1 is row k of ``tiles.csv``.

    One grid cell per stride (the tiles' smallest common step); a tile covers the cells its
    square starts in, so overlapping tiles show their top-left part (the later tile wins).
    Features (``index`` = label) carry each tile's score (its map's mean), max, tissue
    fraction and class (by ``tile_score``, recorded in the layer's metadata).
    """
    import pandas as pd
    from napari.utils.colormaps import DirectLabelColormap

    frame = pd.read_csv(table, keep_default_na=False, dtype={"class": str})
    n = len(frame)
    x = frame["x"].to_numpy(np.float64)
    y = frame["y"].to_numpy(np.float64)
    side = frame["width"].to_numpy(np.float64)
    if n == 0:
        step = 1.0
        grid = np.zeros((1, 1), np.int32)
    else:
        xs, ys = np.unique(x), np.unique(y)
        steps = np.concatenate([np.diff(xs), np.diff(ys), side[:1]])
        step = float(steps[steps > 0].min())
        per = max(1, int(round(float(side.max()) / step)))  # cells a tile spans
        col, row = np.rint(x / step).astype(np.int64), np.rint(y / step).astype(np.int64)
        grid = np.zeros((int(row.max()) + per, int(col.max()) + per), np.int32)
        labels = np.arange(1, n + 1, dtype=np.int32)
        for dy in range(per):
            for dx in range(per):
                grid[row + dy, col + dx] = labels

    def numbers(name: str) -> np.ndarray:
        return pd.to_numeric(frame[name], errors="coerce").to_numpy(np.float64)

    cls = frame["class"].to_numpy(object)
    features = pd.DataFrame(
        {
            "index": np.arange(1, n + 1),
            "anomaly_score": numbers("score"),
            "anomaly_max": numbers("max"),
            "tissue_fraction": numbers("tissue_fraction"),
            "class": cls,
            "qc_flags": frame["qc_flags"].to_numpy(object) if "qc_flags" in frame else "",
        }
    )
    # Tiles faintly white, "Anomalous" ones red: hovering shows any tile's features.
    colours: dict[int | None, Any] = {None: (1.0, 1.0, 1.0, 0.25), 0: (0.0, 0.0, 0.0, 0.0)}
    colours.update({int(k) + 1: (1.0, 0.0, 0.0, 0.6) for k in np.flatnonzero(cls == "Anomalous")})
    kwargs = {
        "name": f"{slide_name} tiles",
        "scale": (step * mpp, step * mpp),
        # napari puts a cell's centre at index × scale + translate; cell k covers [k, k + 1).
        "translate": (0.5 * step * mpp, 0.5 * step * mpp),
        "units": UNITS,
        "features": features,
        "colormap": DirectLabelColormap(color_dict=colours),
        "visible": False,
        "metadata": {"level0_px_per_cell": step, "tile_score": tile_score},
    }
    return grid, kwargs, "labels"


def results_folder_patterns() -> list[str]:
    """napari reader-preference patterns for the names results folders have: the slide's file
    name, or that name and ``-<hash>`` when two slides share it (napari matches a folder's
    real path with a trailing separator)."""
    import os

    from .pipeline import SLIDE_SUFFIXES

    sep = os.sep
    return [f"*{s}{sep}" for s in SLIDE_SUFFIXES] + [f"*{s}-*{sep}" for s in SLIDE_SUFFIXES]


def prefer_for_results_folders(settings: Any = None) -> list[str]:
    """Make this reader napari's preference for results folders (see the module docstring),
    in napari's settings (``settings.plugins.extension2reader``, saved by napari); returns the
    patterns added. Other preferences are kept."""
    if settings is None:
        from napari.settings import get_settings

        settings = get_settings()
    current = dict(settings.plugins.extension2reader)
    added = [p for p in results_folder_patterns() if current.get(p) != "wsi-anomaly"]
    current.update({p: "wsi-anomaly" for p in added})
    settings.plugins.extension2reader = current
    return added
