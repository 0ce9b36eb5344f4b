"""HaloAE (Mathian et al., 2023): VGG19 features reconstructed by a HaloNet auto-encoder.

Blocks, as in the paper's figure 2 (A, Cut&Paste, lives in :mod:`.cutpaste`):

- B ``features``: frozen VGG19 taps → ``fm`` ``B×704×64×64`` (:mod:`.features`);
- C ``encoder`` / ``decoder``: HaloNet bottleneck stages, ``fm`` → ``29×60×60`` → ``fm_hat``;
- D ``image_reconstructor``: ``fm_hat`` → ``im_hat`` ``B×3×256×256`` (training only);
- E ``classifier``: ``im_hat`` → original-vs-Cut&Paste logits (training only).

Scoring needs B and C only (:meth:`HaloAE.reconstruct_features`); D and E never run at inference.

Where the layer tables come from: the paper prints the HaloNet blocks' channel counts only
loosely; the stage tables below (widths, heads, kernel sizes, including the odd 59/237/703
widths) are those of the authors' released code, without its never-used stride-2 convs. Block D
is six reflection-padded 3×3 convs (704→380→190→95→47→23→3) with the two ×2 up-samplings before
the last two, as in the released code, whose final ReLU we drop; the paper's text says "five
2D convolution layers with filters of size 3×3, followed by a ReLU". The paper's text also gives
the encoder output as 60×60×58; the released code's stage table, used here, ends at 29 channels.
Blocks C, D and E start from PyTorch's per-layer defaults; ``released_init=True`` starts them as
the released code does (:func:`init_weights`: Kaiming-normal, fan-in, zero biases).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from wsi_anomaly.models.features import FEATURE_CHANNELS, VGG19Features
from wsi_anomaly.models.halo import HaloAttention

__all__ = [
    "DECODER_STAGES",
    "ENCODER_STAGES",
    "Bottleneck",
    "CutPasteClassifier",
    "HaloAE",
    "HaloDecoder",
    "HaloEncoder",
    "ImageReconstructor",
    "init_weights",
    "recompute",
]


def recompute(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``, keeping none of its intermediate tensors for the backward pass, which runs
    it again instead (activation checkpointing), when a gradient will be taken through it or
    its parameters; a plain call otherwise. The gradients are exactly those of a plain call:
    the second run sees the same input under the same autocast state, and a batch norm in
    training mode normalises with the same batch statistics — its running statistics, which
    the second run would update again, are put back as the first run left them."""
    if (
        torch.is_grad_enabled()
        and module.training
        and (x.requires_grad or any(p.requires_grad for p in module.parameters()))
    ):
        return checkpoint(
            module, x, use_reentrant=False, context_fn=lambda: _norm_statistics_kept(module)
        )
    return module(x)


def _norm_statistics_kept(module: nn.Module) -> tuple[Any, Any]:
    """``checkpoint``'s contexts: nothing around the first run, the running statistics of
    ``module``'s batch norms restored after the second."""
    return contextlib.nullcontext(), _restored_running_statistics(module)


@contextlib.contextmanager
def _restored_running_statistics(module: nn.Module) -> Iterator[None]:
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [[b.clone() for b in m.buffers()] for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(norms, saved, strict=True):
                for live, kept in zip(m.buffers(), buffers, strict=True):
                    live.copy_(kept)


#: (in, width, out, heads, K) per bottleneck stage, as in the authors' released code (the paper's
#: figure gives the HaloNet layout; these widths, heads and kernels are the code's).
ENCODER_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (234, 234, 234, 4, 3),
    (234, 117, 117, 8, 3),
    (117, 58, 58, 8, 5),
    (58, 29, 29, 8, 5),
)
DECODER_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (29, 29, 29, 4, 3),
    (29, 58, 59, 8, 3),
    (59, 118, 118, 8, 3),
    (118, 236, 237, 8, 5),
    (237, 703, 704, 8, 1),
)
ENCODER_HEAD_CHANNELS = 234
ENCODER_HEAD_KERNEL = 5  # valid conv: 64 -> 60 = 5 blocks of 12
IMAGE_SIZE = 256
#: Images the frozen backbone takes at once in a training pass.
BACKBONE_CHUNK = 4
RECONSTRUCTOR_CHANNELS = (FEATURE_CHANNELS, 380, 190, 95, 47, 23, 3)


