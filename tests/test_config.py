import pytest

from wsi_anomaly.config import Config, config_from_dict, load_config
from wsi_anomaly.errors import InputNotFoundError, InvalidInputError


def test_presets_load_and_differ():
    paper = load_config("haloae_paper")
    fast = load_config("haloae_fast")
    assert paper.train.epochs == 251 and paper.train.samples_per_epoch == 3000
    assert paper.train.batch_size == 4 and paper.train.lr == pytest.approx(1e-4)
    assert paper.train.weight_decay == pytest.approx(1e-5)
    assert fast.train.epochs < paper.train.epochs
    assert paper.model == fast.model


def test_overrides_and_round_trip():
    cfg = load_config("haloae_fast", {"train": {"epochs": 3}, "seed": 7,
                                      "model": {"backbone_weights": "random"}})
    assert cfg.train.epochs == 3 and cfg.seed == 7 and cfg.model.backbone_weights == "random"
    assert config_from_dict(cfg.to_dict()) == cfg


def test_bad_configs(tmp_path):
    with pytest.raises(InvalidInputError, match="unknown config key"):
        load_config(None, {"train": {"epoch": 3}})
    with pytest.raises(InvalidInputError, match="at least 1"):
        load_config(None, {"train": {"epochs": 0}})
    with pytest.raises(InvalidInputError, match="loss_terms"):
        load_config(None, {"train": {"loss_terms": ["cls", "xyz"]}})
    with pytest.raises(InputNotFoundError, match="haloae_fast"):
        load_config("no_such_preset")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(InvalidInputError, match="YAML"):
        load_config(str(bad))
    assert Config().validate().tile_px == 256
