"""``wsi-anomaly view RESULTS/``: a local, read-only web app over a results folder.

- :mod:`.results`  what a results folder holds: the cohort table, each slide's summary and tiles
- :mod:`.pyramid`  deep-zoom tiles read from the original slide, and their bounded LRU cache
- :mod:`.pages`    the cohort page and the slide page (bokeh canvas, overlay, colour bar)
- :mod:`.server`   the HTTP server: a fixed set of routes, nothing served by a path it was given
- :mod:`.command`  the ``view`` subcommand

The viewer only reads what ``heatmap`` wrote; nothing else in the package imports it.
"""

from .results import ResultsFolder
from .server import make_server

__all__ = ["ResultsFolder", "make_server"]
