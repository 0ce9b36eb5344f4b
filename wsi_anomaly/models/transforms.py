"""Input normalisation shared by every model: per-channel ``(x - mean) / std`` and its inverse.

Each family binds the statistics its backbone weights were trained with (ImageNet's for the
torchvision VGG19 and ResNet-50 weights, CLIP's for ATAC-Net's inputs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: ImageNet channel statistics (RGB) that torchvision's VGG19 weights were trained with.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def channel_stats(
    x: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean`` and ``std`` as ``3×1×1`` tensors of ``x``'s dtype and device.

    They broadcast over ``3×H×W`` and ``B×3×H×W`` alike: the channel axis is third from last.
    """
    return (
        torch.tensor(tuple(mean), dtype=x.dtype, device=x.device).view(3, 1, 1),
        torch.tensor(tuple(std), dtype=x.dtype, device=x.device).view(3, 1, 1),
    )


def normalise(
    x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """Map RGB in [0, 1] to normalised values (ImageNet statistics unless given).

    Args:
        x: ``3×H×W`` or ``B×3×H×W`` float tensor in [0, 1].
        mean, std: per-channel statistics (RGB).

    Returns:
        Tensor of the same shape, ``(x - mean) / std`` per channel.
    """
    m, s = channel_stats(x, mean, std)
    return (x - m) / s


def denormalise(
    x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """Inverse of :func:`normalise` (no clamping; reconstructions may leave [0, 1])."""
    m, s = channel_stats(x, mean, std)
    return x * s + m


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """Tiles as they come out of the tile store, or float images, as ``B×3×H×W`` float in [0, 1].

    ``images``: ``B×H×W×3`` uint8 (channels last, as stored) or ``B×3×H×W`` float in [0, 1].
    Runs wherever ``images`` is, so a uint8 batch copied to the GPU is converted there.
    """
    if images.dtype == torch.uint8:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"uint8 tiles must be B×H×W×3, got shape {tuple(images.shape)}")
        return images.permute(0, 3, 1, 2).float().div_(255.0)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"float images must be B×3×H×W, got shape {tuple(images.shape)}")
    return images.float()
