"""One checkpoint format for every model the project has.

A checkpoint is a ``torch.save`` dict::

    format            "wsi-anomaly-checkpoint"
    format_version    CHECKPOINT_VERSION
    software_version  wsi_anomaly.__version__ that wrote it
    model_name        the model family's name (``model.name``)
    config            the resolved Config as a dict (model knobs, training settings, seed)
    state_dict        the model's weights (the frozen backbone included, so scoring needs no
                      download)
    backbone          where the backbone weights came from ("vgg19-imagenet1k-v1", "vgg19-random")
    tile_mpp          µm/px of the training tiles (None when unknown)
    calibration       {"mean_map": 64×64 tensor, "score_quantiles": {q: value}, …} — what makes
                      scores comparable across slides; absent in intermediate checkpoints
    train_state       {"epoch", "optimizer", …} for ``--resume``
    tile_features     (a model fitted on TRIDENT/CLAM tile vectors only) their encoder, width
                      and tile geometry, checked before a slide's vectors are scored
    complete          True once training finished and calibration is in

Written to a temporary name and renamed, so a crash never leaves a truncated checkpoint.

A checkpoint given by a user is untrusted input: it is read with ``torch.load(...,
weights_only=True)``, which rebuilds tensors and plain data only and never runs code stored in
the file. A file holding anything else (a pickled object, a function) is refused.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .checkpoint_checks import check_archive, check_record
from .errors import CheckpointError, InputNotFoundError, UnsafeCheckpointError
from .outputs import atomic_path, os_errors_as_user_errors

FORMAT = "wsi-anomaly-checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> None:
    data = {
        "format": FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "software_version": __version__,
        **payload,
    }
    with atomic_path(path) as tmp, os_errors_as_user_errors(path):
        torch.save(data, tmp)


def load_checkpoint(
    path: str | Path, expect_model: str | None = None, require_complete: bool = True
) -> dict[str, Any]:
    """Load and validate a checkpoint.

    Raises:
        InputNotFoundError; CheckpointError for a file that is not ours, of another format
        version, of another model than ``expect_model``, or unfinished when
        ``require_complete``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"model checkpoint not found: {path}")
    check_archive(path)  # sizes bounded before anything is inflated
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch reports refused objects as "Unsupported global"; anything else is damage.
        if "global" not in str(exc).lower():
            raise CheckpointError(
                f"{path} is not a readable checkpoint (it may be truncated or "
                "not a checkpoint at all)"
            ) from exc
        # weights_only refused something other than tensors and plain data: never run it.
        raise UnsafeCheckpointError(
            f"{path} holds objects other than tensors and plain data and was not loaded (it could "
            "run code); use a checkpoint written by `wsi-anomaly train`"
        ) from exc
    except Exception as exc:  # torch raises many types for damaged files (struct.error, …)
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({exc.__class__.__name__}); "
            "it may be truncated or not a checkpoint at all"
        ) from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a wsi-anomaly checkpoint (train one with `wsi-anomaly train`)"
        )
    if data.get("format_version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {data.get('format_version')} (written by wsi-anomaly "
            f"{data.get('software_version')}); this version reads format {CHECKPOINT_VERSION} — "
            "retrain, or use the version that wrote it"
        )
    if expect_model is not None and data.get("model_name") != expect_model:
        raise CheckpointError(
            f"{path} holds a {data.get('model_name')!r} model, not {expect_model!r}"
        )
    if require_complete and not data.get("complete"):
        raise CheckpointError(
            f"{path} is an unfinished training checkpoint; finish it with "
            "`wsi-anomaly train ... --resume`"
        )
    check_record(data, path, require_complete)
    return data
