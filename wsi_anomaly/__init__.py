"""wsi-anomaly: anomalous-tissue detection on whole-slide histopathology images.

``import wsi_anomaly as wa`` gives the Python API: ``wa.open_slide``, ``wa.tile``, ``wa.train``,
``wa.Scorer``, ``wa.heatmap`` (see :mod:`wsi_anomaly.api`).
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("wsi-anomaly")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.1.0"

#: The Python API (:mod:`wsi_anomaly.api`), imported on first use so that ``import wsi_anomaly``
#: stays cheap (no torch) for the command line and the napari plugin.
_API = (
    "HeatmapSettings",
    "Scorer",
    "Slide",
    "TileStore",
    "TilingSettings",
    "heatmap",
    "load_config",
    "open_slide",
    "synthetic_slide",
    "tile",
    "train",
    "train_on_features",
)

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'wsi_anomaly' has no attribute {name!r}")
