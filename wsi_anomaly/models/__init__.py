"""Pure ``nn.Module`` model core: features, halo attention, HaloAE, ATAC-Net, losses, augmentation,
the shared scoring math, and the model families (:mod:`.registry`). No file I/O beyond loading
backbone weights, no printing.

Importing the package imports no torch: every name below is imported on first use, so the
torch-free parts (the registry's config sections, :mod:`.registry`) load on their own.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wsi_anomaly.models.atacnet import (
        ATACNet,
        ResNet50Trunk,
        SelfAttentionBlock,
        atacnet_loss,
        attention_crop_boxes,
        crop_and_resize,
        deviation_loss,
        load_resnet50,
        topk_score,
        train_step,
        weighted_ce_loss,
    )
    from wsi_anomaly.models.atacnet_config import AtacNetConfig
    from wsi_anomaly.models.atacnet_data import (
        ATACNET_MEAN,
        ATACNET_STD,
        BalancedBatchSampler,
        cutmix,
        cutmix_anomalous_half,
        preprocess,
        random_rotation,
    )
    from wsi_anomaly.models.cutpaste import (
        color_jitter,
        cutpaste_normal,
        cutpaste_scar,
        make_cutpaste_batch,
    )
    from wsi_anomaly.models.family import ModelFamily
    from wsi_anomaly.models.features import (
        FEATURE_CHANNELS,
        VGG19Features,
        aggregate_reference,
        aggregate_taps,
        load_vgg19,
    )
    from wsi_anomaly.models.halo import HaloAttention
    from wsi_anomaly.models.haloae import (
        Bottleneck,
        CutPasteClassifier,
        HaloAE,
        HaloDecoder,
        HaloEncoder,
        ImageReconstructor,
    )
    from wsi_anomaly.models.haloae_config import HaloAEConfig
    from wsi_anomaly.models.losses import (
        equal_weights,
        ews_weights,
        haloae_loss,
        loss_weights,
        ssim,
    )
    from wsi_anomaly.models.patchcore_config import PatchCoreConfig
    from wsi_anomaly.models.registry import FAMILIES, family_names, get_family
    from wsi_anomaly.models.scoring import (
        anomaly_map,
        normalise_map,
        score_batch,
        smooth_map,
        tile_scores,
        upsample_map,
    )
    from wsi_anomaly.models.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalise, normalise

#: Public name → the module that defines it.
_WHERE: dict[str, str] = {
    "ATACNet": "wsi_anomaly.models.atacnet",
    "AtacNetConfig": "wsi_anomaly.models.atacnet_config",
    "HaloAEConfig": "wsi_anomaly.models.haloae_config",
    "PatchCoreConfig": "wsi_anomaly.models.patchcore_config",
    "ResNet50Trunk": "wsi_anomaly.models.atacnet",
    "SelfAttentionBlock": "wsi_anomaly.models.atacnet",
    "atacnet_loss": "wsi_anomaly.models.atacnet",
    "attention_crop_boxes": "wsi_anomaly.models.atacnet",
    "crop_and_resize": "wsi_anomaly.models.atacnet",
    "deviation_loss": "wsi_anomaly.models.atacnet",
    "load_resnet50": "wsi_anomaly.models.atacnet",
    "topk_score": "wsi_anomaly.models.atacnet",
    "train_step": "wsi_anomaly.models.atacnet",
    "weighted_ce_loss": "wsi_anomaly.models.atacnet",
    "ATACNET_MEAN": "wsi_anomaly.models.atacnet_data",
    "ATACNET_STD": "wsi_anomaly.models.atacnet_data",
    "BalancedBatchSampler": "wsi_anomaly.models.atacnet_data",
    "cutmix": "wsi_anomaly.models.atacnet_data",
    "cutmix_anomalous_half": "wsi_anomaly.models.atacnet_data",
    "preprocess": "wsi_anomaly.models.atacnet_data",
    "random_rotation": "wsi_anomaly.models.atacnet_data",
    "color_jitter": "wsi_anomaly.models.cutpaste",
    "cutpaste_normal": "wsi_anomaly.models.cutpaste",
    "cutpaste_scar": "wsi_anomaly.models.cutpaste",
    "make_cutpaste_batch": "wsi_anomaly.models.cutpaste",
    "ModelFamily": "wsi_anomaly.models.family",
    "FEATURE_CHANNELS": "wsi_anomaly.models.features",
    "VGG19Features": "wsi_anomaly.models.features",
    "aggregate_reference": "wsi_anomaly.models.features",
    "aggregate_taps": "wsi_anomaly.models.features",
    "load_vgg19": "wsi_anomaly.models.features",
    "HaloAttention": "wsi_anomaly.models.halo",
    "Bottleneck": "wsi_anomaly.models.haloae",
    "CutPasteClassifier": "wsi_anomaly.models.haloae",
    "HaloAE": "wsi_anomaly.models.haloae",
    "HaloDecoder": "wsi_anomaly.models.haloae",
    "HaloEncoder": "wsi_anomaly.models.haloae",
    "ImageReconstructor": "wsi_anomaly.models.haloae",
    "equal_weights": "wsi_anomaly.models.losses",
    "ews_weights": "wsi_anomaly.models.losses",
    "haloae_loss": "wsi_anomaly.models.losses",
    "loss_weights": "wsi_anomaly.models.losses",
    "ssim": "wsi_anomaly.models.losses",
    "FAMILIES": "wsi_anomaly.models.registry",
    "family_names": "wsi_anomaly.models.registry",
    "get_family": "wsi_anomaly.models.registry",
    "anomaly_map": "wsi_anomaly.models.scoring",
    "normalise_map": "wsi_anomaly.models.scoring",
    "score_batch": "wsi_anomaly.models.scoring",
    "smooth_map": "wsi_anomaly.models.scoring",
    "tile_scores": "wsi_anomaly.models.scoring",
    "upsample_map": "wsi_anomaly.models.scoring",
    "IMAGENET_MEAN": "wsi_anomaly.models.transforms",
    "IMAGENET_STD": "wsi_anomaly.models.transforms",
    "denormalise": "wsi_anomaly.models.transforms",
    "normalise": "wsi_anomaly.models.transforms",
}

__all__ = [
    "ATACNET_MEAN",
    "ATACNET_STD",
    "FEATURE_CHANNELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ATACNet",
    "FAMILIES",
    "ModelFamily",
    "AtacNetConfig",
    "HaloAEConfig",
    "PatchCoreConfig",
    "BalancedBatchSampler",
    "Bottleneck",
    "CutPasteClassifier",
    "HaloAE",
    "HaloAttention",
    "HaloDecoder",
    "HaloEncoder",
    "ImageReconstructor",
    "ResNet50Trunk",
    "SelfAttentionBlock",
    "VGG19Features",
    "aggregate_reference",
    "aggregate_taps",
    "anomaly_map",
    "atacnet_loss",
    "attention_crop_boxes",
    "color_jitter",
    "crop_and_resize",
    "cutmix",
    "cutmix_anomalous_half",
    "cutpaste_normal",
    "cutpaste_scar",
    "denormalise",
    "deviation_loss",
    "equal_weights",
    "ews_weights",
    "family_names",
    "get_family",
    "haloae_loss",
    "load_resnet50",
    "load_vgg19",
    "loss_weights",
    "make_cutpaste_batch",
    "normalise",
    "normalise_map",
    "preprocess",
    "random_rotation",
    "score_batch",
    "smooth_map",
    "ssim",
    "tile_scores",
    "topk_score",
    "train_step",
    "upsample_map",
    "weighted_ce_loss",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
