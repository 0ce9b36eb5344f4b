"""What the benchmark needs from a model: a callable from images to scores (and maybe maps).

The evaluation never touches a model directly; it calls a :class:`ModelAdapter`. An adapter
returns named per-image scores (HaloAE: ``mean`` and ``max`` of its anomaly map) and, if the
model localises, anomaly maps at any resolution (they are resized bilinearly to each mask).
Models that only score images (e.g. ATAC-Net) return ``maps=None`` and their pixel metrics are
reported as n/a.

To plug in another model: write a class with ``name``, ``score_names`` and ``__call__`` below,
construct it from a checkpoint, and register the constructor in :data:`ADAPTERS` under the
checkpoint's ``model_name``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from ..checkpoint import load_checkpoint
from ..errors import CheckpointError, InvalidInputError


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
        """``images``: ``(B, 3, 256, 256)`` float in [0, 1] on the CPU."""
        ...


class _ScorerAdapter:
    """What every adapter over :class:`wsi_anomaly.score.Scorer` shares: loading the checkpoint,
    device, precision, batch size and identity. Subclasses name their scores in ``__call__``."""

    def __init__(self, checkpoint: str | Path, device: str = "auto", precision: str = "auto",
                 batch_size: int = 16):
        from ..score import Scorer

        self.scorer = Scorer(checkpoint, device=device, precision=precision, batch_size=batch_size)
        self.batch_size = batch_size
        self.device = self.scorer.device
        self.precision = self.scorer.precision

    @property
    def identity(self) -> dict[str, Any]:
        return self.scorer.identity

    @property
    def config(self):
        return self.scorer.config


class HaloAEAdapter(_ScorerAdapter):
    """HaloAE: image scores ``mean`` (the paper's headline) and ``max`` of the normalised,
    smoothed 64×64 map, which is returned too."""

    name = "haloae"
    score_names = ("mean", "max")
    has_maps = True

    def __call__(self, images: torch.Tensor) -> AdapterOutput:
        result = self.scorer.score(images, keep_maps=True)
        return AdapterOutput({"mean": result.mean, "max": result.max}, result.maps)


class ATACNetAdapter(_ScorerAdapter):
    """ATAC-Net: one image score, ``score`` (the seed's Algorithm 2 score). Image-level only:
    the benchmark reports no pixel metrics for it."""

    name = "atacnet"
    score_names = ("score",)
    has_maps = False

    def __call__(self, images: torch.Tensor) -> AdapterOutput:
        result = self.scorer.score(images, keep_maps=False)
        return AdapterOutput({"score": np.asarray(result.mean)}, None)


#: checkpoint ``model_name`` → adapter constructor ``(checkpoint, device, precision, batch_size)``.
ADAPTERS: dict[str, Callable[..., ModelAdapter]] = {"haloae": HaloAEAdapter,
                                                    "atacnet": ATACNetAdapter}


def available_models() -> list[str]:
    """Model names the benchmark can evaluate."""
    return sorted(ADAPTERS)


def check_model_name(name: str) -> str:
    if name not in ADAPTERS:
        raise InvalidInputError(f"--model {name!r} cannot be benchmarked yet "
                                f"(available: {', '.join(available_models())})")
    return name


def load_adapter(checkpoint: str | Path, device: str = "auto", precision: str = "auto",
                 batch_size: int = 16, expect_model: str | None = None) -> ModelAdapter:
    """The adapter for a finished checkpoint, chosen by the checkpoint's ``model_name``."""
    model_name = load_checkpoint(checkpoint, expect_model=expect_model)["model_name"]
    if model_name not in ADAPTERS:
        raise CheckpointError(f"{checkpoint} holds a {model_name!r} model, which the MVTec "
                              "benchmark cannot evaluate (available: "
                              f"{', '.join(available_models())})")
    return ADAPTERS[model_name](checkpoint, device=device, precision=precision,
                                batch_size=batch_size)
