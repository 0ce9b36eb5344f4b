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

import logging
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputNotFoundError, InvalidInputError
from ..untrusted import load_json

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


#: Vertices in one annotation file: beyond this, refused (QuPath's detailed exports stay far
#: below; a bound keeps memory and time small whatever the file).
MAX_VERTICES = 2_000_000
#: Geometries with more vertices than this skip shapely's validity repair (whose cost grows
#: faster than the vertex count): :func:`rasterize`'s even-odd fill gives a self-intersecting
#: ring a definite inside by itself.
REPAIR_MAX_VERTICES = 10_000
#: Edge-row crossings :func:`rasterize` computes for one file (its time and memory).
MAX_CROSSINGS = 10_000_000


def _raw_rings(geometry: dict) -> list[list[Ring]] | None:
    """A Polygon's or MultiPolygon's rings straight from its coordinates, checked finite; None
    for other geometry types."""
    kind = geometry.get("type")
    coords = geometry.get("coordinates")
    if kind == "Polygon":
        polygons = [coords]
    elif kind == "MultiPolygon" and isinstance(coords, list):
        polygons = coords
    else:
        return None
    out: list[list[Ring]] = []
    for polygon in polygons:
        if not isinstance(polygon, list):
            raise InvalidInputError(f"malformed {kind} coordinates (not a list of rings)")
        rings = []
        for ring in polygon:
            try:
                xy = np.asarray(ring, dtype=np.float64)
            except (TypeError, ValueError):
                raise InvalidInputError(f"malformed {kind} coordinates (not numbers)") from None
            if xy.ndim != 2 or xy.shape[1] < 2:
                raise InvalidInputError(f"malformed {kind} coordinates (a ring of points)")
            if not np.isfinite(xy).all():
                raise InvalidInputError(f"{kind} coordinates that are not finite numbers")
            rings.append(xy[:, :2])
        out.append(rings)
    return out


def _polygon_rings(geometry: dict) -> tuple[list[list[Ring]], str | None]:
    """The polygons of a GeoJSON geometry as rings; the reason when it yields none."""
    from shapely.geometry import shape
    from shapely.validation import make_valid

    raw = _raw_rings(geometry)
    if raw is not None and sum(len(r) for rings in raw for r in rings) > REPAIR_MAX_VERTICES:
        kept = [rings for rings in raw if rings and len(rings[0]) >= 3]
        return (kept, None) if kept else ([], "no area")
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
    doc = load_json(path, "GeoJSON file")
    polys: list[list[Ring]] = []
    left_out: Counter[str] = Counter()
    classes: Counter[str] = Counter()
    vertices = 0
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
        vertices += sum(len(r) for p in rings for r in p)
        if vertices > MAX_VERTICES:
            raise InvalidInputError(
                f"{path}: more than {MAX_VERTICES} polygon vertices; simplify the annotations "
                "(QuPath: Objects › Annotations › Simplify shape) and export again"
            )
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
    """Fill polygons (holes subtracted) on a (H, W) grid of ``downsample`` level-0 px per pixel.

    Each ring is filled by the even-odd rule along pixel-centre rows: the work is one step per
    edge and row it crosses, whatever the vertex count; a file that would need more than
    :data:`MAX_CROSSINGS` steps at this scale is refused with one line.
    """
    height, width = shape
    # Pixel (i, j) covers level-0 [j·d, (j+1)·d); its centre is at (j + 0.5)·d.
    scaled = [[ring / downsample - 0.5 for ring in rings] for rings in polys]
    crossings = sum(
        int(np.abs(np.diff(np.floor(np.clip(r[:, 1], -1, height)))).sum())
        for rings in scaled
        for r in rings
    )
    if crossings > MAX_CROSSINGS:
        raise InvalidInputError(
            f"annotations too intricate to draw ({crossings} edge crossings at this scale, at "
            f"most {MAX_CROSSINGS}); simplify them and export again"
        )
    mask = np.zeros(shape, bool)
    for rings in scaled:
        region = _fill_even_odd(rings[0], height, width)
        for hole in rings[1:]:
            region &= ~_fill_even_odd(hole, height, width)
        mask |= region
    return mask


def _fill_even_odd(ring: Ring, height: int, width: int) -> np.ndarray:
    """(H, W) bool: pixel centres (row i, column j) inside ``ring`` (x, y in pixel units)."""
    x0, y0 = ring[:, 0], ring[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    # Rows r with min(y0, y1) <= r < max(y0, y1), the half-open rule: a vertex on a row counts
    # once, a horizontal edge never.
    lo = np.clip(np.ceil(np.minimum(y0, y1)), 0, height).astype(np.int64)
    hi = np.clip(np.ceil(np.maximum(y0, y1)), 0, height).astype(np.int64)
    counts = hi - lo
    keep = counts > 0
    x0, y0, x1, y1, lo, counts = x0[keep], y0[keep], x1[keep], y1[keep], lo[keep], counts[keep]
    filled = np.zeros((height, width), bool)
    if not len(counts):
        return filled
    edge = np.repeat(np.arange(len(counts)), counts)
    offset = np.arange(len(edge)) - np.repeat(np.cumsum(counts) - counts, counts)
    rows = lo[edge] + offset
    t = (rows - y0[edge]) / (y1[edge] - y0[edge])
    xs = x0[edge] + t * (x1[edge] - x0[edge])
    # Pixel centre j is inside when an odd number of crossings lie at x ≤ j: each crossing
    # toggles the columns from ceil(x) onwards.
    cols = np.clip(np.ceil(xs), 0, width).astype(np.int64)
    top, bottom = int(rows.min()), int(rows.max()) + 1  # only the rows the ring spans
    flat = (rows - top) * (width + 1) + cols
    toggles = np.bincount(flat, minlength=(bottom - top) * (width + 1)).reshape(-1, width + 1)
    filled[top:bottom] = (np.cumsum(toggles[:, :width] & 1, axis=1) & 1).astype(bool)
    return filled
