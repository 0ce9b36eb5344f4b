"""Region annotations exported from QuPath (GeoJSON, level-0 pixels) → a mask at thumbnail scale.

QuPath's *File → Export objects as GeoJSON* writes a ``FeatureCollection`` (or a bare list of
features) whose geometries are ``Polygon``/``MultiPolygon`` in level-0 pixel coordinates. Holes
(interior rings) are honoured. An optional class filter keeps only features whose
``properties.classification.name`` matches, e.g. only "Tumor" regions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from skimage.draw import polygon as draw_polygon

from ..errors import InputNotFoundError, InvalidInputError

Ring = np.ndarray  # (K, 2) float level-0 (x, y)


def _features(doc: Any) -> Iterable[dict]:
    if isinstance(doc, list):
        for item in doc:
            yield from _features(item)
    elif isinstance(doc, dict):
        kind = doc.get("type")
        if kind == "FeatureCollection":
            yield from _features(doc.get("features", []))
        elif kind == "Feature":
            yield doc
        elif kind in ("Polygon", "MultiPolygon", "GeometryCollection"):
            yield {"type": "Feature", "geometry": doc, "properties": {}}


def _polygons(geometry: dict) -> Iterable[list[list]]:
    kind = geometry.get("type")
    if kind == "Polygon":
        yield geometry["coordinates"]
    elif kind == "MultiPolygon":
        yield from geometry["coordinates"]
    elif kind == "GeometryCollection":
        for g in geometry.get("geometries", []):
            yield from _polygons(g)


def load_annotations(path: str | Path, class_name: str | None = None) -> list[list[Ring]]:
    """Polygons from a GeoJSON file: a list of [exterior, hole, hole, …] rings.

    Raises:
        InputNotFoundError, InvalidInputError (not JSON, no polygons, no polygon of that class).
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"annotation file not found: {path}")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{path} is not a GeoJSON file ({exc})") from exc
    polys: list[list[Ring]] = []
    for feature in _features(doc):
        props = feature.get("properties") or {}
        if class_name is not None:
            cls = props.get("classification") or {}
            if cls.get("name") != class_name:
                continue
        for rings in _polygons(feature.get("geometry") or {}):
            try:
                arrs = [np.asarray(r, dtype=np.float64)[:, :2] for r in rings]
            except (ValueError, IndexError, TypeError) as exc:
                raise InvalidInputError(f"{path}: malformed polygon coordinates ({exc})") from exc
            if arrs and len(arrs[0]) >= 3:
                polys.append(arrs)
    if not polys:
        which = f" of class {class_name!r}" if class_name else ""
        raise InvalidInputError(f"{path}: no Polygon/MultiPolygon annotations{which} found")
    return polys


def rasterize(polys: list[list[Ring]], shape: tuple[int, int], downsample: float) -> np.ndarray:
    """Fill polygons (holes subtracted) on a (H, W) grid of ``downsample`` level-0 px per pixel."""
    mask = np.zeros(shape, bool)
    for rings in polys:
        region = np.zeros(shape, bool)
        for k, ring in enumerate(rings):
            # Pixel (i, j) covers level-0 [j·d, (j+1)·d); its centre is at (j + 0.5)·d.
            rr, cc = draw_polygon(ring[:, 1] / downsample - 0.5, ring[:, 0] / downsample - 0.5, shape)
            region[rr, cc] = k == 0
        mask |= region
    return mask
