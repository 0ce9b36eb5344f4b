"""HaloAE's config section (``haloae:`` in the YAML files): architecture and training schedule.

Torch-free, so that a config loads without importing the model code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

#: The loss terms a run may train with (a subset is a loss ablation).
LOSS_TERMS: tuple[str, str, str] = ("cls", "fm", "im")
LOSS_WEIGHTINGS = ("ews", "equal")
ATTENTIONS = ("halo", "conv")


@dataclass
class HaloAEConfig:
    """The HaloAE paper's recipe by default: Adam 1e-4, weight decay 1e-5, batch 4,
    251 epochs × 3000 samples, the EWS curriculum over the three loss terms."""

    # -- architecture
    attention: str = "halo"  # halo | conv (attention layers replaced by 3×3 convs
    #                           in the same blocks; no paper counterpart)
    released_mask: bool = False  # reproduction switch: the authors' released halo layer
    #                               with its inverted mask (the paper's numbers used it)
    released_init: bool = False  # start blocks C, D, E as the released code does
    #                               (Kaiming-normal fan-in, zero biases); default PyTorch's
    # -- schedule
    epochs: int = 251
    samples_per_epoch: int = 3000
    batch_size: int = 4  # originals; each yields two Cut&Paste copies
    lr: float = 1e-4
    weight_decay: float = 1e-5
    loss_weighting: str = "ews"  # ews | equal (1/n for each of the n active terms)
    # A subset is a loss ablation: the weights are renormalised over the active terms (sum 1).
    loss_terms: list[str] = field(default_factory=lambda: list(LOSS_TERMS))
    image_jitter: float = 0.1  # colour jitter of the whole image (histology: 0.05)
    patch_jitter: float = 0.1  # colour jitter of the pasted patch

    #: Where these keys lived before the family had its own section (``model.attention``,
    #: ``train.epochs``, …): configs and checkpoints written then are moved here on loading.
    former_keys: ClassVar[dict[str, tuple[str, ...]]] = {
        "model": ("attention", "released_mask", "released_init"),
        "train": (
            "epochs",
            "samples_per_epoch",
            "batch_size",
            "lr",
            "weight_decay",
            "loss_weighting",
            "loss_terms",
            "image_jitter",
            "patch_jitter",
        ),
    }

    def validate(self) -> None:
        """Ranges and choices of the section's values; ``ValueError`` naming the key."""
        for name in ("epochs", "samples_per_epoch", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"haloae.{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"haloae.lr must be greater than 0, got {self.lr}")
        for name in ("weight_decay", "image_jitter", "patch_jitter"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"haloae.{name} must be 0 or more, got {getattr(self, name)}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(
                f"haloae.loss_weighting must be ews or equal, got {self.loss_weighting!r}"
            )
        if not self.loss_terms or set(self.loss_terms) - set(LOSS_TERMS):
            raise ValueError(
                "haloae.loss_terms must be a non-empty subset of cls, fm, im; "
                f"got {self.loss_terms}"
            )
        if self.attention not in ATTENTIONS:
            raise ValueError(f"haloae.attention must be halo or conv, got {self.attention!r}")
