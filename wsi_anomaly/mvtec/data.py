"""MVTec AD on disk: find categories, validate their layout, and serve them as torch datasets.

The standard layout, per category::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/<type>/*.png                 (type "good" or a defect name)
    <root>/<category>/ground_truth/<type>/<name>_mask.png   (one per defective test image)

``ground_truth/`` is optional: a category without that folder (image-level labels only, as many
users' own data sets) is evaluated with image-level metrics only, and its pixel metrics are
reported as skipped (:data:`NO_MASKS`). When the folder exists, every defective test image must
have its mask. Images go to the model as 3×256×256 float tensors in [0, 1] (greyscale categories become three
equal channels; resizing is antialiased), or at their own resolution (``image_px=None``) for
model families that resize their input themselves (ATAC-Net). Ground-truth masks stay at their own resolution, as
boolean arrays: pixel metrics are computed there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..errors import InputNotFoundError, InvalidInputError
from ..tiles.dataset import IMAGE_SUFFIXES, to_tensor

GOOD = "good"
LAYOUT_HINT = (
    "expected <root>/<category>/train/good/*.png, <root>/<category>/test/<type>/*.png "
    "and, for pixel metrics, <root>/<category>/ground_truth/<type>/<name>_mask.png"
)
#: How tables and ``metrics.json`` show pixel metrics of a category without ``ground_truth/``.
NO_MASKS = "n/a — no masks"


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InvalidInputError(
            f"cannot read image {path} ({exc.__class__.__name__}); replace or remove the file"
        ) from exc


def _is_category(path: Path) -> bool:
    return (path / "train" / GOOD).is_dir() and (path / "test").is_dir()


@dataclass(frozen=True)
class MVTecSample:
    """One image: its file, its type folder (``good`` or a defect) and its mask file (test split)."""

    image: Path
    defect_type: str
    mask: Path | None  # None for good images (all zeros) and in categories without ground_truth/

    @property
    def label(self) -> int:
        """0 for good, 1 for defective."""
        return int(self.defect_type != GOOD)


class MVTecCategory:
    """One category folder, validated when constructed.

    Raises:
        InputNotFoundError: the folder does not exist.
        InvalidInputError: no training images, no test images, a defective test image without
            its ``_mask.png`` (when ``ground_truth/`` exists), or a mask whose size differs from
            its image.

    ``has_masks`` is False when the category has no ``ground_truth/`` folder: image-level data.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise InputNotFoundError(f"MVTec AD category folder not found: {self.path}")
        if not _is_category(self.path):
            raise InvalidInputError(
                f"{self.path} is not an MVTec AD category folder: {LAYOUT_HINT}"
            )
        self.name = self.path.name
        self.has_masks = (self.path / "ground_truth").is_dir()
        self.train_files = _images_in(self.path / "train" / GOOD)
        if not self.train_files:
            raise InvalidInputError(
                f"no training images in {self.path / 'train' / GOOD} "
                f"(looked for {', '.join(IMAGE_SUFFIXES)})"
            )
        self.test_samples = self._find_test_samples()

    def _find_test_samples(self) -> list[MVTecSample]:
        test = self.path / "test"
        samples: list[MVTecSample] = []
        for type_dir in sorted(p for p in test.iterdir() if p.is_dir()):
            kind = type_dir.name
            for image in _images_in(type_dir):
                mask = None
                if kind != GOOD and self.has_masks:
                    mask = self.path / "ground_truth" / kind / f"{image.stem}_mask.png"
                    if not mask.is_file():
                        raise InvalidInputError(
                            f"{self.name}: test image test/{kind}/{image.name} has no ground-truth "
                            f"mask (expected ground_truth/{kind}/{image.stem}_mask.png)"
                        )
                    image_size, mask_size = _size(image), _size(mask)
                    if image_size != mask_size:
                        raise InvalidInputError(
                            f"{self.name}: mask ground_truth/{kind}/{mask.name} is "
                            f"{mask_size[0]}×{mask_size[1]} px but its image test/{kind}/"
                            f"{image.name} is {image_size[0]}×{image_size[1]} px; masks must "
                            "match their images"
                        )
                samples.append(MVTecSample(image, kind, mask))
        if not samples:
            raise InvalidInputError(f"no test images in {test}/<type>/ ({LAYOUT_HINT})")
        return samples

    @property
    def defect_types(self) -> list[str]:
        """Defect folder names in the test split (``good`` excluded), sorted."""
        return sorted({s.defect_type for s in self.test_samples} - {GOOD})

    def dataset(self, split: str, image_px: int | None = 256) -> MVTecDataset:
        """``train`` (train/good) or ``test`` (every test image, with labels and masks);
        ``image_px=None`` gives the images at their own resolution."""
        if split == "train":
            return MVTecDataset(
                [MVTecSample(p, GOOD, None) for p in self.train_files],
                image_px,
                name=f"{self.name}/train",
            )
        if split == "test":
            return MVTecDataset(
                self.test_samples, image_px, name=f"{self.name}/test", has_masks=self.has_masks
            )
        raise InvalidInputError(f"split must be train or test, got {split!r}")

    def __repr__(self) -> str:
        return (
            f"MVTecCategory({self.name!r}, train={len(self.train_files)}, "
            f"test={len(self.test_samples)}, defects={self.defect_types}, "
            f"masks={self.has_masks})"
        )


