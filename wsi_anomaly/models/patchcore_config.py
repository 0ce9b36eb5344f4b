"""PatchCore's config section (``patchcore:`` in the YAML files), torch-free so that a config
loads without importing the model code."""

from __future__ import annotations

from dataclasses import dataclass

#: ``patchcore.backbone`` values: torchvision's Wide ResNet-50-2 (layers 2 and 3, as the
#: paper) or a pathology foundation model from a local weights file.
BACKBONES = ("wide_resnet50_2", "uni", "virchow2", "h-optimus-0", "phikon-v2")


@dataclass
class PatchCoreConfig:
    """The ``patchcore`` config section."""

    backbone: str = "wide_resnet50_2"  # see BACKBONES
    image_px: int = 224  # Wide ResNet input side (28×28 patch grid); foundation models use theirs
    target_dim: int = 1024  # Wide ResNet channels per patch after channel pooling (1536 → this)
    coreset_budget: int = 10000  # rows of the memory bank
    projection_dim: int = 128  # random projection the coreset selection works in
    pool_factor: int = 4  # the streaming builder's pool: pool_factor × coreset_budget rows
    batch_size: int = 16  # tiles per forward pass while fitting
    search_chunk: int = 4096  # query rows per distance block of the nearest-neighbour search

    def validate(self) -> None:
        """Ranges of every value; ``ValueError`` naming the key."""
        if self.backbone not in BACKBONES:
            raise ValueError(
                f"patchcore.backbone must be one of {', '.join(BACKBONES)}, got {self.backbone!r}"
            )
        for name in ("image_px", "coreset_budget", "projection_dim", "batch_size", "search_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"patchcore.{name} must be at least 1, got {getattr(self, name)}")
        if self.image_px < 32:
            raise ValueError(f"patchcore.image_px must be at least 32, got {self.image_px}")
        if not 1 <= self.target_dim <= 1536:
            raise ValueError(f"patchcore.target_dim must be in [1, 1536], got {self.target_dim}")
        if self.pool_factor < 2:
            raise ValueError(f"patchcore.pool_factor must be at least 2, got {self.pool_factor}")
