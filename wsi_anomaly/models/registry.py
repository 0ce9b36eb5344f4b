"""The model families by name: what ``model.name`` in a config and ``model_name`` in a
checkpoint refer to. A new family is one entry in :data:`FAMILIES`."""

from __future__ import annotations

from collections.abc import Iterator

from .atacnet_family import AtacNetFamily
from .family import ModelFamily
from .haloae_family import HaloAEFamily
from .patchcore_family import PatchCoreFamily
from .tile_bank_family import TileBankFamily

FAMILIES: dict[str, ModelFamily] = {
    f.name: f for f in (HaloAEFamily(), AtacNetFamily(), PatchCoreFamily(), TileBankFamily())
}


def family_names() -> list[str]:
    """Every registered family's name, sorted."""
    return sorted(FAMILIES)


def get_family(name: str) -> ModelFamily:
    """The family called ``name``; ``ValueError`` listing the known ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r} (available: {', '.join(family_names())})"
        ) from None


def family_sections() -> Iterator[tuple[str, type]]:
    """``(section key, dataclass)`` of every family that has its own config section."""
    for family in FAMILIES.values():
        if family.section is not None and family.section_type is not None:
            yield family.section, family.section_type
