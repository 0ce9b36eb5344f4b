"""Where a frozen or fine-tuned backbone's weights come from — one rule for every backbone.

``"imagenet"`` (torchvision's weights API, cached under the torch hub directory), ``"random"``
(tests and demos: warned about) or the path of a local state-dict file. A model restored from a
checkpoint resolves nothing here: its family builds it unweighted (:meth:`Backbone.unweighted`),
loads the checkpoint's state dict and takes the backbone identity the checkpoint recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import torch
from torch import nn

from wsi_anomaly.errors import WeightsUnavailableError
from wsi_anomaly.hashing import sha256_file

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=nn.Module, covariant=True)


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


@dataclass(frozen=True)
class Backbone(Generic[M]):
    """A torchvision backbone: its module and, by the rule above, where its weights come from.

    ``module(state_dict or None, backbone_identity=...)`` builds it (``None``: random
    initialisation); ``reference()`` gives the keys and shapes ``module`` takes as its
    ``state_dict``. A state-dict file may hold those keys alone, or a whole torchvision model's
    keys, where they stand under ``prefix`` (``"features."`` for VGG's feature stack; ResNet's
    trunk keys are the model's own).
    """

    #: torchvision's builder name ("vgg19"): the identity's prefix and the ImageNet weights' model.
    name: str
    #: How messages write it ("VGG19").
    label: str
    module: Callable[..., M]
    reference: Callable[[], Mapping[str, torch.Tensor]]
    prefix: str = ""

    @property
    def help_text(self) -> str:
        """How to provide the weights, appended to every error."""
        return (
            "run once on a machine with internet to fill the torch hub cache "
            f'(python -c "import torchvision; torchvision.models.{self.name}'
            f"(weights='IMAGENET1K_V1')\"), or pass --backbone-weights "
            f"/path/to/{self.name}.pth (a torchvision {self.label} state dict), "
            "or --backbone-weights random for tests"
        )

    def _imagenet_state(self) -> Mapping[str, torch.Tensor]:
        import torchvision

        weights = torchvision.models.get_model_weights(self.name)
        return weights.IMAGENET1K_V1.get_state_dict(progress=False)

    def select(self, state: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
        """The module's keys from ``state`` (under :attr:`prefix` or not), in its dtypes.

        Raises:
            WeightsUnavailableError: a key is missing or has another shape.
        """
        prefix = self.prefix if any(k.startswith(self.prefix) for k in state) else ""
        selected: dict[str, torch.Tensor] = {}
        for key, ref in self.reference().items():
            value = state.get(prefix + key)
            if not isinstance(value, torch.Tensor) or value.shape != ref.shape:
                shape = tuple(getattr(value, "shape", ()))
                found = "missing" if value is None else f"shape {shape}"
                raise WeightsUnavailableError(
                    f"{source} is not a torchvision {self.label} state dict ({prefix + key}: "
                    f"expected shape {tuple(ref.shape)}, {found}); {self.help_text}"
                )
            selected[key] = value.to(ref.dtype)
        return selected

    def load(self, weights: str) -> M:
        """The module with weights resolved from a ``--backbone-weights`` value (see
        :func:`backbone_state`); its ``backbone_identity`` says where they came from.

        Raises:
            WeightsUnavailableError: the weights cannot be downloaded, read or matched.
        """
        state, identity, source = backbone_state(
            weights, self.name, self.label, self._imagenet_state, self.help_text
        )
        selected = None if state is None else self.select(state, source)
        return self.module(selected, backbone_identity=identity)

    def unweighted(self, backbone_identity: str) -> M:
        """The module, randomly initialised, recording ``backbone_identity``: what a checkpoint's
        state dict is loaded over (nothing is resolved, nothing is warned about)."""
        return self.module(None, backbone_identity=backbone_identity)
