"""What a model family is: everything the rest of the package may ask about a model.

A family (HaloAE, ATAC-Net, the next one) is one :class:`ModelFamily` subclass registered in
:mod:`wsi_anomaly.models.registry`. Training, scoring, the MVTec benchmark and config validation
look the family up by ``model.name`` and call the methods below; none of them branches on a
family's name.

The family owns:

- its config section (a dataclass; ``section`` is its key in the YAML files, ``schedule_section``
  the section that holds its epochs, batch size and learning rate);
- its model around a backbone (:meth:`make_model`) and that backbone (:attr:`backbone`, a
  :class:`~wsi_anomaly.models.weights.Backbone`): :meth:`build` resolves the backbone's weights
  outside the model's ``__init__``, :meth:`restore` builds it for a checkpoint (nothing to
  download, the identity the checkpoint recorded);
- its input transform (:meth:`transform`: tiles as stored, or float images, to the model's input,
  on the device) and :meth:`predict` → ``(score, max, map)``;
- the pieces of its training loop (:meth:`training_data`, :meth:`loader`, :meth:`train_step`, …);
  the loop itself, progress bars, logging and checkpoints live in :mod:`wsi_anomaly.training`.

``config`` below is the package's resolved ``Config`` (sections as attributes). Methods raise
``ValueError`` for values they cannot use; config validation and the training loop turn those
into the package's typed errors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from wsi_anomaly.models.weights import Backbone

#: Quantiles of the training tiles' scores saved in every checkpoint's calibration.
SCORE_QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)

#: ``rng(stream)``: the training loop's reproducible generator of one purpose for this epoch.
EpochRng = Callable[[int], torch.Generator]


def score_summary(mean_scores: torch.Tensor, max_scores: torch.Tensor) -> dict[str, Any]:
    """Quantiles, mean and standard deviation of training scores (``N`` each), as plain floats."""
    means = mean_scores.numpy().astype(np.float64)
    peaks = max_scores.numpy().astype(np.float64)
    return {
        "n_tiles": len(means),
        "score_quantiles": {f"{q:g}": float(np.quantile(means, q)) for q in SCORE_QUANTILES},
        "max_score_quantiles": {f"{q:g}": float(np.quantile(peaks, q)) for q in SCORE_QUANTILES},
        "score_mean": float(means.mean()),
        "score_std": float(means.std()),
    }


class Prediction(NamedTuple):
    """What :meth:`ModelFamily.predict` gives for a batch of ``B`` inputs."""

    #: ``B`` image scores (the tile's anomaly score).
    score: Tensor
    #: ``B`` peak values of the anomaly maps (the score itself where a family has no maps).
    max: Tensor
    #: ``B×64×64`` anomaly maps, or ``None`` when not asked for.
    map: Tensor | None


@dataclass(frozen=True)
class Epoch:
    """What stays the same for every step of one training epoch."""

    model: nn.Module
    optimiser: torch.optim.Optimizer
    config: Any
    epoch: int
    #: The epoch's augmentation generator (:meth:`ModelFamily.augmenter`).
    aug: torch.Generator
    #: The device and precision (:class:`wsi_anomaly.runtime.Runtime`).
    runtime: Any


class ModelFamily:
    """Base class of a model family; subclasses set the attributes and override the methods."""

    #: ``model.name`` in configs and ``model_name`` in checkpoints.
    name: str = ""
    #: How people write it ("HaloAE").
    title: str = ""
    #: Preset used when no ``--config`` is given.
    default_preset: str = ""
    #: The family's own config section (key in the YAML files) and its dataclass; ``None`` when
    #: the family keeps its knobs in the shared ``model`` and ``train`` sections.
    section: str | None = None
    section_type: type | None = None
    #: The section holding ``epochs``, ``batch_size`` and ``lr`` (command-line overrides).
    schedule_section: str = "train"
    #: History keys worth reporting after training, besides ``loss``.
    loss_terms: tuple[str, ...] = ()
    #: Trains on normal tiles plus a few labelled anomalies.
    weakly_supervised: bool = False
    #: Names of the image scores :meth:`predict` gives (``score`` then ``max``), headline first;
    #: one name when both are the same value.
    score_names: tuple[str, ...] = ("mean", "max")
    #: Whether :meth:`predict` gives maps that localise anomalies (pixel metrics make sense).
    has_maps: bool = True
    #: Whether :meth:`transform` runs on the device (after the copy) or on the CPU (before it).
    transforms_on_device: bool = True
    #: Whether :meth:`transform` wants whole images at their own size (it resizes them itself),
    #: so image loaders that would resize first (the MVTec benchmark's) hand them over as they
    #: are. Slide tiles are always given at their tile size: for them the tile is the image.
    resizes_own_input: bool = False
    #: The backbone the family's models are built around, and where its weights come from.
    backbone: Backbone[nn.Module]
    #: Stream numbers of the training loop's per-epoch generators (``rng(stream)``): the one
    #: :meth:`loader` samples with and the one of :meth:`augmenter`.
    sampler_stream: int = 0
    augment_stream: int = 1
    #: Whether :meth:`scoring_module` traces to ONNX (opset 18) with every op it uses.
    exportable: bool = False

    # -- configuration -------------------------------------------------------------------------
    def validate(self, config: Any) -> None:
        """Raise ``ValueError`` naming the key when the family's settings cannot be used."""

    def epochs(self, config: Any) -> int:
        return int(getattr(config, self.schedule_section).epochs)

    def describe_schedule(self, config: Any) -> str:
        """One phrase: the length of a training run (for tables and reports)."""
        raise NotImplementedError

    def describe_training(self, config: Any, n_normal: int, n_anomalies: int) -> str:
        """One line announcing a training run."""
        raise NotImplementedError

    # -- model ----------------------------------------------------------------------------------
    def make_model(self, config: Any, backbone: nn.Module) -> nn.Module:
        """The family's model around ``backbone`` (a module of :attr:`backbone`), from the
        family's settings."""
        raise NotImplementedError

    def build(self, config: Any) -> nn.Module:
        """The model with its backbone weights resolved from ``config.model.backbone_weights``."""
        return self.make_model(config, self.backbone.load(config.model.backbone_weights))

    def restore(
        self, config: Any, state_dict: Mapping[str, torch.Tensor], backbone_identity: str
    ) -> nn.Module:
        """The model of a checkpoint: built unweighted, ``state_dict`` loaded over it."""
        model = self.make_model(config, self.backbone.unweighted(backbone_identity))
        model.load_state_dict(state_dict)
        return model

    def transform(self, images: torch.Tensor, config: Any) -> torch.Tensor:
        """Model input from ``B×H×W×3`` uint8 tiles or ``B×3×H×W`` float images in [0, 1].

        Called on the device the images were copied to.
        """
        raise NotImplementedError

    def calibration_to(
        self, calibration: Mapping[str, Any], device: torch.device
    ) -> dict[str, Any]:
        """The parts of a checkpoint's calibration :meth:`predict` needs, on ``device``."""
        return {}

    def predict(
        self, model: nn.Module, x: Tensor, calibration: Mapping[str, Any], keep_maps: bool = True
    ) -> Prediction:
        """``Prediction(score, max, map)`` of a batch of model inputs."""
        raise NotImplementedError

    def scoring_module(self, model: nn.Module, calibration: Mapping[str, Any]) -> nn.Module:
        """The scoring path as one module with the calibration baked in, for export: model
        inputs (what :meth:`transform` gives) ``B×3×H×W`` → ``(score, max, map)``, ``B``,
        ``B`` and ``B×64×64``. Meaningful where :attr:`exportable` is set."""
        return ScoringModule(self, model, self.calibration_to(calibration, torch.device("cpu")))

    # -- training -------------------------------------------------------------------------------
    def training_data(self, normals: Dataset, anomalies: Dataset | None, config: Any) -> Dataset:
        """What :meth:`loader` draws from; ``ValueError`` when anomalies cannot be used."""
        raise NotImplementedError

    def calibration_data(self, normals: Dataset, config: Any) -> Dataset:
        """Normal tiles as :meth:`calibration_batch` takes them."""
        raise NotImplementedError

    def optimiser(self, model: nn.Module, config: Any) -> torch.optim.Optimizer:
        raise NotImplementedError

    def scheduler(self, optimiser: torch.optim.Optimizer, config: Any) -> Any | None:
        """A learning-rate scheduler stepped once per epoch, or ``None``."""
        return None

    def loader(
        self, data: Dataset, config: Any, rng: EpochRng, workers: int, pin_memory: bool
    ) -> Iterable[Any]:
        """One epoch's batches."""
        raise NotImplementedError

    def augmenter(self, rng: EpochRng) -> torch.Generator:
        """The generator of one epoch's augmentations, passed to every :meth:`train_step`."""
        return rng(self.augment_stream)

    def train_step(self, ep: Epoch, batch: Any) -> dict[str, float]:
        """One optimisation step; returns ``loss``, ``images`` and the family's terms.

        A non-finite loss is returned without stepping the optimiser (the loop stops there).
        """
        raise NotImplementedError

    def epoch_record(self, ep: Epoch, sums: Mapping[str, float], steps: int) -> dict[str, float]:
        """The history entry of an epoch from the summed step statistics."""
        return {"epoch": ep.epoch, **{k: v / max(steps, 1) for k, v in sums.items()}}

    def describe_epoch(self, record: Mapping[str, float]) -> str:
        """The log line of an epoch's history entry (after ``epoch i/n``)."""
        terms = "  ".join(f"{k} {record[k]:.4f}" for k in self.loss_terms if k in record)
        return f"loss {record['loss']:.4f}  {terms}"

    def calibration_batch(self, model: nn.Module, batch: Any, runtime: Any) -> torch.Tensor:
        """What :meth:`summarise_calibration` needs from one batch of normal tiles (on the CPU)."""
        raise NotImplementedError

    def summarise_calibration(
        self, parts: list[torch.Tensor], reference: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """The checkpoint's calibration from every :meth:`calibration_batch` result.

        ``reference``: the calibration of the training tiles, when ``parts`` come from normal
        tiles held out of training — whatever normalises scores (HaloAE's mean map) is taken
        from it, so held-out scores are the scores a slide's tiles will get."""
        raise NotImplementedError

    def checkpoint_extras(self, data: Dataset, normals: Dataset) -> dict[str, Any]:
        """Plain values the family records in its checkpoints besides the common fields."""
        return {}


class ScoringModule(nn.Module):
    """``family.predict`` of ``model`` with a fixed calibration, as a module of one input."""

    def __init__(
        self, family: ModelFamily, model: nn.Module, calibration: Mapping[str, Any]
    ) -> None:
        super().__init__()
        self.family = family
        self.model = model
        self.calibration = dict(calibration)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        score, peak, maps = self.family.predict(self.model, x, self.calibration, keep_maps=True)
        assert maps is not None
        return score, peak, maps
