import pytest

from wsi_anomaly.errors import InvalidInputError, ResolutionError
from wsi_anomaly.slide.resolution import load_mpp_csv, lookup_mpp, resolve_resolution


def test_openslide_property_wins_over_tags():
    props = {
        "openslide.mpp-x": "0.25",
        "openslide.mpp-y": "0.26",
        "tiff.XResolution": "20000",
        "tiff.YResolution": "20000",
        "tiff.ResolutionUnit": "centimeter",
    }
    res = resolve_resolution(props, "s")
    assert res.source == "openslide" and res.mpp_x == 0.25 and res.mpp_y == 0.26


@pytest.mark.parametrize(
    "unit,xres,expected", [("centimeter", "20000", 0.5), ("inch", "50800", 0.5)]
)
def test_tiff_tags_with_unit(unit, xres, expected):
    res = resolve_resolution(
        {"tiff.XResolution": xres, "tiff.YResolution": xres, "tiff.ResolutionUnit": unit}, "s"
    )
    assert res.source == "tiff-tags"
    assert res.mpp == pytest.approx(expected)


def test_placeholder_tags_are_ignored_and_objective_power_is_used(caplog):
    res = resolve_resolution(
        {
            "tiff.XResolution": "1",
            "tiff.YResolution": "1",
            "tiff.ResolutionUnit": "inch",
            "openslide.objective-power": "40",
        },
        "s",
    )
    assert res.source == "objective-power" and res.mpp == pytest.approx(0.25)
    assert "objective power" in caplog.text


def test_missing_everywhere_names_the_override():
    with pytest.raises(ResolutionError, match="--slide-mpp"):
        resolve_resolution({}, "slide.tif")


@pytest.mark.parametrize("value", ["0.01", "0.05", "25"])
def test_implausible_values_are_refused(value):
    with pytest.raises(ResolutionError, match="implausible"):
        resolve_resolution({"openslide.mpp-x": value, "openslide.mpp-y": value}, "s")


def test_override_wins_and_is_checked():
    assert resolve_resolution({"openslide.mpp-x": "0.25"}, "s", 0.5).source == "override"
    with pytest.raises(ResolutionError):
        resolve_resolution({}, "s", 100.0)


def test_cohort_csv(tmp_path):
    csv = tmp_path / "mpp.csv"
    csv.write_text("slide,mpp\na.svs,0.25\nb,0.5\n")
    table = load_mpp_csv(csv)
    assert lookup_mpp(table, "/data/a.svs") == 0.25
    assert lookup_mpp(table, "/data/b.ndpi") == 0.5
    assert lookup_mpp(table, "/data/c.svs") is None
    bad = tmp_path / "bad.csv"
    bad.write_text("name,res\na,1\n")
    with pytest.raises(InvalidInputError, match="slide,mpp"):
        load_mpp_csv(bad)


def test_trident_csv_header(tmp_path):
    csv = tmp_path / "trident.csv"
    csv.write_text("wsi,mpp\n/data/x/a.svs,0.25\nb.ndpi,0.5\nc,1.0\n")
    table = load_mpp_csv(csv)
    assert lookup_mpp(table, "/data/x/a.svs") == 0.25
    assert lookup_mpp(table, "/other/b.ndpi") == 0.5
    assert lookup_mpp(table, "/data/c.svs") == 1.0
    assert lookup_mpp(table, "/data/d.svs") is None
    bom = tmp_path / "excel.csv"
    bom.write_text("\ufeffwsi,mpp\na.svs,0.25\n", encoding="utf-8")
    assert lookup_mpp(load_mpp_csv(bom), "a.svs") == 0.25


@pytest.mark.parametrize("header", ["name,res", "wsi,microns", "slide", ""])
def test_bad_csv_header_names_the_accepted_ones(tmp_path, header):
    bad = tmp_path / "bad.csv"
    bad.write_text(f"{header}\na,1\n" if header else "")
    with pytest.raises(InvalidInputError, match="'slide,mpp' or 'wsi,mpp'"):
        load_mpp_csv(bad)
