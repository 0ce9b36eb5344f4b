"""Qualitative figures: input | ground-truth contour | anomaly map, for a few test images.

matplotlib's object API only (``Figure`` + Agg canvas): no pyplot, no global state, safe in
worker processes and threads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .data import GOOD, MVTecSample


def pick_examples(samples: list[MVTecSample], n: int) -> list[int]:
    """Up to ``n`` test indices: the first image of each defect type in turn, then one good
    image; deterministic."""
    if n <= 0:
        return []
    by_type: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_type.setdefault(s.defect_type, []).append(i)
    good = by_type.pop(GOOD, [])
    budget = n - 1 if good else n  # keep one place for a good image
    round_robin = [
        by_type[t][depth]
        for depth in range(max(map(len, by_type.values()), default=0))
        for t in sorted(by_type)
        if depth < len(by_type[t])
    ]
    picked = round_robin[:budget]
    if good:
        picked.append(good[0])
    return picked


def save_example_figure(
    path: str | Path,
    image: np.ndarray,
    mask: np.ndarray | None,
    score_map: np.ndarray,
    title: str,
    vmax: float,
    cmap: str = "jet",
) -> None:
    """Write one three-panel PNG.

    Args:
        image: ``(H, W, 3)`` uint8 test image at its own resolution.
        mask: ``(H, W)`` bool ground truth, or ``None`` when the data set has no masks.
        score_map: ``(H, W)`` float anomaly map, already resized to the image.
        title: figure title (type/name and image score).
        vmax: top of the colour scale (shared by a category's figures; the bottom is 0).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.6, 3.5), dpi=100, facecolor="white", layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    axes[0].imshow(image)
    axes[0].set_title("input", fontsize=9)
    axes[1].imshow(image)
    truth = (
        "ground truth (no masks)"
        if mask is None
        else "ground truth"
        if mask.any()
        else "ground truth (none)"
    )
    if mask is None:
        mask = np.zeros(image.shape[:2], dtype=bool)
    if mask.any():
        axes[1].contour(mask.astype(np.float32), levels=[0.5], colors="lime", linewidths=1.2)
    axes[1].set_title(truth, fontsize=9)
    shown = axes[2].imshow(score_map, cmap=cmap, vmin=0.0, vmax=max(vmax, 1e-12))
    if mask.any():
        axes[2].contour(mask.astype(np.float32), levels=[0.5], colors="white", linewidths=0.8)
    axes[2].set_title("anomaly map", fontsize=9)
    fig.colorbar(shown, ax=axes[2], fraction=0.046, pad=0.02)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
