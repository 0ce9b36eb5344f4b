"""Block A of HaloAE: Cut&Paste self-supervision (Li et al., 2021).

Every original yields two synthetic "anomalies": *normal* (a jittered rectangle of 2–15 % of the
image pasted elsewhere) and *scar* (a thin jittered rectangle, rotated, pasted elsewhere). All
randomness comes from an explicit ``torch.Generator``, so a seeded run is reproducible whatever
else consumes the global RNG (data-loader workers, cuDNN, ...).

Images are float tensors ``C×H×W`` in [0, 1] (before ImageNet normalisation).
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

__all__ = ["color_jitter", "cutpaste_normal", "cutpaste_scar", "make_cutpaste_batch"]


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high] (inclusive)."""
    return int(torch.randint(low, high + 1, (), generator=generator).item())


def color_jitter(image: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """torchvision ``ColorJitter(strength, strength, strength, strength)`` with an explicit RNG.

    Brightness, contrast and saturation factors are uniform in ``[1 − s, 1 + s]``, the hue shift
    in ``[−s, s]`` (``s`` ≤ 0.5), applied in a random order like ``ColorJitter``.
    ``image``: ``3×h×w`` in [0, 1]; returns the same shape, in [0, 1].
    """
    if strength <= 0:
        return image
    low = max(0.0, 1.0 - strength)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    factors = [_uniform(generator, low, 1.0 + strength) for _ in range(3)]
    factors.append(_uniform(generator, -strength, strength))
    for i in torch.randperm(4, generator=generator).tolist():
        image = ops[i](image, factors[i])
    return image


def cutpaste_normal(
    image: torch.Tensor,
    generator: torch.Generator,
    area_ratio: tuple[float, float] = (0.02, 0.15),
    aspect_ratio: float = 0.3,
    jitter: float = 0.1,
) -> torch.Tensor:
    """Copy a colour-jittered rectangle to a random place.

    The area is uniform in ``area_ratio`` of the image, the aspect ratio log-uniform in
    ``[aspect_ratio, 1/aspect_ratio]``. ``image``: ``3×H×W`` in [0, 1]; returns a new tensor.
    """
    _, height, width = image.shape
    area = _uniform(generator, *area_ratio) * height * width
    aspect = math.exp(_uniform(generator, math.log(aspect_ratio), -math.log(aspect_ratio)))
    cut_w = min(width, max(1, round(math.sqrt(area * aspect))))
    cut_h = min(height, max(1, round(math.sqrt(area / aspect))))
    y0, x0 = _randint(generator, 0, height - cut_h), _randint(generator, 0, width - cut_w)
    patch = color_jitter(image[:, y0 : y0 + cut_h, x0 : x0 + cut_w], jitter, generator)
    y1, x1 = _randint(generator, 0, height - cut_h), _randint(generator, 0, width - cut_w)
    out = image.clone()
    out[:, y1 : y1 + cut_h, x1 : x1 + cut_w] = patch
    return out


def cutpaste_scar(
    image: torch.Tensor,
    generator: torch.Generator,
    width_px: tuple[int, int] = (2, 16),
    height_px: tuple[int, int] = (10, 25),
    rotation_deg: tuple[float, float] = (-45.0, 45.0),
    jitter: float = 0.1,
) -> torch.Tensor:
    """Copy a thin, colour-jittered, rotated rectangle ("scar") to a random place.

    Width and height are uniform integers in ``width_px`` and ``height_px``, the rotation uniform
    in ``rotation_deg``; the rotated patch is pasted through its rotated mask, so the corners that
    rotation brings in are not pasted. ``image``: ``3×H×W`` in [0, 1]; returns a new tensor.
    """
    _, height, width = image.shape
    cut_w = min(width, _randint(generator, *width_px))
    cut_h = min(height, _randint(generator, *height_px))
    y0, x0 = _randint(generator, 0, height - cut_h), _randint(generator, 0, width - cut_w)
    patch = color_jitter(image[:, y0 : y0 + cut_h, x0 : x0 + cut_w], jitter, generator)
    angle = _uniform(generator, *rotation_deg)
    # Rotate the patch together with an alpha channel; nearest keeps the mask binary and aligned.
    rgba = torch.cat([patch, torch.ones_like(patch[:1])])
    rgba = TF.rotate(rgba, angle, interpolation=InterpolationMode.NEAREST, expand=True, fill=0.0)
    patch, mask = rgba[:-1], rgba[-1:] > 0.5
    ph, pw = min(height, patch.shape[-2]), min(width, patch.shape[-1])
    patch, mask = patch[:, :ph, :pw], mask[:, :ph, :pw]
    y1, x1 = _randint(generator, 0, height - ph), _randint(generator, 0, width - pw)
    out = image.clone()
    region = out[:, y1 : y1 + ph, x1 : x1 + pw]
    out[:, y1 : y1 + ph, x1 : x1 + pw] = torch.where(mask, patch, region)
    return out


def make_cutpaste_batch(
    images: torch.Tensor,
    generator: torch.Generator,
    image_jitter: float = 0.1,
    patch_jitter: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn ``B`` originals into the ``3B`` training images of HaloAE.

    Each original is first colour-jittered as a whole (``image_jitter``; the histopathology
    variant uses 0.05), then both copies are made from that jittered image.

    Args:
        images: ``B×3×H×W`` float in [0, 1] (not yet normalised), on the CPU like ``generator``.
        generator: the only source of randomness.

    Returns:
        ``(batch, labels)``: ``3B×3×H×W`` ordered ``[originals, normals, scars]`` and ``3B`` int64
        labels (0 original, 1 Cut&Paste).
    """
    originals, normals, scars = [], [], []
    for image in images:
        image = color_jitter(image, image_jitter, generator)
        originals.append(image)
        normals.append(cutpaste_normal(image, generator, jitter=patch_jitter))
        scars.append(cutpaste_scar(image, generator, jitter=patch_jitter))
    n = len(originals)
    labels = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(2 * n, dtype=torch.long)])
    return torch.stack(originals + normals + scars), labels
