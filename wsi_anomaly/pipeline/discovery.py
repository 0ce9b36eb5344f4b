"""Slide discovery: which files of the given files, folders and glob patterns are slides."""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path

from ..errors import InputNotFoundError, InvalidInputError
from ..outputs import os_errors_as_user_errors

SLIDE_SUFFIXES = (
    ".svs",
    ".ndpi",
    ".mrxs",
    ".tif",
    ".tiff",
    ".scn",
    ".vms",
    ".vmu",
    ".bif",
    ".svslide",
    ".dcm",
)


def find_slides(
    inputs: Sequence[str | Path],
    recursive: bool = False,
    skip: Sequence[str | Path] = (),
) -> list[Path]:
    """Slides from files, folders and glob patterns (``**`` matches any depth), in a stable
    order, each file once.

    Folders are read one level deep unless ``recursive``; a recursive search, and a ``**``
    pattern, never enter hidden folders, the folders in ``skip`` (the results folder) or this
    tool's own work folders (``*.partial``, tile stores ``*.zarr``).
    """
    skipped = {Path(s).resolve() for s in skip}
    found: list[Path] = []
    for item in map(str, inputs):
        if any(ch in item for ch in "*?[") and not Path(item).exists():
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise InputNotFoundError(f"no slide matches {item!r}")
            found.extend(
                Path(m)
                for m in matches
                if Path(m).is_file()
                and ("**" not in item or not _in_skipped(Path(m), item, skipped))
            )
        elif Path(item).is_dir():
            found.extend(_slides_in_folder(Path(item), recursive, skipped))
        else:
            found.append(Path(item))  # a missing file is reported per slide, like any error
    seen: set[Path] = set()
    unique: list[Path] = []
    for p in found:
        real = _real_path(p)
        if real not in seen:
            seen.add(real)
            unique.append(p)
    if not unique:
        raise InvalidInputError(
            f"no slides found in {', '.join(map(str, inputs))} "
            f"(looked for {', '.join(SLIDE_SUFFIXES)})"
        )
    return unique


def _real_path(path: Path) -> Path:
    """``path`` resolved; as given (absolute) when it cannot be — a symlink loop, reported per
    slide like any other unreadable slide."""
    try:
        return path.resolve()
    except (RuntimeError, OSError):
        return path.absolute()


def _not_entered(folder: Path, skipped: set[Path]) -> bool:
    """A folder discovery does not search: hidden, a results or work folder of ours."""
    name = folder.name
    return (
        name.startswith(".") or name.endswith((".partial", ".zarr")) or folder.resolve() in skipped
    )


def _in_skipped(path: Path, pattern: str, skipped: set[Path]) -> bool:
    """Whether a glob match lies inside a folder that discovery does not enter, below the
    pattern's fixed start (``/data/.cohort/**/*.svs`` may search a hidden folder it names)."""
    base = Path(pattern)
    while any(ch in str(base) for ch in "*?[") and base != base.parent:
        base = base.parent
    return any(
        _not_entered(parent, skipped)
        for parent in path.parents
        if parent != base and parent.is_relative_to(base)
    )


def _slides_in_folder(
    folder: Path, recursive: bool, skipped: set[Path], visited: set[Path] | None = None
) -> list[Path]:
    """The slides in ``folder`` (and, when ``recursive``, its sub-folders), sorted by path.
    A folder reached twice (a symbolic link back up the tree) is searched once."""
    visited = set() if visited is None else visited
    visited.add(folder.resolve())
    slides: list[Path] = []
    with os_errors_as_user_errors(folder):
        entries = sorted(folder.iterdir())
    for p in entries:
        if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES:
            slides.append(p)
        elif (
            recursive and p.is_dir() and not _not_entered(p, skipped) and p.resolve() not in visited
        ):
            slides.extend(_slides_in_folder(p, recursive, skipped, visited))
    return sorted(slides)
