"""Pure ``nn.Module`` model core: features, halo attention, HaloAE, losses, augmentation and the
shared scoring math. No file I/O beyond loading backbone weights, no printing."""

from wsi_anomaly.models.cutpaste import (
    color_jitter,
    cutpaste_normal,
    cutpaste_scar,
    make_cutpaste_batch,
)
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
    "FEATURE_CHANNELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Bottleneck",
    "CutPasteClassifier",
    "HaloAE",
    "HaloAttention",
    "HaloDecoder",
    "HaloEncoder",
    "ImageReconstructor",
    "VGG19Features",
    "aggregate_reference",
    "aggregate_taps",
    "anomaly_map",
    "color_jitter",
    "cutpaste_normal",
    "cutpaste_scar",
    "denormalise",
    "equal_weights",
    "ews_weights",
    "haloae_loss",
    "load_vgg19",
    "loss_weights",
    "make_cutpaste_batch",
    "normalise",
    "normalise_map",
    "score_batch",
    "smooth_map",
    "ssim",
    "tile_scores",
    "upsample_map",
]
