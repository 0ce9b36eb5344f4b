"""ATAC-Net inputs: preprocessing, CutMix pseudo-anomalies, balanced batches and rotation.

The ATAC-Net paper (§2) fixes the order of the preprocessing: contrast equalisation (CLAHE on the
lightness of LAB) on the image as it is, scaling to [0, 1], channel-wise standardisation with the
paper's statistics and one 224×224 bicubic resize through Pillow. :func:`preprocess` runs CLAHE at
the size it is given, then the one bicubic resize, then standardises. Standardisation is an
affine map per channel and bicubic weights sum to one, so resizing before standardising (as done
here, on 8-bit RGB like torchvision's ``Resize`` on a PIL image) gives the same result up to
8-bit rounding. Callers hand over whole images unresized (the family's ``resizes_own_input``):
the MVTec benchmark gives ATAC-Net each image at its own resolution; a slide tile is the image.

Training batches are balanced (the ATAC-Net paper's Algorithm 2, line 5): half normal images, half drawn from the
"anomalous pool", which is the few labelled anomalies plus CutMix (Yun et al., 2019) of normal
images. All randomness comes from an explicit ``torch.Generator``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence, Sized
from typing import Any, cast

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from wsi_anomaly.models.transforms import normalise

__all__ = [
    "AtacNetData",
    "ATACNET_MEAN",
    "ATACNET_STD",
    "IMAGE_SIZE",
    "BalancedBatchSampler",
    "cutmix",
    "cutmix_anomalous_half",
    "equalise_contrast",
    "preprocess",
    "random_rotation",
]

#: Input side of ATAC-Net in pixels (the ATAC-Net paper, §2).
IMAGE_SIZE = 224
#: Channel statistics stated by the ATAC-Net paper (§2) for standardisation, RGB order.
ATACNET_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
ATACNET_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
#: Lightness range (fraction of full scale) below which an image counts as flat and CLAHE is
#: skipped: scikit-image stretches its output to [0, 1], which turns the rounding noise of a
#: flat image (blank glass, padding) into black-and-white artefacts.
FLAT_LIGHTNESS_RANGE = 1e-3


def _as_rgb_uint8(image: object) -> np.ndarray:
    """PIL image, ``H×W[×C]`` array (uint8, or float in [0, 1]) or ``C×H×W`` tensor → ``H×W×3``
    uint8."""
    if isinstance(image, Image.Image):
        return np.array(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
            raise ValueError(f"expected a C×H×W image tensor, got shape {tuple(image.shape)}")
        image = image.detach().cpu().permute(1, 2, 0).numpy()
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an H×W×3 RGB image, got shape {array.shape}")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    array = array[..., :3]  # drop alpha
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if np.issubdtype(array.dtype, np.floating):
        return np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    raise ValueError(f"expected uint8 or float (in [0, 1]) pixels, got dtype {array.dtype}")


def equalise_contrast(rgb: np.ndarray, clip_limit: float = 0.01) -> np.ndarray:
    """CLAHE on the lightness of CIE-LAB, colour kept (the ATAC-Net paper, §2, "contrast equalisation").

    scikit-image's ``equalize_adapthist`` with its defaults (tiles of 1/8 of the image side,
    ``clip_limit`` 0.01, 256 bins) runs on ``L/100``; a and b are kept. Flat images (lightness
    range below :data:`FLAT_LIGHTNESS_RANGE`) are returned unchanged.

    Args:
        rgb: ``H×W×3`` uint8.

    Returns:
        ``H×W×3`` uint8.
    """
    from skimage import color, exposure

    lab = color.rgb2lab(rgb)
    lightness = lab[..., 0] / 100.0
    if float(lightness.max() - lightness.min()) < FLAT_LIGHTNESS_RANGE:
        return rgb.copy()
    lab[..., 0] = exposure.equalize_adapthist(lightness, clip_limit=clip_limit) * 100.0
    with warnings.catch_warnings():
        # Out-of-gamut colours after raising L are clipped; skimage warns about each one.
        warnings.simplefilter("ignore", UserWarning)
        out = color.lab2rgb(lab)
    return np.round(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8)


def preprocess(
    image: object, size: int = IMAGE_SIZE, clahe: bool = True, clip_limit: float = 0.01
) -> torch.Tensor:
    """The ATAC-Net paper's preprocessing of one image (§2): CLAHE on the image at its own size,
    then one bicubic resize to ``size``, then standardisation.

    Args:
        image: RGB as a PIL image, an ``H×W×3`` array (uint8, or float in [0, 1]) or a
            ``3×H×W`` tensor in [0, 1]; grey-scale is repeated, alpha dropped.
        size: output side in pixels (224 in the ATAC-Net paper).
        clahe: apply :func:`equalise_contrast` (off only for ablations).
        clip_limit: CLAHE clip limit (scikit-image's default; the paper is silent).

    Returns:
        ``3×size×size`` float32 tensor, standardised with :data:`ATACNET_MEAN` /
        :data:`ATACNET_STD`.
    """
    rgb = _as_rgb_uint8(image)
    if clahe:
        rgb = equalise_contrast(rgb, clip_limit=clip_limit)
    if rgb.shape[:2] != (size, size):
        rgb = np.array(Image.fromarray(rgb).resize((size, size), Image.Resampling.BICUBIC))
    x = torch.from_numpy(np.array(rgb, copy=True)).permute(2, 0, 1).float() / 255.0
    return normalise(x, ATACNET_MEAN, ATACNET_STD)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def cutmix(
    normal_a: torch.Tensor,
    normal_b: torch.Tensor,
    generator: torch.Generator,
    area_ratio: tuple[float, float] = (0.05, 0.25),
) -> torch.Tensor:
    """A CutMix pseudo-anomaly (label 1): a box of ``normal_b`` pasted into ``normal_a``.

    As in CutMix the box has the image's aspect ratio and sits at the same place in both images.
    CutMix draws the mixed area from ``Beta(1, 1)`` and clips the box at the border; here the
    area is uniform in ``area_ratio`` of the image and the box lies fully inside, because a box
    of nearly nothing or nearly everything would be a normal image labelled anomalous (the ATAC-Net paper
    is silent on the size).

    Args:
        normal_a, normal_b: ``C×H×W`` images of the same shape (any value range).
        generator: source of randomness.
        area_ratio: range of the box area as a fraction of the image area.

    Returns:
        A new ``C×H×W`` tensor.
    """
    if normal_a.shape != normal_b.shape:
        raise ValueError(
            f"CutMix needs images of one shape, got {tuple(normal_a.shape)} and "
            f"{tuple(normal_b.shape)}"
        )
    height, width = normal_a.shape[-2:]
    side = math.sqrt(_uniform(generator, *area_ratio))
    box_h = min(height, max(1, round(side * height)))
    box_w = min(width, max(1, round(side * width)))
    top = int(torch.randint(0, height - box_h + 1, (), generator=generator))
    left = int(torch.randint(0, width - box_w + 1, (), generator=generator))
    mixed = normal_a.clone()
    mixed[..., top : top + box_h, left : left + box_w] = normal_b[
        ..., top : top + box_h, left : left + box_w
    ]
    return mixed


class BalancedBatchSampler(Sampler[list[int]]):
    """Index batches for a dataset of normal images and a few labelled anomalies.

    Each batch lists ``batch_size // 2`` normal indices first, then the anomalous half. Every
    anomalous slot is a labelled anomaly (drawn with replacement) with probability
    ``real_anomaly_fraction``, otherwise, and always when there is no labelled anomaly, a
    *normal* index that :func:`cutmix_anomalous_half` turns into a CutMix pseudo-anomaly. The
    normal indices of one batch (both halves) are distinct whenever the dataset has enough
    normals, so a CutMix never mixes an image with itself.

    Use it as ``DataLoader(dataset, batch_sampler=sampler)`` and keep the order of the batch.
    The split between labelled anomalies and CutMix in the pool is not given by the ATAC-Net paper.

    Args:
        labels: dataset labels, 0 normal and 1 labelled anomaly.
        batch_size: images per batch (48 in the training settings), at least 2.
        steps: batches per epoch (one pass over the sampler).
        generator: source of randomness (seed it per epoch for reproducible resumes).
        real_anomaly_fraction: probability that an anomalous slot is a labelled anomaly.
    """

    def __init__(
        self,
        labels: Sequence[int],
        batch_size: int,
        steps: int,
        generator: torch.Generator,
        real_anomaly_fraction: float = 0.5,
    ) -> None:
        labels_t = torch.as_tensor(list(labels), dtype=torch.long)
        self.normal_indices = torch.nonzero(labels_t == 0).flatten()
        self.anomaly_indices = torch.nonzero(labels_t == 1).flatten()
        if len(self.normal_indices) == 0:
            raise ValueError("balanced batches need at least one normal image")
        if batch_size < 2:
            raise ValueError(f"batch_size must be at least 2, got {batch_size}")
        if not 0.0 <= real_anomaly_fraction <= 1.0:
            raise ValueError(
                f"real_anomaly_fraction must be in [0, 1], got {real_anomaly_fraction}"
            )
        self.batch_size = batch_size
        self.steps = steps
        self.generator = generator
        self.real_anomaly_fraction = real_anomaly_fraction

    def __len__(self) -> int:
        return self.steps

    def _normals(self, n: int) -> torch.Tensor:
        pool = self.normal_indices
        if n <= len(pool):
            return pool[torch.randperm(len(pool), generator=self.generator)[:n]]
        return pool[torch.randint(0, len(pool), (n,), generator=self.generator)]

    def __iter__(self) -> Iterator[list[int]]:
        n_normal = self.batch_size // 2
        n_pool = self.batch_size - n_normal
        for _ in range(self.steps):
            if len(self.anomaly_indices):
                real = torch.rand(n_pool, generator=self.generator) < self.real_anomaly_fraction
            else:
                real = torch.zeros(n_pool, dtype=torch.bool)
            n_cutmix = int((~real).sum())
            normals = self._normals(n_normal + n_cutmix)
            pool = torch.empty(n_pool, dtype=torch.long)
            pool[~real] = normals[n_normal:]
            if real.any():
                picks = torch.randint(
                    0, len(self.anomaly_indices), (int(real.sum()),), generator=self.generator
                )
                pool[real] = self.anomaly_indices[picks]
            yield normals[:n_normal].tolist() + pool.tolist()


def cutmix_anomalous_half(
    images: torch.Tensor,
    dataset_labels: torch.Tensor,
    generator: torch.Generator,
    area_ratio: tuple[float, float] = (0.05, 0.25),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a :class:`BalancedBatchSampler` batch into training images and targets.

    The first ``B // 2`` images are normal (target 0); the rest are the anomalous half (target 1):
    labelled anomalies stay as they are, normal images there become :func:`cutmix` of themselves
    with a random image of the normal half.

    Args:
        images: ``B×C×H×W`` in the sampler's order.
        dataset_labels: ``B`` dataset labels (0 normal, 1 labelled anomaly).
        generator: source of randomness.
        area_ratio: CutMix box area range, see :func:`cutmix`.

    Returns:
        ``(images, targets)``: a new ``B×C×H×W`` tensor and float targets ``B``.
    """
    batch = images.shape[0]
    n_normal = batch // 2
    if n_normal == 0:
        raise ValueError("a balanced batch needs at least 2 images")
    labels = torch.as_tensor(dataset_labels).flatten().long().cpu()
    if labels[:n_normal].any():
        raise ValueError(
            "the first half of a balanced batch must be normal images; build batches with "
            "BalancedBatchSampler and keep their order"
        )
    out = images.clone()
    for i in range(n_normal, batch):
        if int(labels[i]) == 0:
            partner = int(torch.randint(0, n_normal, (), generator=generator))
            out[i] = cutmix(images[i], images[partner], generator, area_ratio)
    targets = torch.zeros(batch, dtype=torch.float32, device=images.device)
    targets[n_normal:] = 1.0
    return out, targets


def random_rotation(
    images: torch.Tensor, generator: torch.Generator, max_degrees: float = 180.0
) -> torch.Tensor:
    """Rotate each standardised image by an angle uniform in ``[−max_degrees, max_degrees]``.

    The only geometric augmentation of the training recipe (DevNet's image code uses
    ``RandomRotation(180)``). Corners left empty are filled with black in standardised units
    (``−μ/σ``), as a rotation before standardisation would leave them. Bilinear interpolation.

    Args:
        images: ``B×3×H×W`` standardised images.
        generator: source of randomness.
        max_degrees: largest rotation; 0 returns the input.

    Returns:
        ``B×3×H×W``.
    """
    if max_degrees <= 0:
        return images
    fill = [-m / s for m, s in zip(ATACNET_MEAN, ATACNET_STD)]
    angles = (torch.rand(images.shape[0], generator=generator) * 2 - 1) * max_degrees
    return torch.stack(
        [
            TF.rotate(img, float(angle), interpolation=InterpolationMode.BILINEAR, fill=fill)
            for img, angle in zip(images, angles)
        ]
    )


class AtacNetData(Dataset):
    """Normal tiles then labelled anomalies, preprocessed by :func:`preprocess`: ``(x, label)``.

    ``x`` is ``3×P×P`` standardised (CLAHE on lightness, bicubic resize to P = ``image_px``);
    ``labels`` lists every item's label (0 normal, 1 anomalous) for
    :class:`BalancedBatchSampler`.
    """

    def __init__(self, normals: Dataset, anomalies: Dataset | None, image_px: int, clahe: bool):
        # Map-style datasets with a length (torch's Dataset type declares neither).
        self.normals: Any = normals
        self.anomalies: Any = anomalies
        self.image_px, self.clahe = image_px, clahe
        n_anomalies = len(cast(Sized, anomalies)) if anomalies is not None else 0
        self.labels = [0] * len(cast(Sized, normals)) + [1] * n_anomalies

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self.normals)
        image = self.normals[index] if index < n else self.anomalies[index - n]
        return preprocess(image, size=self.image_px, clahe=self.clahe), self.labels[index]
