"""ATAC-Net's config section (``atacnet:`` in the YAML files), torch-free so that a config loads
without importing the model code."""

from __future__ import annotations

from dataclasses import dataclass

#: The ATAC-Net paper's ablation ladder (Table 1), in order.
VARIANTS: tuple[str, ...] = ("cutmix_bce", "weighted_ce", "devnet", "atacnet")


@dataclass
class AtacNetConfig:
    """ATAC-Net's config section (``atacnet:`` in the YAML files): architecture and recipe.

    Where the ATAC-Net paper is silent the values follow DevNet's public code: Adam (``lr``,
    ``weight_decay``), learning rate ×``lr_gamma`` every ``lr_step_epochs``, ``epochs`` ×
    ``steps_per_epoch`` balanced batches of ``batch_size`` (half normal, half from the anomalous
    pool), gradient norm clipped to ``grad_clip_norm``, random rotation up to
    ``rotation_degrees`` as the only geometric augmentation. ``train.workers`` and
    ``train.calibration_tiles`` are shared with the other families.
    """

    variant: str = "atacnet"  # cutmix_bce | weighted_ce | devnet | atacnet
    crop_threshold: float = 0.5  # ω of Algorithm 1 (the ATAC-Net paper is silent)
    topk_ratio: float = 0.1
    margin: float = 5.0
    min_box_px: int = 32
    box_pad_px: int = 8
    image_px: int = 224
    clahe: bool = True
    epochs: int = 50
    steps_per_epoch: int = 20
    batch_size: int = 48  # half normal, half anomalous pool
    lr: float = 2e-4
    weight_decay: float = 1e-5
    lr_step_epochs: int = 10
    lr_gamma: float = 0.1
    grad_clip_norm: float = 1.0
    rotation_degrees: float = 180.0
    real_anomaly_fraction: float = 0.5  # share of the anomalous half drawn from the labelled ones

    def validate(self) -> None:
        """Ranges of the section's values; ``ValueError`` naming the key."""
        a = self
        if a.variant not in VARIANTS:
            raise ValueError(
                "atacnet.variant must be cutmix_bce, weighted_ce, devnet or "
                f"atacnet, got {a.variant!r}"
            )
        for name in ("epochs", "steps_per_epoch", "lr_step_epochs", "image_px"):
            if getattr(a, name) < 1:
                raise ValueError(f"atacnet.{name} must be at least 1")
        if a.batch_size < 2:
            raise ValueError("atacnet.batch_size must be at least 2 (half normal, half anomalous)")
        if not 0.0 < a.crop_threshold < 1.0:
            raise ValueError("atacnet.crop_threshold must be between 0 and 1")
        if not 0.0 < a.topk_ratio <= 1.0:
            raise ValueError(f"atacnet.topk_ratio must be in (0, 1], got {a.topk_ratio}")
        if not 0.0 <= a.real_anomaly_fraction <= 1.0:
            raise ValueError(
                "atacnet.real_anomaly_fraction must be between 0 and 1, "
                f"got {a.real_anomaly_fraction}"
            )
