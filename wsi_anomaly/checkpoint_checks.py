"""Checks of an untrusted checkpoint, made before anything is inflated or any model is built.

Three steps, each its own function, each failing with one line that names the culprit:

1. :func:`check_archive` — on the file alone: its size, and (``torch.save`` writes a zip
   archive) the sizes its central directory declares, so nothing is decompressed that could
   inflate far beyond the file (a "zip bomb" record).
2. :func:`check_record` — on what ``torch.load(weights_only=True)`` gave: the plain data types
   of the record's fields, the state dict's entries, and a calibration that is present and
   finite.
3. :func:`check_state_dict` — against the model the record's family would build: the state
   dict's keys, shapes and dtypes are compared with the model built on the ``meta`` device (no
   memory, no weights), and every floating-point weight must be finite.

Nothing here knows a family by name: step 3 asks the family for its model.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

#: The largest checkpoint file read (the biggest model the project trains is far smaller).
MAX_CHECKPOINT_BYTES = 4 << 30
#: The pickled record (everything but the tensors' bytes) is small: field names, the config,
#: the calibration's numbers.
MAX_RECORD_BYTES = 64 << 20
#: ``torch.save`` stores its entries uncompressed; an archive may declare at most this many
#: times its own size (plus a little) once inflated.
MAX_INFLATION = 4
#: Entries an archive may hold (one per tensor storage, plus a few).
MAX_ENTRIES = 100_000


def check_archive(path: Path) -> None:
    """Refuse a checkpoint whose file, or whose declared contents, are too large to read.

    Raises:
        CheckpointError naming the file and what is too large.
    """
    size = path.stat().st_size
    if size > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(
            f"{path} is {size / 2**30:.1f} GiB; checkpoints are at most "
            f"{MAX_CHECKPOINT_BYTES / 2**30:.0f} GiB (is it a checkpoint?)"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise CheckpointError(
            f"{path} is not a readable checkpoint (not a torch zip archive: {exc}); it may be "
            "truncated or not a checkpoint at all"
        ) from None
    if len(entries) > MAX_ENTRIES:
        raise CheckpointError(f"{path} holds {len(entries)} entries; not a checkpoint")
    total = sum(e.file_size for e in entries)
    if total > MAX_INFLATION * size + (16 << 20):
        raise CheckpointError(
            f"{path} would inflate to {total / 2**20:.0f} MiB from {size / 2**20:.1f} MiB; "
            "refused unread (checkpoints are stored uncompressed)"
        )
    for entry in entries:
        if entry.filename.endswith(".pkl") and entry.file_size > MAX_RECORD_BYTES:
            raise CheckpointError(
                f"{path}: its record {entry.filename} is {entry.file_size / 2**20:.0f} MiB "
                f"(at most {MAX_RECORD_BYTES >> 20} MiB); refused unread"
            )


#: The record's fields every checkpoint has, and their plain types.
REQUIRED_FIELDS: dict[str, tuple[type, ...]] = {
    "model_name": (str,),
    "config": (dict,),
    "state_dict": (dict,),
}
#: Fields that may be absent, and their types when present.
OPTIONAL_FIELDS: dict[str, tuple[type, ...]] = {
    "software_version": (str,),
    "backbone": (str,),
    "tile_mpp": (int, float, type(None)),
    "calibration": (dict, type(None)),
    "complete": (bool,),
    "train_state": (dict,),
    "tile_features": (dict,),
}
#: Calibration entries the package reads whatever the family: score quantiles by name.
QUANTILE_FIELDS = ("score_quantiles", "max_score_quantiles")


def _type_names(types: tuple[type, ...]) -> str:
    return " or ".join("None" if t is type(None) else t.__name__ for t in types)


def check_record(data: Mapping[str, Any], path: Path, require_complete: bool) -> None:
    """Check the plain data of a loaded record (its format fields are checked by the loader).

    Raises:
        CheckpointError: a field of the wrong type, a state-dict entry that is not a tensor, a
        tile resolution that is not a finite positive number, or (``require_complete``) a
        calibration that is missing, malformed or not finite.
    """
    for fields, required in ((REQUIRED_FIELDS, True), (OPTIONAL_FIELDS, False)):
        for key, types in fields.items():
            if key not in data:
                if required:
                    raise CheckpointError(f"{path} has no {key!r}; not a complete checkpoint")
                continue
            value = data[key]
            # bool is an int: accept it only where bool is meant.
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise CheckpointError(
                    f"{path}: {key!r} must be {_type_names(types)}, "
                    f"not {type(value).__name__}; the checkpoint is damaged or not ours"
                )
    for key, value in data["state_dict"].items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: state_dict entry {key!r} is a {type(value).__name__}, not a tensor"
            )
    mpp = data.get("tile_mpp")
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise CheckpointError(f"{path}: tile_mpp {mpp!r} is not a finite positive µm/px")
    if require_complete:
        check_calibration(data.get("calibration"), path)


def check_calibration(calibration: Any, path: Path) -> None:
    """A finished checkpoint's calibration: present, its score quantiles finite numbers, and
    every number and tensor in it finite."""
    if not isinstance(calibration, dict) or not calibration:
        raise CheckpointError(
            f"{path} has no calibration; it is not a finished checkpoint (train it again)"
        )
    for key in QUANTILE_FIELDS:
        quantiles = calibration.get(key)
        if not isinstance(quantiles, dict) or not quantiles:
            raise CheckpointError(f"{path}: calibration.{key} is missing or not a mapping")
        for q, value in quantiles.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise CheckpointError(
                    f"{path}: calibration.{key}[{q!r}] is a {type(value).__name__}, not a number"
                )
    _check_finite(calibration, f"{path}: calibration")


def _check_finite(value: Any, where: str, depth: int = 0) -> None:
    if depth > 16:
        raise CheckpointError(f"{where} is nested too deeply")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{where}.{key}", depth + 1)
    elif isinstance(value, (list, tuple)):
        for k, item in enumerate(value):
            _check_finite(item, f"{where}[{k}]", depth + 1)
    elif isinstance(value, float) and not math.isfinite(value):
        raise CheckpointError(f"{where} is {value} (not finite); retrain the model")
    elif isinstance(value, torch.Tensor) and value.is_floating_point():
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            raise CheckpointError(
                f"{where} holds {bad} non-finite value(s) of {value.numel()}; retrain the model"
            )


def expected_state(
    family: Any, config: Any, backbone_identity: str
) -> dict[str, torch.Tensor] | None:
    """The state dict (keys, shapes, dtypes; no data) of the model ``family`` restores for a
    checkpoint — built on the ``meta`` device, so nothing is allocated or initialised."""
    return family.expected_state(config, backbone_identity)


def check_state_dict(
    state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], path: Path
) -> None:
    """Compare a checkpoint's weights with the model's (keys, shapes, dtypes); every
    floating-point weight must be finite.

    Raises:
        CheckpointError naming the first keys that are missing or extra, or the first tensor of
        another shape or dtype, or holding NaN or infinity.
    """
    missing = [k for k in expected if k not in state_dict]
    extra = [k for k in state_dict if k not in expected]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({', '.join(missing[:3])}…)")
        if extra:
            parts.append(f"{len(extra)} unexpected ({', '.join(extra[:3])}…)")
        raise CheckpointError(
            f"{path}: its weights do not fit its model ({'; '.join(parts)}); the checkpoint "
            "is damaged or holds another model's weights"
        )
    for key, ref in expected.items():
        value = state_dict[key]
        # a 0 in the model's shape stands for any length (a memory bank's rows)
        if value.ndim != ref.ndim or any(
            r not in (0, v) for v, r in zip(value.shape, ref.shape, strict=True)
        ):
            raise CheckpointError(
                f"{path}: weight {key} has shape {tuple(value.shape)}, the model needs "
                f"{tuple(ref.shape)}; the checkpoint is damaged or of another configuration"
            )
        if value.dtype != ref.dtype:
            raise CheckpointError(
                f"{path}: weight {key} is {value.dtype}, the model needs {ref.dtype}"
            )
    for key, value in state_dict.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(
                f"{path}: weight {key} holds NaN or infinite values; the model would score "
                "every tile non-finite (retrain, or use an earlier checkpoint)"
            )
