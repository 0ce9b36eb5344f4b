"""Where TRIDENT and CLAM put their feature files, and the training vectors they hold.

Layouts (one ``.h5`` per slide, named after the slide's file name without its extension):

- TRIDENT: ``<job_dir>/<mag>x_<size>px_<overlap>px_overlap/features_<encoder>/<slide>.h5``;
- CLAM (``extract_features_fp.py``): ``<feat_dir>/h5_files/<slide>.h5`` (and ``pt_files/``).

A folder given with ``--features`` may be any level of these: the folder that holds the ``.h5``
files, a CLAM feature folder (``h5_files/`` inside), a TRIDENT patching folder
(``features_<encoder>/`` inside) or a TRIDENT job folder (``*/features_<encoder>/``). The first
of those levels that has files is used; two encoders' folders at that level are ambiguous (name
one of them).

Interface:

- :func:`feature_file_for_slide` ``(slide, sources)`` → the slide's ``.h5`` path.
- :func:`training_feature_files` ``(sources)`` → every ``.h5`` file the sources hold, sorted.
- :func:`open_training_features` ``(sources)`` → a ``ConcatDataset`` of
  :class:`FeatureFileDataset` (one per file, ``(D,)`` float32 tensors, one file in memory at a
  time) whose ``tile_features`` attribute is :func:`source_record` of the files.
- :func:`first_overlap` ``(coords, step_px)``: two tiles closer than the grid step in both
  axes (cut on another grid), or None.
- :func:`source_record` ``(files)``: what the files say about their encoder, feature width and
  tile geometry, checked to agree across files (one-line
  :class:`~wsi_anomaly.errors.InvalidInputError` otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from ..errors import InputNotFoundError, InvalidInputError
from .features_h5 import TileFeatures, read_tile_features

__all__ = [
    "FeatureFileDataset",
    "feature_file_for_slide",
    "first_overlap",
    "open_training_features",
    "source_record",
    "training_feature_files",
]

#: The folder levels searched below a ``--features`` folder, in order.
_LEVELS = (".", "h5_files", "features_*", "*/features_*")


def _levels(folder: Path) -> list[tuple[str, list[Path]]]:
    """``(pattern, folders)`` of every layout level below ``folder`` that exists."""
    found = []
    for pattern in _LEVELS:
        folders = [folder] if pattern == "." else sorted(p for p in folder.glob(pattern))
        folders = [p for p in folders if p.is_dir()]
        if folders:
            found.append((pattern, folders))
    return found


def _ambiguous(folder: Path, where: list[Path], what: str) -> InvalidInputError:
    shown = ", ".join(str(p) for p in where[:3]) + (" …" if len(where) > 3 else "")
    return InvalidInputError(
        f"--features {folder} holds {what} in more than one folder ({shown}): several "
        "encoders or patch settings; pass the one folder to use"
    )


def feature_file_for_slide(slide: str | Path, sources: Sequence[str | Path]) -> Path:
    """The features file of ``slide`` among ``sources`` (folders, or ``.h5`` files named after
    slides).

    Raises:
        InputNotFoundError: no source holds ``<slide stem>.h5``.
        InvalidInputError: a folder holds it at one level in more than one place.
    """
    stem = Path(slide).stem
    looked: list[str] = []
    for source in map(Path, sources):
        if source.is_file():
            if source.stem == stem:
                return source
            continue
        if not source.is_dir():
            raise InputNotFoundError(f"--features {source} does not exist")
        for pattern, folders in _levels(source):
            hits = [f / f"{stem}.h5" for f in folders if (f / f"{stem}.h5").is_file()]
            if len(hits) > 1:
                raise _ambiguous(source, [h.parent for h in hits], f"{stem}.h5")
            if hits:
                return hits[0]
            looked.append(str(source / pattern / f"{stem}.h5"))
    raise InputNotFoundError(
        f"no features file for {Path(slide).name}: looked for {', '.join(looked) or stem + '.h5'}"
    )


def training_feature_files(sources: Sequence[str | Path]) -> list[Path]:
    """Every ``.h5`` features file of ``sources`` (files, or folders at any layout level)."""
    files: list[Path] = []
    for source in map(Path, sources):
        if source.is_file():
            files.append(source)
            continue
        if not source.is_dir():
            raise InputNotFoundError(f"--features {source} does not exist")
        for _, folders in _levels(source):
            holding = [f for f in folders if any(f.glob("*.h5"))]
            if len(holding) > 1:
                raise _ambiguous(source, holding, ".h5 files")
            if holding:
                files.extend(sorted(holding[0].glob("*.h5")))
                break
        else:
            raise InputNotFoundError(
                f"--features {source} holds no .h5 features files (looked in "
                f"{', '.join(str(source / p) for p in _LEVELS)})"
            )
    unique = list(dict.fromkeys(p.resolve() for p in files))
    return unique


def first_overlap(coords: np.ndarray, step_px: int) -> tuple[int, int] | None:
    """Two tiles (indices) closer than ``step_px`` in both x and y — their cells overlap — or
    None. ``coords``: ``(N, 2)`` level-0 top-left corners. Tiles are bucketed by cell, so only
    neighbouring cells are compared (linear in N for tiles on grids)."""
    cells: dict[tuple[int, int], list[int]] = {}
    for i, (cx, cy) in enumerate((coords // step_px).tolist()):
        cells.setdefault((cx, cy), []).append(i)
    xy = coords.tolist()
    for (cx, cy), members in cells.items():
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                for j in cells.get((cx + dx, cy + dy), ()):
                    for i in members:
                        if i < j and (
                            abs(xy[i][0] - xy[j][0]) < step_px
                            and abs(xy[i][1] - xy[j][1]) < step_px
                        ):
                            return i, j
    return None


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


@dataclass(frozen=True)
class _Header:
    n: int
    record: dict[str, Any]


def _header(tiles: TileFeatures) -> _Header:
    """What one file says about its vectors (plain values only: they go into checkpoints)."""
    attrs = tiles.attrs
    return _Header(
        len(tiles),
        {
            "encoder": tiles.encoder,
            "dim": tiles.dim,
            "patch_size_level0": tiles.patch_size_level0,
            "patch_size": _number(attrs.get("patch_size")),
            "target_magnification": _number(attrs.get("target_magnification")),
        },
    )


#: Keys of the record that must agree across files (when the files record them).
_AGREE = ("encoder", "dim", "patch_size", "target_magnification")


def source_record(headers: Sequence[tuple[Path, dict[str, Any]]]) -> dict[str, Any]:
    """One record for files whose records (``(path, record)``) agree on encoder, width, patch
    size and magnification; the level-0 tile side only when every file has the same."""
    first_path, first = headers[0]
    for path, record in headers[1:]:
        for key in _AGREE:
            a, b = first.get(key), record.get(key)
            if a is not None and b is not None and a != b:
                raise InvalidInputError(
                    f"{path} has {key} {b!r} but {first_path} has {a!r}: train on the features "
                    "of one encoder and one patch setting"
                )
    out = dict(first)
    for key in _AGREE:
        if out.get(key) is None:
            out[key] = next((r[key] for _, r in headers if r.get(key) is not None), None)
    sides = {r.get("patch_size_level0") for _, r in headers}
    out["patch_size_level0"] = sides.pop() if len(sides) == 1 else None
    out["n_files"] = len(headers)
    return out


class _OneFile:
    """The vectors of the one file in memory (shared by the datasets of one collection)."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.features: np.ndarray | None = None

    def get(self, path: Path) -> np.ndarray:
        if self.path != path or self.features is None:
            self.features = None  # the old file goes before the new one comes
            self.features = read_tile_features(path).features
            self.path = path
        return self.features


