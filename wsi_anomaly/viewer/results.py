"""What a results folder holds, as the viewer needs it.

A results folder (``heatmap --out RESULTS/``) has ``summary.csv`` (one row per slide) and one
folder per slide with ``summary.json``, ``tiles.zarr`` and the stitched pictures. Slides are
addressed by the name of their folder inside RESULTS; a row's ``output`` column is used for its
last path component only, so a moved results folder still opens and nothing outside it is served.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputNotFoundError, InvalidInputError
from ..stitch import ColourScale, grid_origin, headline_scores, recorded_tile_score

log = logging.getLogger(__name__)

#: Files of a slide's results folder that may be downloaded as they are.
SERVED_FILES = {
    "thumbnail.png": "image/png",
    "heatmap.png": "image/png",
    "overlay.png": "image/png",
    "top_tiles.png": "image/png",
    "tiles.geojson": "application/geo+json",
    "tiles.csv": "text/csv; charset=utf-8",
    "summary.json": "application/json",
}

COHORT_COLUMNS = (
    "slide",
    "status",
    "n_tiles",
    "fraction_anomalous",
    "score_mean",
    "score_max",
    "seconds",
    "error",
)


@dataclass(frozen=True)
class TileTable:
    """The scored tiles of one slide. Lengths in level-0 px; arrays have length N.

    ``tile_score``: which of ``scores`` and ``max_scores`` is the tiles' score (the model
    family's, as the results record it): what the overlay colours, the threshold compares and
    the most anomalous tiles are ranked by (:attr:`headline`)."""

    coords: np.ndarray  # (N, 2) int64 top-left x, y
    grid_index: np.ndarray  # (N, 2) int64 col, row
    scores: np.ndarray  # (N,) float32 tile mean score
    max_scores: np.ndarray  # (N,) float32 tile max score
    tissue_fraction: np.ndarray  # (N,) float32
    tile_size_l0: float
    stride_l0: float
    grid_cols: int
    grid_rows: int
    qc_flags: np.ndarray | None = None  # (N,) uint16 tissue QC flag bits, when measured
    tile_score: str = "mean"

    @property
    def headline(self) -> np.ndarray:
        """(N,) float32: the tiles' scores by :attr:`tile_score`."""
        return headline_scores(self.scores, self.max_scores, self.tile_score)

    @property
    def grid_origin(self) -> tuple[float, float]:
        """Level-0 (x, y) of grid cell (0, 0)'s top-left corner."""
        return grid_origin(self.coords, self.grid_index, self.stride_l0)

    def top(self, k: int) -> np.ndarray:
        """Indices of the ``k`` highest finite tile scores (:attr:`headline`), highest first."""
        ranked = self.headline
        finite = np.flatnonzero(np.isfinite(ranked))
        order = finite[np.argsort(-ranked[finite], kind="stable")]
        return order[:k]


def contained(path: Path, root: Path) -> Path | None:
    """``path`` with every symlink resolved, when it lies inside ``root`` (resolved); None when
    it leads anywhere else, or cannot be resolved (a symlink loop)."""
    try:
        real = path.resolve()
        return real if real.is_relative_to(root.resolve()) else None
    except (OSError, RuntimeError, ValueError):
        return None


#: The largest summary.json read (they are a few kB).
MAX_SUMMARY_BYTES = 8 << 20


