"""The zarr tile store, the tiler that fills it, and tile datasets (no model code here)."""

from .store import TileStore, TileStoreWriter
from .tiler import TilingResult, TilingSettings, tile_slide

__all__ = ["TileStore", "TileStoreWriter", "TilingResult", "TilingSettings", "tile_slide"]
