"""The one anomaly-scoring function of HaloAE, shared by slide tiles and MVTec AD.

``fm`` → ``fm_hat`` → squared-error map at 64×64 → ``|map − training mean map|`` → 3×3 binomial
smoothing → tile score (mean; max also exposed) and, on demand, a bilinear pixel map.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from wsi_anomaly.models.haloae import HaloAE

__all__ = [
    "BINOMIAL_KERNEL",
    "anomaly_map",
    "normalise_map",
    "score_batch",
    "smooth_map",
    "tile_scores",
    "upsample_map",
]

#: [¼, ½, ¼] ⊗ [¼, ½, ¼]: OpenCV's 3×3 Gaussian with σ = 0, as the paper's post-processing used.
BINOMIAL_KERNEL: torch.Tensor = torch.outer(
    torch.tensor([0.25, 0.5, 0.25]), torch.tensor([0.25, 0.5, 0.25])
)


def anomaly_map(fm: torch.Tensor, fm_hat: torch.Tensor) -> torch.Tensor:
    """Mean over channels of the squared reconstruction error.

    ``fm``, ``fm_hat``: ``B×C×h×w`` → ``B×h×w`` in float32 (bf16 would round small errors away).
    """
    return (fm.float() - fm_hat.float()).pow(2).mean(dim=1)


def _fp32_maps(maps: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off: the map arithmetic after the model stays in float32 under bf16 autocast
    (its smoothing is a convolution, which autocast would otherwise run in bf16 and so round
    every map value to 3 significant digits, enough to swap the ranks of close tiles)."""
    return torch.autocast(maps.device.type, enabled=False)


def normalise_map(maps: torch.Tensor, mean_map: torch.Tensor) -> torch.Tensor:
    """``|A − mean_map|``: deviation from the mean map of the *training* normals.

    ``maps``: ``B×h×w``; ``mean_map``: ``h×w`` (or broadcastable). Returns ``B×h×w``.
    """
    return (maps - mean_map.to(device=maps.device, dtype=maps.dtype)).abs()


def smooth_map(maps: torch.Tensor) -> torch.Tensor:
    """3×3 binomial smoothing of ``B×h×w`` maps (same shape out).

    The border is extended by reflection without repeating the edge pixel (torch ``"reflect"``),
    which is OpenCV's default ``BORDER_REFLECT_101``; a constant map therefore stays constant.
    """
    kernel = BINOMIAL_KERNEL.to(device=maps.device, dtype=maps.dtype).view(1, 1, 3, 3)
    with _fp32_maps(maps):
        padded = F.pad(maps.unsqueeze(1), (1, 1, 1, 1), mode="reflect")
        return F.conv2d(padded, kernel).squeeze(1)


def tile_scores(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image (mean, max) of ``B×h×w`` maps; the mean is the paper's image score. Each ``B``."""
    flat = maps.flatten(1)
    return flat.mean(dim=1), flat.amax(dim=1)


def upsample_map(maps: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear up-sampling of ``B×h×w`` maps to ``B×H×W`` (``size`` = ``H`` or ``(H, W)``)."""
    with _fp32_maps(maps):
        maps = F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False)
        return maps.squeeze(1)


@torch.no_grad()
def score_batch(
    model: nn.Module,
    x: torch.Tensor,
    mean_map: torch.Tensor | None,
    output_size: int | tuple[int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Score a batch with a :class:`~wsi_anomaly.models.haloae.HaloAE` in eval mode.

    Runs the feature extractor and the encoder/decoder only (never blocks D and E).

    Args:
        model: provides ``features(x)`` and ``reconstruct_features(fm)``; must be in eval mode
            (batch-norm statistics).
        x: ``B×3×256×256`` ImageNet-normalised images.
        mean_map: ``64×64`` mean raw map of the training normals, or ``None`` to skip the
            normalisation (only while that mean map is being estimated).
        output_size: if given, also return ``pixel_map`` upsampled to it.

    Returns:
        ``raw_map`` ``B×64×64`` (before normalisation), ``map`` ``B×64×64`` (normalised and
        smoothed), ``mean`` and ``max`` ``B`` (of ``map``), and ``pixel_map`` ``B×H×W`` if asked.
    """
    if model.training:
        raise ValueError("score_batch needs the model in eval mode; call model.eval() first")
    halo_ae = cast("HaloAE", model)
    fm = halo_ae.features(x)
    raw = anomaly_map(fm, halo_ae.reconstruct_features(fm))
    maps = smooth_map(raw if mean_map is None else normalise_map(raw, mean_map))
    mean, peak = tile_scores(maps)
    result = {"raw_map": raw, "map": maps, "mean": mean, "max": peak}
    if output_size is not None:
        result["pixel_map"] = upsample_map(maps, output_size)
    return result
