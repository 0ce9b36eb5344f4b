"""Model families by name: what a checkpoint's ``model_name`` refers to."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from ..errors import InvalidInputError
from .atacnet import ATACNet
from .haloae import HaloAE

MODELS: dict[str, Callable[..., nn.Module]] = {"atacnet": ATACNet, "haloae": HaloAE}


def build_model(name: str, **knobs: Any) -> nn.Module:
    """Construct a model family's ``nn.Module`` from its architecture knobs."""
    if name not in MODELS:
        raise InvalidInputError(f"unknown model {name!r} (available: {', '.join(sorted(MODELS))})")
    return MODELS[name](**knobs)
