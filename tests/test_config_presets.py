"""The presets are data files: packaged with the code, and visible at the repository root."""

from pathlib import Path

import pytest

from wsi_anomaly.config import PRESET_DIR, load_config
from wsi_anomaly.slide.qc import load_qc_settings

REPO = Path(__file__).resolve().parent.parent
PRESETS = sorted(p.name for p in PRESET_DIR.glob("*.yaml"))


def test_there_are_presets():
    assert {"haloae_paper.yaml", "haloae_fast.yaml", "atacnet.yaml", "atacnet_fast.yaml"} <= set(
        PRESETS
    )


@pytest.mark.parametrize("name", PRESETS)
def test_top_level_preset_exists_and_equals_the_packaged_one(name):
    top = REPO / "configs" / name
    assert top.is_file(), f"configs/{name} is missing at the repository root"
    assert top.read_bytes() == (PRESET_DIR / name).read_bytes()
    # Quality-control presets (qc_*.yaml) hold QC thresholds, not a model config.
    (load_qc_settings if name.startswith("qc_") else load_config)(str(top))
