"""The two pages: the cohort table and a slide's zoomable view.

The slide view is a bokeh figure whose data units are slide micrometres, x to the right and y
*downwards as negative numbers* (bokeh's tile grid counts its world from the bottom-left; the
slide's top-left corner is the origin and the slide lies at y ≤ 0). Layers, bottom to top: the
original slide (deep-zoom tiles), the tile-score overlay, the pixel-level map (when kept), the
tile squares (invisible until the overlay is thresholded or drawn as outlines; they answer hover
and click with the tile's stored values) and the reviewer's marks. The figure fills the window;
a small overview figure beside it shows the whole slide with the main view's extent.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from ..stitch import scale_label
from .pyramid import TILE_PX, max_zoom_for
from .results import COHORT_COLUMNS, ResultsFolder, SlideResults

TEMPLATES = Path(__file__).with_name("templates")
PLOT_W, PLOT_H = 960, 720  # the initial ranges' aspect; the canvas then fills the window
OVERVIEW_PX = 260
TOP_TILES = 20
#: Review marks: name → outline colour (the GeoJSON export's classification colour too).
MARK_COLOURS = {"anomalous": "#d50000", "artifact": "#ff9100", "normal": "#00c853"}
#: bokeh's JS bundles the pages load (the slide figure needs the core bundle only); the server
#: serves them under ``/bokeh/``.
BOKEH_BUNDLES = ("bokeh.min.js",)


def bokeh_script_names() -> list[str]:
    import bokeh

    return [f"/bokeh/{name}?v={bokeh.__version__}" for name in BOKEH_BUNDLES]


@lru_cache(maxsize=1)
def _environment():
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    return Environment(
        loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(["html"])
    )


def slide_url(name: str) -> str:
    return f"/slide/{quote(name, safe='')}/"


def _number(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def cohort_rows(results: ResultsFolder) -> list[dict[str, Any]]:
    """One dict per summary.csv row, numbers parsed, with links for viewable slides."""
    rows = []
    for row in results.rows:
        folder = row.get("folder", "")
        entry = results.slide(folder) if folder else None
        item: dict[str, Any] = {k: row.get(k, "") for k in COHORT_COLUMNS}
        for key in ("n_tiles", "fraction_anomalous", "score_mean", "score_max", "seconds"):
            item[key] = _number(row.get(key))
        item["folder"] = folder
        item["url"] = slide_url(folder) if entry is not None and entry.viewable else None
        has_thumb = entry is not None and (entry.folder / "thumbnail.png").is_file()
        item["thumbnail"] = (slide_url(folder) + "thumb.jpg") if has_thumb else None
        rows.append(item)
    return rows


def cohort_page(results: ResultsFolder) -> str:
    return (
        _environment()
        .get_template("cohort.html")
        .render(root=str(results.root), rows=cohort_rows(results))
    )


def tile_records(entry: SlideResults) -> dict[str, Any]:
    """Tile values for the page: level-0 coordinates, scores, max, tissue fraction."""
    tiles = entry.tiles()
    return {
        "x": tiles.coords[:, 0].tolist(),
        "y": tiles.coords[:, 1].tolist(),
        "score": _finite_list(tiles.scores),
        "max": _finite_list(tiles.max_scores),
        "tissue": _finite_list(tiles.tissue_fraction),
    }


def _finite_list(values: np.ndarray) -> list[float | None]:
    return [float(v) if math.isfinite(v) else None for v in np.asarray(values, np.float64)]


def slide_figure(entry: SlideResults, slide_available: bool):
    """The bokeh layout of a slide view and the names the page's script looks up."""
    from bokeh.models import (
        ColumnDataSource,
        CustomJS,
        FixedTicker,
        HoverTool,
        LinearColorMapper,
        Range1d,
        Rect,
        TapTool,
        WheelZoomTool,
        WMTSTileSource,
    )
    from bokeh.models.annotations.dimensional import MetricLength
    from bokeh.models.annotations.legends import ColorBar, ScaleBar
    from bokeh.plotting import figure

    w0, h0 = entry.dimensions
    mpp = entry.mpp
    tiles = entry.tiles()
    scale = entry.scale
    base = slide_url(entry.name)

    width_um, height_um = w0 * mpp, h0 * mpp
    # Initial ranges: the whole slide, padded to the plot's aspect ratio (1 data unit = 1 µm on
    # both axes, so tissue is not stretched).
    um_per_screen_px = max(width_um / PLOT_W, height_um / PLOT_H) * 1.02
    cx, cy = width_um / 2, -height_um / 2
    x_range = Range1d(
        start=cx - um_per_screen_px * PLOT_W / 2,
        end=cx + um_per_screen_px * PLOT_W / 2,
        name="x_range",
    )
    y_range = Range1d(
        start=cy - um_per_screen_px * PLOT_H / 2,
        end=cy + um_per_screen_px * PLOT_H / 2,
        name="y_range",
    )
    # Zoom limits: out to four slide extents, in to a few level-0 pixels a screen pixel (the
    # page's script sets the exact floor from the canvas width once it is laid out).
    extent_um = 4 * max(width_um, height_um)
    for r in (x_range, y_range):
        r.max_interval = extent_um
        r.min_interval = 64 * mpp
    fig = figure(
        sizing_mode="stretch_both",
        x_range=x_range,
        y_range=y_range,
        tools="pan,reset,save",
        toolbar_location="above",
        name="slide_figure",
        output_backend="canvas",
        min_border=0,
    )
    zoom = WheelZoomTool(zoom_on_axis=False)
    fig.add_tools(zoom)
    fig.toolbar.active_scroll = zoom
    fig.axis.visible = False
    fig.grid.visible = False
    fig.background_fill_color = "#f4f4f4"

    if slide_available:
        zmax = max_zoom_for(w0, h0)
        world_um = TILE_PX * 2**zmax * mpp
        pyramid = WMTSTileSource(
            url=base + "tiles/{Z}/{X}/{Y}.jpg",
            tile_size=TILE_PX,
            min_zoom=0,
            max_zoom=zmax,
            initial_resolution=world_um / TILE_PX,
            x_origin_offset=0,
            y_origin_offset=world_um,
            wrap_around=False,
        )
        fig.add_tile(pyramid, name="slide_tiles", render_parents=True)
    elif (entry.folder / "thumbnail.png").is_file():
        fig.image_url(
            url=[base + "files/thumbnail.png"],
            x=0,
            y=0,
            w=width_um,
            h=height_um,
            anchor="top_left",
            name="slide_thumbnail",
        )

    ox, oy = tiles.grid_origin
    stride_um = tiles.stride_l0 * mpp

    def overlay(image: str, name: str, visible: bool = True) -> Any:
        """A half-transparent image over the tile grid's extent."""
        return fig.image_url(
            url=[base + f"overlay/{image}"],
            x=ox * mpp,
            y=-oy * mpp,
            w=max(tiles.grid_cols, 1) * stride_um,
            h=max(tiles.grid_rows, 1) * stride_um,
            anchor="top_left",
            global_alpha=0.5,
            visible=visible,
            name=name,
        )

    heat = overlay("cells.png", "cell_overlay")
    pixel = None
    if entry.pixel_map() is not None:
        pixel = overlay("pixels.png", "pixel_overlay", visible=False)
    qc = None
    if tiles.qc_flags is not None:
        qc = overlay("qc.png", "qc_overlay", visible=False)

    # numpy columns: bokeh sends them as binary arrays (compact and quick for many tiles).
    side_um = tiles.tile_size_l0 * mpp
    centres_um = (tiles.coords + tiles.tile_size_l0 / 2) * mpp
    data = {
        "x": tiles.coords[:, 0],
        "y": tiles.coords[:, 1],
        "score": tiles.scores,
        "max": tiles.max_scores,
        # the tiles' score as the model's family ranks them: what is coloured and thresholded
        "headline": tiles.headline,
        "tissue": tiles.tissue_fraction,
        "qc": _qc_labels(tiles),
        "cx": centres_um[:, 0],
        "cy": -centres_um[:, 1],
    }
    rgb = scale.to_rgb(np.nan_to_num(np.asarray(tiles.headline, np.float64), nan=scale.vmin))
    data["color"] = np.array(["#{:02x}{:02x}{:02x}".format(*(int(c) for c in v)) for v in rgb])
    # Per-tile fill and line opacity: the page's script sets them for the threshold and mode.
    data["fa"] = np.zeros(len(tiles.scores))
    data["la"] = np.zeros(len(tiles.scores))
    source = ColumnDataSource(data, name="tile_source")
    # Squares that answer hover and click, drawn when the overlay is thresholded or outlined;
    # the clicked tile gets a green outline.
    glyph: dict[str, Any] = {"x": "cx", "y": "cy", "width": side_um, "height": side_um}
    squares = fig.rect(
        **glyph,
        source=source,
        fill_color="color",
        fill_alpha="fa",
        line_color="color",
        line_alpha="la",
        line_width=2,
        name="tile_squares",
    )
    squares.selection_glyph = Rect(
        **glyph, fill_color="color", fill_alpha="fa", line_color="#00c000", line_width=3
    )
    squares.nonselection_glyph = Rect(
        **glyph,
        fill_color="color",
        fill_alpha="fa",
        line_color="color",
        line_alpha="la",
        line_width=2,
    )
    # The reviewer's marks: dashed outlines in the mark's colour (filled in by the script).
    marks = ColumnDataSource(
        {"cx": np.zeros(0), "cy": np.zeros(0), "color": np.zeros(0, "U7")}, name="mark_source"
    )
    fig.rect(
        **glyph,
        source=marks,
        fill_alpha=0.0,
        line_color="color",
        line_width=3,
        line_dash="dashed",
        name="mark_squares",
    )
    fig.add_tools(
        HoverTool(
            renderers=[squares],
            tooltips=[
                *(
                    [("score (map max)", "@max{0.0000}"), ("map mean", "@score{0.0000}")]
                    if tiles.tile_score == "max"
                    else [("score", "@score{0.0000}"), ("max", "@max{0.0000}")]
                ),
                ("tissue", "@tissue{0.00}"),
                ("QC", "@qc"),
                ("level-0 x, y", "@x, @y"),
            ],
        )
    )
    fig.add_tools(TapTool(renderers=[squares]))
    source.selected.js_on_change(
        "indices",
        CustomJS(
            args={"source": source},
            code="""
        const i = source.selected.indices[0];
        if (i === undefined) { return; }
        const d = source.data;
        if (window.wsiShowTile) {
          window.wsiShowTile({index: i, x: d.x[i], y: d.y[i], score: d.score[i],
                              max: d.max[i], tissue: d.tissue[i], qc: d.qc[i]});
        }
    """,
        ),
    )

    # The colour bar: the fixed piecewise scale drawn on a linear score axis from vmin to vmax.
    values = np.linspace(scale.vmin, scale.vmax, 256)
    palette = ["#{:02x}{:02x}{:02x}".format(*(int(c) for c in rgb)) for rgb in scale.to_rgb(values)]
    mapper = LinearColorMapper(palette=palette, low=scale.vmin, high=scale.vmax)
    fig.add_layout(
        ColorBar(
            color_mapper=mapper,
            title=scale_label(scale),
            ticker=FixedTicker(ticks=[scale.vmin, scale.vcenter, scale.vmax]),
            major_label_overrides={
                scale.vmin: f"{scale.vmin:.3g} median",
                scale.vcenter: f"{scale.vcenter:.3g} p99",
                scale.vmax: f"{scale.vmax:.3g}+",
            },
            width=14,
            name="colour_bar",
        ),
        "right",
    )
    fig.add_layout(
        ScaleBar(
            range=fig.x_range,
            unit="µm",
            dimensional=MetricLength(),
            location="bottom_left",
            bar_length=0.2,
            name="scale_bar",
        )
    )
    overview = _overview_figure(entry, x_range, y_range, slide_available)
    return (
        fig,
        overview,
        {
            "heat": heat.name,
            "pixel": pixel.name if pixel is not None else None,
            "qc": qc.name if qc is not None else None,
        },
    )


