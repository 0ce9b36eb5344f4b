"""Region annotations exported from QuPath (GeoJSON, level-0 pixels) → a mask at thumbnail scale.

QuPath's *File → Export objects as GeoJSON* writes a ``FeatureCollection`` (or a bare list of
features) whose geometries are ``Polygon``/``MultiPolygon`` in level-0 pixel coordinates. Holes
(interior rings) are honoured; self-intersecting or otherwise invalid shapes (as QuPath's brush
can draw) are repaired with shapely's ``make_valid``.

Classes: QuPath writes ``"classification": {"name": "Tumor"}``, and for derived classes
(QuPath ≥ 0.4) ``{"names": ["Tumor", "Positive"]}`` — the full name is "Tumor: Positive". A
class filter matches the full name exactly, and a base class also takes its derived classes:
``Tumor`` keeps "Tumor", "Tumor: Positive" and "Tumor: Negative"; ``Tumor: Positive`` keeps only
that one. Nothing is dropped silently: what was left out, and why, is counted and logged.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from skimage.draw import polygon as draw_polygon

from ..errors import InputNotFoundError, InvalidInputError

log = logging.getLogger(__name__)

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
        elif isinstance(kind, str) and "coordinates" in doc or kind == "GeometryCollection":
            yield {"type": "Feature", "geometry": doc, "properties": {}}


def class_name(properties: dict) -> str | None:
    """The full QuPath class of a feature ("Tumor", "Tumor: Positive"), or None."""
    cls = properties.get("classification")
    if isinstance(cls, str):
        return cls
    if not isinstance(cls, dict):
        return None
    names = cls.get("names")
    if isinstance(names, list) and names:
        return ": ".join(str(n) for n in names)
    name = cls.get("name")
    return str(name) if name is not None else None


def class_matches(name: str | None, wanted: str) -> bool:
    """``wanted`` is the full class, or a base class of it ("Tumor" for "Tumor: Positive")."""
    if name is None:
        return False
    return name == wanted or name.startswith(wanted + ": ")


def _polygon_rings(geometry: dict) -> tuple[list[list[Ring]], str | None]:
    """The polygons of a GeoJSON geometry as rings; the reason when it yields none."""
    from shapely.geometry import shape
    from shapely.validation import make_valid

    try:
        geom = shape(geometry)
    except Exception as exc:  # shapely raises several types for malformed coordinates
        raise InvalidInputError(f"malformed {geometry.get('type')} coordinates ({exc})") from exc
    if geom.is_empty:
        return [], "empty geometry"
    if geom.geom_type not in ("Polygon", "MultiPolygon", "GeometryCollection"):
        return [], f"not an area ({geom.geom_type})"
    if not geom.is_valid:
        geom = make_valid(geom)
    parts = [g for g in getattr(geom, "geoms", [geom]) if g.geom_type == "Polygon"]
    for g in getattr(geom, "geoms", []):
        if g.geom_type == "MultiPolygon":
            parts.extend(g.geoms)
    parts = [p for p in parts if not p.is_empty and p.area > 0]
    if not parts:
        return [], "no area"
    return [
        [np.asarray(p.exterior.coords)[:, :2]] + [np.asarray(r.coords)[:, :2] for r in p.interiors]
        for p in parts
    ], None


def load_annotations(path: str | Path, class_filter: str | None = None) -> list[list[Ring]]:
    """Polygons from a GeoJSON file: a list of [exterior, hole, hole, …] rings.

    Raises:
        InputNotFoundError, InvalidInputError (not JSON, no polygons, no polygon of that class).
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"annotation file not found: {path}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{path} is not a GeoJSON file ({exc})") from exc
    polys: list[list[Ring]] = []
    left_out: Counter[str] = Counter()
    classes: Counter[str] = Counter()
    for feature in _features(doc):
        props = feature.get("properties") or {}
        name = class_name(props) if isinstance(props, dict) else None
        classes[name or "(unclassified)"] += 1
        if class_filter is not None and not class_matches(name, class_filter):
            left_out[f"class {name!r}" if name else "unclassified"] += 1
            continue
        geometry = feature.get("geometry")
        if not isinstance(geometry, dict):
            left_out["no geometry"] += 1
            continue
        try:
            rings, reason = _polygon_rings(geometry)
        except InvalidInputError as exc:
            raise InvalidInputError(f"{path}: {exc}") from exc
        if reason:
            left_out[reason] += 1
        polys.extend(rings)
    if left_out:
        log.warning(
            "%s: %d annotation(s) left out (%s); %d polygon(s) kept",
            path.name,
            sum(left_out.values()),
            ", ".join(f"{n} {why}" for why, n in left_out.most_common()),
            len(polys),
        )
    if not polys:
        which = f" of class {class_filter!r}" if class_filter else ""
        found = ", ".join(f"{k} ×{n}" for k, n in classes.most_common(8)) or "no features"
        raise InvalidInputError(
            f"{path}: no Polygon/MultiPolygon annotations{which} found (classes present: {found})"
        )
    return polys


def rasterize(polys: list[list[Ring]], shape: tuple[int, int], downsample: float) -> np.ndarray:
    """Fill polygons (holes subtracted) on a (H, W) grid of ``downsample`` level-0 px per pixel."""
    mask = np.zeros(shape, bool)
    for rings in polys:
        region = np.zeros(shape, bool)
        for k, ring in enumerate(rings):
            # Pixel (i, j) covers level-0 [j·d, (j+1)·d); its centre is at (j + 0.5)·d.
            rr, cc = draw_polygon(
                ring[:, 1] / downsample - 0.5, ring[:, 0] / downsample - 0.5, shape
            )
            region[rr, cc] = k == 0
        mask |= region
    return mask
