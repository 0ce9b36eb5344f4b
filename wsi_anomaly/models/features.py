"""Block B of HaloAE: multi-scale VGG19 features (frozen).

The extractor keeps torchvision's ``vgg19().features`` only up to ``relu3_4``; nothing deeper is
used by HaloAE, so computing conv4/conv5 would be wasted time. Every conv pads by reflection, as
the authors' code does. The four taps are brought to a common quarter resolution and
concatenated into the 704-channel feature map ``fm``. (The released code hands three of the taps
on with their 1-pixel reflection border still attached, 258/130/66 px; we use the unpadded maps,
a documented and harmless simplification.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from wsi_anomaly.models.weights import Backbone

__all__ = [
    "FEATURE_CHANNELS",
    "VGG19",
    "VGG19Features",
    "aggregate_reference",
    "aggregate_taps",
    "load_vgg19",
]

# torchvision's VGG19 ("E") configuration truncated after conv3_4. Building the layers in the
# same order keeps torchvision's indices, so its state-dict keys ("features.<i>.weight") map 1:1.
_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256)
#: indices of relu1_1, relu2_1, relu3_1, relu3_4 in ``vgg19().features``.
_TAP_INDICES: tuple[int, ...] = (1, 6, 11, 17)
_TAP_CHANNELS: tuple[int, ...] = (64, 128, 256, 256)
#: channels of the aggregated feature map ``fm``.
FEATURE_CHANNELS: int = sum(_TAP_CHANNELS)  # 704
#: spatial down-sampling of ``fm`` with respect to the input image.
POOL: int = 4


def _make_layers() -> nn.Sequential:
    layers: list[nn.Module] = []
    in_ch = 3
    for v in _CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            # Reflection instead of zero padding, as in the authors' code: no dark frame at the
            # tile border, which would otherwise leak into the anomaly map's edge.
            layers.append(nn.Conv2d(in_ch, int(v), 3, padding=1, padding_mode="reflect"))
            layers.append(nn.ReLU(inplace=True))
            in_ch = int(v)
    return nn.Sequential(*layers)


def aggregate_taps(taps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Bring the VGG taps to 1/4 of the input resolution and concatenate them (fast path).

    The definition is "nearest-resize every tap to the input size, then 4×4 average pooling with
    stride 4". Nearest up-sampling by an integer factor ``f`` (which divides 4) repeats each pixel
    in an ``f×f`` square, so each 4×4 pooling cell covers ``(4/f)×(4/f)`` source pixels, each
    repeated ``f²`` times: the result is exactly ``avg_pool2d`` with kernel ``4/f`` on the tap
    itself, without ever materialising the up-sampled maps (16× less memory for relu3_x).

    Args:
        taps: feature maps ``B×C_i×(H/f_i)×(W/f_i)`` with ``f_i`` in {1, 2, 4}; ``taps[0]`` is at
            the input resolution ``H×W`` (``H`` and ``W`` divisible by 4).

    Returns:
        ``B×ΣC_i×(H/4)×(W/4)``.
    """
    height, width = taps[0].shape[-2:]
    out = []
    for t in taps:
        kh = POOL * t.shape[-2] // height
        kw = POOL * t.shape[-1] // width
        out.append(t if kh == kw == 1 else F.avg_pool2d(t, (kh, kw)))
    return torch.cat(out, dim=1)


def aggregate_reference(taps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Literal (slow) definition of :func:`aggregate_taps`, kept for testing it.

    Nearest-resize every tap to the input size (that of ``taps[0]``), 4×4 average pooling with
    stride 4, concatenate along channels.
    """
    size = taps[0].shape[-2:]
    return torch.cat(
        [F.avg_pool2d(F.interpolate(t, size=size, mode="nearest"), POOL) for t in taps], dim=1
    )


class VGG19Features(nn.Module):
    """Frozen VGG19 up to relu3_4 with reflection padding; returns the 704-channel ``fm``.

    Input ``B×3×H×W`` (ImageNet-normalised, ``H`` and ``W`` divisible by 4; 256×256 in HaloAE),
    output ``B×704×(H/4)×(W/4)``: relu1_1 (64 ch), relu2_1 (128), relu3_1 (256), relu3_4 (256),
    in that order, each aggregated by :func:`aggregate_taps`.

    The module is always in eval mode and has no trainable parameters: ``train()`` is a no-op, so
    calling ``train()`` on a parent model cannot switch it.

    Args:
        state_dict: weights with torchvision's ``features`` indices as keys (``"0.weight"``,
            ``"0.bias"``, ... ``"16.bias"``). ``None`` initialises randomly (as torchvision does).
        backbone_identity: where the weights came from, recorded in checkpoints so that models
            trained on different features are never mixed.
    """

    def __init__(
        self,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        backbone_identity: str = "vgg19-random",
    ) -> None:
        super().__init__()
        self.layers = _make_layers()
        self.backbone_identity = backbone_identity
        if state_dict is None:
            for m in self.layers.modules():
                if isinstance(m, nn.Conv2d):  # torchvision's VGG initialisation
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        else:
            self.layers.load_state_dict(state_dict, strict=True)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> VGG19Features:
        """Stay in eval mode whatever ``mode`` is (the backbone is frozen)."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-2] % POOL or x.shape[-1] % POOL:
            raise ValueError(
                f"VGG19 features need B×3×H×W images with H and W divisible by {POOL}, "
                f"got shape {tuple(x.shape)}; resize tiles to 256×256"
            )
        taps = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i in _TAP_INDICES:
                taps.append(x)
        return aggregate_taps(taps)


#: VGG19's feature stack up to conv3_4; a full ``vgg19()`` state dict holds it under ``features.``.
VGG19 = Backbone(
    "vgg19",
    "VGG19",
    VGG19Features,
    lambda: _make_layers().state_dict(),
    prefix="features.",
)


def load_vgg19(weights: str = "imagenet") -> VGG19Features:
    """The frozen feature extractor with weights from ``weights`` (see :meth:`Backbone.load`):
    ``"imagenet"`` (torchvision's ``VGG19_Weights.IMAGENET1K_V1``), ``"random"`` or the path of a
    full ``vgg19()`` or ``features``-only state dict. Its ``backbone_identity`` is
    ``"vgg19-imagenet1k-v1"``, ``"vgg19-random"`` or ``"vgg19-file:<sha256 prefix>"``."""
    return VGG19.load(weights)
