"""PatchCore: nearest-neighbour distance of patch features to a memory bank of normal patches.

Roth et al. 2022, "Towards total recall in industrial anomaly detection": frozen backbone features
at a patch grid (Wide ResNet-50-2 layers 2 and 3, or a pathology foundation model's patch
tokens), each averaged over its 3×3 neighbourhood; a greedy k-center coreset of the normal
tiles' patches (after a random projection) as the memory bank; the anomaly map of a tile is, at
every patch, the Euclidean distance to the nearest bank row; the tile's score is the map's
maximum. In pathology the same nearest-neighbour distance over foundation-model features is the
reference method (Dippel et al. 2024).

:class:`PatchCore` is a pure ``nn.Module``: the fit is :meth:`PatchCore.begin_fit`,
:meth:`PatchCore.observe` (no gradient, streaming: the bank builder holds a bounded pool, never
every patch of the training set) and :meth:`PatchCore.finish_fit`;
:meth:`PatchCore.forward` gives the distance maps. The bank is a buffer (the only state a
checkpoint needs: the backbone is rebuilt from its recorded identity).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wsi_anomaly.models.memory_bank import BankModule
from wsi_anomaly.models.patchcore_config import BACKBONES, PatchCoreConfig

__all__ = ["BACKBONES", "PatchCore", "PatchCoreConfig"]


class PatchCore(BankModule):
    """Frozen patch features and a memory bank.

    Args:
        features: the frozen backbone: float ``(B, 3, s, s)`` RGB in [0, 1] → ``(B, C, g, g)``.
        input_px: the side ``s`` tiles are resized to before the backbone; ``None`` hands them
            over as they are (a backbone that resamples to its own input, as its card says).
        aggregate: average every patch over its 3×3 neighbourhood (PatchCore's local
            aggregation; off for a backbone that does it itself).
        coreset_budget, projection_dim, pool_factor, seed: the bank builder's settings
            (:class:`~wsi_anomaly.models.memory_bank.CoresetBuilder`).
        search_chunk: query rows per block of the exact nearest-neighbour search.
    """

    def __init__(
        self,
        features: nn.Module,
        input_px: int | None,
        aggregate: bool,
        coreset_budget: int,
        projection_dim: int = 128,
        pool_factor: int = 4,
        seed: int = 0,
        search_chunk: int = 4096,
    ) -> None:
        super().__init__(
            coreset_budget, projection_dim, pool_factor, seed, search_chunk, what="patches"
        )
        self.features = features
        self.features.requires_grad_(False)
        self.input_px = None if input_px is None else int(input_px)
        self.aggregate = aggregate
        self.backbone_identity = str(getattr(features, "backbone_identity", "unknown"))

    def train(self, mode: bool = True) -> PatchCore:
        """The backbone stays in eval mode (frozen; its batch norms keep their statistics)."""
        super().train(mode)
        self.features.eval()
        return self

    @torch.no_grad()
    def patch_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, g, g)`` patch features of ``(B, 3, H, W)`` images in [0, 1]."""
        if self.input_px is not None and x.shape[-2:] != (self.input_px, self.input_px):
            x = F.interpolate(
                x, size=(self.input_px, self.input_px), mode="bilinear", antialias=True
            )
        f = self.features(x)
        if self.aggregate:
            f = F.avg_pool2d(f, kernel_size=3, stride=1, padding=1)
        return f

    # -- fitting -----------------------------------------------------------------------------------
    # (begin_fit, finish_fit and load_bank are the bank's own)
    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> int:
        """Stream the patches of a batch of normal tiles into the bank builder; returns how
        many patches."""
        f = self.patch_features(x).float()
        return self.add_rows(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]))

    # -- scoring -----------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, g, g)`` float32 distance of every patch to its nearest bank row."""
        if self.memory_bank.numel() == 0:
            raise ValueError("the memory bank is empty: fit the model first")
        f = self.patch_features(x)
        b, c, h, w = f.shape
        return self.search(f.permute(0, 2, 3, 1).reshape(-1, c)).reshape(b, h, w)
