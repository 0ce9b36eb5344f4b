import logging

import pytest
import torch
import torch.nn.functional as F
import torchvision

from wsi_anomaly.errors import WeightsUnavailableError
from wsi_anomaly.models.wide_resnet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    WideResNetPatchFeatures,
    load_wide_resnet50,
)


@pytest.fixture(scope="module")
def torchvision_state():
    torch.manual_seed(0)
    net = torchvision.models.wide_resnet50_2(weights=None)
    # non-trivial batch-norm statistics, so that a wrong mapping would show
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval().state_dict()


def _reference_features(state, x):
    """PatchCore's layer 2 + 3 features, computed from torchvision's own model."""
    net = torchvision.models.wide_resnet50_2(weights=None)
    net.load_state_dict(state)
    net.eval()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        h = net.maxpool(net.relu(net.bn1(net.conv1((x - mean) / std))))
        l2 = net.layer2(net.layer1(h))
        l3 = net.layer3(l2)
    l2 = F.avg_pool2d(l2, 3, stride=1, padding=1)
    l3 = F.avg_pool2d(l3, 3, stride=1, padding=1)
    l3 = F.interpolate(l3, size=l2.shape[-2:], mode="bilinear", align_corners=False)
    return torch.cat([l2, l3], dim=1)


def test_features_from_a_whole_torchvision_state_dict(tmp_path, torchvision_state):
    path = tmp_path / "wrn.pth"
    torch.save(torchvision_state, path)
    model = load_wide_resnet50(str(path))
    assert model.backbone_identity.startswith("wide_resnet50_2-file:")
    x = torch.rand(2, 3, 224, 224)
    out = model(x)
    assert out.shape == (2, 1536, 28, 28) == (2, model.out_channels, *model.grid(224, 224))
    assert not out.requires_grad
    torch.testing.assert_close(out, _reference_features(torchvision_state, x), atol=1e-4, rtol=1e-4)


def test_channel_reduction_and_other_sizes(torchvision_state):
    trunk = {k: v for k, v in torchvision_state.items() if not k.startswith(("layer4", "fc"))}
    full = WideResNetPatchFeatures(trunk)
    reduced = WideResNetPatchFeatures(trunk, target_dim=1024)
    x = torch.rand(1, 3, 256, 200)
    out = full(x)
    assert out.shape == (1, 1536, 32, 25) and full.grid(256, 200) == (32, 25)
    small = reduced(x)
    assert small.shape == (1, 1024, 32, 25) and reduced.out_channels == 1024
    # adaptive average pooling over each position's channel vector
    expected = F.adaptive_avg_pool1d(out.permute(0, 2, 3, 1).reshape(-1, 1, 1536), 1024)
    torch.testing.assert_close(small.permute(0, 2, 3, 1).reshape(-1, 1024), expected[:, 0])
    with pytest.raises(ValueError, match="target_dim"):
        WideResNetPatchFeatures(target_dim=0)
    with pytest.raises(ValueError, match="B×3×H×W"):
        full(torch.rand(1, 1, 64, 64))


def test_random_weights_are_frozen_and_warned(caplog):
    with caplog.at_level(logging.WARNING):
        model = load_wide_resnet50("random", target_dim=512)
    assert "RANDOM" in caplog.text
    assert model.backbone_identity == "wide_resnet50_2-random"
    assert not any(p.requires_grad for p in model.parameters())
    model.train()
    assert not model.training
    x = torch.rand(1, 3, 64, 64, requires_grad=True)
    out = model(x)
    assert out.shape == (1, 512, 8, 8) and not out.requires_grad
    assert torch.isfinite(out).all()


def test_mismatched_file_is_one_line_naming_the_architecture(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    with pytest.raises(WeightsUnavailableError) as info:
        load_wide_resnet50(str(path))
    message = str(info.value)
    assert "\n" not in message
    assert "Wide ResNet-50-2" in message and "expected shape" in message
    missing = tmp_path / "empty.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, missing)
    with pytest.raises(WeightsUnavailableError, match="missing"):
        load_wide_resnet50(str(missing))