class FeatureFileDataset(Dataset):
    """The tile vectors of one features file: ``(D,)`` float32 tensors, read lazily."""

    def __init__(self, path: Path, n: int, record: dict[str, Any], cache: _OneFile):
        self.path = path
        self.n = n
        self.tile_features = record
        self._cache = cache

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self._cache.get(self.path)[index])


def open_training_features(sources: Sequence[str | Path]) -> ConcatDataset:
    """The normal tiles' vectors of every features file of ``sources`` (see the module's
    description), checked file by file (one file in memory at a time)."""
    files = training_feature_files(sources)
    headers: list[tuple[Path, _Header]] = []
    for path in files:
        header = _header(read_tile_features(path))
        if header.n == 0:
            continue
        headers.append((path, header))
    if not headers:
        raise InvalidInputError(
            f"no tile vectors in {', '.join(map(str, sources))} (every file is empty)"
        )
    record = source_record([(p, h.record) for p, h in headers])
    record["n_tiles"] = sum(h.n for _, h in headers)
    cache = _OneFile()
    parts = [FeatureFileDataset(path, h.n, record, cache) for path, h in headers]
    dataset: ConcatDataset[torch.Tensor] = ConcatDataset(parts)
    dataset.tile_features = record  # type: ignore[attr-defined]
    return dataset
