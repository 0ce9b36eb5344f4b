"""Shared fixtures: small synthetic slides written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from wsi_anomaly.slide.synthetic import write_synthetic_slide

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CMU_SVS = SHARED_DATA / "slides" / "CMU-1-Small-Region.svs"
HAZELNUT = SHARED_DATA / "mvtec" / "hazelnut"

needs_cmu = pytest.mark.skipif(not CMU_SVS.is_file(), reason=f"real slide not present: {CMU_SVS}")


@pytest.fixture(scope="session")
def slide_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slides")


@pytest.fixture(scope="session")
def small_slide(slide_dir):
    """A 2048×1536 px synthetic slide at 0.5 µm/px with a pyramid (levels 1 and 4 ds)."""
    return write_synthetic_slide(slide_dir / "small.tif", width=2048, height=1536, mpp=0.5, seed=1)


@pytest.fixture(scope="session")
def blank_slide(slide_dir):
    return write_synthetic_slide(
        slide_dir / "blank.tif", width=1024, height=768, mpp=0.5, all_background=True
    )


@pytest.fixture(scope="session")
def no_mpp_slide(slide_dir):
    return write_synthetic_slide(
        slide_dir / "nompp.tif", width=1024, height=768, mpp=0.5, with_resolution=False, seed=2
    )


@pytest.fixture(scope="session")
def small_store(small_slide, tmp_path_factory):
    """The tissue tiles of ``small_slide`` at 0.5 µm/px."""
    from wsi_anomaly.tiles import tile_slide

    out = tmp_path_factory.mktemp("stores") / "small.zarr"
    tile_slide(small_slide.path, out, progress=False)
    return out


def tiny_config(**settings):
    """The fast preset shrunk to seconds: random backbone, a couple of single-tile steps.

    ``settings``: keys of the ``haloae`` section or of the shared ``train`` section."""
    from dataclasses import fields

    from wsi_anomaly.config import load_config
    from wsi_anomaly.models.haloae_config import HaloAEConfig

    own = {f.name for f in fields(HaloAEConfig)}
    schedule = {"epochs": 1, "samples_per_epoch": 2, "batch_size": 1}
    train = {"workers": 0, "calibration_tiles": 4}
    for key, value in settings.items():
        (schedule if key in own else train)[key] = value
    return load_config(
        "haloae_fast",
        {"model": {"backbone_weights": "random"}, "haloae": schedule, "train": train},
    )


@pytest.fixture(scope="session")
def tiny_model(small_store, tmp_path_factory):
    """A checkpoint trained for two steps on ``small_store`` (random VGG19 weights)."""
    from wsi_anomaly.tiles.dataset import ZarrTileDataset
    from wsi_anomaly.training import train_model

    out = tmp_path_factory.mktemp("models") / "tiny.pt"
    train_model(
        ZarrTileDataset(small_store), tiny_config(), out, device="cpu", tile_mpp=0.5, progress=False
    )
    return out