class SlideResults:
    """One slide's results folder: its summary, tile table and derived overlay images.

    Every file is read through :meth:`file`: resolved, and refused when it leads outside the
    slide's folder (a symlink to elsewhere)."""

    def __init__(self, name: str, folder: Path, row: dict[str, str] | None = None):
        self.name = name
        self.folder = folder
        self.row = row or {}
        self._lock = threading.Lock()
        self._tiles: TileTable | None = None
        self.summary: dict[str, Any] = {}
        summary = self.file("summary.json")
        try:
            if summary is not None and summary.stat().st_size <= MAX_SUMMARY_BYTES:
                loaded = json.loads(summary.read_text(encoding="utf-8"))
                self.summary = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError, RecursionError):
            self.summary = {}

    def file(self, name: str) -> Path | None:
        """The resolved path of ``name`` in the slide's folder; None when it is absent or
        leads outside the folder."""
        path = contained(self.folder / name, self.folder)
        return path if path is not None and path.exists() else None

    @property
    def viewable(self) -> bool:
        """Whether the slide page can be drawn: a finished summary (that names a known tile
        score, or none) and a scored tile store."""
        store = self.file("tiles.zarr")
        try:
            _ = self.tile_score  # a value it does not know: not drawn
        except InvalidInputError as exc:
            log.warning("%s", exc)
            return False
        return bool(self.summary.get("colour_scale")) and store is not None and store.is_dir()

    @property
    def tile_score(self) -> str:
        """Which stored value is the tiles' score, as summary.json records it ("mean" when it
        records none)."""
        return recorded_tile_score(self.summary, f"{self.folder / 'summary.json'}")

    @property
    def slide_path(self) -> Path | None:
        path = self.summary.get("slide_path") or self.row.get("slide_path")
        return Path(path) if path else None

    @property
    def dimensions(self) -> tuple[int, int]:
        w, h = self.summary["slide_dimensions"]
        return int(w), int(h)

    @property
    def mpp(self) -> float:
        return float(self.summary["level0_mpp"])

    @property
    def scale(self) -> ColourScale:
        return ColourScale.from_dict(self.summary["colour_scale"])

    def tiles(self) -> TileTable:
        """The tile table, read once from ``tiles.zarr``."""
        with self._lock:
            if self._tiles is None:
                from ..tiles.store import TileStore

                path = self.file("tiles.zarr")
                if path is None:
                    raise InvalidInputError(f"{self.folder / 'tiles.zarr'} is not in its folder")
                store = TileStore(path)
                scores = store.scores
                if scores is None:
                    raise InvalidInputError(f"{self.folder / 'tiles.zarr'} holds no scores")
                max_scores = store.max_scores
                attrs = store.attrs
                self._tiles = TileTable(
                    coords=np.asarray(store.coords, np.int64).reshape(-1, 2),
                    grid_index=np.asarray(store.grid_index, np.int64).reshape(-1, 2),
                    scores=np.asarray(scores, np.float32),
                    max_scores=np.asarray(scores if max_scores is None else max_scores, np.float32),
                    tissue_fraction=np.asarray(store.tissue_fraction, np.float32),
                    tile_size_l0=float(attrs["tile_size_l0"]),
                    stride_l0=float(attrs.get("stride_l0", attrs["tile_size_l0"])),
                    grid_cols=int(attrs["grid_cols"]),
                    grid_rows=int(attrs["grid_rows"]),
                    qc_flags=store.qc_flags,
                    tile_score=self.tile_score,
                )
            return self._tiles

    def pixel_map(self) -> np.ndarray | None:
        """The pixel-level anomaly map of ``heatmap.ome.zarr`` (rows·f, cols·f) float32, or None
        when the maps were not kept."""
        path = self.file("heatmap.ome.zarr")
        if path is None or not (path / "pixel").is_dir():
            return None
        import zarr

        try:
            return np.asarray(zarr.open_array(str(path / "pixel" / "0"), mode="r")[...], np.float32)
        except Exception as exc:  # a damaged or foreign store: the page simply lacks the layer
            log.warning("%s: pixel map unreadable: %s", self.name, exc)
            return None


