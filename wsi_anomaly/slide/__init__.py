"""Open slides, resolve their resolution, find tissue and lay the tile grid (no torch here)."""

from .grid import ReadPlan, TileGrid, box_fractions, make_grid, plan_read
from .reader import LevelInfo, Slide, open_slide, slide_fingerprint
from .resolution import Resolution, load_mpp_csv, lookup_mpp, resolve_resolution
from .tissue import TissueMask, TissueSettings, detect_tissue

__all__ = [
    "LevelInfo",
    "ReadPlan",
    "Resolution",
    "Slide",
    "TileGrid",
    "TissueMask",
    "TissueSettings",
    "box_fractions",
    "detect_tissue",
    "load_mpp_csv",
    "lookup_mpp",
    "make_grid",
    "open_slide",
    "plan_read",
    "resolve_resolution",
    "slide_fingerprint",
]
