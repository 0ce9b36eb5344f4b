// Controls around the bokeh slide view: overlay opacity, mode and threshold, magnification
// presets, keyboard pan and zoom, the tile panel, the most anomalous tiles, and review marks
// (kept in the browser's localStorage, exported as QuPath GeoJSON or CSV). Bokeh models are
// found by the names set in pages.py. Data units are slide µm, y downwards as negative numbers.
(function () {
  const config = JSON.parse(document.getElementById("viewer-config").textContent);
  const MARKS_KEY = "wsi-anomaly-marks:" + config.slide;

  function withModels(fn) {
    const doc = window.Bokeh && Bokeh.documents && Bokeh.documents[0];
    const figure = doc && doc.get_model_by_name("slide_figure");
    const view = figure && Bokeh.index && Bokeh.index.get_one(figure);
    if (!doc || !doc.get_model_by_name("tile_source") || !view || !view.frame.bbox.width) {
      setTimeout(function () { withModels(fn); }, 50);
      return;
    }
    fn(function (name) { return name ? doc.get_model_by_name(name) : null; }, view);
  }

  function fmt(v, digits) {
    return v === null || v === undefined || Number.isNaN(v) ? "–" : Number(v).toPrecision(digits);
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

  withModels(function (model, view) {
    const heat = model(config.names.heat);
    const pixel = model(config.names.pixel);
    const xr = model("x_range"), yr = model("y_range"), source = model("tile_source");
    const marksSource = model("mark_source");
    const side = config.tile_size_l0 * config.mpp;
    const d = source.data;
    const n = d.score.length;

    // -- geometry: aspect, zoom limits, presets ---------------------------------------------
    function frameSize() { return [view.frame.bbox.width, view.frame.bbox.height]; }
    // 1 µm is as long across as up: the y range follows the canvas's aspect around its centre.
    function setView(cx, cy, widthUm) {
      const size = frameSize();
      widthUm = Math.min(Math.max(widthUm, xr.min_interval || 0), xr.max_interval || Infinity);
      const heightUm = widthUm * size[1] / size[0];
      xr.setv({start: cx - widthUm / 2, end: cx + widthUm / 2});
      yr.setv({start: cy - heightUm / 2, end: cy + heightUm / 2});
    }
    function centre() { return [(xr.start + xr.end) / 2, (yr.start + yr.end) / 2]; }
    function fitSlide() {
      const size = frameSize();
      const w = config.slide_w * config.mpp, h = config.slide_h * config.mpp;
      const widthUm = Math.max(w, h * size[0] / size[1]) * 1.02;
      setView(w / 2, -h / 2, widthUm);
    }
    function applyLimits() {
      // Zoom limit: at most 4 screen pixels per level-0 pixel.
      const size = frameSize();
      xr.min_interval = size[0] * config.mpp / 4;
      yr.min_interval = size[1] * config.mpp / 4;
      xr.max_interval = 4 * Math.max(config.slide_w, config.slide_h) * config.mpp * Math.max(1, size[0] / size[1]);
      yr.max_interval = 4 * Math.max(config.slide_w, config.slide_h) * config.mpp * Math.max(1, size[1] / size[0]);
    }
    applyLimits();
    fitSlide();
    window.addEventListener("resize", function () {
      setTimeout(function () { applyLimits(); const c = centre(); setView(c[0], c[1], xr.end - xr.start); }, 150);
    });
    // Magnification presets: M× ≈ 10 / M µm per screen pixel (40× ≈ 0.25 µm/px).
    document.querySelectorAll("#presets button[data-mag]").forEach(function (button) {
      button.addEventListener("click", function () {
        const c = centre();
        setView(c[0], c[1], frameSize()[0] * 10 / parseFloat(button.dataset.mag));
      });
    });
    document.getElementById("fit").addEventListener("click", fitSlide);

    // -- keyboard ------------------------------------------------------------------------------
    function zoom(factor) { const c = centre(); setView(c[0], c[1], (xr.end - xr.start) * factor); }
    function pan(fx, fy) {
      const c = centre();
      setView(c[0] + fx * (xr.end - xr.start), c[1] + fy * (yr.end - yr.start), xr.end - xr.start);
    }
    document.addEventListener("keydown", function (e) {
      const tag = (e.target && e.target.tagName) || "";
      if (tag === "INPUT" || tag === "SELECT" || tag === "TEXTAREA" || e.ctrlKey || e.metaKey || e.altKey) { return; }
      const keys = {
        ArrowLeft: function () { pan(-0.25, 0); }, ArrowRight: function () { pan(0.25, 0); },
        ArrowUp: function () { pan(0, 0.25); }, ArrowDown: function () { pan(0, -0.25); },
        "+": function () { zoom(1 / 1.5); }, "=": function () { zoom(1 / 1.5); },
        "-": function () { zoom(1.5); }, "_": function () { zoom(1.5); },
        "0": fitSlide, Home: fitSlide,
        a: function () { markSelected("anomalous"); }, r: function () { markSelected("artifact"); },
        n: function () { markSelected("normal"); }, x: function () { markSelected(""); },
      };
      const action = keys[e.key];
      if (action) { e.preventDefault(); action(); }
    });

    // -- overlay: opacity, mode, threshold --------------------------------------------------
    const opacity = document.getElementById("opacity");
    const threshold = document.getElementById("threshold");
    const mode = document.getElementById("overlay-mode");
    const showOverlay = document.getElementById("show-overlay");
    function applyOverlay() {
      const a = parseFloat(opacity.value);
      const t = parseFloat(threshold.value);
      document.getElementById("opacity-value").textContent = a.toFixed(2);
      document.getElementById("threshold-value").textContent = Number(t).toPrecision(4);
      const on = showOverlay.checked;
      // The stored colour image when every tile is shown filled; tile squares otherwise.
      const image = on && mode.value === "fill" && t <= parseFloat(threshold.min);
      heat.visible = image;
      heat.glyph.global_alpha = a;
      if (pixel) { pixel.glyph.global_alpha = a; }
      const fa = new Float64Array(n), la = new Float64Array(n);
      if (on && !image) {
        for (let i = 0; i < n; i++) {
          const s = d.headline[i];  // the tile's score as the model ranks it
          if (s === null || Number.isNaN(s) || s < t) { continue; }
          if (mode.value === "fill") { fa[i] = a; } else { la[i] = Math.max(a, 0.3); }
        }
      }
      source.data = Object.assign({}, source.data, {fa: fa, la: la});
    }
    [opacity, threshold, mode, showOverlay].forEach(function (el) {
      el.addEventListener("input", applyOverlay);
      el.addEventListener("change", applyOverlay);
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
    applyOverlay();

    // -- top tiles ---------------------------------------------------------------------------
    document.querySelectorAll("#top-tiles button").forEach(function (button) {
      button.addEventListener("click", function () {
        const x = parseFloat(button.dataset.x), y = parseFloat(button.dataset.y);
        const cx = (x + config.tile_size_l0 / 2) * config.mpp;
        const cy = -(y + config.tile_size_l0 / 2) * config.mpp;
        setView(cx, cy, 8 * side);
        source.selected.indices = [parseInt(button.dataset.index, 10)];
      });
    });

    // -- review marks ------------------------------------------------------------------------
    function loadMarks() {
      try { return JSON.parse(localStorage.getItem(MARKS_KEY) || "{}"); } catch (e) { return {}; }
    }
    let marks = loadMarks();  // tile index → mark name
    function drawMarks() {
      const cx = [], cy = [], color = [];
      const list = document.getElementById("marks");
      list.innerHTML = "";
      Object.keys(marks).map(Number).sort(function (a, b) { return a - b; }).forEach(function (i) {
        cx.push(d.cx[i]); cy.push(d.cy[i]); color.push(config.mark_colours[marks[i]]);
        const li = document.createElement("li");
        li.dataset.index = i; li.dataset.mark = marks[i];
        li.textContent = marks[i] + " · x " + d.x[i] + ", y " + d.y[i] + " · " + fmt(d.headline[i], 4);
        list.appendChild(li);
      });
      marksSource.data = {cx: cx, cy: cy, color: color};
      document.getElementById("mark-count").textContent = String(cx.length);
    }
    function markSelected(name) {
      const i = source.selected.indices[0];
      if (i === undefined) { return; }
      if (name) { marks[i] = name; } else { delete marks[i]; }
      localStorage.setItem(MARKS_KEY, JSON.stringify(marks));
      drawMarks();
    }
    document.querySelectorAll(".mark-buttons button").forEach(function (button) {
      button.addEventListener("click", function () { markSelected(button.dataset.mark); });
    });
    drawMarks();

    function download(name, type, text) {
      const link = document.createElement("a");
      link.href = URL.createObjectURL(new Blob([text], {type: type}));
      link.download = name;
      document.body.appendChild(link);
      link.click();
      setTimeout(function () { URL.revokeObjectURL(link.href); link.remove(); }, 1000);
    }
    function rgb(hex) { return [1, 3, 5].map(function (k) { return parseInt(hex.substr(k, 2), 16); }); }
    function uuid() {
      if (window.crypto && crypto.randomUUID) { return crypto.randomUUID(); }
      return "10000000-1000-4000-8000-100000000000".replace(/[018]/g, function (c) {
        return (c ^ (crypto.getRandomValues(new Uint8Array(1))[0] & (15 >> (c / 4)))).toString(16);
      });
    }
    const stem = config.slide.replace(/[^A-Za-z0-9._-]+/g, "_");
    const modelId = config.model_sha256 ? config.model_sha256.slice(0, 8) : "nomodel";
    function markedIndices() { return Object.keys(marks).map(Number).sort(function (a, b) { return a - b; }); }
    document.getElementById("export-geojson").addEventListener("click", function () {
      const s = config.tile_size_l0;
      const features = markedIndices().map(function (i) {
        const x = d.x[i], y = d.y[i], name = marks[i];
        const measurements = {};
        if (d.score[i] !== null && !Number.isNaN(d.score[i])) { measurements["anomaly_score [" + modelId + "]"] = d.score[i]; }
        return {
          type: "Feature", id: uuid(),
          geometry: {type: "Polygon", coordinates: [[[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]]},
          properties: {
            objectType: "annotation", name: "review " + modelId,
            classification: {name: name.charAt(0).toUpperCase() + name.slice(1), color: rgb(config.mark_colours[name])},
            measurements: measurements,
          },
        };
      });
      const doc = {type: "FeatureCollection", features: features,
                   properties: {wsi_anomaly: {slide: config.slide, model_sha256: config.model_sha256, review: true}}};
      download(stem + ".review.geojson", "application/geo+json", JSON.stringify(doc));
    });
    document.getElementById("export-csv").addEventListener("click", function () {
      const lines = ["x,y,width,height,score,mark"];
      markedIndices().forEach(function (i) {
        const s = d.score[i];
        lines.push([d.x[i], d.y[i], config.tile_size_l0, config.tile_size_l0,
                    s === null || Number.isNaN(s) ? "" : s, marks[i]].join(","));
      });
      download(stem + ".review.csv", "text/csv", lines.join("\n") + "\n");
    });

    document.getElementById("view").focus({preventScroll: true});
    document.body.dataset.ready = "1";
  });
})();
