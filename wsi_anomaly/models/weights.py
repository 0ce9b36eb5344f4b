"""Where a frozen or fine-tuned backbone's weights come from — one rule for every backbone.

``"imagenet"`` (torchvision's weights API, cached under the torch hub directory), ``"random"``
(tests and demos: warned about) or the path of a local state-dict file. A model restored from a
checkpoint resolves nothing here: its family builds it unweighted, loads the checkpoint's state
dict and takes the backbone identity the checkpoint recorded.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from wsi_anomaly.errors import WeightsUnavailableError

logger = logging.getLogger(__name__)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def backbone_state(
    weights: str,
    family: str,
    label: str,
    imagenet_state: Callable[[], Mapping[str, torch.Tensor]],
    help_text: str,
) -> tuple[Mapping[str, torch.Tensor] | None, str, str]:
    """Resolve a ``--backbone-weights`` value.

    Args:
        weights: ``imagenet`` | ``random`` | a state-dict path.
        family: identity prefix, e.g. ``"vgg19"``; ``label`` its name in messages ("VGG19").
        imagenet_state: returns torchvision's ImageNet state dict (may download).
        help_text: how to provide weights, appended to every error.

    Returns:
        ``(state or None for random init, backbone identity, source for messages)``.

    Raises:
        WeightsUnavailableError: the weights cannot be downloaded, read or matched.
    """
    if weights == "random":
        logger.warning(
            "%s backbone uses RANDOM weights: features are meaningless for anomaly "
            "detection; use this only for tests and demos",
            label,
        )
        return None, f"{family}-random", "random"
    if weights == "imagenet":
        try:
            state = imagenet_state()
        except Exception as exc:  # URLError, OSError, RuntimeError from a truncated file, ...
            raise WeightsUnavailableError(
                f"cannot load ImageNet {label} weights ({type(exc).__name__}: {exc}); {help_text}"
            ) from exc
        return state, f"{family}-imagenet1k-v1", "torchvision IMAGENET1K_V1"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsUnavailableError(
            f"backbone weights {weights!r} are neither 'imagenet', 'random' nor an existing "
            f"file; {help_text}"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, permission errors
        raise WeightsUnavailableError(
            f"cannot read backbone weights {str(path)!r} ({type(exc).__name__}); {help_text}"
        ) from exc
    if not isinstance(state, Mapping):
        raise WeightsUnavailableError(
            f"{str(path)!r} does not hold a state dict (got {type(state).__name__}); {help_text}"
        )
    return state, f"{family}-file:{sha256_file(path)[:12]}", repr(str(path))
