"""The HaloAE family: normal tiles only, Cut&Paste self-supervision, 64×64 anomaly maps.

Its knobs live in its own ``haloae`` section (:class:`~wsi_anomaly.models.haloae_config.
HaloAEConfig`): the architecture (``attention: conv`` replaces the attention layers by 3×3
convolutions in the same blocks; ``released_mask`` reproduces the authors' inverted halo mask) and
the schedule (epochs, samples per epoch, batch size, learning rate, loss terms and weighting,
colour jitter). ``train.workers``, ``train.checkpoint_every`` and the calibration are shared.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sized
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from wsi_anomaly.models.calibration import Calibration
from wsi_anomaly.models.cutpaste import make_cutpaste_batch
from wsi_anomaly.models.family import Epoch, EpochRng, ModelFamily, Prediction, Step
from wsi_anomaly.models.features import VGG19, VGG19Features
from wsi_anomaly.models.haloae import HaloAE
from wsi_anomaly.models.haloae_config import LOSS_TERMS, HaloAEConfig
from wsi_anomaly.models.losses import haloae_loss, loss_weights
from wsi_anomaly.models.scoring import (
    anomaly_map,
    normalise_map,
    score_batch,
    smooth_map,
    tile_scores,
)
from wsi_anomaly.models.transforms import normalise, to_unit_float
from wsi_anomaly.words import count

if TYPE_CHECKING:
    from wsi_anomaly.config import Config


class HaloAEFamily(ModelFamily):
    name = "haloae"
    title = "HaloAE"
    default_preset = "haloae_paper"
    fast_preset = "haloae_fast"
    section = "haloae"
    section_type = HaloAEConfig
    schedule_section = "haloae"
    loss_terms = ("cls", "fm", "im")
    weakly_supervised = False
    score_names = ("mean", "max")
    has_maps = True
    backbone = VGG19
    inputs_per_image = 3
    throughput_note = "training images per second (each also yields two Cut&Paste copies)"
    exportable = True

    def describe_schedule(self, config: Config) -> str:
        t = config.haloae
        return f"{count(t.epochs, 'epoch')} × {t.samples_per_epoch} samples, batch {t.batch_size}"

    def describe_training(self, config: Config, n_normal: int, n_anomalies: int) -> str:
        return (
            f"training {self.name} on {n_normal} tiles ({self.describe_schedule(config)}, "
            f"backbone {config.model.backbone_weights})"
        )

    def settings(self, config: Any) -> Any:
        """The section holding HaloAE's schedule and loss settings (the one place that names
        it for the methods below)."""
        return getattr(config, self.schedule_section)

    def loss_weights(self, config: Any, epoch: int) -> dict[str, float]:
        t = self.settings(config)
        weights = loss_weights(t.loss_weighting, epoch, t.epochs, t.loss_terms)
        return {k: w for k, w in zip(LOSS_TERMS, weights) if k in t.loss_terms}

    def explain_loss(self, config: Any) -> str:
        t = self.settings(config)
        terms = [k for k in LOSS_TERMS if k in t.loss_terms]
        if len(terms) == 1:
            return f"loss: the {terms[0]} term alone (weight 1)"
        first, last = self.loss_weights(config, 0), self.loss_weights(config, t.epochs - 1)
        names = ", ".join(terms[:-1]) + f" and {terms[-1]}"
        if t.loss_weighting != "ews" or first == last:
            each = " ".join(f"{k} {w:.2f}" for k, w in first.items())
            return f"loss: the weighted sum of {names}, fixed weights {each}"

        def shown(weights: dict[str, float]) -> str:
            return " ".join(f"{k} {w:.2f}" for k, w in weights.items())

        return (
            f"loss: the weighted sum of {names}, whose weights evolve over the epochs "
            f"(EWS, {self.schedule_section}.loss_weighting: ews) from {shown(first)} in epoch 1 to {shown(last)} "
            f"in epoch {t.epochs}, shifting from classification to reconstruction; the weighted "
            "loss can rise from one epoch to the next while every term falls: each epoch's line "
            "shows the weights and the unweighted terms"
        )

    # -- model ----------------------------------------------------------------------------------
    def make_model(self, config: Config, backbone: nn.Module) -> nn.Module:
        return HaloAE(
            cast(VGG19Features, backbone),
            attention=config.haloae.attention,
            released_mask=config.haloae.released_mask,
            released_init=config.haloae.released_init,
        )

    def transform(self, images: torch.Tensor, config: Config) -> torch.Tensor:
        return normalise(to_unit_float(images))

    def calibration_to(self, calibration: Calibration, device: torch.device) -> dict[str, Any]:
        mean_map = calibration.extras.get("mean_map")
        return {"mean_map": mean_map.to(device) if mean_map is not None else None}

    def predict(
        self, model: nn.Module, x: Tensor, calibration: Mapping[str, Any], keep_maps: bool = True
    ) -> Prediction:
        out = score_batch(model, x, calibration.get("mean_map"))
        return Prediction(out["mean"], out["max"], out["map"] if keep_maps else None)

    # -- training -------------------------------------------------------------------------------
    def training_data(self, normals: Dataset, anomalies: Dataset | None, config: Config) -> Dataset:
        return normals  # normal tiles only: the loop refuses anomalies (not weakly supervised)

    def calibration_data(self, normals: Dataset, config: Config) -> Dataset:
        return normals

    def optimiser(self, model: nn.Module, config: Config) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            cast(HaloAE, model).trainable_parameters(),
            lr=config.haloae.lr,
            weight_decay=config.haloae.weight_decay,
        )

    def loader(
        self, data: Dataset, config: Config, rng: EpochRng, workers: int, pin_memory: bool
    ) -> Iterable[Any]:
        t = config.haloae
        sampler = RandomSampler(
            cast(Sized, data),
            replacement=True,
            num_samples=t.samples_per_epoch,
            generator=rng(self.sampler_stream),
        )
        return DataLoader(
            data,
            batch_size=t.batch_size,
            sampler=sampler,
            num_workers=workers,
            drop_last=False,
            persistent_workers=False,
            pin_memory=pin_memory,
        )

    def train_step(self, ep: Epoch, batch: Any) -> Step:
        model, epoch, aug, runtime = ep.model, ep.epoch, ep.aug, ep.runtime
        t = ep.config.haloae
        weights = loss_weights(t.loss_weighting, epoch, t.epochs, t.loss_terms)
        images, labels = make_cutpaste_batch(
            batch, aug, image_jitter=t.image_jitter, patch_jitter=t.patch_jitter
        )
        x = runtime.layout(normalise(images).to(runtime.device, non_blocking=True))
        labels = labels.to(runtime.device)
        with runtime.autocast():
            outputs = model(x)
            loss, parts = haloae_loss(outputs, x, labels, weights, t.loss_terms)
        stats = {**{k: float(parts[k]) for k in self.loss_terms}, "images": float(len(x))}
        return Step(loss, stats)

    def epoch_record(self, ep: Epoch, sums: Mapping[str, float], steps: int) -> dict[str, float]:
        t = ep.config.haloae
        w = loss_weights(t.loss_weighting, ep.epoch, t.epochs, t.loss_terms)
        return {
            **super().epoch_record(ep, sums, steps),
            "w_cls": w[0],
            "w_fm": w[1],
            "w_im": w[2],
        }

    def calibration_batch(self, model: nn.Module, batch: Any, runtime: Any) -> torch.Tensor:
        x = runtime.layout(normalise(runtime.to_device(batch)))
        halo_ae = cast(HaloAE, model)
        with runtime.autocast():
            fm = halo_ae.features(x)
            raw = anomaly_map(fm, halo_ae.reconstruct_features(fm))
        return raw.float().cpu()

    def summarise_calibration(
        self, parts: list[torch.Tensor], reference: Calibration | None = None
    ) -> Calibration:
        raw = torch.cat(parts)
        mean_map = raw.mean(dim=0) if reference is None else reference.extras["mean_map"]
        maps = smooth_map(normalise_map(raw, mean_map))
        mean_scores, max_scores = tile_scores(maps)
        return Calibration.from_scores(mean_scores, max_scores, {"mean_map": mean_map})
