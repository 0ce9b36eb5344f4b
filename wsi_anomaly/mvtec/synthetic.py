"""A tiny dataset in the MVTec AD layout, with known synthetic defects, for tests and trials.

Each category is a smooth textured surface (colour, or greyscale like MVTec's grid/screw/zipper);
defective test images carry a bright spot or a dark scratch whose pixels are exactly the
ground-truth mask.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

DEFECTS = ("scratch", "spot")


def _surface(rng: np.random.Generator, size_px: int, grey: bool) -> np.ndarray:
    """``(size, size, 3)`` float in [0, 1]: low-frequency stripes plus mild noise."""
    y, x = np.mgrid[0:size_px, 0:size_px] / size_px
    phase = rng.uniform(0, 2 * np.pi)
    base = 0.5 + 0.15 * np.sin(2 * np.pi * 3 * (x + 0.3 * y) + phase)
    base = base + rng.normal(0, 0.02, base.shape)
    tint = np.array([1.0, 1.0, 1.0]) if grey else np.array([0.9, 0.7, 0.5])
    return np.clip(base[..., None] * tint, 0, 1)


def _defect_mask(rng: np.random.Generator, size_px: int, kind: str) -> np.ndarray:
    y, x = np.mgrid[0:size_px, 0:size_px]
    cy, cx = rng.integers(size_px // 4, 3 * size_px // 4, size=2)
    if kind == "spot":
        r = max(2, size_px // 10)
        return (y - cy) ** 2 + (x - cx) ** 2 <= r**2
    # scratch: a thin diagonal band
    half_len, half_width = size_px // 4, max(1, size_px // 48)
    along, across = (x - cx + y - cy) / np.sqrt(2), (x - cx - (y - cy)) / np.sqrt(2)
    return (np.abs(along) <= half_len) & (np.abs(across) <= half_width)


def _save(rgb: np.ndarray, path: Path, grey: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)
    image = Image.fromarray(pixels[..., 0], "L") if grey else Image.fromarray(pixels, "RGB")
    image.save(path)


def write_synthetic_category(
    root: str | Path,
    name: str,
    size_px: int = 96,
    n_train: int = 4,
    n_good: int = 2,
    n_per_defect: int = 2,
    grey: bool = False,
    seed: int = 0,
    masks: bool = True,
) -> Path:
    """Write ``<root>/<name>/`` with train/good, test/{good,scratch,spot} and ground_truth.

    Images are ``size_px``² PNGs (greyscale ``L`` if ``grey``); masks are 0/255 ``L`` PNGs of the
    same size. ``masks=False`` leaves out ``ground_truth/`` (image-level data); the images are
    the same. Returns the category folder.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / name
    for i in range(n_train):
        _save(_surface(rng, size_px, grey), folder / "train" / "good" / f"{i:03d}.png", grey)
    for i in range(n_good):
        _save(_surface(rng, size_px, grey), folder / "test" / "good" / f"{i:03d}.png", grey)
    for kind in DEFECTS:
        for i in range(n_per_defect):
            image = _surface(rng, size_px, grey)
            mask = _defect_mask(rng, size_px, kind)
            image[mask] = (
                [0.95, 0.1, 0.1]
                if (kind == "spot" and not grey)
                else (0.98 if kind == "spot" else 0.05)
            )
            _save(image, folder / "test" / kind / f"{i:03d}.png", grey)
            if not masks:
                continue
            mask_path = folder / "ground_truth" / kind / f"{i:03d}_mask.png"
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255, "L").save(mask_path)
    return folder
