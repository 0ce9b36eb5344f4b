"""A memory bank of normal *tile* vectors: tile features another tool extracted (TRIDENT, CLAM),
one vector per tile, no backbone and no pixel map.

:class:`TileBank` streams the normal tiles' vectors into the same greedy k-center coreset
builder as PatchCore (:class:`~wsi_anomaly.models.memory_bank.CoresetBuilder`) and scores a
tile by the Euclidean distance of its vector to the nearest row of the bank
(:func:`~wsi_anomaly.models.memory_bank.nearest_distance`, exact and chunked).
"""

from __future__ import annotations

import torch
from torch import nn

from wsi_anomaly.models.memory_bank import CoresetBuilder, nearest_distance
from wsi_anomaly.models.tile_bank_config import TileBankConfig

__all__ = ["TileBank", "TileBankConfig"]


class TileBank(nn.Module):
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
        super().__init__()
        self.coreset_budget = int(coreset_budget)
        self.projection_dim = int(projection_dim)
        self.pool_factor = int(pool_factor)
        self.seed = int(seed)
        self.search_chunk = int(search_chunk)
        #: what checkpoints record as the backbone: there is none
        self.backbone_identity = "none"
        self.register_buffer("memory_bank", torch.empty(0))
        self.memory_bank: torch.Tensor
        self._builder: CoresetBuilder | None = None

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> int:
        """Stream ``(B, D)`` normal tile vectors into the bank builder; returns ``B``."""
        if self._builder is None:
            self._builder = CoresetBuilder(
                self.coreset_budget,
                self.projection_dim,
                seed=self.seed,
                pool_factor=self.pool_factor,
            )
        self._builder.add(x.float())
        return int(x.shape[0])

    def finish_fit(self) -> None:
        """Select the coreset: the bank is ``(M, D)`` with ``M ≤ coreset_budget``."""
        if self._builder is None:
            raise ValueError("no normal tile vectors were seen: nothing to build a bank from")
        self.memory_bank = self._builder.finish().float().contiguous()
        self._builder = None

    def load_bank(self, bank: torch.Tensor) -> None:
        """Install a checkpoint's bank (``(M, D)`` float)."""
        if bank.ndim != 2 or bank.shape[0] < 1 or bank.shape[1] < 1:
            raise ValueError(
                f"the memory bank must be a non-empty (M, D) matrix, got {tuple(bank.shape)}"
            )
        self.memory_bank = bank.float().contiguous()

    @property
    def feature_dim(self) -> int:
        """``D``, the width of the bank's vectors (0 before the fit)."""
        return int(self.memory_bank.shape[1]) if self.memory_bank.ndim == 2 else 0

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B,)`` float32 distance of every tile vector to its nearest bank row."""
        if self.memory_bank.numel() == 0:
            raise ValueError("the memory bank is empty: fit the model first")
        if x.ndim != 2 or x.shape[1] != self.feature_dim:
            raise ValueError(f"tile vectors must be (B, {self.feature_dim}), got {tuple(x.shape)}")
        bank = self.memory_bank.to(x.device)
        # float32 whatever the autocast: one vector per tile is little work, and the training
        # calibration and the slides' scores must come from the same arithmetic
        with torch.autocast(device_type=x.device.type, enabled=False):
            return nearest_distance(x.float(), bank, chunk_rows=self.search_chunk)
