import pytest
import torch
from torch import nn

from wsi_anomaly.models.scoring import (
    BINOMIAL_KERNEL,
    anomaly_map,
    normalise_map,
    score_batch,
    smooth_map,
    tile_scores,
    upsample_map,
)


def test_kernel_values():
    expected = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16
    torch.testing.assert_close(BINOMIAL_KERNEL, expected)


def test_smoothing_keeps_constants_and_spreads_an_impulse():
    torch.testing.assert_close(smooth_map(torch.full((2, 8, 8), 3.5)), torch.full((2, 8, 8), 3.5))
    impulse = torch.zeros(1, 7, 7)
    impulse[0, 3, 3] = 1.0
    torch.testing.assert_close(smooth_map(impulse)[0, 2:5, 2:5], BINOMIAL_KERNEL)
    # Reflect-101 border (OpenCV's default, torch "reflect"): the edge pixel is not repeated.
    corner = torch.zeros(1, 5, 5)
    corner[0, 0, 0] = 1.0
    assert smooth_map(corner)[0, 0, 0].item() == pytest.approx(4 / 16)  # replicate: 9/16
    inner = torch.zeros(1, 5, 5)
    inner[0, 1, 1] = 1.0
    # (1, 1) is mirrored onto all four diagonal neighbours of (0, 0); zero padding gives 1/16.
    assert smooth_map(inner)[0, 0, 0].item() == pytest.approx(4 / 16)


def test_anomaly_map_normalisation_and_scores():
    fm = torch.zeros(2, 4, 8, 8)
    fm_hat = torch.zeros(2, 4, 8, 8)
    fm_hat[1, :2] = 2.0  # squared error 4 on two of four channels -> mean 2
    maps = anomaly_map(fm, fm_hat)
    assert maps.shape == (2, 8, 8)
    assert maps[0].abs().max() == 0 and torch.all(maps[1] == 2.0)

    mean_map = torch.full((8, 8), 0.5)
    normalised = normalise_map(maps, mean_map)
    assert torch.all(normalised[0] == 0.5) and torch.all(normalised[1] == 1.5)

    peaked = normalised.clone()
    peaked[0, 3, 3] = 10.0
    mean, peak = tile_scores(peaked)
    assert mean.tolist() == pytest.approx([0.5 + 9.5 / 64, 1.5])
    assert peak.tolist() == [10.0, 1.5]


def test_upsample_size():
    maps = torch.rand(3, 64, 64)
    assert upsample_map(maps, 256).shape == (3, 256, 256)
    assert upsample_map(maps, (900, 1024)).shape == (3, 900, 1024)


class _ConstantReconstruction(nn.Module):
    """fm = x, fm_hat = x + 1 everywhere: every raw map is exactly 1."""

    def features(self, x):
        return x

    def reconstruct_features(self, fm):
        return fm + 1.0


def test_score_batch_composes_the_steps():
    model = _ConstantReconstruction().eval()
    x = torch.randn(2, 3, 16, 16)
    result = score_batch(model, x, mean_map=torch.full((16, 16), 0.25), output_size=64)
    torch.testing.assert_close(result["raw_map"], torch.ones(2, 16, 16))
    torch.testing.assert_close(result["map"], torch.full((2, 16, 16), 0.75))
    torch.testing.assert_close(result["mean"], torch.full((2,), 0.75))
    assert result["pixel_map"].shape == (2, 64, 64)
    with pytest.raises(ValueError, match="eval"):
        score_batch(model.train(), x, mean_map=None)


def test_map_arithmetic_stays_float32_under_bf16_autocast():
    # Smoothing is a convolution: under autocast it would run in bf16 and round the scores.
    maps = 1.0 + torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)) * 1e-3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        smoothed = smooth_map(maps)
        pixels = upsample_map(maps, 256)
    assert smoothed.dtype == pixels.dtype == torch.float32
    assert torch.equal(smoothed, smooth_map(maps))
    assert torch.equal(pixels, upsample_map(maps, 256))
