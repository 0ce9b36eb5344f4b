"""Typed configuration: dataclasses loaded from YAML presets and overridden on the command line.

The resolved configuration is saved next to every output and inside every checkpoint.
Presets live in ``configs/`` (``haloae_paper.yaml``, ``haloae_fast.yaml``, ``atacnet.yaml``,
``atacnet_fast.yaml``); ``--config NAME`` finds a preset by name, ``--config FILE`` reads any
YAML file.

Sections: ``model`` (``name`` selects the model family), ``train`` (run knobs every family
shares, and HaloAE's schedule), then one section per family that has its own (``atacnet``),
contributed by the family's registry entry in :mod:`wsi_anomaly.models.registry`. Every value is
checked up front, by type and by range: a mistake is one line naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import InputNotFoundError, InvalidInputError
from .models.registry import family_names, family_sections, get_family
from .outputs import write_text
from .untrusted import load_yaml

PRESET_DIR = Path(__file__).resolve().parent / "configs"


def check_finite(section: Any, key: str) -> None:
    """Every number of the dataclass ``section`` (called ``key``) is finite, or one-line
    :class:`InvalidInputError` naming it (a YAML ``.inf`` or ``.nan`` is refused)."""
    for f in fields(section):
        value = getattr(section, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidInputError(f"{key}.{f.name} must be a finite number, got {value}")


@dataclass
class ModelConfig:
    """Which model family, its backbone weights, and HaloAE's architecture switches."""

    name: str = "haloae"
    backbone_weights: str = "imagenet"  # imagenet | random | path to a state-dict file
    attention: str = "halo"  # halo | conv (attention layers replaced by 3×3 convs
    #                                     in the same blocks; no paper counterpart)
    released_mask: bool = False  # reproduction switch: the authors' released halo layer
    #                                     with its inverted mask (the paper's numbers used it)
    released_init: bool = False  # start blocks C, D, E as the released code does
    #                                     (Kaiming-normal fan-in, zero biases); default PyTorch's


@dataclass
class TrainConfig:
    """Run knobs shared by every family (``workers``, ``checkpoint_every``,
    ``calibration_tiles``) and HaloAE's schedule (the HaloAE paper: Adam 1e-4, wd 1e-5,
    batch 4, 251 epochs × 3000 samples)."""

    epochs: int = 251
    samples_per_epoch: int = 3000
    batch_size: int = 4  # originals; each yields two Cut&Paste copies
    lr: float = 1e-4
    weight_decay: float = 1e-5
    loss_weighting: str = "ews"  # ews | equal (1/n for each of the n active terms)
    # A subset is a loss ablation: the weights are renormalised over the active terms (sum 1).
    loss_terms: list[str] = field(default_factory=lambda: ["cls", "fm", "im"])
    image_jitter: float = 0.1  # colour jitter of the whole image (histology: 0.05)
    patch_jitter: float = 0.1  # colour jitter of the pasted patch
    workers: int = 2  # data-loading processes
    checkpoint_every: int = 0  # a numbered copy of the resume point every N epochs (0: none)
    calibration_tiles: int = 2000  # tiles used for the mean map and score quantiles
    calibration_holdout: float = 0.1  # normal tiles held out of training for the score scale

    def validate(self) -> None:
        """Types were checked on loading; here finiteness and ranges (one line naming the key)."""
        check_finite(self, "train")
        for name in (
            "epochs",
            "samples_per_epoch",
            "batch_size",
            "calibration_tiles",
        ):
            if getattr(self, name) < 1:
                raise InvalidInputError(
                    f"train.{name} must be at least 1, got {getattr(self, name)}"
                )
        if self.workers < 0:
            raise InvalidInputError("train.workers must be ≥ 0")
        if self.checkpoint_every < 0:
            raise InvalidInputError(
                f"train.checkpoint_every must be ≥ 0 (0: no numbered copies), "
                f"got {self.checkpoint_every}"
            )
        if not 0.0 <= self.calibration_holdout < 1.0:
            raise InvalidInputError(
                f"train.calibration_holdout must be in [0, 1), got {self.calibration_holdout}"
            )


def _to_dict(self: Any) -> dict[str, Any]:
    return asdict(self)


def _validate(self: Any) -> Any:
    """Check every section (each validates itself: types, finiteness, ranges) and the family's
    settings; returns ``self``."""
    for section in fields(self):
        value = getattr(self, section.name)
        if dataclasses.is_dataclass(value):
            check_finite(value, section.name)
            own = getattr(value, "validate", None)
            if callable(own):
                try:
                    own()
                except ValueError as exc:
                    raise InvalidInputError(str(exc)) from None
    _check_positive(self)
    if self.model.name not in family_names():
        raise InvalidInputError(
            f"model.name must be one of {', '.join(family_names())}, got {self.model.name!r}"
        )
    if self.tile_px != 256:
        raise InvalidInputError("tiles are 256×256 (tile_px must be 256)")
    try:
        get_family(self.model.name).validate(self)
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from None
    return self


