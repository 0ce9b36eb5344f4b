"""ATAC-Net: weakly supervised anomaly scoring with attention-guided cropping.

Blocks, in the ATAC-Net paper's notation (Algorithms 1–2):

- φ ``backbone``: torchvision ResNet-50 up to layer4, fine-tuned; ``B×3×224×224`` →
  ``B×2048×7×7``;
- σ ``attention``: one pairwise self-attention block (Zhao et al., 2020), residual
  (:class:`SelfAttentionBlock`; "atacnet" variant only);
- τ ``head``: a 1×1 conv to one channel, the cell map ``B×7×7``; image score = mean of the top-k
  absolute cells (:func:`topk_score`).

Scoring (Algorithm 2): ``a1`` on the image, a crop around the attention (Algorithm 1,
:func:`attention_crop_boxes`, no gradient), ``a2`` on the crop resized to the input size, score
``(a1 + a2)/2``. The four rungs of the paper's ablation (Table 1) are the ``variant`` knob of
:class:`ATACNet`; their losses are :func:`atacnet_loss`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import cast

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from wsi_anomaly.models.atacnet_config import VARIANTS, AtacNetConfig
from wsi_anomaly.models.weights import Backbone

__all__ = [
    "BACKBONE_CHANNELS",
    "CLASSIFICATION_VARIANTS",
    "RESNET50",
    "VARIANTS",
    "ATACNet",
    "AtacNetConfig",
    "ResNet50Trunk",
    "SelfAttentionBlock",
    "atacnet_loss",
    "attention_crop_boxes",
    "bce_loss",
    "crop_and_resize",
    "deviation_loss",
    "load_resnet50",
    "make_optimiser",
    "make_scheduler",
    "topk_count",
    "topk_score",
    "clip_gradients",
    "step_loss",
    "train_step",
    "weighted_ce_loss",
]

#: Channels of ResNet-50's layer4.
BACKBONE_CHANNELS = 2048
#: Down-sampling of layer4 with respect to the input: one cell is 32×32 pixels.
BACKBONE_STRIDE = 32
#: Variants that end in a classification logit rather than a deviation score.
CLASSIFICATION_VARIANTS: tuple[str, ...] = ("cutmix_bce", "weighted_ce")


# --------------------------------------------------------------------------------------------
# φ: ResNet-50 trunk
# --------------------------------------------------------------------------------------------


class ResNet50Trunk(nn.Module):
    """torchvision ResNet-50 without ``avgpool`` and ``fc``.

    ``B×3×H×W`` (standardised RGB) → ``B×2048×⌈H/32⌉×⌈W/32⌉`` (``7×7`` at 224 px, ``2×2`` at
    64 px). The submodules keep torchvision's names, so its state-dict keys (``conv1.weight``,
    ``layer4.2.bn3.running_var``, ...) load one to one. Trainable (ATAC-Net fine-tunes φ).

    Args:
        state_dict: trunk weights (no ``fc.*``); ``None`` keeps torchvision's random
            initialisation.
        backbone_identity: where the weights came from, recorded in checkpoints.
    """

    def __init__(
        self,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        backbone_identity: str = "resnet50-random",
    ) -> None:
        super().__init__()
        net = torchvision.models.resnet50(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )
        self.backbone_identity = backbone_identity
        if state_dict is not None:
            self.load_state_dict(state_dict, strict=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"ResNet-50 needs B×3×H×W images, got shape {tuple(x.shape)}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


#: ResNet-50 without ``avgpool`` and ``fc``; a full ``resnet50()`` state dict holds its keys as
#: they are.
RESNET50 = Backbone("resnet50", "ResNet-50", ResNet50Trunk, lambda: ResNet50Trunk().state_dict())


def load_resnet50(weights: str = "imagenet") -> ResNet50Trunk:
    """φ with weights from ``weights`` (see :meth:`Backbone.load`): ``"imagenet"`` (torchvision's
    ``ResNet50_Weights.IMAGENET1K_V1``, the weights of ``pretrained=True`` in the PyTorch 1.12 the
    ATAC-Net paper used), ``"random"`` or the path of a full ``resnet50()`` or trunk-only state
    dict. Its ``backbone_identity`` is ``"resnet50-imagenet1k-v1"``, ``"resnet50-random"`` or
    ``"resnet50-file:<sha256 prefix>"``."""
    return RESNET50.load(weights)


# --------------------------------------------------------------------------------------------
# σ: pairwise self-attention
# --------------------------------------------------------------------------------------------


class SelfAttentionBlock(nn.Module):
    """Residual pairwise self-attention block (Zhao, Jia & Koltun, CVPR 2020), subtraction
    relation.

    ``y = ReLU(BN(conv1×1(x)))`` reduces to ``width`` channels; at every position ``i``,

        ``z_i = Σ_{j ∈ k×k(i)} softmax_j(γ([φ(y_i) − ψ(y_j), P(j − i)])) ⊙ β(y_j)``

    with ``φ``, ``ψ`` 1×1 convs to ``relation_channels``, ``β`` a 1×1 conv to ``width``, ``P`` a
    learned linear map of the neighbour's offset (in units of ``k//2`` cells), and ``γ`` =
    BN-ReLU-conv1×1-BN-ReLU-conv1×1 giving one weight per group of ``share_channels`` channels
    (the paper's vector attention with weight sharing). The softmax runs over the neighbours that
    lie inside the map (positions beyond the border are masked out rather than padded, so any map
    size works, 2×2 included). Then ``out = ReLU(x + BN(conv1×1(ReLU(BN(z)))))``.

    Widths are ours: the ATAC-Net paper names the block (its reference [8]) but gives no sizes.
    ``width = C/4`` (512), ``relation_channels = width/16`` (32) and ``share_channels = 8``
    follow the SAN bottleneck blocks of Zhao et al. (their rel_planes = planes/16, share 8); one
    block, not a stack.

    The last BN starts at zero, so the block starts as the identity and the pretrained features
    reach τ unchanged; the final ReLU keeps the output (and the attention map, its channel mean)
    non-negative like layer4's.

    Args:
        channels: ``C`` of input and output (2048 for ResNet-50).
        kernel_size: ``k`` of the neighbourhood (odd; 7 covers a 7×7 map from its centre).
        width: channels inside the block (``C/4`` when ``None``).
        relation_channels: channels of ``φ``, ``ψ`` (``width/16`` when ``None``).
        share_channels: channels sharing one attention weight (must divide ``width``).

    Shapes:
        ``B×C×H×W`` → ``B×C×H×W``.
    """

    def __init__(
        self,
        channels: int = BACKBONE_CHANNELS,
        kernel_size: int = 7,
        width: int | None = None,
        relation_channels: int | None = None,
        share_channels: int = 8,
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        width = width or max(channels // 4, 1)
        relation_channels = relation_channels or max(width // 16, 1)
        if width % share_channels:
            raise ValueError(f"share_channels ({share_channels}) must divide width ({width})")
        self.kernel_size = kernel_size
        self.share_channels = share_channels
        self.reduce = nn.Sequential(
            nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        self.query = nn.Conv2d(width, relation_channels, 1)
        self.key = nn.Conv2d(width, relation_channels, 1)
        self.value = nn.Conv2d(width, width, 1)
        self.position = nn.Conv2d(2, 2, 1, bias=False)
        self.weights = nn.Sequential(
            nn.BatchNorm2d(relation_channels + 2),
            nn.ReLU(inplace=True),
            nn.Conv2d(relation_channels + 2, relation_channels, 1, bias=False),
            nn.BatchNorm2d(relation_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(relation_channels, width // share_channels, 1),
        )
        self.expand = nn.Sequential(
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
        )
        for m in self.modules():
            if isinstance(
                m, nn.Conv2d
            ):  # He initialisation (the ATAC-Net paper's Algorithm 2, line 1)
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        last_bn = self.expand[-1]
        assert isinstance(last_bn, nn.BatchNorm2d)
        nn.init.zeros_(last_bn.weight)
        half = kernel_size // 2
        grid = torch.arange(kernel_size, dtype=torch.float32) - half
        dy, dx = torch.meshgrid(grid, grid, indexing="ij")  # unfold's row-major kernel order
        offsets = torch.stack([dy.flatten(), dx.flatten()]) / max(half, 1)
        self.register_buffer("offsets", offsets.view(1, 2, kernel_size**2, 1), persistent=False)

    def attend(self, y: torch.Tensor) -> torch.Tensor:
        """The pairwise aggregation alone: ``B×width×H×W`` → ``B×width×H×W``."""
        batch, channels, height, width = y.shape
        k, pad = self.kernel_size, self.kernel_size // 2
        n_pos, n_nb = height * width, k * k
        query = self.query(y).flatten(2).unsqueeze(2)  # B×r×1×HW
        keys = F.unfold(self.key(y), k, padding=pad).view(batch, -1, n_nb, n_pos)  # B×r×K×HW
        values = F.unfold(self.value(y), k, padding=pad).view(batch, channels, n_nb, n_pos)
        inside = F.unfold(y.new_ones(1, 1, height, width), k, padding=pad) > 0.5  # 1×K×HW
        position = self.position(self.offsets.to(y.dtype)).expand(batch, 2, n_nb, n_pos)
        logits = self.weights(torch.cat([query - keys, position], dim=1))  # B×(w/s)×K×HW
        logits = logits.masked_fill(~inside.view(1, 1, n_nb, n_pos), float("-inf"))
        attention = logits.softmax(dim=2)
        groups = channels // self.share_channels
        shared = values.view(batch, groups, self.share_channels, n_nb, n_pos)
        z = (attention.unsqueeze(2) * shared).sum(dim=3)  # B×groups×share×HW
        return z.reshape(batch, channels, height, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.expand(self.attend(self.reduce(x))))


# --------------------------------------------------------------------------------------------
# τ and scores
# --------------------------------------------------------------------------------------------


def topk_count(cells: int, ratio: float = 0.1) -> int:
    """``k = max(⌊ratio·cells⌋, 1)`` (4 of 49 at 224 px)."""
    return max(math.floor(ratio * cells + 1e-9), 1)


def topk_score(cell_map: torch.Tensor, ratio: float = 0.1) -> torch.Tensor:
    """Mean of the top-k absolute cells (DevNet's top-k multiple-instance score).

    ``cell_map``: ``B×h×w`` (or ``B×1×h×w``) → ``B``, with ``k`` from :func:`topk_count`.
    """
    flat = cell_map.flatten(1).abs()
    return flat.topk(topk_count(flat.shape[1], ratio), dim=1).values.mean(dim=1)


# --------------------------------------------------------------------------------------------
# Algorithm 1: attention-guided cropping
# --------------------------------------------------------------------------------------------


def _fit_min_side(
    low: torch.Tensor, high: torch.Tensor, min_side: int, limit: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grow ``[low, high)`` around its centre to at least ``min_side``, shifted inside
    ``[0, limit)``."""
    side = min(min_side, limit)
    short = (high - low) < side
    start = torch.div(low + high - side, 2, rounding_mode="floor").clamp(0, limit - side)
    return torch.where(short, start, low), torch.where(short, start + side, high)


def attention_crop_boxes(
    attention: torch.Tensor,
    image_size: int | tuple[int, int],
    threshold: float = 0.5,
    min_box: int = BACKBONE_STRIDE,
    pad: int = 8,
) -> torch.Tensor:
    """Crop boxes from attention maps (the ATAC-Net paper's Algorithm 1).

    Each map is divided by its maximum, bilinearly up-sampled to the image size, and the pixels
    ``≥ threshold`` are kept; the box is their bounding box, grown by ``pad`` pixels on every
    side, then to at least ``min_box`` pixels per side (around its centre, shifted inside the
    image), clamped to the image. (The ATAC-Net paper's pseudo-code compares the normalised map with
    ``ω·max``; its text's "keep pixels ≥ ω of the max" is used.)

    The whole image is the box when the map has no positive maximum, is flat or not finite, or
    when nothing or everything is kept.

    Args:
        attention: ``B×h×w`` (or ``B×1×h×w``) maps; no gradient flows.
        image_size: ``H`` or ``(H, W)`` of the images in pixels.
        threshold: ω, a fraction of each map's maximum.
        min_box: smallest box side in pixels (one layer4 cell by default).
        pad: pixels added on every side of the kept region.

    Returns:
        ``B×4`` int64 boxes ``(x0, y0, x1, y1)`` with exclusive ends, so that
        ``image[..., y0:y1, x0:x1]`` is the crop; on the attention map's device.
    """
    if attention.ndim == 4:
        attention = attention.squeeze(1)
    if attention.ndim != 3:
        raise ValueError(f"attention maps must be B×h×w, got {tuple(attention.shape)}")
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    height, width = int(height), int(width)
    maps = attention.detach().float()
    flat = maps.flatten(1)
    peak, low = flat.amax(dim=1), flat.amin(dim=1)
    usable = torch.isfinite(flat).all(dim=1) & (peak > 0) & (peak - low > 1e-6 * peak)
    normalised = maps / torch.where(usable, peak, torch.ones_like(peak)).view(-1, 1, 1)
    up = F.interpolate(
        normalised.unsqueeze(1), size=(height, width), mode="bilinear", align_corners=False
    ).squeeze(1)
    kept = up >= threshold
    rows, cols = kept.any(dim=2), kept.any(dim=1)  # B×H, B×W
    whole = ~usable | ~rows.any(dim=1) | kept.flatten(1).all(dim=1)
    y0 = rows.int().argmax(dim=1)
    y1 = height - rows.flip(1).int().argmax(dim=1)
    x0 = cols.int().argmax(dim=1)
    x1 = width - cols.flip(1).int().argmax(dim=1)
    y0, y1 = (y0 - pad).clamp(min=0), (y1 + pad).clamp(max=height)
    x0, x1 = (x0 - pad).clamp(min=0), (x1 + pad).clamp(max=width)
    y0, y1 = _fit_min_side(y0, y1, min_box, height)
    x0, x1 = _fit_min_side(x0, x1, min_box, width)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).long()
    full = torch.tensor([0, 0, width, height], dtype=torch.long, device=boxes.device)
    return torch.where(whole.unsqueeze(1), full, boxes)


def crop_and_resize(
    x: torch.Tensor, boxes: torch.Tensor, size: int | tuple[int, int] = 224
) -> torch.Tensor:
    """Crop each image to its box and resize it (bilinear, anti-aliased when shrinking).

    Args:
        x: ``B×C×H×W``.
        boxes: ``B×4`` ``(x0, y0, x1, y1)``, exclusive ends (from :func:`attention_crop_boxes`).
        size: output side ``S`` or ``(S_h, S_w)``.

    Returns:
        ``B×C×S_h×S_w``, same dtype and device as ``x``.
    """
    size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    crops = []
    for image, (x0, y0, x1, y1) in zip(x, boxes.tolist()):
        crop = image[:, y0:y1, x0:x1].unsqueeze(0)
        if crop.shape[-2:] != size:
            crop = F.interpolate(
                crop, size=size, mode="bilinear", align_corners=False, antialias=True
            )
        crops.append(crop)
    return torch.cat(crops)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class ATACNet(nn.Module):
    """ATAC-Net and its ablation ladder for standardised RGB inputs (224×224 in the ATAC-Net paper).

    Args:
        variant: the rung of the ATAC-Net paper's Table 1:
            ``"cutmix_bce"``: φ + classification head, binary cross-entropy;
            ``"weighted_ce"``: same head, weighted cross-entropy (anomaly 20, normal 0.5);
            ``"devnet"``: φ + τ, top-k deviation score, no attention, no cropping;
            ``"atacnet"``: φ + σ + τ, attention-guided cropping, score ``(a1 + a2)/2``.
        backbone: φ with its weights, from :func:`load_resnet50` (the builder resolves them);
            ``None`` for an unweighted trunk (a checkpoint's state dict is loaded over it).
        crop_threshold: ω of Algorithm 1 (the paper is silent; choose it on training data only).
        topk_ratio: fraction of cells averaged by the top-k score.
        margin: deviation-loss margin ``m``.
        min_box_px, box_pad_px: minimum crop side and padding (Algorithm 1).
        attention_kernel: ``k`` of σ's neighbourhood.
        anomaly_weight, normal_weight: class weights of ``"weighted_ce"``.

    The classification head of the first two rungs is τ followed by global average pooling: the
    logit is the mean of the signed cell map, which equals a linear layer on pooled layer4
    features (torchvision's classifier with one output) and keeps the cell map as its class
    activation map. All parameters train (φ is fine-tuned).
    """

    def __init__(
        self,
        variant: str = "atacnet",
        backbone: ResNet50Trunk | None = None,
        crop_threshold: float = 0.5,
        topk_ratio: float = 0.1,
        margin: float = 5.0,
        min_box_px: int = BACKBONE_STRIDE,
        box_pad_px: int = 8,
        attention_kernel: int = 7,
        anomaly_weight: float = 20.0,
        normal_weight: float = 0.5,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(
                f"unknown ATAC-Net variant {variant!r} (available: {', '.join(VARIANTS)})"
            )
        if not 0.0 < topk_ratio <= 1.0:
            raise ValueError(f"topk_ratio must be in (0, 1], got {topk_ratio}")
        self.variant = variant
        self.crop_threshold = float(crop_threshold)
        self.topk_ratio = float(topk_ratio)
        self.margin = float(margin)
        self.min_box_px = int(min_box_px)
        self.box_pad_px = int(box_pad_px)
        self.anomaly_weight = float(anomaly_weight)
        self.normal_weight = float(normal_weight)
        self.backbone = backbone if backbone is not None else ResNet50Trunk()
        self.attention: SelfAttentionBlock | None = (
            SelfAttentionBlock(BACKBONE_CHANNELS, attention_kernel)
            if variant == "atacnet"
            else None
        )
        self.head = nn.Conv2d(BACKBONE_CHANNELS, 1, 1)
        nn.init.kaiming_normal_(self.head.weight, mode="fan_in", nonlinearity="linear")
        if self.head.bias is not None:
            nn.init.zeros_(self.head.bias)

    @property
    def backbone_identity(self) -> str:
        """Where the ResNet-50 weights came from, e.g. ``"resnet50-imagenet1k-v1"``."""
        return self.backbone.backbone_identity

    @property
    def is_classifier(self) -> bool:
        """True for the classification rungs (score = logit)."""
        return self.variant in CLASSIFICATION_VARIANTS

    @property
    def uses_cropping(self) -> bool:
        """True for ``"atacnet"``: scores average the image and its attention crop."""
        return self.variant == "atacnet"

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter: φ is fine-tuned together with σ and τ."""
        return self.parameters()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """One view through φ (σ) τ.

        Args:
            x: ``B×3×H×W`` standardised images (224×224 in the ATAC-Net paper).

        Returns:
            ``cells``: τ's signed cell map ``B×h×w`` (``h = ⌈H/32⌉``);
            ``score``: ``a1``, the top-k score ``B`` (the logit for the classification rungs);
            ``attention``: channel mean of σ's output ``B×h×w`` (of φ's when there is no σ).
        """
        features = self.backbone(x)
        if self.attention is not None:
            features = self.attention(features)
        cells = self.head(features).squeeze(1)
        score = cells.mean(dim=(1, 2)) if self.is_classifier else topk_score(cells, self.topk_ratio)
        return {"cells": cells, "score": score, "attention": features.mean(dim=1)}

    def crop_boxes(self, attention: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """:func:`attention_crop_boxes` with this model's ω, minimum side and padding."""
        return attention_crop_boxes(
            attention, image_size, self.crop_threshold, self.min_box_px, self.box_pad_px
        )

    def score_details(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Algorithm 2 scoring of the ATAC-Net paper, with its intermediate results.

        ``a1`` on ``x``; for ``"atacnet"`` the crop boxes from ``a1``'s attention (no gradient),
        ``a2`` on the crops resized to ``x``'s size, and ``score = (a1 + a2)/2``; otherwise
        ``score = a1``. Gradients flow through both views when grad is enabled (training). In
        eval mode images whose box is the whole image reuse ``a1`` as ``a2`` (the same
        computation), so only real crops cost a second pass.

        Returns:
            ``score``, ``a1`` (and ``a2``) ``B``; ``cells``, ``attention`` ``B×h×w`` of the first
            view; ``boxes`` ``B×4`` when cropping.
        """
        out = self(x)
        details = {
            "score": out["score"],
            "a1": out["score"],
            "cells": out["cells"],
            "attention": out["attention"],
        }
        if not self.uses_cropping:
            return details
        size = (x.shape[-2], x.shape[-1])
        with torch.no_grad():
            boxes = self.crop_boxes(out["attention"], size)
            if self.training:  # batch-norm statistics: every image takes both views
                index = torch.arange(len(boxes), device=boxes.device)
            else:
                full = torch.tensor([0, 0, size[1], size[0]], device=boxes.device)
                index = torch.nonzero((boxes != full).any(dim=1)).flatten()
            crops = crop_and_resize(x[index], boxes[index], size) if len(index) else None
        if self.training:
            a2 = self(crops)["score"]
        else:
            a2 = out["score"].clone()
            if crops is not None:
                a2[index] = self(crops)["score"].to(a2.dtype)
        details.update(a2=a2, score=(out["score"] + a2) / 2, boxes=boxes)
        return details

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Per-image anomaly score ``B`` (higher = more anomalous), see :meth:`score_details`."""
        return self.score_details(x)["score"]

    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        """τ's cell map of the full view, bilinearly up-sampled to the input: ``B×H×W``.

        ``|cells|`` for the deviation rungs (what the top-k score averages), the signed cells
        (class activation map) for the classification rungs. Coarse: one value per 32×32 cell.
        """
        cells = self(x)["cells"]
        cells = cells if self.is_classifier else cells.abs()
        return F.interpolate(
            cells.unsqueeze(1), size=x.shape[-2:], mode="bilinear", align_corners=False
        ).squeeze(1)


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def deviation_loss(scores: torch.Tensor, labels: torch.Tensor, margin: float = 5.0) -> torch.Tensor:
    """DevNet's deviation loss with a standard-normal reference, batch mean.

    ``dev = (a − μ_R)/σ_R`` with the exact moments of N(0, 1), ``μ_R = 0`` and ``σ_R = 1``:
    DevNet estimates them from 5 000 reference scores drawn per batch, whose sample moments
    converge to these; using them exactly is the deterministic equivalent (no RNG involved).
    ``L = (1 − y)·|dev| + y·max(0, m − dev)``.

    Args:
        scores: ``B`` anomaly scores ``a``.
        labels: ``B`` targets, 0 normal and 1 anomalous.
        margin: ``m``.

    Returns:
        Scalar tensor (float32).
    """
    dev = scores.float()
    y = labels.to(dev.device).float()
    return ((1.0 - y) * dev.abs() + y * (margin - dev).clamp(min=0.0)).mean()


def weighted_ce_loss(
    logits: torch.Tensor, labels: torch.Tensor, w_anomaly: float = 20.0, w_normal: float = 0.5
) -> torch.Tensor:
    """Class-weighted binary cross-entropy on anomaly logits.

    The weighted mean ``Σ w_i·ℓ_i / Σ w_i`` of ``torch.nn.CrossEntropyLoss(weight=...)``;
    a single logit ``z`` is two-class cross-entropy on ``(0, z)``.

    Args:
        logits: ``B`` anomaly logits.
        labels: ``B`` targets in {0, 1}.
        w_anomaly, w_normal: class weights (20 and 0.5 in the ATAC-Net paper).

    Returns:
        Scalar tensor (float32).
    """
    z = logits.float()
    y = labels.to(z.device).float()
    weights = torch.where(y > 0.5, torch.full_like(y, w_anomaly), torch.full_like(y, w_normal))
    per_image = F.binary_cross_entropy_with_logits(z, y, reduction="none")
    return (weights * per_image).sum() / weights.sum()


def bce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Unweighted binary cross-entropy on ``B`` anomaly logits (batch mean, float32)."""
    z = logits.float()
    return F.binary_cross_entropy_with_logits(z, labels.to(z.device).float())


def atacnet_loss(
    variant: str,
    outputs: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    margin: float = 5.0,
    w_anomaly: float = 20.0,
    w_normal: float = 0.5,
) -> torch.Tensor:
    """The training objective of a rung of the ladder on ``outputs["score"]`` (``B``).

    ``"cutmix_bce"``: :func:`bce_loss`; ``"weighted_ce"``: :func:`weighted_ce_loss`;
    ``"devnet"`` and ``"atacnet"``: :func:`deviation_loss`.
    """
    scores = outputs["score"]
    if variant == "cutmix_bce":
        return bce_loss(scores, labels)
    if variant == "weighted_ce":
        return weighted_ce_loss(scores, labels, w_anomaly, w_normal)
    if variant in ("devnet", "atacnet"):
        return deviation_loss(scores, labels, margin)
    raise ValueError(f"unknown ATAC-Net variant {variant!r} (available: {', '.join(VARIANTS)})")


# --------------------------------------------------------------------------------------------
# Training recipe
# --------------------------------------------------------------------------------------------


def make_optimiser(model: nn.Module, settings: AtacNetConfig) -> torch.optim.Adam:
    """Adam over ``model.trainable_parameters()`` with the settings' lr and weight decay."""
    return torch.optim.Adam(
        cast(ATACNet, model).trainable_parameters(),
        lr=settings.lr,
        weight_decay=settings.weight_decay,
    )


def make_scheduler(
    optimiser: torch.optim.Optimizer, settings: AtacNetConfig
) -> torch.optim.lr_scheduler.StepLR:
    """Step decay; call ``scheduler.step()`` once per epoch."""
    return torch.optim.lr_scheduler.StepLR(
        optimiser, step_size=settings.lr_step_epochs, gamma=settings.lr_gamma
    )


def step_loss(
    model: ATACNet,
    images: torch.Tensor,
    labels: torch.Tensor,
    variant: str | None = None,
    precision: str = "fp32",
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of the ATAC-Net paper's Algorithm 2 on a balanced batch, before ``backward``.

    Args:
        model: an :class:`ATACNet`; switched to training mode.
        images: ``B×3×H×W`` standardised images on the model's device.
        labels: ``B`` targets (0 normal, 1 anomalous pool).
        variant: the loss to use; ``None`` (or equal to ``model.variant``) for the model's own.
        precision: ``"fp32"`` or ``"bf16"`` (autocast of the forward pass).

    Returns:
        The scalar loss (with its graph) and ``score_normal`` and ``score_anomalous`` (batch
        means; NaN when the batch has none) as floats.
    """
    variant = model.variant if variant is None else variant
    if variant != model.variant:
        raise ValueError(
            f"train_step variant {variant!r} does not match the model's {model.variant!r}"
        )
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    model.train()
    autocast = (
        torch.autocast(images.device.type, dtype=torch.bfloat16)
        if precision == "bf16"
        else contextlib.nullcontext()
    )
    with autocast:
        outputs = model.score_details(images)
    labels = labels.to(images.device).float()
    loss = atacnet_loss(
        variant, outputs, labels, model.margin, model.anomaly_weight, model.normal_weight
    )
    scores = outputs["score"].detach().float()
    normal, anomalous = scores[labels < 0.5], scores[labels >= 0.5]
    return loss, {
        "score_normal": float(normal.mean()) if len(normal) else float("nan"),
        "score_anomalous": float(anomalous.mean()) if len(anomalous) else float("nan"),
    }


def clip_gradients(optimiser: torch.optim.Optimizer, grad_clip_norm: float | None) -> float:
    """Clip the global gradient norm of ``optimiser``'s parameters to ``grad_clip_norm``
    (``None``: no clipping); returns the norm before clipping."""
    params = [p for group in optimiser.param_groups for p in group["params"]]
    max_norm = float("inf") if grad_clip_norm is None else grad_clip_norm
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def train_step(
    model: ATACNet,
    optimiser: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    variant: str | None = None,
    grad_clip_norm: float | None = 1.0,
    precision: str = "fp32",
) -> dict[str, float]:
    """One optimisation step of Algorithm 2 (:func:`step_loss`, then ``backward``, clipping and
    the optimiser's step), for scripts outside the training loop. A non-finite loss is
    returned without touching the weights.

    Returns:
        ``loss``, ``grad_norm`` (before clipping; NaN when not stepped), ``score_normal`` and
        ``score_anomalous`` as floats.
    """
    loss, stats = step_loss(model, images, labels, variant, precision)
    value = float(loss.detach())
    if not math.isfinite(value):
        return {"loss": value, "grad_norm": float("nan"), **stats}
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = clip_gradients(optimiser, grad_clip_norm)
    optimiser.step()
    return {"loss": value, "grad_norm": grad_norm, **stats}
