"""The ``features_knn`` config section of the tile-vector memory bank (no torch: configs load
without model code)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TileBankConfig:
    """The ``features_knn`` config section."""

    coreset_budget: int = 20000  # rows of the memory bank (tile vectors)
    projection_dim: int = 128  # random projection the coreset selection works in
    pool_factor: int = 4  # the streaming builder's pool: pool_factor × coreset_budget rows
    batch_size: int = 4096  # tile vectors per step while fitting
    search_chunk: int = 4096  # query rows per distance block of the nearest-neighbour search

    def validate(self) -> None:
        """Ranges of every value; ``ValueError`` naming the key."""
        for name in ("coreset_budget", "projection_dim", "batch_size", "search_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"features_knn.{name} must be at least 1, got {getattr(self, name)}"
                )
        if self.pool_factor < 2:
            raise ValueError(f"features_knn.pool_factor must be at least 2, got {self.pool_factor}")
