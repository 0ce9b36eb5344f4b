// Controls around the bokeh slide view: overlay opacity and visibility, the tile panel, and
// jumping to the most anomalous tiles. Bokeh models are found by the names set in pages.py.
(function () {
  const config = JSON.parse(document.getElementById("viewer-config").textContent);

  function withModels(fn) {
    const doc = window.Bokeh && Bokeh.documents && Bokeh.documents[0];
    if (!doc || !doc.get_model_by_name("tile_source")) {
      setTimeout(function () { withModels(fn); }, 50);
      return;
    }
    fn(function (name) { return name ? doc.get_model_by_name(name) : null; });
  }

  function fmt(v, digits) {
    return v === null || v === undefined ? "–" : Number(v).toPrecision(digits);
  }

  window.wsiShowTile = function (t) {
    const info = document.getElementById("tile-info");
    info.innerHTML = "";
    const dl = document.createElement("dl");
    [["score", fmt(t.score, 5)], ["max", fmt(t.max, 5)],
     ["tissue fraction", t.tissue === null ? "–" : Number(t.tissue).toFixed(2)],
     ["QC flags", t.qc ? t.qc.split(";").join(", ") : "–"],
     ["level-0 x, y", t.x + ", " + t.y],
     ["µm", (t.x * config.mpp).toFixed(0) + ", " + (t.y * config.mpp).toFixed(0)]]
      .forEach(function (pair) {
        const dt = document.createElement("dt"); dt.textContent = pair[0];
        const dd = document.createElement("dd"); dd.textContent = pair[1];
        dd.dataset.field = pair[0];
        dl.appendChild(dt); dl.appendChild(dd);
      });
    info.appendChild(dl);
    info.dataset.index = t.index;
  };

  withModels(function (model) {
    const heat = model(config.names.heat);
    const pixel = model(config.names.pixel);
    const opacity = document.getElementById("opacity");
    opacity.addEventListener("input", function () {
      const a = parseFloat(opacity.value);
      document.getElementById("opacity-value").textContent = a.toFixed(2);
      heat.glyph.global_alpha = a;
      if (pixel) { pixel.glyph.global_alpha = a; }
    });
    document.getElementById("show-overlay").addEventListener("change", function (e) {
      heat.visible = e.target.checked;
    });
    const qc = model(config.names.qc);
    const showQc = document.getElementById("show-qc");
    if (showQc && qc) {
      showQc.addEventListener("change", function (e) { qc.visible = e.target.checked; });
    }
    const showPixels = document.getElementById("show-pixels");
    if (showPixels && pixel) {
      showPixels.addEventListener("change", function (e) { pixel.visible = e.target.checked; });
    }
    const xr = model("x_range"), yr = model("y_range"), source = model("tile_source");
    document.querySelectorAll("#top-tiles button").forEach(function (button) {
      button.addEventListener("click", function () {
        const x = parseFloat(button.dataset.x), y = parseFloat(button.dataset.y);
        const side = config.tile_size_l0 * config.mpp;
        const cx = (x + config.tile_size_l0 / 2) * config.mpp;
        const cy = -(y + config.tile_size_l0 / 2) * config.mpp;
        const aspect = (yr.end - yr.start) / (xr.end - xr.start);
        const w = 8 * side;
        xr.setv({start: cx - w / 2, end: cx + w / 2});
        yr.setv({start: cy - w * aspect / 2, end: cy + w * aspect / 2});
        source.selected.indices = [parseInt(button.dataset.index, 10)];
      });
    });
    document.body.dataset.ready = "1";
  });
})();
