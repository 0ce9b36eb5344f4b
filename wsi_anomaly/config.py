"""Typed configuration: dataclasses loaded from YAML presets and overridden on the command line.

The resolved configuration is saved next to every output and inside every checkpoint.
Presets live in ``configs/`` (``haloae_paper.yaml``, ``haloae_fast.yaml``); ``--config NAME``
finds a preset by name, ``--config FILE`` reads any YAML file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import InputNotFoundError, InvalidInputError

PRESET_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class ModelConfig:
    """Architecture knobs. ``name`` selects the model family."""

    name: str = "haloae"
    backbone_weights: str = "imagenet"  # imagenet | random | path to a state-dict file
    attention: str = "halo"             # halo | conv (ablation: plain conv auto-encoder)
    released_mask: bool = False         # reproduce the released inverted halo mask (ablation)


@dataclass
class TrainConfig:
    """Optimisation knobs (paper: Adam 1e-4, wd 1e-5, batch 4, 251 epochs × 3000 samples)."""

    epochs: int = 251
    samples_per_epoch: int = 3000
    batch_size: int = 4                 # originals; each yields two Cut&Paste copies
    lr: float = 1e-4
    weight_decay: float = 1e-5
    loss_weighting: str = "ews"         # ews | equal
    loss_terms: list[str] = field(default_factory=lambda: ["cls", "fm", "im"])
    image_jitter: float = 0.1           # colour jitter of the whole image (histology: 0.05)
    patch_jitter: float = 0.1           # colour jitter of the pasted patch
    workers: int = 2                    # data-loading processes
    checkpoint_every: int = 10          # epochs between resumable checkpoints
    calibration_tiles: int = 2000       # training tiles used for the mean map and score quantiles


@dataclass
class AtacNetConfig:
    """ATAC-Net knobs and its training recipe (used when ``model.name`` is ``atacnet``).

    Where the seed is silent the values follow DevNet's public code (see spec/atacnet.md).
    ``train.workers`` and ``train.calibration_tiles`` are shared with HaloAE.
    """

    variant: str = "atacnet"            # cutmix_bce | weighted_ce | devnet | atacnet
    crop_threshold: float = 0.5         # ω of Algorithm 1 (seed silent)
    topk_ratio: float = 0.1
    margin: float = 5.0
    min_box_px: int = 32
    box_pad_px: int = 8
    image_px: int = 224
    clahe: bool = True
    epochs: int = 50
    steps_per_epoch: int = 20
    batch_size: int = 48                # half normal, half anomalous pool
    lr: float = 2e-4
    weight_decay: float = 1e-5
    lr_step_epochs: int = 10
    lr_gamma: float = 0.1
    grad_clip_norm: float = 1.0
    rotation_degrees: float = 180.0
    real_anomaly_fraction: float = 0.5  # share of the anomalous half drawn from the labelled ones


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    atacnet: AtacNetConfig = field(default_factory=AtacNetConfig)
    tile_px: int = 256
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> "Config":
        t = self.train
        for name in ("epochs", "samples_per_epoch", "batch_size", "checkpoint_every",
                     "calibration_tiles"):
            if getattr(t, name) < 1:
                raise InvalidInputError(f"train.{name} must be at least 1, got {getattr(t, name)}")
        if t.workers < 0:
            raise InvalidInputError("train.workers must be ≥ 0")
        if t.loss_weighting not in ("ews", "equal"):
            raise InvalidInputError(f"train.loss_weighting must be ews or equal, got {t.loss_weighting!r}")
        bad = set(t.loss_terms) - {"cls", "fm", "im"}
        if bad or not t.loss_terms:
            raise InvalidInputError(f"train.loss_terms must be a non-empty subset of cls, fm, im; got {t.loss_terms}")
        if self.model.name not in ("haloae", "atacnet"):
            raise InvalidInputError(f"model.name must be haloae or atacnet, got {self.model.name!r}")
        if self.model.attention not in ("halo", "conv"):
            raise InvalidInputError(f"model.attention must be halo or conv, got {self.model.attention!r}")
        if self.tile_px != 256:
            raise InvalidInputError("tiles are 256×256 (tile_px must be 256)")
        a = self.atacnet
        if a.variant not in ("cutmix_bce", "weighted_ce", "devnet", "atacnet"):
            raise InvalidInputError("atacnet.variant must be cutmix_bce, weighted_ce, devnet or "
                                    f"atacnet, got {a.variant!r}")
        for name in ("epochs", "steps_per_epoch", "lr_step_epochs", "image_px"):
            if getattr(a, name) < 1:
                raise InvalidInputError(f"atacnet.{name} must be at least 1")
        if a.batch_size < 2:
            raise InvalidInputError("atacnet.batch_size must be at least 2 (half normal, half anomalous)")
        if not 0.0 < a.crop_threshold < 1.0:
            raise InvalidInputError("atacnet.crop_threshold must be between 0 and 1")
        return self


def _merge(obj: Any, data: dict[str, Any], where: str) -> Any:
    """Return a copy of dataclass ``obj`` updated from ``data``; unknown keys are errors."""
    known = {f.name: f for f in fields(obj)}
    updates = {}
    for key, value in data.items():
        if key not in known:
            raise InvalidInputError(f"unknown config key {where}{key!r} (known: {', '.join(known)})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise InvalidInputError(f"config key {where}{key} must be a mapping")
            value = _merge(current, value, f"{where}{key}.")
        elif isinstance(current, bool) and not isinstance(value, bool):
            raise InvalidInputError(f"config key {where}{key} must be true or false")
        elif isinstance(current, (int, float)) and not isinstance(current, bool):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise InvalidInputError(f"config key {where}{key} must be a number, got {value!r}")
            value = type(current)(value) if isinstance(current, float) else value
        updates[key] = value
    return dataclasses.replace(obj, **updates)


def resolve_preset(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (PRESET_DIR / name_or_path, PRESET_DIR / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    presets = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
    raise InputNotFoundError(f"config {name_or_path!r} not found (a YAML file, or a preset: {presets})")


def load_config(name_or_path: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults ← preset/YAML file ← ``overrides`` (a nested dict, e.g. from CLI flags)."""
    config = Config()
    if name_or_path:
        path = resolve_preset(name_or_path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise InvalidInputError(f"{path} is not valid YAML ({exc})") from exc
        if not isinstance(data, dict):
            raise InvalidInputError(f"{path}: a config file must be a mapping")
        config = _merge(config, data, "")
    if overrides:
        config = _merge(config, overrides, "")
    return config.validate()


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a :class:`Config` saved with :meth:`Config.to_dict` (e.g. from a checkpoint)."""
    return _merge(Config(), data, "")


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