def _thumbnail_extent_um(entry: SlideResults) -> tuple[float, float] | None:
    """Width and height, µm, that ``thumbnail.png`` covers (its canvas may pad the slide)."""
    from PIL import Image

    path = entry.folder / "thumbnail.png"
    if not path.is_file():
        return None
    with Image.open(path) as image:
        d = _number(getattr(image, "text", {}).get("display_downsample"))
        w, h = image.size
    if d is None:
        return entry.dimensions[0] * entry.mpp, entry.dimensions[1] * entry.mpp
    return w * d * entry.mpp, h * d * entry.mpp


def _overview_figure(entry: SlideResults, x_range: Any, y_range: Any, slide_available: bool):
    """The whole slide, small, with a box showing the main view; a click centres it there."""
    from bokeh.events import Tap
    from bokeh.models import CustomJS, Range1d
    from bokeh.models.annotations import BoxAnnotation
    from bokeh.plotting import figure

    w_um, h_um = entry.dimensions[0] * entry.mpp, entry.dimensions[1] * entry.mpp
    height = max(60, int(round(OVERVIEW_PX * h_um / max(w_um, 1e-9))))
    overview = figure(
        width=OVERVIEW_PX,
        height=min(height, 2 * OVERVIEW_PX),
        x_range=Range1d(start=0, end=w_um),
        y_range=Range1d(start=-h_um, end=0),
        tools="tap",
        toolbar_location=None,
        name="overview_figure",
        min_border=0,
        output_backend="canvas",
    )
    overview.axis.visible = False
    overview.grid.visible = False
    overview.background_fill_color = "#f4f4f4"
    extent = _thumbnail_extent_um(entry)
    if extent is not None:
        overview.image_url(
            url=[slide_url(entry.name) + "files/thumbnail.png"],
            x=0,
            y=0,
            w=extent[0],
            h=extent[1],
            anchor="top_left",
            name="overview_thumbnail",
        )
    box = BoxAnnotation(
        left=x_range.start,
        right=x_range.end,
        bottom=y_range.start,
        top=y_range.end,
        fill_alpha=0.1,
        fill_color="#00c000",
        line_color="#00c000",
        line_width=2,
        name="overview_box",
    )
    overview.add_layout(box)
    follow = CustomJS(
        args={"box": box, "xr": x_range, "yr": y_range},
        code="box.setv({left: xr.start, right: xr.end, bottom: yr.start, top: yr.end});",
    )
    for r in (x_range, y_range):
        r.js_on_change("start", follow)
        r.js_on_change("end", follow)
    overview.js_on_event(
        Tap,
        CustomJS(
            args={"xr": x_range, "yr": y_range},
            code="""
        const w = xr.end - xr.start, h = yr.end - yr.start;
        xr.setv({start: cb_obj.x - w / 2, end: cb_obj.x + w / 2});
        yr.setv({start: cb_obj.y - h / 2, end: cb_obj.y + h / 2});
    """,
        ),
    )
    return overview