def cell_overlay_rgba(tiles: TileTable, scale: ColourScale, max_px: int = 4096) -> np.ndarray:
    """The tile scores (:attr:`TileTable.headline`) as an RGBA image, one grid cell = ``k × k``
    pixels (crisp when the browser scales it), transparent where no tile was scored. Returns
    (rows·k, cols·k, 4) uint8."""
    rows, cols = max(tiles.grid_rows, 1), max(tiles.grid_cols, 1)
    grid = np.zeros((rows, cols, 4), np.uint8)
    ranked = tiles.headline
    ok = np.isfinite(ranked)
    col, row = tiles.grid_index[ok, 0], tiles.grid_index[ok, 1]
    inside = (col >= 0) & (col < cols) & (row >= 0) & (row < rows)
    grid[row[inside], col[inside], :3] = scale.to_rgb(ranked[ok][inside])
    grid[row[inside], col[inside], 3] = 255
    k = max(1, min(16, max_px // max(rows, cols)))
    return np.repeat(np.repeat(grid, k, axis=0), k, axis=1)


def qc_overlay_rgba(tiles: TileTable, max_px: int = 4096) -> np.ndarray:
    """The tiles' QC flags as an RGBA image on the grid of :func:`cell_overlay_rgba`: each
    flagged cell in the colour of its first flag, clean cells transparent."""
    from ..quality import first_flag_labels
    from ..slide.qc import FLAG_COLOURS, FLAG_NAMES

    rows, cols = max(tiles.grid_rows, 1), max(tiles.grid_cols, 1)
    grid = np.zeros((rows, cols, 4), np.uint8)
    if tiles.qc_flags is not None:
        labels = first_flag_labels(tiles.qc_flags)
        lut = np.array([(0, 0, 0, 0)] + [(*FLAG_COLOURS[n], 255) for n in FLAG_NAMES], np.uint8)
        col, row = tiles.grid_index[:, 0], tiles.grid_index[:, 1]
        inside = (col >= 0) & (col < cols) & (row >= 0) & (row < rows)
        grid[row[inside], col[inside]] = lut[labels[inside]]
    k = max(1, min(16, max_px // max(rows, cols)))
    return np.repeat(np.repeat(grid, k, axis=0), k, axis=1)


def pixel_overlay_rgba(pixel_map: np.ndarray, scale: ColourScale, max_px: int = 8192) -> np.ndarray:
    """The pixel-level map as RGBA (NaN transparent), decimated to at most ``max_px`` a side."""
    step = max(1, math.ceil(max(pixel_map.shape) / max_px))
    values = pixel_map[::step, ::step]
    finite = np.isfinite(values)
    rgba = np.zeros(values.shape + (4,), np.uint8)
    rgba[finite, :3] = scale.to_rgb(values[finite])
    rgba[finite, 3] = 255
    return rgba


class ResultsFolder:
    """A ``heatmap`` results folder opened for viewing.

    Slides come from ``summary.csv``; slide folders that have a ``summary.json`` but no row (a
    single-slide run, or a table written before them) are listed too.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise InputNotFoundError(f"results folder not found: {root}")
        self.rows: list[dict[str, str]] = []
        self.slides: dict[str, SlideResults] = {}
        table = self.root / "summary.csv"
        if table.is_file():
            with table.open(newline="", encoding="utf-8") as fh:
                self.rows = [dict(r) for r in csv.DictReader(fh)]
        for row in self.rows:
            name = _folder_name(row)
            if name:
                row["folder"] = name
                folder = self.root / name
                if self._inside(folder) and folder.is_dir() and name not in self.slides:
                    self.slides[name] = SlideResults(name, folder, row)
        for summary in sorted(self.root.glob("*/summary.json")):
            folder = summary.parent
            if folder.name.startswith(".") or folder.name in self.slides:
                continue
            if not self._inside(folder):
                continue
            entry = SlideResults(folder.name, folder)
            if not entry.summary:
                continue
            self.slides[folder.name] = entry
            self.rows.append(
                {
                    **{k: str(entry.summary.get(k, "")) for k in COHORT_COLUMNS},
                    "slide_path": str(entry.summary.get("slide_path", "")),
                    "seconds": str((entry.summary.get("timings_s") or {}).get("total_s", "")),
                    "status": str(entry.summary.get("status", "ok")),
                    "folder": folder.name,
                }
            )
        if not self.rows:
            raise InputNotFoundError(
                f"{self.root} holds no summary.csv and no slide results; point `view` at the "
                "--out folder of `wsi-anomaly heatmap`"
            )

    def _inside(self, folder: Path) -> bool:
        """A slide folder is listed only when it really lies in the results folder."""
        if contained(folder, self.root) is None:
            log.warning("%s leads outside %s; not served", folder.name, self.root)
            return False
        return True

    def slide(self, name: str) -> SlideResults | None:
        """The slide whose results folder is ``name``; None for any other name."""
        return self.slides.get(name)


def _folder_name(row: dict[str, str]) -> str:
    output = (row.get("output") or "").replace("\\", "/").rstrip("/")
    name = output.rsplit("/", 1)[-1] if output else ""
    if name in ("", ".", "..") or name.startswith("."):
        return ""
    return name