class Bottleneck(nn.Module):
    """HaloNet bottleneck block at stride 1.

    ``y = ReLU(BN(conv1×1(x)))`` → ``ReLU(attention(y))`` (no BN after attention) →
    ``BN(convK(y))``; ``out = ReLU(y + skip)`` with ``skip = x`` when ``in == out``, else
    ``BN(conv1×1(x))``. All convs are bias-free.

    Args:
        in_channels, width, out_channels: channel counts of input, attention and output.
        heads: attention heads (``dim_head`` is 16, so the attention's inner width is 16·heads).
        kernel_size: ``K`` of the last conv (odd, same padding).
        attention: ``"halo"`` for :class:`HaloAttention` (block 12, halo 2), ``"conv"`` for a
            plain 3×3 conv in its place, the rest of the block unchanged. This has no paper
            counterpart: the paper's Table 4 "Block C as CNN" swapped the whole auto-encoder for
            DFR's convolutional one.
        released_mask: reproduction switch (not an ablation): the released code's inverted
            attention mask, which the paper's numbers were produced with.

    Shapes:
        ``B×in×H×W`` → ``B×out×H×W`` (``H``, ``W`` divisible by 12 for ``"halo"``).
    """

    def __init__(
        self,
        in_channels: int,
        width: int,
        out_channels: int,
        heads: int,
        kernel_size: int,
        attention: str = "halo",
        released_mask: bool = False,
    ) -> None:
        super().__init__()
        self.reduce = nn.Sequential(
            nn.Conv2d(in_channels, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        if attention == "halo":
            self.attention: nn.Module = HaloAttention(width, heads, released_mask=released_mask)
        elif attention == "conv":
            # Takes the place of an attention layer whose output projection has a bias and is
            # not followed by BN, so it keeps its bias.
            self.attention = nn.Conv2d(width, width, 3, padding=1)
        else:
            raise ValueError(f"attention must be 'halo' or 'conv', got {attention!r}")
        self.expand = nn.Sequential(
            nn.Conv2d(width, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.skip: nn.Module = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.attention(self.reduce(x)))
        return F.relu(self.expand(y) + self.skip(x))


def _stages(
    table: Sequence[tuple[int, int, int, int, int]], attention: str, released_mask: bool
) -> nn.Sequential:
    return nn.Sequential(
        *(
            Bottleneck(i, w, o, heads, k, attention=attention, released_mask=released_mask)
            for i, w, o, heads, k in table
        )
    )


def _recomputed_in_turn(stages: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``stages(x)``, each stage recomputed in the backward pass (:func:`recompute`): training
    keeps only the stages' inputs — not their attention windows, padded keys and values, batch
    norm inputs and 703-channel expansions, the largest saved tensors of a training step."""
    for stage in stages:
        x = recompute(stage, x)
    return x


class HaloEncoder(nn.Module):
    """``fm`` ``B×704×64×64`` → bottleneck ``B×29×60×60``.

    A valid 5×5 conv + BN + ReLU takes 64 to 60 (five 12-pixel attention blocks), then the four
    stages of :data:`ENCODER_STAGES` compress channels only; there is no stride anywhere.
    """

    def __init__(self, attention: str = "halo", released_mask: bool = False) -> None:
        super().__init__()
        self.head = nn.Sequential(
            nn.Conv2d(FEATURE_CHANNELS, ENCODER_HEAD_CHANNELS, ENCODER_HEAD_KERNEL, bias=False),
            nn.BatchNorm2d(ENCODER_HEAD_CHANNELS),
            nn.ReLU(inplace=True),
        )
        self.stages = _stages(ENCODER_STAGES, attention, released_mask)

    def forward(self, fm: torch.Tensor) -> torch.Tensor:
        return _recomputed_in_turn(self.stages, recompute(self.head, fm))


class HaloDecoder(nn.Module):
    """Bottleneck ``B×29×60×60`` → ``fm_hat`` ``B×704×S×S`` (``S = 64`` unless given).

    The five stages of :data:`DECODER_STAGES` (the paper's transposed convs at stride 1 are the
    same function class as these same-padded convs), then nearest up-sampling 60 → ``S``.
    """

    def __init__(self, attention: str = "halo", released_mask: bool = False) -> None:
        super().__init__()
        self.stages = _stages(DECODER_STAGES, attention, released_mask)

    def forward(self, z: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            size = (z.shape[-2] + ENCODER_HEAD_KERNEL - 1, z.shape[-1] + ENCODER_HEAD_KERNEL - 1)
        return F.interpolate(_recomputed_in_turn(self.stages, z), size=size, mode="nearest")


class ImageReconstructor(nn.Module):
    """Block D: ``fm_hat`` ``B×704×64×64`` → ``im_hat`` ``B×3×256×256`` (normalised RGB).

    Reflection-padded 3×3 convs 704→380→190→95→47 at 64×64, then ×2 nearest up-sampling before
    each of the last two convs (47→23 at 128, 23→3 at 256). ReLU after every conv but the last:
    the target is an ImageNet-normalised image, negative in places, which the released code's
    final ReLU could never reach.
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = RECONSTRUCTOR_CHANNELS
        n_convs = len(channels) - 1
        for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])):
            if i >= n_convs - 2:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            layers.append(nn.Conv2d(c_in, c_out, 3, padding=1, padding_mode="reflect"))
            if i < n_convs - 1:
                layers.append(nn.ReLU(inplace=True))
        self.layers = nn.Sequential(*layers)

    def forward(self, fm_hat: torch.Tensor) -> torch.Tensor:
        return self.layers(fm_hat)


class CutPasteClassifier(nn.Module):
    """Block E: ``Linear(3·256·256 → 2)`` on the flattened ``im_hat``; ``B×3×256×256`` → ``B×2``.

    Class 0 is an original image, class 1 either Cut&Paste copy.
    """

    def __init__(self, image_size: int = IMAGE_SIZE, num_classes: int = 2) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * image_size * image_size, num_classes)

    def forward(self, im_hat: torch.Tensor) -> torch.Tensor:
        return self.fc(im_hat.flatten(1))


