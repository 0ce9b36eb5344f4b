"""PatchCore's patch features: torchvision ``wide_resnet50_2``, layers 2 and 3, frozen.

Interface:

- :class:`WideResNetPatchFeatures` ``(state_dict=None, backbone_identity=..., target_dim=None)``:
  ``forward(x)`` takes ``x`` float ``(B, 3, H, W)``, RGB in ``[0, 1]`` (ImageNet normalisation is
  applied inside), ``H, W >= 32``, and returns float ``(B, C, h, w)`` on ``x``'s device and in its
  dtype, where ``(h, w)`` is layer 2's grid (``⌈H/8⌉ × ⌈W/8⌉``: 28×28 for 224 px tiles, 32×32 for
  256 px) and ``C = 1536`` (512 from layer 2, then 1024 from layer 3) or ``target_dim``.
  ``grid(h_px, w_px)`` gives ``(h, w)``; ``out_channels`` gives ``C``; ``backbone_identity``
  says where the weights came from. Always in eval mode, no parameter requires a gradient, the
  forward runs without autograd.
- :func:`load_wide_resnet50` ``(weights="imagenet", target_dim=None)``: the module with weights
  by the package's one rule (:class:`wsi_anomaly.models.weights.Backbone`): ``"imagenet"``
  (torchvision's ``Wide_ResNet50_2_Weights.IMAGENET1K_V1``, the ``pretrained=True`` weights
  PatchCore used), ``"random"`` (warned about) or the path of a state dict (a whole
  ``wide_resnet50_2()`` or the trunk up to ``layer3``; read with ``weights_only=True``). A file
  whose keys or shapes do not match raises :class:`~wsi_anomaly.errors.WeightsUnavailableError`
  with one line naming the architecture.
- :data:`WIDE_RESNET50`: that :class:`~wsi_anomaly.models.weights.Backbone` (no channel
  reduction).

The features follow PatchCore (Roth et al. 2022) as anomalib implements it: each layer's map is
averaged over the 3×3 neighbourhood of every position (stride 1, zero padding 1, padding counted
in the mean, as ``nn.AvgPool2d`` does), layer 3's map is then resized bilinearly to layer 2's grid
and the two are concatenated along channels. With ``target_dim`` the ``1536`` channels of each
position are reduced by adaptive average pooling over the channel axis (PatchCore's
``target_embed_dimension``), which keeps the cost of the memory-bank search down. ``layer4``,
``avgpool`` and ``fc`` are never built.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from wsi_anomaly.models.weights import Backbone

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LAYER_CHANNELS",
    "WIDE_RESNET50",
    "WideResNetPatchFeatures",
    "load_wide_resnet50",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: channels of layer 2 and layer 3 of ``wide_resnet50_2``.
LAYER_CHANNELS: tuple[int, int] = (512, 1024)


class WideResNetPatchFeatures(nn.Module):
    """Frozen ``wide_resnet50_2`` trunk to ``layer3``; returns PatchCore's aggregated patch map.

    Args:
        state_dict: the trunk's weights with torchvision's names (``conv1.weight``,
            ``layer3.5.bn3.running_var``, ...); ``None`` keeps torchvision's random
            initialisation.
        backbone_identity: where the weights came from, recorded by whoever stores results.
        target_dim: reduce the 1536 channels to this many by adaptive average pooling over
            channels; ``None`` keeps them all.
    """

    def __init__(
        self,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        backbone_identity: str = "wide_resnet50_2-random",
        target_dim: int | None = None,
    ) -> None:
        super().__init__()
        if target_dim is not None and not 1 <= int(target_dim) <= sum(LAYER_CHANNELS):
            raise ValueError(
                f"target_dim must be between 1 and {sum(LAYER_CHANNELS)}, got {target_dim}"
            )
        net = torchvision.models.wide_resnet50_2(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.pool = nn.AvgPool2d(kernel_size=3, stride=1, padding=1)
        self.target_dim = None if target_dim is None else int(target_dim)
        self.backbone_identity = backbone_identity
        if state_dict is not None:
            self.load_state_dict(state_dict, strict=True)
        self.requires_grad_(False)
        self.eval()

    @property
    def out_channels(self) -> int:
        """Channels of the output map: 1536, or ``target_dim``."""
        return sum(LAYER_CHANNELS) if self.target_dim is None else self.target_dim

    @staticmethod
    def grid(height_px: int, width_px: int) -> tuple[int, int]:
        """The output grid for ``height_px × width_px`` inputs: layer 2's, stride 8."""

        def down(n: int) -> int:  # conv1 (stride 2), maxpool (stride 2), layer2 (stride 2)
            n = (n + 2 * 3 - 7) // 2 + 1
            n = (n + 2 * 1 - 3) // 2 + 1
            return (n + 2 * 1 - 3) // 2 + 1

        return down(height_px), down(width_px)

    def train(self, mode: bool = True) -> WideResNetPatchFeatures:
        """Stay in eval mode whatever ``mode`` is (the backbone is frozen)."""
        return super().train(False)

    def taps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer 2 ``(B, 512, h, w)`` and layer 3 ``(B, 1024, ⌈h/2⌉, ⌈w/2⌉)`` of ``x`` in ``[0, 1]``
        (before any aggregation)."""
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        layer2 = self.layer2(self.layer1(x))
        return layer2, self.layer3(layer2)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3 or min(x.shape[-2:]) < 32:
            raise ValueError(
                "wide_resnet50_2 patch features need B×3×H×W RGB images in [0, 1] with H, W >= 32, "
                f"got shape {tuple(x.shape)}"
            )
        layer2, layer3 = self.taps(x)
        layer2, layer3 = self.pool(layer2), self.pool(layer3)
        layer3 = F.interpolate(layer3, size=layer2.shape[-2:], mode="bilinear", align_corners=False)
        features = torch.cat([layer2, layer3], dim=1)
        if self.target_dim is None or self.target_dim == features.shape[1]:
            return features
        b, c, h, w = features.shape
        per_patch = features.permute(0, 2, 3, 1).reshape(b * h * w, 1, c)
        reduced = F.adaptive_avg_pool1d(per_patch, self.target_dim)
        return reduced.reshape(b, h, w, self.target_dim).permute(0, 3, 1, 2).contiguous()


def _reference() -> Mapping[str, torch.Tensor]:
    # keys and shapes only: built on the meta device, no memory, no initialisation cost
    with torch.device("meta"):
        return WideResNetPatchFeatures().state_dict()


#: ``wide_resnet50_2`` trunk to ``layer3``; a whole ``wide_resnet50_2()`` state dict holds its
#: keys as they are (``layer4.*`` and ``fc.*`` are ignored).
WIDE_RESNET50 = Backbone("wide_resnet50_2", "Wide ResNet-50-2", WideResNetPatchFeatures, _reference)


def load_wide_resnet50(
    weights: str = "imagenet", target_dim: int | None = None
) -> WideResNetPatchFeatures:
    """The frozen feature extractor with weights from ``weights`` (see the module docstring).

    Its ``backbone_identity`` is ``"wide_resnet50_2-imagenet1k-v1"``,
    ``"wide_resnet50_2-random"`` or ``"wide_resnet50_2-file:<sha256 prefix>"``.

    Raises:
        WeightsUnavailableError: the weights cannot be downloaded, read or matched.
    """
    if target_dim is None:
        return WIDE_RESNET50.load(weights)
    backbone = Backbone(
        WIDE_RESNET50.name,
        WIDE_RESNET50.label,
        partial(WideResNetPatchFeatures, target_dim=target_dim),
        _reference,
    )
    return backbone.load(weights)
