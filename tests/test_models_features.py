import logging

import pytest
import torch
import torchvision

from wsi_anomaly.errors import WeightsUnavailableError
from wsi_anomaly.models.features import (
    VGG19Features,
    aggregate_reference,
    aggregate_taps,
    load_vgg19,
)


@pytest.mark.parametrize("size", [(256, 256), (64, 96)])
def test_fast_aggregation_equals_literal_definition(size):
    torch.manual_seed(0)
    h, w = size
    taps = [
        torch.randn(2, 64, h, w),
        torch.randn(2, 128, h // 2, w // 2),
        torch.randn(2, 256, h // 4, w // 4),
        torch.randn(2, 256, h // 4, w // 4),
    ]
    fast = aggregate_taps(taps)
    assert fast.shape == (2, 704, h // 4, w // 4)
    torch.testing.assert_close(fast, aggregate_reference(taps), atol=1e-6, rtol=1e-6)


def test_output_shape_and_frozen(caplog):
    with caplog.at_level(logging.WARNING):
        backbone = load_vgg19("random")
    assert "RANDOM" in caplog.text
    assert backbone.backbone_identity == "vgg19-random"
    assert not any(p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not backbone.training
    with torch.no_grad():
        assert backbone(torch.randn(1, 3, 256, 256)).shape == (1, 704, 64, 64)
        assert backbone(torch.randn(2, 3, 64, 96)).shape == (2, 704, 16, 24)


def test_rejects_sizes_not_divisible_by_four():
    with pytest.raises(ValueError, match="divisible by 4"):
        VGG19Features()(torch.randn(1, 3, 30, 32))


def _torchvision_reference(features: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    layers = features[:18]
    for m in layers.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.padding_mode = "reflect"
    taps = []
    for i, layer in enumerate(layers):
        x = layer(x)
        if i in (1, 6, 11, 17):
            taps.append(x.clone())  # the next ReLU is in place
    return aggregate_reference(taps)


def test_local_state_dict_matches_torchvision(tmp_path):
    torch.manual_seed(0)
    # torchvision's own VGG19 feature stack; the 120 M-parameter classifier is left out to keep
    # the test fast, but its keys are mimicked so the file looks like a full vgg19() state dict.
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["E"]).eval()
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.6.bias"] = torch.zeros(1000)
    full = tmp_path / "vgg19.pth"
    torch.save(state, full)
    backbone = load_vgg19(str(full))
    assert backbone.backbone_identity.startswith("vgg19-file:")
    assert len(backbone.backbone_identity.split(":")[1]) == 12

    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), _torchvision_reference(features, x))

    features_only = tmp_path / "features.pth"
    torch.save(features.state_dict(), features_only)
    with torch.no_grad():
        torch.testing.assert_close(load_vgg19(str(features_only))(x), backbone(x))


def test_bad_weight_files_raise_clear_errors(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="--backbone-weights"):
        load_vgg19(str(tmp_path / "missing.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match="cannot read"):
        load_vgg19(str(garbage))
    wrong = tmp_path / "wrong.pth"
    torch.save({"features.0.weight": torch.zeros(32, 3, 3, 3)}, wrong)
    with pytest.raises(WeightsUnavailableError, match="expected shape"):
        load_vgg19(str(wrong))


def test_imagenet_download_failure_says_how_to_provide_weights(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network")

    # Never touch the network (or a 548 MB download) from a test.
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailableError) as info:
        load_vgg19("imagenet")
    message = str(info.value)
    assert "IMAGENET1K_V1" in message and "--backbone-weights random" in message
    assert "\n" not in message
