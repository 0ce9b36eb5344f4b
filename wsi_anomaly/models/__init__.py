"""Pure ``nn.Module`` model core: features, halo attention, HaloAE, ATAC-Net, losses, augmentation,
the shared scoring math, and the model families (:mod:`.registry`). No file I/O beyond loading
backbone weights, no printing."""

from wsi_anomaly.models.atacnet import (
    ATACNet,
    AtacNetConfig,
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
from wsi_anomaly.models.losses import (
    equal_weights,
    ews_weights,
    haloae_loss,
    loss_weights,
    ssim,
)
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
