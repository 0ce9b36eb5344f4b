"""What the benchmark needs from a model: a callable from images to scores (and maybe maps).

The evaluation never touches a model directly; it calls a :class:`ModelAdapter`. An adapter
returns named per-image scores (HaloAE: ``mean`` and ``max`` of its anomaly map) and, if the
model localises, anomaly maps at any resolution (they are resized bilinearly to each mask).
Models that only score images (e.g. ATAC-Net) return ``maps=None`` and their pixel metrics are
reported as n/a.

Every model family registered in :mod:`wsi_anomaly.models.registry` is evaluated through
:class:`ScorerAdapter`; a new family needs nothing here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ..checkpoint import load_checkpoint
from ..errors import CheckpointError, InvalidInputError
from ..models.registry import family_names, get_family


@dataclass
class AdapterOutput:
    """Scores of a batch of ``B`` images.

    ``scores``: score name → ``(B,)`` float array (higher = more anomalous).
    ``maps``: ``(B, h, w)`` float32 anomaly maps, or ``None`` for image-level-only models.
    """

    scores: dict[str, np.ndarray]
    maps: np.ndarray | None = None


class ModelAdapter(Protocol):
    """A trained model seen by the benchmark.

    ``name``: the model family; ``score_names``: the keys of :attr:`AdapterOutput.scores`, the
    first being the model's headline score; ``has_maps``: whether ``maps`` are returned;
    ``batch_size``: images per call the adapter is tuned for; ``identity``: what to record
    next to the results (checkpoint path and hash, backbone…); ``precision`` and ``device``:
    how it runs.
    """

    name: str
    score_names: tuple[str, ...]
    has_maps: bool
    batch_size: int
    device: torch.device
    precision: str

    @property
    def identity(self) -> dict[str, Any]: ...

    def __call__(self, images: torch.Tensor) -> AdapterOutput:
        """``images``: ``(B, 3, H, W)`` float in [0, 1] on the CPU (256×256, or the images' own
        size for families that resize their input themselves)."""
        ...


class ScorerAdapter:
    """Any trained model, through :class:`wsi_anomaly.score.Scorer` and its family.

    The family says what the scores are called (``score_names``: the headline first, ``mean``
    and ``max`` of the anomaly map for a family with maps in its own order, or one score's name
    for a family without) and
    whether its maps localise anomalies (``has_maps``; otherwise no pixel metrics are reported).
    """

    def __init__(
        self,
        checkpoint: str | Path,
        device: str = "auto",
        precision: str = "auto",
        batch_size: int = 16,
    ):
        from ..score import Scorer

        self.scorer = Scorer(checkpoint, device=device, precision=precision, batch_size=batch_size)
        family = self.scorer.family
        self.name: str = family.name
        self.score_names: tuple[str, ...] = family.score_names
        self.has_maps: bool = family.has_maps
        self.batch_size = batch_size
        self.device = self.scorer.device
        self.precision = self.scorer.precision

    @property
    def identity(self) -> dict[str, Any]:
        return self.scorer.identity

    @property
    def config(self):
        return self.scorer.config

    def __call__(self, images: torch.Tensor) -> AdapterOutput:
        result = self.scorer.score(images, keep_maps=self.has_maps)
        by_name = {"mean": np.asarray(result.mean), "max": np.asarray(result.max)}
        # ``mean`` and ``max`` name the two values; a family's one other name is its score
        scores = {n: by_name.get(n, by_name["mean"]) for n in self.score_names}
        return AdapterOutput(scores, result.maps if self.has_maps else None)


def available_models() -> list[str]:
    """Model names the benchmark can evaluate: every registered family that scores images."""
    return [name for name in family_names() if get_family(name).inputs == "images"]


def check_model_name(name: str) -> str:
    if name not in available_models():
        raise InvalidInputError(
            f"--family {name!r} cannot be benchmarked yet "
            f"(available: {', '.join(available_models())})"
        )
    return name


def load_adapter(
    checkpoint: str | Path,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 16,
    expect_model: str | None = None,
) -> ModelAdapter:
    """The adapter for a finished checkpoint, whose ``model_name`` picks the family."""
    model_name = load_checkpoint(checkpoint, expect_model=expect_model)["model_name"]
    if model_name not in available_models():
        raise CheckpointError(
            f"{checkpoint} holds a {model_name!r} model, which the MVTec "
            "benchmark cannot evaluate (available: "
            f"{', '.join(available_models())})"
        )
    return ScorerAdapter(checkpoint, device=device, precision=precision, batch_size=batch_size)
