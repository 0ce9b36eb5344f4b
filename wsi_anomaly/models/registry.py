"""The model families by name: what ``model.name`` in a config and ``model_name`` in a
checkpoint refer to.

Importing this module does not import torch: the families' config sections are plain
dataclasses in torch-free modules (``*_config.py``), and a family's class (model code, torch) is
imported the first time :func:`get_family` or :data:`FAMILIES` is asked for it. So a YAML config
loads, validates and saves without the model code.

A new family is one field of :class:`FamilySettings` (its config section, named after the
family) and one entry of :data:`FAMILY_CLASSES`.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from wsi_anomaly.models.atacnet_config import AtacNetConfig
from wsi_anomaly.models.haloae_config import HaloAEConfig
from wsi_anomaly.models.patchcore_config import PatchCoreConfig
from wsi_anomaly.models.tile_bank_config import TileBankConfig

if TYPE_CHECKING:
    from wsi_anomaly.models.family import ModelFamily

#: The family a run trains when neither ``--family`` nor the config names one.
DEFAULT_FAMILY = "haloae"


@dataclass
class FamilySettings:
    """Every family's own config section: one field per family, named after it (the section's
    key in the YAML files). The shared sections (``model``, ``train``) hold only what every
    family uses."""

    haloae: HaloAEConfig = field(default_factory=HaloAEConfig)
    atacnet: AtacNetConfig = field(default_factory=AtacNetConfig)
    patchcore: PatchCoreConfig = field(default_factory=PatchCoreConfig)
    features_knn: TileBankConfig = field(default_factory=TileBankConfig)


#: Where each family's class lives (``module:Class``), imported on first use.
FAMILY_CLASSES: dict[str, str] = {
    "haloae": "wsi_anomaly.models.haloae_family:HaloAEFamily",
    "atacnet": "wsi_anomaly.models.atacnet_family:AtacNetFamily",
    "patchcore": "wsi_anomaly.models.patchcore_family:PatchCoreFamily",
    "features-knn": "wsi_anomaly.models.tile_bank_family:TileBankFamily",
}


class _Families(MutableMapping[str, "ModelFamily"]):
    """Name → family instance, each imported and built when first looked up. Families added
    by assignment (tests register their own) are kept as given."""

    def __init__(self, classes: dict[str, str]) -> None:
        self._classes = dict(classes)
        self._loaded: dict[str, ModelFamily] = {}

    def __getitem__(self, name: str) -> ModelFamily:
        if name not in self._loaded:
            module, _, cls = self._classes[name].partition(":")
            self._loaded[name] = getattr(importlib.import_module(module), cls)()
        return self._loaded[name]

    def __setitem__(self, name: str, family: ModelFamily) -> None:
        self._loaded[name] = family

    def __delitem__(self, name: str) -> None:
        if name not in self:
            raise KeyError(name)
        self._loaded.pop(name, None)
        self._classes.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._classes or name in self._loaded

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys([*self._classes, *self._loaded]))

    def __len__(self) -> int:
        return len(set(self._classes) | set(self._loaded))


FAMILIES: MutableMapping[str, ModelFamily] = _Families(FAMILY_CLASSES)


def family_names() -> list[str]:
    """Every registered family's name, sorted (imports no model code)."""
    return sorted(FAMILIES)


def get_family(name: str) -> ModelFamily:
    """The family called ``name``; ``ValueError`` listing the known ones otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model {name!r} (available: {', '.join(family_names())})")
    return FAMILIES[name]


def family_sections() -> Iterator[tuple[str, type]]:
    """``(section key, dataclass)`` of every family's own config section (no model code)."""
    hints = typing.get_type_hints(FamilySettings)
    for f in dataclasses.fields(FamilySettings):
        yield f.name, hints[f.name]
