"""Is this a slide the models can judge? Brightfield (H&E, IHC) against fluorescence.

The models learn tissue as transmitted light shows it: stained tissue on bright glass. A
fluorescence slide is the opposite — a dark background with light in one or a few channels —
and scoring it against a brightfield model gives numbers that mean nothing (a DAPI slide came
out "0 % anomalous", a TRITC one "no tissue"). This looks at the thumbnail the tiler reads for
tissue detection anyway, so it costs nothing extra.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Pixel value (the brightest channel, 0–1) below which a pixel counts as dark.
DARK_VALUE = 0.25
#: Share of the scanned area that must be dark for a slide to count as fluorescence. Brightfield
#: glass is near-white; even tissue stained as dark as hematoxylin rarely goes below 0.3.
DARK_SHARE = 0.6
#: A channel whose 99th percentile stays below this share of the brightest channel's carries no
#: signal (a DAPI slide lights up blue only).
CHANNEL_SIGNAL = 0.2


@dataclass(frozen=True)
class Brightness:
    """What the check measured on a thumbnail."""

    dark_share: float  # share of the scanned pixels darker than DARK_VALUE
    channels: tuple[str, ...]  # the RGB channels that carry signal

    @property
    def fluorescence(self) -> bool:
        return self.dark_share >= DARK_SHARE

    def describe(self) -> str:
        """``"dark background (93 % of the slide), light in the blue channel only"``."""
        if len(self.channels) == 1:
            light = f"light in the {self.channels[0]} channel only"
        elif len(self.channels) == 2:
            light = f"light in the {' and '.join(self.channels)} channels only"
        else:
            light = "light in all three channels"
        return f"dark background ({self.dark_share:.0%} of the slide), {light}"


def measure_brightness(rgb: np.ndarray) -> Brightness | None:
    """The background brightness and signal channels of an RGB uint8 thumbnail (H, W, 3);
    ``None`` when nothing was scanned (every pixel exactly black: padding, or an empty slide)."""
    if rgb.ndim != 3 or rgb.shape[-1] < 3 or rgb.size == 0:
        return None
    pixels = rgb[..., :3].reshape(-1, 3)
    # Exact black is what readers fill unscanned areas with (MRXS, sparse DICOM): not the slide.
    scanned = pixels[pixels.any(axis=1)]
    if len(scanned) < max(16, 0.01 * len(pixels)):
        return None
    value = scanned.max(axis=1) / 255.0
    dark_share = float(np.mean(value < DARK_VALUE))
    top = np.percentile(scanned, 99, axis=0)
    names = ("red", "green", "blue")
    channels = tuple(n for n, t in zip(names, top) if t >= CHANNEL_SIGNAL * max(top.max(), 1))
    return Brightness(dark_share, channels)


def brightfield_problem(rgb: np.ndarray) -> str | None:
    """Why the slide of thumbnail ``rgb`` cannot be judged by a brightfield model, or ``None``
    when it looks like brightfield (or cannot be told)."""
    measured = measure_brightness(rgb)
    if measured is None or not measured.fluorescence:
        return None
    return (
        f"looks like a fluorescence slide ({measured.describe()}); the models judge "
        "brightfield slides (H&E, IHC: stained tissue on bright glass) only"
    )
