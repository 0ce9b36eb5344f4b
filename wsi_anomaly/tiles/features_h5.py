"""Tile features other tools extracted: the ``.h5`` files of TRIDENT and CLAM.

Both write one file per slide with two datasets: ``features`` ``(N, D)`` (one vector per tile,
float) and ``coords`` ``(N, 2)`` (the level-0 pixel ``(x, y)`` of each tile's top-left corner, in
the same order). TRIDENT (``trident/IO.py``, ``WSI.extract_patch_features``) stores the patching
settings as attributes of ``coords``: ``patch_size`` (px at the target magnification),
``patch_size_level0``, ``level0_magnification``, ``target_magnification``, ``overlap``,
``name``, ``level0_width``, ``level0_height``, and the encoder's name as attribute ``encoder``
of ``features``. CLAM's ``extract_features_fp.py`` writes the two datasets without attributes;
its patch files (``create_patches_fp.py``) carry ``patch_size``, ``patch_level``,
``downsample``, ``level_dim`` and ``name`` on ``coords``, so the tile side at level 0 is
``patch_size × downsample[0]`` when they are present and must otherwise be given.

Interface:

- :func:`read_tile_features` ``(path, max_tiles=2_000_000, max_dim=16_384,
  max_bytes=8 GiB)`` → :class:`TileFeatures`: ``features`` float32 ``(N, D)``, ``coords`` int64
  ``(N, 2)`` (level-0 px, top-left ``(x, y)``), ``patch_size_level0`` (int or ``None``),
  ``level0_size`` (``(width, height)`` the extractor saw, or ``None``), ``encoder`` (str or
  ``None``), ``attrs`` (``coords``' attributes as plain Python values), ``path``.
  Refuses (one-line :class:`~wsi_anomaly.errors.InvalidInputError`) files that are not HDF5,
  miss a dataset, have shapes that disagree, are larger than the bounds (checked from the
  shapes, before any data is read), hold non-finite features or non-integral or negative
  coordinates. Needs h5py (``pip install 'wsi-anomaly[export]'``).
- :func:`check_coordinates` ``(tiles, width_px, height_px, patch_size_level0=None,
  step_px=None, origin_px=(0, 0))``: the coordinates belong to a slide of that level-0 size
  (every tile's top-left corner inside it, no tile twice, and the extractor's recorded slide
  size, when there is one, equal to it) and, with ``step_px``, lie on the grid
  ``origin + k × step``; otherwise one-line :class:`~wsi_anomaly.errors.InvalidInputError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputNotFoundError, InvalidInputError

__all__ = ["TileFeatures", "check_coordinates", "read_tile_features"]

#: rows of ``features`` read at a time while converting and checking them
_CHUNK_ROWS = 65_536


@dataclass(frozen=True)
class TileFeatures:
    """One slide's tile features as TRIDENT or CLAM wrote them (see the module docstring)."""

    features: np.ndarray
    coords: np.ndarray
    patch_size_level0: int | None
    level0_size: tuple[int, int] | None
    encoder: str | None
    attrs: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        """Feature width ``D``."""
        return int(self.features.shape[1])


