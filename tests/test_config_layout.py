"""Each family's settings in its own section: the shared sections hold what every family uses,
old layouts (files and checkpoints written before) are moved on loading, a key in the wrong
section of a new-layout file is one line naming where it belongs, and loading a config imports
no torch."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from wsi_anomaly.config import (
    PRESET_DIR,
    Config,
    ModelConfig,
    TrainConfig,
    config_from_dict,
    former_keys,
    load_config,
    migrate_layout,
    save_config,
)
from wsi_anomaly.errors import InvalidInputError
from wsi_anomaly.models.registry import FamilySettings, family_sections

REPO = Path(__file__).resolve().parents[1]
MODEL_PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if not p.stem.startswith("qc_"))

#: ``haloae_paper.yaml`` as it was shipped before HaloAE had its own section.
OLD_PAPER_YAML = """\
model:
  name: haloae
  backbone_weights: imagenet
  attention: halo
  released_mask: false
train:
  epochs: 251
  samples_per_epoch: 3000
  batch_size: 4
  lr: 1.0e-4
  weight_decay: 1.0e-5
  loss_weighting: ews
  loss_terms: [cls, fm, im]
  image_jitter: 0.1
  patch_jitter: 0.1
  workers: 4
  calibration_tiles: 3000
tile_px: 256
seed: 0
"""

#: The ``config`` a checkpoint written before the move holds (``Config.to_dict()`` then), with
#: values away from the defaults so that a key left behind shows.
OLD_CHECKPOINT_CONFIG = {
    "model": {
        "name": "haloae",
        "backbone_weights": "random",
        "attention": "conv",
        "released_mask": True,
        "released_init": True,
    },
    "train": {
        "epochs": 7,
        "samples_per_epoch": 12,
        "batch_size": 3,
        "lr": 0.002,
        "weight_decay": 0.0,
        "loss_weighting": "equal",
        "loss_terms": ["fm", "im"],
        "image_jitter": 0.05,
        "patch_jitter": 0.2,
        "workers": 1,
        "checkpoint_every": 2,
        "calibration_tiles": 32,
        "calibration_holdout": 0.2,
    },
    "atacnet": {"variant": "devnet", "epochs": 5},
    "tile_px": 256,
    "seed": 3,
}


def test_shared_sections_hold_only_what_every_family_uses():
    assert {f.name for f in dataclasses.fields(ModelConfig)} == {"name", "backbone_weights"}
    assert {f.name for f in dataclasses.fields(TrainConfig)} == {
        "workers",
        "checkpoint_every",
        "calibration_tiles",
        "calibration_holdout",
    }
    # every key that left a shared section is in exactly one family's section now
    for (old, key), section in former_keys().items():
        assert key not in {f.name for f in dataclasses.fields(getattr(Config(), old))}
        assert key in {f.name for f in dataclasses.fields(getattr(Config(), section))}


def test_every_family_section_is_a_field_and_validates_itself():
    from wsi_anomaly.models.registry import FAMILIES

    sections = dict(family_sections())
    assert set(sections) == {f.name for f in dataclasses.fields(FamilySettings)}
    for family in FAMILIES.values():
        assert family.section in sections
        assert sections[family.section] is family.section_type
        assert family.schedule_section == family.section
    for key, section_type in sections.items():
        section_type().validate()  # the defaults are valid
        if any(f.name == "epochs" for f in dataclasses.fields(section_type)):
            with pytest.raises(ValueError, match=f"{key}.epochs"):
                dataclasses.replace(section_type(), epochs=0).validate()


def test_old_checkpoint_config_is_moved_to_the_family_section():
    config = config_from_dict(OLD_CHECKPOINT_CONFIG)
    h = config.haloae
    assert (h.attention, h.released_mask, h.released_init) == ("conv", True, True)
    assert (h.epochs, h.samples_per_epoch, h.batch_size) == (7, 12, 3)
    assert h.lr == pytest.approx(0.002) and h.weight_decay == 0.0
    assert (h.loss_weighting, h.loss_terms) == ("equal", ["fm", "im"])
    assert (h.image_jitter, h.patch_jitter) == (0.05, 0.2)
    assert config.train == TrainConfig(1, 2, 32, 0.2)
    assert config.model == ModelConfig("haloae", "random")
    assert config.atacnet.variant == "devnet" and config.atacnet.epochs == 5
    assert config.seed == 3
    # written again, it is in the new layout and reads back the same
    assert "haloae" in config.to_dict() and "epochs" not in config.to_dict()["train"]
    assert config_from_dict(config.to_dict()) == config


def test_old_checkpoint_restores_its_model(tiny_model, tmp_path):
    """A checkpoint whose config is in the old layout scores as before: the moved settings
    build the same model (checked against the checkpoint's weights)."""
    import torch

    from wsi_anomaly.checkpoint import load_checkpoint, save_checkpoint
    from wsi_anomaly.score import Scorer

    state = load_checkpoint(tiny_model)
    new = state["config"]
    old = {k: dict(v) if isinstance(v, dict) else v for k, v in new.items() if k != "haloae"}
    moved = former_keys()
    for (section, key), family_section in moved.items():
        old[section][key] = new[family_section][key]
    path = tmp_path / "old.pt"
    save_checkpoint({**state, "config": old}, path)
    images = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    before = Scorer(tiny_model, device="cpu").score(images)
    after = Scorer(path, device="cpu").score(images)
    assert Scorer(path, device="cpu").config == config_from_dict(new)
    assert (before.mean == after.mean).all() and (before.max == after.max).all()


def test_old_yaml_loads_as_the_new_preset_and_says_so(tmp_path, caplog):
    path = tmp_path / "old_paper.yaml"
    path.write_text(OLD_PAPER_YAML)
    with caplog.at_level(logging.WARNING, logger="wsi_anomaly.config"):
        old = load_config(str(path))
    assert old == load_config("haloae_paper")
    assert "old config layout" in caplog.text and "train.epochs → haloae.epochs" in caplog.text


def test_old_layout_overrides_still_apply():
    config = load_config("haloae_fast", {"train": {"epochs": 2, "workers": 1}})
    assert config.haloae.epochs == 2 and config.train.workers == 1


@pytest.mark.parametrize(
    "text, key",
    [
        ("haloae:\n  epochs: 3\ntrain:\n  lr: 0.1\n", "train.lr"),
        ("haloae:\n  lr: 0.1\nmodel:\n  attention: conv\n", "model.attention"),
    ],
)
def test_a_family_key_in_a_shared_section_of_a_new_file_names_where_it_belongs(tmp_path, text, key):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(InvalidInputError) as info:
        load_config(str(path))
    message = str(info.value)
    name = key.split(".")[1]
    assert key in message and f"haloae.{name}" in message and "\n" not in message


def test_migrate_layout_leaves_a_new_layout_alone():
    data = load_config("haloae_fast").to_dict()
    assert migrate_layout(data) == (data, [])


@pytest.mark.parametrize("preset", MODEL_PRESETS)
def test_shipped_presets_are_in_the_new_layout(preset):
    from wsi_anomaly.config import read_yaml

    data = read_yaml(PRESET_DIR / f"{preset}.yaml")
    assert migrate_layout(data)[1] == [], f"{preset} still has keys in the old place"


def test_saved_config_round_trips(tmp_path):
    config = load_config("atacnet_fast", {"seed": 5})
    save_config(config, tmp_path / "c.yaml")
    assert load_config(str(tmp_path / "c.yaml")) == config
    assert list(config.to_dict())[:2] == ["model", "train"]


def test_loading_a_config_imports_no_torch(tmp_path):
    """In a fresh interpreter: every preset, an old-layout file and a saved config load,
    validate and save without importing torch or torchvision."""
    old = tmp_path / "old.yaml"
    old.write_text(OLD_PAPER_YAML)
    code = f"""
import sys
from wsi_anomaly.config import load_config, save_config, config_family
for name in {MODEL_PRESETS!r} + [{str(old)!r}]:
    config = load_config(name, {{"seed": 1}})
    config_family(name)
save_config(config, {str(tmp_path / "saved.yaml")!r})
load_config({str(tmp_path / "saved.yaml")!r})
loaded = sorted(m for m in ("torch", "torchvision") if m in sys.modules)
print("loaded:", ",".join(loaded) or "none")
"""
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("loaded: none"), result.stdout


def test_no_code_outside_the_models_names_a_family():
    """Outside ``models/`` and the published-numbers table, no string in the code is a family's
    name or preset (prose in docstrings and help may mention them): code asks the registry."""
    import ast

    from wsi_anomaly.models.registry import family_names

    names = set(family_names()) | set(MODEL_PRESETS)
    package = REPO / "wsi_anomaly"
    allowed = {package / "mvtec" / "paper.py"}
    found = []
    for path in [*package.rglob("*.py"), *(REPO / "workflows").rglob("*.py")]:
        if package / "models" in path.parents or path in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in names:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}")
    assert not found, "family names in code outside models/:\n" + "\n".join(found)