#: Values that must be positive (> 0) or non-negative (≥ 0) wherever a section has them.
_POSITIVE = ("lr", "lr_gamma", "grad_clip_norm", "margin")
_NON_NEGATIVE = (
    "weight_decay",
    "image_jitter",
    "patch_jitter",
    "rotation_degrees",
    "min_box_px",
    "box_pad_px",
)


def _check_positive(config: Any) -> None:
    for section in fields(config):
        value = getattr(config, section.name)
        if not dataclasses.is_dataclass(value):
            continue
        for name in _POSITIVE:
            if hasattr(value, name) and not getattr(value, name) > 0:
                raise InvalidInputError(
                    f"{section.name}.{name} must be greater than 0, got {getattr(value, name)}"
                )
        for name in _NON_NEGATIVE:
            if hasattr(value, name) and not getattr(value, name) >= 0:
                raise InvalidInputError(
                    f"{section.name}.{name} must be 0 or more, got {getattr(value, name)}"
                )


def _make_config_class() -> type:
    """``Config``: ``model``, ``train``, each family's own section, ``tile_px``, ``seed``."""
    spec: list[Any] = [
        ("model", ModelConfig, field(default_factory=ModelConfig)),
        ("train", TrainConfig, field(default_factory=TrainConfig)),
    ]
    for key, section_type in family_sections():
        spec.append((key, section_type, field(default_factory=section_type)))
    spec += [("tile_px", int, field(default=256)), ("seed", int, field(default=0))]
    cls = dataclasses.make_dataclass(
        "Config",
        spec,
        namespace={
            "to_dict": _to_dict,
            "validate": _validate,
            "__doc__": "The resolved configuration of a run.",
        },
    )
    cls.__module__ = __name__
    return cls


Config: Any = _make_config_class()


def _kind(hint: Any) -> str:
    if dataclasses.is_dataclass(hint):
        return "section"
    if typing.get_origin(hint) is list:
        return "list"
    return {bool: "bool", int: "int", float: "float", str: "str"}.get(hint, "any")


def _check_value(where: str, hint: Any, value: Any) -> Any:
    """``value`` as the type ``hint`` asks for, or one-line :class:`InvalidInputError`."""
    kind = _kind(hint)
    if kind == "bool":
        if not isinstance(value, bool):
            raise InvalidInputError(f"config key {where} must be true or false, got {value!r}")
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidInputError(f"config key {where} must be a whole number, got {value!r}")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidInputError(f"config key {where} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise InvalidInputError(f"config key {where} must be a finite number, got {value!r}")
    elif kind == "str":
        if not isinstance(value, str):
            raise InvalidInputError(f"config key {where} must be a string, got {value!r}")
    elif kind == "list":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidInputError(f"config key {where} must be a list of names, got {value!r}")
        value = list(value)
    return value


def _merge(obj: Any, data: dict[str, Any], where: str) -> Any:
    """Return a copy of dataclass ``obj`` updated from ``data``; unknown keys are errors."""
    known = {f.name: f for f in fields(obj)}
    hints = typing.get_type_hints(type(obj))
    updates = {}
    for key, value in data.items():
        if key not in known:
            raise InvalidInputError(
                f"unknown config key {where}{key!r} (known: {', '.join(known)})"
            )
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise InvalidInputError(f"config key {where}{key} must be a mapping")
            value = _merge(current, value, f"{where}{key}.")
        else:
            value = _check_value(f"{where}{key}", hints.get(key), value)
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
    raise InputNotFoundError(
        f"config {name_or_path!r} not found (a YAML file, or a preset: {presets})"
    )


def config_family(name_or_path: str) -> str | None:
    """The model family a preset or YAML config names (``model.name``), None where it names
    none."""
    path = resolve_preset(name_or_path)
    data = read_yaml(path) or {}
    model = data.get("model") if isinstance(data, dict) else None
    name = model.get("name") if isinstance(model, dict) else None
    return name if isinstance(name, str) and name else None


def read_yaml(path: Path) -> Any:
    """Parse a UTF-8 YAML file with the safe loader, bounded in size, aliases and nesting
    (:func:`wsi_anomaly.untrusted.load_yaml`); errors name the file and line."""
    return load_yaml(path, "config")


def load_config(name_or_path: str | None = None, overrides: dict[str, Any] | None = None) -> Any:
    """Defaults ← preset/YAML file ← ``overrides`` (a nested dict, e.g. from CLI flags)."""
    config = Config()
    if name_or_path:
        path = resolve_preset(name_or_path)
        data = read_yaml(path) or {}
        if not isinstance(data, dict):
            raise InvalidInputError(f"{path}: a config file must be a mapping")
        config = _merge(config, data, "")
    if overrides:
        config = _merge(config, overrides, "")
    return config.validate()


def config_from_dict(data: dict[str, Any]) -> Any:
    """Rebuild a :class:`Config` saved with :meth:`Config.to_dict` (e.g. from a checkpoint)."""
    return _merge(Config(), data, "")


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
