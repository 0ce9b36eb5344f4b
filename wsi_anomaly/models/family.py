"""What a model family is: everything the rest of the package may ask about a model.

A family (HaloAE, ATAC-Net, the next one) is one :class:`ModelFamily` subclass registered in
:mod:`wsi_anomaly.models.registry`. Training, scoring and the MVTec benchmark look the family up by ``model.name`` and call the methods below; none of them branches on a
family's name.

The family owns:

- its config section (a dataclass in a torch-free module, a field of
  :class:`~wsi_anomaly.models.registry.FamilySettings` that validates itself; ``section`` is its
  key in the YAML files, ``schedule_section`` the section that holds its epochs, batch size and
  learning rate);
- its model around a backbone (:meth:`make_model`) and that backbone (:attr:`backbone`, a
  :class:`~wsi_anomaly.models.weights.Backbone`): :meth:`build` resolves the backbone's weights
  outside the model's ``__init__``, :meth:`restore` builds it for a checkpoint (nothing to
  download, the identity the checkpoint recorded);
- its input transform (:meth:`transform`: tiles as stored, or float images, to the model's input,
  on the device) and :meth:`predict` → ``(score, max, map)``;
- the pieces of its training loop (:meth:`training_data`, :meth:`loader`, :meth:`train_step`,
  :meth:`fit_end`, …); the loop itself, ``backward`` and the optimiser's step, the non-finite
  loss rule, progress bars, logging and checkpoints live in :mod:`wsi_anomaly.training`;
- how its training loss reads (:meth:`loss_weights` of its terms per epoch, shown on the
  progress bar; :meth:`explain_loss`, said once when training starts);
- its map size (:attr:`map_px`) and its calibration (:meth:`summarise_calibration` →
  :class:`~wsi_anomaly.models.calibration.Calibration`, with the family's own ``extras``).

Two kinds of fit share the loop. A family with an optimiser (:meth:`optimiser` returns one)
gives a loss per step (:class:`Step`) and the loop does ``backward`` and ``step``; a family
without one (the default, ``None``) is fitted by passes over normal tiles with no gradient (its
:meth:`train_step` runs under ``torch.no_grad`` and gives no loss), then :meth:`fit_end` (e.g.
selecting a coreset) runs once before calibration.

``config`` below is the package's resolved :class:`~wsi_anomaly.config.Config` (sections as
attributes; a family reads ``model``, ``train``, ``seed`` and its own section). Methods raise
``ValueError`` for values they cannot use; the training loop turns those into the package's typed
errors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from wsi_anomaly.models.calibration import Calibration
from wsi_anomaly.models.weights import Backbone

if TYPE_CHECKING:
    from wsi_anomaly.config import Config

#: ``rng(stream)``: the training loop's reproducible generator of one purpose for this epoch.
EpochRng = Callable[[int], torch.Generator]


class Prediction(NamedTuple):
    """What :meth:`ModelFamily.predict` gives for a batch of ``B`` inputs."""

    #: ``B`` image scores: the mean of each anomaly map (the ``score`` column of tile tables,
    #: the ``mean`` of :attr:`ModelFamily.score_names`), or, for a family without maps, its one
    #: score.
    score: Tensor
    #: ``B`` peak values of the anomaly maps (the score itself where a family has no maps).
    max: Tensor
    #: ``B×map_px×map_px`` anomaly maps (:attr:`ModelFamily.map_px`), or ``None`` when not
    #: asked for.
    map: Tensor | None


class Step(NamedTuple):
    """What :meth:`ModelFamily.train_step` gives for one batch."""

    #: The scalar to minimise, with its graph (the loop calls ``backward``); ``None`` for a fit
    #: without gradients.
    loss: Tensor | None
    #: The family's terms (:attr:`ModelFamily.loss_terms`) and ``images`` (inputs seen), floats.
    stats: dict[str, float]


@dataclass(frozen=True)
class Epoch:
    """What stays the same for every step of one training epoch."""

    model: nn.Module
    #: ``None`` for a family fitted without gradients.
    optimiser: torch.optim.Optimizer | None
    config: Config
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
    #: Preset used when no ``--config`` is given, and the short one for CPUs and the demo.
    default_preset: str = ""
    fast_preset: str = ""
    #: The family's own config section (key in the YAML files, a field of
    #: :class:`~wsi_anomaly.models.registry.FamilySettings`) and its dataclass; ``None`` for a
    #: family without settings of its own.
    section: str | None = None
    section_type: type | None = None
    #: The section holding ``epochs``, ``batch_size`` and ``lr`` (and, where the family has
    #: them, ``samples_per_epoch``): where the command line's schedule flags go.
    schedule_section: str = ""
    #: History keys worth reporting after training, besides ``loss``.
    loss_terms: tuple[str, ...] = ()
    #: Trains on normal tiles plus a few labelled anomalies.
    weakly_supervised: bool = False
    #: What the family's models take: ``"images"`` (tiles of slides, image folders) or
    #: ``"tile features"`` (one vector per tile that another tool extracted: TRIDENT, CLAM).
    inputs: str = "images"
    #: Names of the image scores :meth:`predict` gives, headline first: ``mean`` (its ``score``)
    #: and ``max`` (its ``max``) for a family with maps, in the order the family ranks them;
    #: one other name (its ``score``) for a family whose two values are the same.
    score_names: tuple[str, ...] = ("mean", "max")
    #: Which of :meth:`predict`'s two values is a tile's score on slides — what ranks, colours
    #: and classes tiles (heatmaps, "Anomalous" class, top tiles, ``fraction_anomalous``),
    #: against the calibration's matching quantiles: ``"mean"`` (:attr:`Prediction.score`, the
    #: map's mean) or ``"max"`` (:attr:`Prediction.max`, its peak). The headline of
    #: :attr:`score_names` for a family with maps; either for a family whose two values are the
    #: same. Results record it (``tile_score``), so they are re-drawn without the model.
    tile_score: str = "mean"
    #: Whether :meth:`predict` gives maps that localise anomalies (pixel metrics make sense).
    has_maps: bool = True
    #: Side of the square maps :meth:`predict` gives (any patch grid: 14, 16, 28, 64, …).
    map_px: int = 64
    #: Whether checkpoints hold the backbone's weights; when false they record its identity
    #: (name and sha256) and :meth:`checkpoint_state` leaves the backbone out.
    stores_backbone: bool = True
    #: Network inputs each training image yields (HaloAE: the original and two Cut&Paste
    #: copies), so throughput tables count images, and how those tables say it.
    inputs_per_image: int = 1
    throughput_note: str = "training images per second"
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
    #: Whether :meth:`scoring_module` exports to ONNX (opset 18) with a free batch size, and
    #: why not where it does not (the end of a one-line refusal).
    exportable: bool = False
    not_exportable: str = "its scoring path has not been made exportable"

    # -- configuration -------------------------------------------------------------------------
    def epochs(self, config: Config) -> int:
        return int(getattr(config, self.schedule_section).epochs)

    def batch_size(self, config: Config) -> int | None:
        """Training images per batch (for reports); ``None`` for a family whose schedule has
        no batch size."""
        value = getattr(getattr(config, self.schedule_section, None), "batch_size", None)
        return None if value is None else int(value)

    def variant(self, config: Config) -> str | None:
        """The name of the variant of the family ``config`` trains (e.g. an ablation), for
        tables and reports; ``None`` for a family without variants."""
        return None

    def describe_schedule(self, config: Config) -> str:
        """One phrase: the length of a training run (for tables and reports)."""
        raise NotImplementedError

    def describe_training(self, config: Config, n_normal: int, n_anomalies: int) -> str:
        """One line announcing a training run."""
        raise NotImplementedError

    def loss_weights(self, config: Any, epoch: int) -> dict[str, float]:
        """The weight of each of :attr:`loss_terms` in the loss of ``epoch`` (0-based), for a
        family whose loss is a weighted sum of them; empty (the default) for any other. Shown on
        the training bar; an :meth:`epoch_record` that keeps them as ``w_<term>`` has its epoch
        line written as that weighted sum (:meth:`describe_epoch`)."""
        return {}

    def explain_loss(self, config: Any) -> str:
        """One or two sentences printed once when training starts: what the loss printed per
        epoch is, where it could be misread (e.g. weights that change from epoch to epoch make
        the total rise while every term falls); empty when there is nothing to say."""
        return ""

    # -- model ----------------------------------------------------------------------------------
    def make_model(self, config: Config, backbone: nn.Module) -> nn.Module:
        """The family's model around ``backbone`` (a module of :attr:`backbone`), from the
        family's settings."""
        raise NotImplementedError

    def build(self, config: Config) -> nn.Module:
        """The model with its backbone weights resolved from ``config.model.backbone_weights``."""
        return self.make_model(config, self.backbone.load(config.model.backbone_weights))

    def restore(
        self,
        config: Config,
        state_dict: Mapping[str, torch.Tensor],
        backbone_identity: str,
        backbone_weights: str | None = None,
    ) -> nn.Module:
        """The model of a checkpoint: built unweighted, ``state_dict`` loaded over it.

        ``backbone_weights``: for a family whose checkpoints record the backbone's identity
        instead of holding it (:attr:`stores_backbone` false), the weights file to load, checked
        against that identity (``ValueError`` in one line when it differs or is missing)."""
        if backbone_weights is not None:
            raise ValueError(
                f"a {self.title} checkpoint holds its backbone's weights; --backbone-weights "
                "is for models whose checkpoint records the backbone instead"
            )
        model = self.make_model(config, self.backbone.unweighted(backbone_identity))
        model.load_state_dict(state_dict)
        return model

    def transform(self, images: torch.Tensor, config: Config) -> torch.Tensor:
        """Model input from ``B×H×W×3`` uint8 tiles or ``B×3×H×W`` float images in [0, 1].

        Called on the device the images were copied to.
        """
        raise NotImplementedError

    def calibration_to(self, calibration: Calibration, device: torch.device) -> dict[str, Any]:
        """The parts of a checkpoint's calibration :meth:`predict` needs, on ``device``."""
        return {}

    def predict(
        self, model: nn.Module, x: Tensor, calibration: Mapping[str, Any], keep_maps: bool = True
    ) -> Prediction:
        """``Prediction(score, max, map)`` of a batch of model inputs."""
        raise NotImplementedError

    def scoring_module(self, model: nn.Module, calibration: Calibration) -> nn.Module:
        """The scoring path as one module with the calibration baked in, for export: model
        inputs (what :meth:`transform` gives) ``B×3×H×W`` → ``(score, max, map)``, ``B``,
        ``B`` and ``B×map_px×map_px``, as :meth:`predict` gives them. Meaningful where
        :attr:`exportable` is set."""
        return ScoringModule(self, model, self.calibration_to(calibration, torch.device("cpu")))

    # -- training -------------------------------------------------------------------------------
    def training_data(self, normals: Dataset, anomalies: Dataset | None, config: Config) -> Dataset:
        """What :meth:`loader` draws from; ``ValueError`` when anomalies cannot be used."""
        raise NotImplementedError

    def calibration_data(self, normals: Dataset, config: Config) -> Dataset:
        """Normal tiles as :meth:`calibration_batch` takes them."""
        raise NotImplementedError

    def optimiser(self, model: nn.Module, config: Config) -> torch.optim.Optimizer | None:
        """The optimiser of a gradient fit, or ``None`` (the default): a fit without gradients."""
        return None

    def scheduler(self, optimiser: torch.optim.Optimizer, config: Config) -> Any | None:
        """A learning-rate scheduler stepped once per epoch, or ``None``."""
        return None

    def loader(
        self, data: Dataset, config: Config, rng: EpochRng, workers: int, pin_memory: bool
    ) -> Iterable[Any]:
        """One epoch's batches."""
        raise NotImplementedError

    def augmenter(self, rng: EpochRng) -> torch.Generator:
        """The generator of one epoch's augmentations, passed to every :meth:`train_step`."""
        return rng(self.augment_stream)

    def train_step(self, ep: Epoch, batch: Any) -> Step:
        """The loss of one batch (the loop checks it is finite, then steps the optimiser), or,
        without an optimiser, one batch of the fit (run under ``torch.no_grad``)."""
        raise NotImplementedError

    def before_optimiser_step(self, ep: Epoch) -> dict[str, float]:
        """Called between ``backward`` and the optimiser's step (e.g. gradient clipping); the
        statistics it returns join the step's."""
        return {}

    def fit_end(self, model: nn.Module, config: Config) -> None:
        """Called once after the last epoch, before calibration (e.g. coreset selection)."""

    def epoch_record(self, ep: Epoch, sums: Mapping[str, float], steps: int) -> dict[str, float]:
        """The history entry of an epoch from the summed step statistics."""
        return {"epoch": ep.epoch, **{k: v / max(steps, 1) for k, v in sums.items()}}

    def describe_epoch(self, record: Mapping[str, float]) -> str:
        """The log line of an epoch's history entry (after ``epoch i/n``): the loss and its
        terms; where the record holds the terms' weights (``w_<term>``), the loss is written as
        the weighted sum it is, ``loss 1.4600 = 0.20×cls 0.6931 + …``."""
        terms = [k for k in self.loss_terms if k in record]
        if all(f"w_{k}" in record for k in terms) and terms and "loss" in record:
            parts = " + ".join(f"{record[f'w_{k}']:.2f}×{k} {record[k]:.4f}" for k in terms)
            return f"loss {record['loss']:.4f} = {parts}"
        text = "  ".join(f"{k} {record[k]:.4f}" for k in terms)
        if "loss" not in record:
            return text or "fitted"
        return f"loss {record['loss']:.4f}  {text}"

    def calibration_batch(self, model: nn.Module, batch: Any, runtime: Any) -> torch.Tensor:
        """What :meth:`summarise_calibration` needs from one batch of normal tiles (on the CPU)."""
        raise NotImplementedError

    def summarise_calibration(
        self, parts: list[torch.Tensor], reference: Calibration | None = None
    ) -> Calibration:
        """The checkpoint's calibration from every :meth:`calibration_batch` result.

        ``reference``: the calibration of the training tiles, when ``parts`` come from normal
        tiles held out of training — whatever normalises scores (the family's ``extras``, e.g.
        HaloAE's mean map) is taken from it, so held-out scores are the scores a slide's tiles
        will get. The default: ``parts`` are ``(B, 2)`` rows of (score, max) as :meth:`predict`
        gives them."""
        values = torch.cat(parts).float()
        return Calibration.from_scores(values[:, 0], values[:, 1])

    def checkpoint_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint keeps of ``model`` (all of its state by default)."""
        return dict(model.state_dict())

    def expected_state(
        self, config: Config, backbone_identity: str
    ) -> dict[str, torch.Tensor] | None:
        """What :meth:`checkpoint_state` holds for ``config``: keys, shapes and dtypes as tensors
        on the ``meta`` device (nothing allocated), checked against a checkpoint before any model
        is built. A 0 in a shape stands for any length. None for a family that builds its models
        only in :meth:`build` and :meth:`restore` (no :meth:`make_model`): its :meth:`restore`
        is then what refuses weights that do not fit."""
        try:
            with torch.device("meta"):
                model = self.make_model(config, self.backbone.unweighted(backbone_identity))
        except NotImplementedError:
            return None
        return dict(self.checkpoint_state(model))

    def map_size(self, config: Config) -> int:
        """Side of the maps :meth:`predict` gives under ``config`` (:attr:`map_px` unless the
        family's settings change it, e.g. a backbone's patch grid)."""
        return self.map_px

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
