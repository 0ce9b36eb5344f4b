"""A memory bank of normal *tile* vectors: tile features another tool extracted (TRIDENT, CLAM),
one vector per tile, no backbone and no pixel map.

:class:`TileBank` streams the normal tiles' vectors into the same greedy k-center coreset
builder as PatchCore (:class:`~wsi_anomaly.models.memory_bank.CoresetBuilder`) and scores a
tile by the Euclidean distance of its vector to the nearest row of the bank
(:func:`~wsi_anomaly.models.memory_bank.nearest_distance`, exact and chunked).
"""

from __future__ import annotations

import torch

from wsi_anomaly.models.memory_bank import BankModule
from wsi_anomaly.models.tile_bank_config import TileBankConfig

__all__ = ["TileBank", "TileBankConfig"]


class TileBank(BankModule):
    """Normal tile vectors and the distance of a tile vector to the nearest of them.

    Args:
        coreset_budget, projection_dim, pool_factor, seed: the bank builder's settings.
        search_chunk: query rows per block of the exact nearest-neighbour search.

    ``forward``: ``(B, D)`` float tile vectors → ``(B,)`` float32 distances (computed in float32
    under any autocast).
    """

    def __init__(
        self,
        coreset_budget: int,
        projection_dim: int = 128,
        pool_factor: int = 4,
        seed: int = 0,
        search_chunk: int = 4096,
    ) -> None:
        super().__init__(
            coreset_budget, projection_dim, pool_factor, seed, search_chunk, what="tile vectors"
        )
        #: what checkpoints record as the backbone: there is none
        self.backbone_identity = "none"

    def observe(self, x: torch.Tensor) -> int:
        """Stream ``(B, D)`` normal tile vectors into the bank builder; returns ``B``."""
        return self.add_rows(x)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B,)`` float32 distance of every tile vector to its nearest bank row."""
        if self.memory_bank.numel() == 0:
            raise ValueError("the memory bank is empty: fit the model first")
        if x.ndim != 2 or x.shape[1] != self.feature_dim:
            raise ValueError(f"tile vectors must be (B, {self.feature_dim}), got {tuple(x.shape)}")
        # float32 whatever the autocast: one vector per tile is little work, and the training
        # calibration and the slides' scores must come from the same arithmetic
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.search(x)
