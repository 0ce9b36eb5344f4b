"""The recipes in workflows/ run on the public API."""

import importlib.util
import json
from pathlib import Path

from wsi_anomaly.tiles import TileStore

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"


def load(name):
    spec = importlib.util.spec_from_file_location(name, WORKFLOWS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_training_set_from_annotations(small_slide, tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "s1.tif").write_bytes(small_slide.path.read_bytes())
    (slides / "s2.tif").write_bytes(small_slide.path.read_bytes())  # no annotations: ignored
    geo = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[0, 0], [1024, 0], [1024, 1536], [0, 1536], [0, 0]]],
                },
                "properties": {"classification": {"name": "Tumor", "color": [255, 0, 0]}},
            }
        ],
    }
    (slides / "s1.geojson").write_text(json.dumps(geo))
    out = tmp_path / "train"
    build = load("build_training_set")
    assert (
        build.main([str(slides), "--out", str(out), "--class", "Tumor", "--min-tissue", "0"]) == 0
    )
    store = TileStore(out / "s1.zarr")
    assert len(store) == 24 and (store.coords[:, 0] + 256 <= 1024).all()
    assert not (out / "s2.zarr").exists()
    assert "s1.tif,ok,24" in (out / "training_set.csv").read_text()
    # re-run: done slides are skipped
    assert build.main([str(slides), "--out", str(out), "--class", "Tumor"]) == 0
    assert "skipped" in (out / "training_set.csv").read_text()
    assert build.main([str(tmp_path / "nope"), "--out", str(out)]) == 2
