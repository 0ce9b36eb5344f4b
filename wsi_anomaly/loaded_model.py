"""A trained model as read from its checkpoint, once: its identity and what scoring needs.

:func:`load_model` reads and checks a checkpoint file and hashes it; the :class:`LoadedModel`
it returns is what the scorer restores the model from, and what the heatmap pipeline reads the
tile size and resolution, the calibration (the colour scale) and the identity (recorded with
every result) from. Loading runs no code from the file (see :mod:`wsi_anomaly.checkpoint`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from torch import nn

from .checkpoint import load_checkpoint
from .checkpoint_checks import check_state_dict, expected_state
from .config import Config, config_from_dict
from .errors import CheckpointError
from .hashing import sha256_file
from .models.calibration import Calibration
from .models.family import ModelFamily
from .models.registry import get_family


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A checked checkpoint: the file (``path``, ``sha256``), its family and config, the
    backbone it records, its calibration and its training tiles' resolution and size."""

    path: Path
    sha256: str
    checkpoint: dict[str, Any]  # the checked record (weights included)
    config: Config
    model_name: str
    family: ModelFamily
    backbone: str
    calibration: Calibration
    tile_mpp: float | None  # µm/px of the training tiles (None when unknown)
    tile_px: int  # side of the model's input tiles
    map_px: int  # side of the anomaly maps the model gives

    @property
    def identity(self) -> dict[str, Any]:
        """What to record next to scores so they can be traced to this model."""
        return {
            "model_path": str(self.path.resolve()),
            "model_sha256": self.sha256,
            "model_name": self.model_name,
            "backbone": self.backbone,
            "tile_mpp": self.tile_mpp,
            "software_version": self.checkpoint["software_version"],
        }

    def restore(self, backbone_weights: str | None = None) -> nn.Module:
        """The family's model with the checkpoint's weights, on the CPU, in eval mode.
        ``backbone_weights``: for a family whose checkpoints record the backbone's identity
        instead of holding it; refused when its hash differs."""
        try:
            model = self.family.restore(
                self.config, self.checkpoint["state_dict"], self.backbone, backbone_weights
            )
        except ValueError as exc:
            raise CheckpointError(f"{self.path}: {exc}") from None
        except (RuntimeError, TypeError, KeyError, AttributeError) as exc:
            raise CheckpointError(
                f"{self.path} cannot be restored ({exc.__class__.__name__}: "
                f"{str(exc).splitlines()[0][:200] if str(exc) else 'no detail'})"
            ) from exc
        return model.eval()


def read_model(path: str | Path) -> LoadedModel:
    """Read and check a finished checkpoint and hash its file.

    Raises:
        InputNotFoundError; CheckpointError (and its kinds) for a file that is not a usable
        checkpoint of a known family.
    """
    path = Path(path)
    ckpt = load_checkpoint(path)
    config = config_from_dict(ckpt["config"])
    model_name: str = ckpt["model_name"]
    try:
        family = get_family(model_name)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    backbone: str = ckpt.get("backbone", "unknown")
    # The weights are checked against the family's model before one is built.
    try:
        expected = expected_state(family, config, backbone)
    except (RuntimeError, TypeError, ValueError, KeyError, AttributeError) as exc:
        raise CheckpointError(
            f"{path}: its config does not describe a {model_name} model "
            f"({exc.__class__.__name__}); the checkpoint is damaged or not ours"
        ) from exc
    # (a family without a model to compare with: every weight is still checked finite)
    check_state_dict(ckpt["state_dict"], expected or ckpt["state_dict"], path)
    try:
        calibration = Calibration.from_dict(ckpt["calibration"])
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: {exc}; retrain the model") from None
    return LoadedModel(
        path=path,
        sha256=checkpoint_sha256(path),
        checkpoint=ckpt,
        config=config,
        model_name=model_name,
        family=family,
        backbone=backbone,
        calibration=calibration,
        tile_mpp=ckpt.get("tile_mpp"),
        tile_px=config.tile_px,
        map_px=family.map_size(config),
    )


def load_model(path: str | Path) -> LoadedModel:
    """:func:`read_model`, once per file version in a process: the slides of a run (and a dask
    worker's slides) share one read and one hash of the checkpoint."""
    resolved = Path(path).resolve()
    if not resolved.is_file():
        return read_model(path)  # reports the missing file
    st = resolved.stat()
    return _cached(str(path), str(resolved), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=8)
def _cached(path: str, resolved: str, mtime_ns: int, size: int) -> LoadedModel:
    return read_model(path)


def checkpoint_sha256(path: str | Path) -> str:
    """sha256 of a checkpoint file, computed once per file version in a process (planning a
    slide's identity and reading the model share it)."""
    resolved = Path(path).resolve()
    st = resolved.stat()
    return _cached_sha256(str(resolved), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=8)
def _cached_sha256(resolved: str, mtime_ns: int, size: int) -> str:
    return sha256_file(resolved)
