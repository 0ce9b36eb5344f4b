"""QuPath GeoJSON annotations: classes (derived too), repaired shapes, nothing dropped silently."""

import json
import logging

import numpy as np
import pytest

from wsi_anomaly.errors import InvalidInputError
from wsi_anomaly.slide.annotations import class_matches, load_annotations, rasterize


def square(x, y, side):
    return [[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]


def feature(geometry, classification=None):
    props = {"objectType": "annotation"}
    if classification is not None:
        props["classification"] = classification
    return {"type": "Feature", "geometry": geometry, "properties": props}


@pytest.fixture
def qupath_file(tmp_path):
    features = [
        feature({"type": "Polygon", "coordinates": [square(0, 0, 100)]}, {"name": "Tumor"}),
        # QuPath ≥ 0.4 derived class
        feature(
            {"type": "Polygon", "coordinates": [square(200, 0, 100)]},
            {"names": ["Tumor", "Positive"], "color": [200, 0, 0]},
        ),
        feature({"type": "Polygon", "coordinates": [square(400, 0, 100)]}, {"name": "Stroma"}),
        feature({"type": "Polygon", "coordinates": [square(600, 0, 100)]}),
        feature({"type": "Point", "coordinates": [5, 5]}, {"name": "Tumor"}),
        # A bow-tie: self-intersecting, as a brush stroke can be.
        feature(
            {
                "type": "Polygon",
                "coordinates": [[[0, 200], [100, 300], [100, 200], [0, 300], [0, 200]]],
            },
            {"names": ["Tumor", "Negative"]},
        ),
    ]
    path = tmp_path / "regions.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def test_derived_classes_and_full_names(qupath_file, caplog):
    with caplog.at_level(logging.WARNING):
        tumour = load_annotations(qupath_file, "Tumor")
    # "Tumor", "Tumor: Positive" and the repaired bow-tie (two triangles)
    assert len(tumour) == 4
    assert "left out" in caplog.text and "not an area (Point)" in caplog.text
    assert "class 'Stroma'" in caplog.text and "unclassified" in caplog.text
    positive = load_annotations(qupath_file, "Tumor: Positive")
    assert len(positive) == 1 and positive[0][0][:, 0].min() == 200
    assert class_matches("Tumor: Positive", "Tumor")
    assert not class_matches("Tumorous", "Tumor")
    assert not class_matches("Tumor", "Tumor: Positive")


def test_unknown_class_names_the_classes_present(qupath_file):
    with pytest.raises(InvalidInputError, match="Necrosis.*classes present: Tumor"):
        load_annotations(qupath_file, "Necrosis")


def test_repaired_bow_tie_rasterises_as_two_triangles(qupath_file):
    polys = load_annotations(qupath_file, "Tumor: Negative")
    mask = rasterize(polys, (400, 400), 1.0)
    # The two lobes of the bow-tie are filled, the empty wedges between them are not.
    assert mask[250, 10] and mask[250, 90]
    assert not mask[210, 50] and not mask[290, 50]


def test_holes_and_multipolygons(tmp_path):
    ring = square(0, 0, 100)
    hole = square(40, 40, 20)
    doc = [feature({"type": "MultiPolygon", "coordinates": [[ring, hole], [square(200, 200, 10)]]})]
    path = tmp_path / "a.geojson"
    path.write_text(json.dumps(doc))
    polys = load_annotations(path)
    assert len(polys) == 2 and len(polys[0]) == 2
    mask = rasterize(polys, (300, 300), 1.0)
    assert mask[10, 10] and not mask[50, 50] and mask[205, 205]
    assert np.count_nonzero(mask) == pytest.approx(100 * 100 - 20 * 20 + 100, rel=0.1)
