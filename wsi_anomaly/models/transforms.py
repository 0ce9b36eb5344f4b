"""Input normalisation shared by every model that sits on an ImageNet backbone."""

from __future__ import annotations

import torch

#: ImageNet channel statistics (RGB) that torchvision's VGG19 weights were trained with.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Broadcast over (C, H, W) and (B, C, H, W) alike: the channel axis is always third from last.
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return mean, std


def normalise(x: torch.Tensor) -> torch.Tensor:
    """Map RGB in [0, 1] to ImageNet-normalised values.

    Args:
        x: ``3×H×W`` or ``B×3×H×W`` float tensor in [0, 1].

    Returns:
        Tensor of the same shape, ``(x - mean) / std`` per channel.
    """
    mean, std = _stats(x)
    return (x - mean) / std


def denormalise(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalise` (no clamping; reconstructions may leave [0, 1])."""
    mean, std = _stats(x)
    return x * std + mean
