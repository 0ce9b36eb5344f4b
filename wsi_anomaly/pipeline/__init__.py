"""Slides in, pictures out: tile → score → stitch, per slide and across a cohort.

Inside one slide, tiles are decoded by a pool of threads a few shards ahead of the model, the
model sees fixed-size batches, and each decoded shard is compressed and written to the slide's
tile store in the background — so the pipeline runs at the pace of its slowest stage. Per-tile
scores are written to the same store as they are computed.

Across slides there is one dask task per slide (never per tile): in-process by default, on a
local cluster with ``workers``, or on an existing dask.distributed cluster with ``scheduler``
(tasks ask for ``resources={"GPU": 1}`` when the cluster's workers declare GPUs).

Each slide's outputs are built in ``results/.<name>.partial/`` and renamed to
``results/<name>/`` when complete (``name`` is the slide's file name, plus a short hash of its
path when two slides share a name). A lock file beside them keeps two runs from working on one
slide at once. A finished slide is skipped on re-run only when it is the same work — same slide
content, model file and scoring settings; one that differs only in how it is drawn (colour
map, scale, opacity, picture size, top tiles) is re-drawn from its stored scores; results of
other work are refused unless ``overwrite``.

The stages, one module each: :mod:`.discovery` (which files are slides), :mod:`.results`
(results folders: names, identity, reuse), :mod:`.slide_run` (one slide end to end),
:mod:`.render` and :mod:`.summary` (its outputs and summary.json), :mod:`.cohort` (many slides
on dask, and the cohort table).
"""

from .cohort import SUMMARY_FIELDS, run_cohort, slides_in_flight
from .discovery import SLIDE_SUFFIXES, find_slides
from .render import redraw_folder, redraw_results
from .results import (
    RESULT_KIND,
    SlidePlan,
    cohort_output_names,
    output_name,
    slide_output_dir,
)
from .settings import (
    DISPLAY_KEYS,
    QC_MODES,
    HeatmapSettings,
    ScoringProgress,
    display_settings,
    scoring_settings,
)
from .slide_run import SlideRun, model_sha256, process_slide
from .summary import package_versions

__all__ = [
    "DISPLAY_KEYS",
    "QC_MODES",
    "RESULT_KIND",
    "SLIDE_SUFFIXES",
    "SUMMARY_FIELDS",
    "HeatmapSettings",
    "ScoringProgress",
    "SlidePlan",
    "SlideRun",
    "cohort_output_names",
    "display_settings",
    "find_slides",
    "model_sha256",
    "output_name",
    "package_versions",
    "process_slide",
    "redraw_folder",
    "redraw_results",
    "run_cohort",
    "scoring_settings",
    "slide_output_dir",
    "slides_in_flight",
]