def _plain(value: Any) -> Any:
    """An HDF5 attribute as a plain Python value (numbers, strings, lists)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _positive_int(value: Any) -> int | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not np.isfinite(number) or number <= 0 or number != int(number):
        return None
    return int(number)


def _tile_side(attrs: dict[str, Any]) -> int | None:
    if "patch_size_level0" in attrs:  # TRIDENT
        return _positive_int(attrs["patch_size_level0"])
    size, downsample = attrs.get("patch_size"), attrs.get("downsample")
    if size is not None and downsample is not None:  # CLAM's patch attributes
        factor = downsample[0] if isinstance(downsample, list) else downsample
        side = _positive_int(size)
        try:
            scaled = None if side is None else side * float(factor)
        except (TypeError, ValueError):
            scaled = None
        return _positive_int(scaled) if scaled is not None else None
    return None


def read_tile_features(
    path: str | Path,
    max_tiles: int = 2_000_000,
    max_dim: int = 16_384,
    max_bytes: int = 8 << 30,
) -> TileFeatures:
    """Read and validate a TRIDENT/CLAM features file (see the module docstring).

    Raises:
        InputNotFoundError: no such file.
        InvalidInputError: h5py missing, not an HDF5 file, datasets missing or of the wrong
            shape, beyond the bounds, non-finite features, bad coordinates.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"features file not found: {str(path)!r}")
    try:
        import h5py
    except ImportError:
        raise InvalidInputError(
            "reading TRIDENT/CLAM feature .h5 files needs h5py: pip install 'wsi-anomaly[export]'"
        ) from None
    name = repr(str(path))
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise InvalidInputError(
            f"{name} is not a readable HDF5 file ({type(exc).__name__}); expected a TRIDENT or "
            "CLAM features .h5"
        ) from None
    with handle:
        datasets = {}
        for key in ("features", "coords"):
            item = handle.get(key)
            if not isinstance(item, h5py.Dataset):
                raise InvalidInputError(
                    f"{name} has no {key!r} dataset; a TRIDENT or CLAM features file holds "
                    "'features' (N, D) and 'coords' (N, 2)"
                )
            datasets[key] = item
        feats, coords = datasets["features"], datasets["coords"]
        if feats.ndim == 3 and feats.shape[0] == 1:  # (1, N, D): a batch axis left in
            n, dim = int(feats.shape[1]), int(feats.shape[2])
        elif feats.ndim == 2:
            n, dim = int(feats.shape[0]), int(feats.shape[1])
        else:
            raise InvalidInputError(f"{name}: 'features' has shape {feats.shape}, expected (N, D)")
        if coords.ndim != 2 or coords.shape[1] != 2 or int(coords.shape[0]) != n:
            raise InvalidInputError(
                f"{name}: 'coords' has shape {coords.shape}, expected ({n}, 2) to match "
                f"'features' {feats.shape}"
            )
        if dim < 1 or dim > max_dim or n > max_tiles or n * dim * 4 > max_bytes:
            raise InvalidInputError(
                f"{name}: {n} tiles × {dim} features is outside the bounds read here "
                f"({max_tiles} tiles, {max_dim} dimensions, {max_bytes >> 20} MiB as float32)"
            )
        if not np.issubdtype(feats.dtype, np.floating):
            raise InvalidInputError(f"{name}: 'features' are {feats.dtype}, expected floats")
        if not (
            np.issubdtype(coords.dtype, np.integer) or np.issubdtype(coords.dtype, np.floating)
        ):
            raise InvalidInputError(f"{name}: 'coords' are {coords.dtype}, expected numbers")
        features = np.empty((n, dim), dtype=np.float32)
        for start in range(0, n, _CHUNK_ROWS):
            stop = min(start + _CHUNK_ROWS, n)
            rows = feats[0, start:stop] if feats.ndim == 3 else feats[start:stop]
            if not np.isfinite(rows).all():
                bad = start + int(np.argwhere(~np.isfinite(rows))[0][0])
                raise InvalidInputError(f"{name}: tile {bad} has NaN or infinite features")
            features[start:stop] = rows
        raw = coords[()]
        if np.issubdtype(raw.dtype, np.floating) and not (
            np.isfinite(raw).all() and (raw == np.round(raw)).all()
        ):
            raise InvalidInputError(f"{name}: 'coords' are not whole level-0 pixel positions")
        xy = raw.astype(np.int64)
        if n and int(xy.min()) < 0:
            bad = int(np.argwhere(xy < 0)[0][0])
            raise InvalidInputError(
                f"{name}: tile {bad} has a negative coordinate {tuple(xy[bad].tolist())}"
            )
        attrs = {str(k): _plain(v) for k, v in coords.attrs.items()}
        encoder = feats.attrs.get("encoder")
    width = _positive_int(attrs.get("level0_width"))
    height = _positive_int(attrs.get("level0_height"))
    level0_size = None if width is None or height is None else (width, height)
    return TileFeatures(
        features=features,
        coords=xy,
        patch_size_level0=_tile_side(attrs),
        level0_size=level0_size,
        encoder=None if encoder is None else str(_plain(encoder)),
        attrs=attrs,
        path=path,
    )


def check_coordinates(
    tiles: TileFeatures,
    width_px: int,
    height_px: int,
    patch_size_level0: int | None = None,
    step_px: int | None = None,
    origin_px: tuple[int, int] = (0, 0),
) -> None:
    """Check that ``tiles`` were extracted from a slide of ``width_px × height_px`` level-0 px.

    Args:
        tiles: from :func:`read_tile_features`.
        width_px, height_px: the slide's level-0 size.
        patch_size_level0: the tile side at level 0, when the file does not record it (CLAM);
            when both are known they must agree.
        step_px: with it, every coordinate must be ``origin_px + k × step_px`` (a tile grid).
        origin_px: the grid's origin (level-0 px).

    Raises:
        InvalidInputError: one line naming the first mismatch.
    """
    name = repr(str(tiles.path)) if tiles.path is not None else "the tile features"
    recorded = tiles.patch_size_level0
    if patch_size_level0 is not None and recorded is not None and patch_size_level0 != recorded:
        raise InvalidInputError(
            f"{name} records tiles of {recorded} level-0 px, not {patch_size_level0}"
        )
    side = patch_size_level0 if patch_size_level0 is not None else recorded
    if side is None:
        raise InvalidInputError(
            f"{name} does not record its tile size (a CLAM features file); give the tile side "
            "in level-0 pixels"
        )
    if tiles.level0_size is not None and tiles.level0_size != (int(width_px), int(height_px)):
        w, h = tiles.level0_size
        raise InvalidInputError(
            f"{name} was extracted from a {w}×{h} px slide, this slide is "
            f"{width_px}×{height_px} px: features and slide do not belong together"
        )
    xy = tiles.coords
    if len(xy) == 0:
        return
    outside = (xy[:, 0] >= width_px) | (xy[:, 1] >= height_px)
    if outside.any():
        bad = int(np.argmax(outside))
        raise InvalidInputError(
            f"{name}: tile {bad} at {tuple(xy[bad].tolist())} lies outside the "
            f"{width_px}×{height_px} px slide: features and slide do not belong together"
        )
    unique = np.unique(xy, axis=0)
    if len(unique) != len(xy):
        raise InvalidInputError(
            f"{name}: {len(xy) - len(unique)} tiles appear more than once in 'coords'"
        )
    if step_px is not None:
        if step_px < 1:
            raise InvalidInputError(f"tile grid step must be >= 1 px, got {step_px}")
        off = (xy - np.asarray(origin_px, dtype=np.int64)) % int(step_px)
        wrong = off.any(axis=1)
        if wrong.any():
            bad = int(np.argmax(wrong))
            raise InvalidInputError(
                f"{name}: tile {bad} at {tuple(xy[bad].tolist())} is not on the {step_px} px "
                f"grid from {tuple(origin_px)}: the features were cut on another tile grid"
            )