class MVTecDataset(Dataset):
    """Images of one category and split.

    ``dataset[i]`` is the model input, a float32 tensor ``(3, image_px, image_px)`` in [0, 1]
    (``(3, H, W)`` at the image's own resolution when ``image_px`` is ``None``)
    (the same form as the slide-tile datasets, so :func:`wsi_anomaly.training.train_model` and the
    scorer take it as is). Labels, masks and native-resolution images are available by index.
    ``has_masks`` False: the defective images have no ground truth (image-level data).
    """

    def __init__(
        self,
        samples: list[MVTecSample],
        image_px: int | None = 256,
        name: str = "mvtec",
        has_masks: bool = True,
    ):
        self.samples = list(samples)
        self.image_px = image_px
        self.name = name
        self.has_masks = has_masks

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> np.ndarray:
        """``(N,)`` int64: 0 good, 1 defective."""
        return np.array([s.label for s in self.samples], dtype=np.int64)

    def load_rgb(self, index: int) -> np.ndarray:
        """The image at its own resolution as ``(H, W, 3)`` uint8 (greyscale → 3 channels)."""
        with Image.open(self.samples[index].image) as im:
            return np.asarray(im.convert("RGB"))

    def load_mask(self, index: int) -> np.ndarray:
        """Ground truth at the image's own resolution: ``(H, W)`` bool (all False for good).

        Raises:
            InvalidInputError: a defective image of a data set without masks.
        """
        sample = self.samples[index]
        if sample.mask is None and sample.label and not self.has_masks:
            raise InvalidInputError(
                f"{self.name}: no ground-truth mask for {sample.image.name} "
                "(this data set has no ground_truth/ folder)"
            )
        if sample.mask is None:
            w, h = _size(sample.image)
            return np.zeros((h, w), dtype=bool)
        with Image.open(sample.mask) as im:
            return np.asarray(im.convert("L")) > 0

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(self.samples[index].image) as file:
            im = file.convert("RGB")
            if self.image_px is not None and im.size != (self.image_px, self.image_px):
                # PIL widens the bilinear kernel by the scale factor when shrinking: antialiased.
                im = im.resize(
                    (self.image_px, self.image_px), Image.Resampling.BILINEAR, reducing_gap=None
                )
            return to_tensor(np.asarray(im))


def find_categories(root: str | Path) -> dict[str, Path]:
    """Category name → folder, for a dataset root (or for a single category folder).

    Raises:
        InputNotFoundError: ``root`` does not exist.
        InvalidInputError: no sub-folder of ``root`` has the MVTec AD layout.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputNotFoundError(f"MVTec AD root not found: {root}")
    if _is_category(root):  # the user pointed at one category, e.g. .../mvtec/hazelnut
        return {root.name: root}
    found = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and _is_category(p)}
    if not found:
        raise InvalidInputError(f"{root} does not have the MVTec AD layout: {LAYOUT_HINT}")
    return found


def resolve_categories(root: str | Path, requested: list[str] | None = None) -> list[MVTecCategory]:
    """The requested categories of ``root`` (``None``, ``[]`` or ``["all"]``: every one found),
    each validated.

    Raises:
        InputNotFoundError: a requested category is not in ``root`` (the message lists those that
            are).
    """
    from .paper import CATEGORIES

    found = find_categories(root)
    if not requested or requested == ["all"]:
        names = [c for c in CATEGORIES if c in found] + sorted(set(found) - set(CATEGORIES))
    else:
        if "all" in requested:
            raise InvalidInputError("--category all cannot be combined with category names")
        missing = [c for c in requested if c not in found]
        if missing:
            raise InputNotFoundError(
                f"category {', '.join(repr(m) for m in missing)} not found in {root} "
                f"(available: {', '.join(sorted(found))})"
            )
        names = list(dict.fromkeys(requested))
    return [MVTecCategory(found[n]) for n in names]