def init_weights(module: nn.Module) -> nn.Module:
    """The released code's initialisation: every conv and linear layer of ``module`` gets
    Kaiming-normal weights (fan-in, ReLU gain √2) and zero biases; other parameters (batch
    norm, the halo position tables) keep theirs. Returns ``module``."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


class HaloAE(nn.Module):
    """HaloAE for 256×256 ImageNet-normalised RGB inputs.

    Args:
        backbone: the frozen VGG19 with its weights, from
            :func:`~wsi_anomaly.models.features.load_vgg19` (the builder resolves them); ``None``
            for an unweighted one (a checkpoint's state dict is loaded over it).
        attention: ``"halo"`` (the model) or ``"conv"`` (attention layers replaced by 3×3
            convolutions in the same blocks; no paper counterpart, not the paper's Table 4
            "Block C as CNN", which used DFR's convolutional auto-encoder instead).
        released_mask: reproduction switch, not an ablation: the released code's inverted
            attention mask (see :class:`~wsi_anomaly.models.halo.HaloAttention`), the layer the
            paper's numbers came from; off by default (the corrected layer).

    The VGG19 backbone is frozen and excluded from :meth:`trainable_parameters`; its origin is
    :attr:`backbone_identity`. Blocks C, D and E start from PyTorch's per-layer defaults, or with
    ``released_init`` from :func:`init_weights` (the released code's Kaiming-normal
    initialisation; with random VGG19 features its first Adam steps at lr 1e-4 are unstable).
    """

    def __init__(
        self,
        backbone: VGG19Features | None = None,
        attention: str = "halo",
        released_mask: bool = False,
        released_init: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone if backbone is not None else VGG19Features()
        self.encoder = HaloEncoder(attention, released_mask)
        self.decoder = HaloDecoder(attention, released_mask)
        self.image_reconstructor = ImageReconstructor()
        self.classifier = CutPasteClassifier()
        if released_init:
            for name, child in self.named_children():
                if name != "backbone":
                    init_weights(child)

    @property
    def backbone_identity(self) -> str:
        """Where the VGG19 weights came from, e.g. ``"vgg19-imagenet1k-v1"``."""
        return self.backbone.backbone_identity

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of blocks C, D and E: what the optimiser gets (the backbone is frozen)."""
        for name, module in self.named_children():
            if name != "backbone":
                yield from module.parameters()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``B×3×256×256`` (normalised) → ``fm`` ``B×704×64×64``."""
        return self.backbone(x)

    def reconstruct_features(self, fm: torch.Tensor) -> torch.Tensor:
        """``fm`` ``B×704×64×64`` → ``fm_hat`` ``B×704×64×64`` (block C only; used for scoring)."""
        return self.decoder(self.encoder(fm), size=fm.shape[-2:])

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training pass through all blocks.

        Args:
            x: ``B×3×256×256`` ImageNet-normalised images (originals and Cut&Paste copies).

        Returns:
            ``fm`` and ``fm_hat`` ``B×704×64×64``, ``im_hat`` ``B×3×256×256``, ``logits`` ``B×2``.
        """
        with torch.no_grad():  # the frozen backbone: no autograd state, whatever the caller
            # a few images at a time: its 256²×64 activations of a whole Cut&Paste batch are
            # the step's largest transient tensors (each image's features are its own)
            fm = torch.cat([self.features(part) for part in x.split(BACKBONE_CHUNK)])
        fm_hat = self.reconstruct_features(fm)
        # Block D has no batch norm: recomputed in the backward pass instead of keeping its
        # reflection-padded inputs at 64², 128² and 256².
        im_hat = recompute(self.image_reconstructor, fm_hat)
        return {"fm": fm, "fm_hat": fm_hat, "im_hat": im_hat, "logits": self.classifier(im_hat)}