def _qc_labels(tiles: Any) -> list[str]:
    """Each tile's QC flags as text ("" when clean or not measured)."""
    if tiles.qc_flags is None:
        return [""] * len(tiles.scores)
    from ..slide.qc import flag_labels

    return flag_labels(tiles.qc_flags)


def slide_page(entry: SlideResults, slide_available: bool, slide_error: str | None) -> str:
    from bokeh.embed import components

    fig, overview, names = slide_figure(entry, slide_available)
    script, (div, overview_div) = components((fig, overview))
    tiles = entry.tiles()
    mpp = entry.mpp
    top = []
    for rank, i in enumerate(tiles.top(TOP_TILES)):
        x, y = (int(v) for v in tiles.coords[i])
        top.append(
            {
                "rank": rank + 1,
                "index": int(i),
                "x": x,
                "y": y,
                "score": float(tiles.scores[i]),
                "max": float(tiles.max_scores[i]),
                "value": float(tiles.headline[i]),
                "image": f"tile-image/{int(i)}.jpg",
            }
        )
    summary = entry.summary
    config = {
        "mpp": mpp,
        "tile_size_l0": tiles.tile_size_l0,
        "names": names,
        "slide_w": entry.dimensions[0],
        "slide_h": entry.dimensions[1],
        "slide": entry.name,
        "model_sha256": str((summary.get("identity") or {}).get("model_sha256") or ""),
        "vmin": entry.scale.vmin,
        "vcenter": entry.scale.vcenter,
        "vmax": entry.scale.vmax,
        "score_min": _number(np.nanmin(tiles.headline)) if len(tiles.scores) else None,
        "tile_score": tiles.tile_score,
        "mark_colours": MARK_COLOURS,
    }
    return (
        _environment()
        .get_template("slide.html")
        .render(
            {
                "name": entry.name,
                "summary": summary,
                "scale": entry.scale,
                "top": top,
                "bokeh_div": div,
                "overview_div": overview_div,
                "mark_colours": MARK_COLOURS,
                "bokeh_script": script,
                "bokeh_js": bokeh_script_names(),
                "config": json.dumps(config),
                "has_pixel_map": names["pixel"] is not None,
                "has_qc": names["qc"] is not None,
                "slide_error": slide_error,
                "n_tiles": len(tiles.scores),
                "tile_score": tiles.tile_score,
                "mpp": mpp,
                "tile_um": tiles.tile_size_l0 * mpp,
            }
        )
    )
