"""Tissue detection on a thumbnail (wsi.md §3).

RGB → HSV saturation → Otsu threshold (never below a floor, so a blank slide stays blank) →
morphological closing and opening → small objects removed and small holes filled. Obvious pen
marks (green/blue ink, near-black marker) are dropped before thresholding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image
from skimage import filters, morphology


@dataclass(frozen=True)
class TissueSettings:
    """Tissue-detection knobs. Sizes are in µm so they mean the same at any thumbnail scale."""

    thumbnail_max_px: int = 2048
    #: Thumbnail resolution, µm/px: a few µm resolve tissue edges; finer only costs time.
    thumbnail_mpp: float = 4.0
    #: Saturation below this is never tissue, whatever Otsu says (white glass has ~0.02).
    min_saturation: float = 0.07
    closing_radius_um: float = 16.0
    opening_radius_um: float = 8.0
    min_object_um2: float = 20_000.0
    max_hole_um2: float = 20_000.0
    remove_pen_marks: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TissueMask:
    """A boolean tissue mask at thumbnail scale.

    ``mask[i, j]`` covers level-0 pixels [j·d, (j+1)·d) × [i·d, (i+1)·d), ``d = downsample``.
    """

    mask: np.ndarray
    downsample: float
    threshold: float
    #: median optical density (summed over RGB) of the thumbnail's tissue: the slide's own
    #: staining level, which quality control compares tiles with (NaN when not measured)
    reference_od: float = float("nan")
    #: the same per stain colour (``qc.colour_reference_od``; None when not measured)
    colour_reference_od: np.ndarray | None = None

    @property
    def tissue_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB → float32 HSV in [0, 1] (Pillow's C conversion: ~10× skimage's)."""
    hsv = np.asarray(Image.fromarray(np.ascontiguousarray(rgb[..., :3])).convert("HSV"))
    return hsv.astype(np.float32) / 255.0


def pen_mark_mask(rgb: np.ndarray, hsv: np.ndarray | None = None) -> np.ndarray:
    """Pixels that look like marker ink rather than H&E stain: green/blue hues or near-black.

    ``hsv`` is :func:`rgb_to_hsv` of ``rgb`` when the caller has it already.
    """
    hsv = rgb_to_hsv(rgb) if hsv is None else hsv
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    # H&E lives in pink→purple (hue ≳ 0.75 or ≲ 0.05); green and cyan-blue ink do not.
    ink_hue = (hue > 0.2) & (hue < 0.62) & (sat > 0.25)
    black = val < 0.15
    return ink_hue | black


def detect_tissue(
    rgb: np.ndarray, mpp_thumb: float, settings: TissueSettings = TissueSettings()
) -> tuple[np.ndarray, float]:
    """Tissue mask of an RGB thumbnail whose pixels are ``mpp_thumb`` µm wide.

    Returns ``(mask, saturation_threshold)``; ``mask`` is boolean with the thumbnail's shape.
    """
    if rgb.size == 0:
        return np.zeros(rgb.shape[:2], bool), 1.0
    hsv = rgb_to_hsv(rgb)
    saturation = hsv[..., 1]
    excluded = (
        pen_mark_mask(rgb, hsv) if settings.remove_pen_marks else np.zeros(saturation.shape, bool)
    )
    candidates = saturation[~excluded]
    threshold = settings.min_saturation
    if candidates.size and candidates.max() > candidates.min():
        threshold = max(float(filters.threshold_otsu(candidates)), settings.min_saturation)
    mask = (saturation > threshold) & ~excluded

    def radius(um: float) -> int:
        return max(0, int(round(um / mpp_thumb)))

    if (r := radius(settings.closing_radius_um)) > 0:
        mask = morphology.closing(mask, morphology.disk(r))
    if (r := radius(settings.opening_radius_um)) > 0:
        mask = morphology.opening(mask, morphology.disk(r))
    px_area = mpp_thumb * mpp_thumb
    min_obj = int(settings.min_object_um2 / px_area)
    max_hole = int(settings.max_hole_um2 / px_area)
    if min_obj > 0:
        mask = morphology.remove_small_objects(mask, max_size=min_obj)
    if max_hole > 0:
        mask = morphology.remove_small_holes(mask, max_size=max_hole)
    return mask.astype(bool), threshold
