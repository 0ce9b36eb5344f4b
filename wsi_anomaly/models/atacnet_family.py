"""The ATAC-Net family: normal tiles plus a few labelled anomalies, one image score.

Its knobs live in its own ``atacnet`` section (:class:`~wsi_anomaly.models.atacnet.AtacNetConfig`);
``train.workers``, ``train.checkpoint_every`` and ``train.calibration_tiles`` are shared.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sized
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from wsi_anomaly.models.atacnet import (
    RESNET50,
    ATACNet,
    AtacNetConfig,
    ResNet50Trunk,
    clip_gradients,
    make_optimiser,
    make_scheduler,
    step_loss,
)
from wsi_anomaly.models.atacnet_data import (
    AtacNetData,
    BalancedBatchSampler,
    cutmix_anomalous_half,
    preprocess,
    random_rotation,
)
from wsi_anomaly.models.calibration import Calibration
from wsi_anomaly.models.family import Epoch, EpochRng, ModelFamily, Prediction, Step
from wsi_anomaly.words import count

if TYPE_CHECKING:
    from wsi_anomaly.config import Config

#: Side of the maps :meth:`AtacNetFamily.predict` returns (the 7×7 cells, up-sampled).
MAP_PX = 64


class AtacNetFamily(ModelFamily):
    name = "atacnet"
    title = "ATAC-Net"
    default_preset = "atacnet"
    fast_preset = "atacnet_fast"
    section = "atacnet"
    section_type = AtacNetConfig
    schedule_section = "atacnet"
    loss_terms = ("score_normal", "score_anomalous")
    weakly_supervised = True
    score_names = ("score",)
    has_maps = False
    backbone = RESNET50
    sampler_stream, augment_stream = 2, 3
    #: CLAHE runs on the CPU, one image at a time: the transform comes before the copy.
    transforms_on_device = False
    #: The paper's order is CLAHE on the image at its own size, then one bicubic resize.
    resizes_own_input = True
    not_exportable = "its crops are cut at boxes that depend on each image's attention"

    def variant(self, config: Config) -> str:
        return config.atacnet.variant

    def describe_schedule(self, config: Config) -> str:
        a = config.atacnet
        return (
            f"variant {a.variant}, {count(a.epochs, 'epoch')} × {a.steps_per_epoch} batches of "
            f"{a.batch_size}"
        )

    def describe_training(self, config: Config, n_normal: int, n_anomalies: int) -> str:
        a = config.atacnet
        return (
            f"training atacnet ({a.variant}) on {n_normal} normal tiles and {n_anomalies} "
            f"labelled anomalies ({count(a.epochs, 'epoch')} × {a.steps_per_epoch} steps, batch "
            f"{a.batch_size}, backbone {config.model.backbone_weights})"
        )

    # -- model ----------------------------------------------------------------------------------
    def make_model(self, config: Config, backbone: nn.Module) -> nn.Module:
        a = config.atacnet
        return ATACNet(
            variant=a.variant,
            backbone=cast(ResNet50Trunk, backbone),
            crop_threshold=a.crop_threshold,
            topk_ratio=a.topk_ratio,
            margin=a.margin,
            min_box_px=a.min_box_px,
            box_pad_px=a.box_pad_px,
        )

    def transform(self, images: torch.Tensor, config: Config) -> torch.Tensor:
        """The ATAC-Net paper's preprocessing of every image: CLAHE at the size it is given,
        one bicubic resize to ``atacnet.image_px``, standardisation."""
        a = config.atacnet
        if images.dtype == torch.uint8:  # B×H×W×3 as stored
            views: Iterable[Any] = (img.cpu().numpy() for img in images)
        else:
            views = (img.cpu() for img in images)
        return torch.stack([preprocess(v, size=a.image_px, clahe=a.clahe) for v in views])

    def predict(
        self, model: nn.Module, x: Tensor, calibration: Mapping[str, Any], keep_maps: bool = True
    ) -> Prediction:
        atac = cast(ATACNet, model)
        score = atac.score(x).float()
        maps = None
        if keep_maps:
            cells = atac.anomaly_map(x).float()
            maps = F.interpolate(
                cells.unsqueeze(1), size=(MAP_PX, MAP_PX), mode="bilinear", align_corners=False
            ).squeeze(1)
        return Prediction(score, score, maps)

    # -- training -------------------------------------------------------------------------------
    def training_data(self, normals: Dataset, anomalies: Dataset | None, config: Config) -> Dataset:
        a = config.atacnet
        return AtacNetData(normals, anomalies, a.image_px, a.clahe)

    def calibration_data(self, normals: Dataset, config: Config) -> Dataset:
        return self.training_data(normals, None, config)

    def optimiser(self, model: nn.Module, config: Config) -> torch.optim.Optimizer:
        return make_optimiser(model, config.atacnet)

    def scheduler(self, optimiser: torch.optim.Optimizer, config: Config) -> Any | None:
        return make_scheduler(optimiser, config.atacnet)

    def loader(
        self, data: Dataset, config: Config, rng: EpochRng, workers: int, pin_memory: bool
    ) -> Iterable[Any]:
        a = config.atacnet
        sampler = BalancedBatchSampler(
            cast(AtacNetData, data).labels,
            a.batch_size,
            a.steps_per_epoch,
            rng(self.sampler_stream),
            a.real_anomaly_fraction,
        )
        return DataLoader(data, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory)

    def train_step(self, ep: Epoch, batch: Any) -> Step:
        a = ep.config.atacnet
        images, labels = batch
        images, targets = cutmix_anomalous_half(images, labels, ep.aug)
        images = random_rotation(images, ep.aug, a.rotation_degrees)
        loss, stats = step_loss(
            cast(ATACNet, ep.model),
            images.to(ep.runtime.device, non_blocking=True),
            targets,
            precision=ep.runtime.precision,
        )
        return Step(loss, {**stats, "images": float(len(images))})

    def before_optimiser_step(self, ep: Epoch) -> dict[str, float]:
        assert ep.optimiser is not None
        clip_gradients(ep.optimiser, ep.config.atacnet.grad_clip_norm)
        return {}

    def epoch_record(self, ep: Epoch, sums: Mapping[str, float], steps: int) -> dict[str, float]:
        steps_per_epoch = ep.config.atacnet.steps_per_epoch
        return {
            "epoch": ep.epoch,
            **{k: v / steps_per_epoch for k, v in sums.items()},
            "lr": ep.optimiser.param_groups[0]["lr"] if ep.optimiser is not None else 0.0,
        }

    def calibration_batch(self, model: nn.Module, batch: Any, runtime: Any) -> torch.Tensor:
        x, _ = batch
        with runtime.autocast():
            return cast(ATACNet, model).score(runtime.to_device(x)).float().cpu()

    def summarise_calibration(
        self, parts: list[torch.Tensor], reference: Calibration | None = None
    ) -> Calibration:
        values = torch.cat(parts)
        return Calibration.from_scores(values, values)

    def checkpoint_extras(self, data: Dataset, normals: Dataset) -> dict[str, Any]:
        return {"n_labelled_anomalies": len(cast(Sized, data)) - len(cast(Sized, normals))}
