import pytest

from wsi_anomaly.config import Config, config_from_dict, load_config
from wsi_anomaly.errors import InputNotFoundError, InvalidInputError


def test_presets_load_and_differ():
    paper = load_config("haloae_paper")
    fast = load_config("haloae_fast")
    assert paper.haloae.epochs == 251 and paper.haloae.samples_per_epoch == 3000
    assert paper.haloae.batch_size == 4 and paper.haloae.lr == pytest.approx(1e-4)
    assert paper.haloae.weight_decay == pytest.approx(1e-5)
    assert fast.haloae.epochs < paper.haloae.epochs
    assert paper.model == fast.model


def test_overrides_and_round_trip():
    cfg = load_config(
        "haloae_fast", {"haloae": {"epochs": 3}, "seed": 7, "model": {"backbone_weights": "random"}}
    )
    assert cfg.haloae.epochs == 3 and cfg.seed == 7 and cfg.model.backbone_weights == "random"
    assert config_from_dict(cfg.to_dict()) == cfg


def test_bad_configs(tmp_path):
    with pytest.raises(InvalidInputError, match="unknown config key"):
        load_config(None, {"haloae": {"epoch": 3}})
    with pytest.raises(InvalidInputError, match="at least 1"):
        load_config(None, {"haloae": {"epochs": 0}})
    with pytest.raises(InvalidInputError, match="loss_terms"):
        load_config(None, {"haloae": {"loss_terms": ["cls", "xyz"]}})
    with pytest.raises(InputNotFoundError, match="haloae_fast"):
        load_config("no_such_preset")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(InvalidInputError, match="YAML"):
        load_config(str(bad))
    assert Config().validate().tile_px == 256


# -- values checked up front: one line naming the key --------------------------------------------


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"haloae": {"epochs": 1.5}}, "haloae.epochs"),
        ({"haloae": {"lr": -1}}, "haloae.lr"),
        ({"haloae": {"lr": 0}}, "haloae.lr"),
        ({"haloae": {"loss_terms": 5}}, "haloae.loss_terms"),
        ({"haloae": {"loss_terms": "cls"}}, "haloae.loss_terms"),
        ({"haloae": {"epochs": True}}, "haloae.epochs"),
        ({"haloae": {"lr": False}}, "haloae.lr"),
        ({"haloae": {"weight_decay": -0.1}}, "haloae.weight_decay"),
        ({"haloae": {"attention": "dense"}}, "haloae.attention"),
        ({"train": {"calibration_tiles": 0}}, "train.calibration_tiles"),
        ({"train": {"workers": 1.5}}, "train.workers"),
        ({"atacnet": {"lr": -2e-4}}, "atacnet.lr"),
        ({"atacnet": {"batch_size": 4.5}}, "atacnet.batch_size"),
        ({"model": {"name": 3}}, "model.name"),
        ({"haloae": {"released_mask": 1}}, "haloae.released_mask"),
        ({"seed": 0.5}, "seed"),
        ({"model": {"nam": "haloae"}}, "nam"),
    ],
)
def test_wrong_types_and_ranges_name_the_key(overrides, key):
    with pytest.raises(InvalidInputError) as info:
        load_config("haloae_fast", overrides)
    message = str(info.value)
    assert key in message and "\n" not in message


def test_unknown_family_lists_the_registered_ones():
    with pytest.raises(
        InvalidInputError, match="model.name .*atacnet, features-knn, haloae, patchcore"
    ):
        load_config(None, {"model": {"name": "nosuchfamily"}})


def test_yaml_file_values_are_checked_too(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("haloae:\n  epochs: 1.5\n")
    with pytest.raises(InvalidInputError, match="haloae.epochs"):
        load_config(str(path))


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  name: haloae\ntrain:\n  epochs: [1, 2\n  lr: 3\n")
    with pytest.raises(InvalidInputError) as info:
        load_config(str(path))
    message = str(info.value)
    assert f"{path}:" in message and "\n" not in message
    line = int(message.split(f"{path}:")[1].split(":")[0])
    assert 4 <= line <= 6


def test_non_utf8_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model:\n  name: haloae\n# température\n".encode("latin-1"))
    with pytest.raises(InvalidInputError) as info:
        load_config(str(path))
    message = str(info.value)
    assert f"{path}:3:" in message and "UTF-8" in message and "\n" not in message


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "unsafe.yaml"
    path.write_text("seed: !!python/object/apply:os.getpid []\n")
    with pytest.raises(InvalidInputError, match=str(path)):
        load_config(str(path))


def test_family_sections_come_from_the_registry():
    from wsi_anomaly.models.registry import FAMILIES

    config = Config()
    for family in FAMILIES.values():
        if family.section is not None:
            assert isinstance(getattr(config, family.section), family.section_type)
        # a fit without gradients (PatchCore) has no schedule to lengthen: one pass
        assert family.epochs(config) >= 1
        assert hasattr(getattr(config, family.schedule_section), "batch_size")
        assert family.batch_size(config) >= 1