def _flags(**values):
    import argparse

    base = dict(
        family=None, epochs=None, batch_size=None, lr=None, samples_per_epoch=None,
        loader_workers=None, seed=None, backbone_weights=None,
    )  # fmt: skip
    return argparse.Namespace(**{**base, **values})


def test_schedule_flags_go_to_the_trained_familys_section():
    from wsi_anomaly.cli.options import config_overrides

    flags = _flags(family="haloae", epochs=3, batch_size=2, lr=0.01, samples_per_epoch=5)
    config = load_config("haloae_fast", config_overrides(flags, "haloae"))
    h = config.haloae
    assert (h.epochs, h.batch_size, h.lr, h.samples_per_epoch) == (3, 2, 0.01, 5)
    flags = _flags(family="atacnet", epochs=2, batch_size=6, lr=0.001, loader_workers=1)
    config = load_config("atacnet_fast", config_overrides(flags, "atacnet"))
    assert (config.atacnet.epochs, config.atacnet.batch_size) == (2, 6)
    assert config.atacnet.lr == 0.001 and config.train.workers == 1
    assert config.haloae == load_config("atacnet_fast").haloae  # untouched


def test_a_schedule_flag_the_family_lacks_is_one_line(capsys, tmp_path):
    from test_cli import assert_one_error_line

    from wsi_anomaly.cli import main

    tiles = tmp_path / "tiles"
    tiles.mkdir()
    code = main(
        ["train", "--tiles", str(tiles), "--out", str(tmp_path / "m.pt"), "--family", "atacnet",
         "--samples-per-epoch", "5"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert_one_error_line(code, err, "--samples-per-epoch", "atacnet", "steps_per_epoch")
