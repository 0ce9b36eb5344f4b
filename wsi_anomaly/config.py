"""Typed configuration: dataclasses loaded from YAML presets and overridden on the command line.

The resolved configuration is saved next to every output and inside every checkpoint.
Presets live in ``configs/`` (each family's default and fast preset); ``--config NAME`` finds a
preset by name, ``--config FILE`` reads any YAML file.

Sections: ``model`` (``name`` selects the model family, ``backbone_weights``) and ``train`` (run
knobs every family shares: data-loading workers, checkpoint interval, calibration), then one
section per family holding all of that family's own settings, architecture and schedule
(:class:`~wsi_anomaly.models.registry.FamilySettings`), then ``tile_px`` and ``seed``. Every
section validates itself, by type and by range: a mistake is one line naming the key. Loading a
config imports no torch.

Configs written before a family had its own section (its keys in ``model`` or ``train``) are
read as the new layout: each key the family's section lists in ``former_keys`` moves there
(e.g. ``train.epochs`` → ``<family>.epochs``) when the file has no such section; in a file that
has it, the same key in the old place is an error naming where it belongs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import InputNotFoundError, InvalidInputError
from .models.registry import DEFAULT_FAMILY, FamilySettings, family_names, family_sections
from .outputs import write_text
from .untrusted import load_yaml

log = logging.getLogger(__name__)

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
    """Which model family, and where its backbone's weights come from."""

    name: str = DEFAULT_FAMILY
    backbone_weights: str = "imagenet"  # imagenet | random | path to a state-dict file


@dataclass
class TrainConfig:
    """Run knobs every family shares; each family's schedule is in its own section."""

    workers: int = 2  # data-loading processes
    checkpoint_every: int = 0  # a numbered copy of the resume point every N epochs (0: none)
    calibration_tiles: int = 2000  # tiles used for the mean map and score quantiles
    calibration_holdout: float = 0.1  # normal tiles held out of training for the score scale

    def validate(self) -> None:
        """Types were checked on loading; here finiteness and ranges (one line naming the key)."""
        check_finite(self, "train")
        for name in ("calibration_tiles",):
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


def _section_order() -> list[str]:
    """The order sections are written in: a saved config reads top-down, the shared sections,
    then each family's, then the tile size and the seed."""
    return ["model", "train", *(key for key, _ in family_sections()), "tile_px", "seed"]


@dataclass
class Config(FamilySettings):
    """The resolved configuration of a run: the shared sections, every family's own section
    (:class:`~wsi_anomaly.models.registry.FamilySettings`), the tile size and the seed."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tile_px: int = 256
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {key: data[key] for key in _section_order()}

    def validate(self) -> Config:
        """Check every section (each validates itself: types, finiteness, ranges) and the
        family's name; returns ``self``."""
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


def former_keys() -> dict[tuple[str, str], str]:
    """The documented moves from the old layout: ``(old section, key)`` → the family section
    that holds the key now (from each section's ``former_keys``)."""
    moves: dict[tuple[str, str], str] = {}
    for section, section_type in family_sections():
        for old, keys in getattr(section_type, "former_keys", {}).items():
            for key in keys:
                moves[(old, key)] = section
    return moves


def migrate_layout(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``data`` (a config mapping as read) in the current layout, and the moves made.

    A mapping without the family section a key now belongs to is in the old layout: the key
    moves there (``train.epochs`` → ``<family>.epochs``). A mapping that has that section already
    is in the new layout: the key in the old place is a mistake, one line naming where it
    belongs."""
    moved: list[str] = []
    out = dict(data)
    for (old, key), section in former_keys().items():
        values = out.get(old)
        if not isinstance(values, dict) or key not in values:
            continue
        if section in data:
            raise InvalidInputError(
                f"config key {old}.{key} belongs in the {section} section: write it as "
                f"{section}.{key}"
            )
        target = out.get(section)
        out[old] = {k: v for k, v in values.items() if k != key}
        out[section] = {**(target if isinstance(target, dict) else {}), key: values[key]}
        moved.append(f"{old}.{key} → {section}.{key}")
    return out, moved


def _merge_layout(config: Config, data: dict[str, Any], source: str, quiet: bool = False) -> Config:
    data, moved = migrate_layout(data)
    if moved:
        log.log(
            logging.DEBUG if quiet else logging.WARNING,
            "%s uses the old config layout; read as %s",
            source,
            ", ".join(moved),
        )
    merged: Config = _merge(config, data, "")
    return merged


def load_config(name_or_path: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults ← preset/YAML file ← ``overrides`` (a nested dict, e.g. from CLI flags).

    Either may be in the old layout (:func:`migrate_layout`)."""
    config = Config()
    if name_or_path:
        path = resolve_preset(name_or_path)
        data = read_yaml(path) or {}
        if not isinstance(data, dict):
            raise InvalidInputError(f"{path}: a config file must be a mapping")
        config = _merge_layout(config, data, str(path))
    if overrides:
        config = _merge_layout(config, overrides, "the overrides", quiet=True)
    return config.validate()


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a :class:`Config` saved with :meth:`Config.to_dict` (e.g. from a checkpoint),
    old layouts included (:func:`migrate_layout`)."""
    return _merge_layout(Config(), data, "a saved config", quiet=True)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
