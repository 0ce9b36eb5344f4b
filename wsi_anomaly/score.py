"""Batched scoring: tiles in, per-tile scores and anomaly maps out.

One :class:`Scorer` serves image folders (``wsi-anomaly score``), slide tile stores and MVTec:
it owns the device, precision and batching (:class:`wsi_anomaly.runtime.Runtime`); the model's
family (looked up by the checkpoint's ``model_name``) restores the model, turns tiles into its
input and predicts ``(score, max, map)``.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .checkpoint import file_hash, load_checkpoint
from .config import config_from_dict
from .errors import CheckpointError, InputNotFoundError, InvalidInputError
from .models.registry import get_family
from .outputs import atomic_path
from .runtime import Runtime
from .tiles.dataset import IMAGE_SUFFIXES, ImageFolderDataset, find_images

log = logging.getLogger(__name__)


@dataclass
class ScoreBatch:
    """Scores of a batch: ``mean`` and ``max`` (B,) float32, ``maps`` (B, 64, 64) float32."""

    mean: np.ndarray
    max: np.ndarray
    maps: np.ndarray | None


class Scorer:
    """A trained model ready to score batches of 256×256 RGB tiles.

    Args:
        checkpoint: path of a finished checkpoint.
        device: ``auto`` | ``cpu`` | ``cuda[:N]``.
        precision: ``auto`` (bf16 on CUDA, fp32 on CPU) | ``fp32`` | ``bf16``.
        batch_size: tiles per forward pass.
    """

    def __init__(
        self,
        checkpoint: str | Path,
        device: str = "auto",
        precision: str = "auto",
        batch_size: int = 32,
    ):
        self.path = Path(checkpoint)
        ckpt = load_checkpoint(self.path)
        self.checkpoint = ckpt
        self.config = config_from_dict(ckpt["config"])
        self.runtime = Runtime.resolve(device, precision)
        self.device = self.runtime.device
        self.precision = self.runtime.precision
        if batch_size < 1:
            raise InvalidInputError("--batch-size must be at least 1")
        self.batch_size = batch_size
        self.model_name: str = ckpt["model_name"]
        try:
            self.family = get_family(self.model_name)
        except ValueError as exc:
            raise CheckpointError(f"{self.path}: {exc}") from None
        self.backbone: str = ckpt.get("backbone", "unknown")
        model = self.family.restore(self.config, ckpt["state_dict"], self.backbone)
        self.model = self.runtime.prepare_model(model.eval())
        self.calibration: dict[str, Any] = ckpt["calibration"]
        self._predict_calibration = self.family.calibration_to(self.calibration, self.device)
        self.tile_mpp: float | None = ckpt.get("tile_mpp")
        self.model_hash = file_hash(self.path)
        self.tile_px = self.config.tile_px

    @property
    def identity(self) -> dict[str, Any]:
        """What to record next to scores so they can be traced to this model."""
        return {
            "model_path": str(self.path.resolve()),
            "model_sha256": self.model_hash,
            "model_name": self.checkpoint["model_name"],
            "backbone": self.backbone,
            "tile_mpp": self.tile_mpp,
            "software_version": self.checkpoint["software_version"],
        }

    def _model_input(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The family's input on the device, from uint8 ``B×H×W×3`` tiles (as stored: 4× fewer
        bytes to copy; converted and normalised on the device) or float ``B×3×H×W`` in [0, 1]."""
        x = (
            torch.from_numpy(np.ascontiguousarray(images))
            if isinstance(images, np.ndarray)
            else images
        )
        if x.dtype != torch.uint8 and not x.is_floating_point():
            raise InvalidInputError(f"tiles must be uint8 or float, got {x.dtype}")
        if self.family.transforms_on_device:
            x = self.family.transform(self.runtime.to_device(x), self.config)
        else:
            x = self.runtime.to_device(self.family.transform(x, self.config))
        return self.runtime.layout(x)

    @torch.no_grad()
    def score(self, images: torch.Tensor | np.ndarray, keep_maps: bool = True) -> ScoreBatch:
        """Score a batch: ``B×H×W×3`` uint8 tiles (numpy or tensor, as the tile store gives
        them) or ``B×3×H×W`` float images in [0, 1] (any device)."""
        x = self._model_input(images)
        with self.runtime.autocast():
            score, peak, maps = self.family.predict(
                self.model, x, self._predict_calibration, keep_maps=keep_maps
            )
        mean = score.float().cpu().numpy()
        peak_values = peak.float().cpu().numpy()
        if peak is score:
            peak_values = peak_values.copy()
        out_maps = maps.float().cpu().numpy() if keep_maps and maps is not None else None
        return ScoreBatch(mean, peak_values, out_maps)

    def score_dataset(
        self,
        dataset: Dataset,
        workers: int = 0,
        keep_maps: bool = False,
        progress: bool = True,
        desc: str = "scoring",
    ) -> Iterator[tuple[int, ScoreBatch]]:
        """Yield ``(start_index, scores)`` for consecutive batches of ``dataset``, in order."""
        loader = DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=workers,
            pin_memory=self.runtime.is_cuda,
        )
        start = 0
        total = len(dataset) if isinstance(dataset, Sized) else None
        with tqdm(total=total, desc=desc, unit="tile", disable=not progress, leave=False) as bar:
            for images in loader:
                result = self.score(images, keep_maps=keep_maps)
                yield start, result
                start += len(images)
                bar.update(len(images))


def collect_image_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Files given directly plus image files found recursively in given folders."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(find_images(p))
        elif p.is_file():
            out.append(p)
        else:
            raise InputNotFoundError(f"not found: {p}")
    if not out:
        raise InvalidInputError(
            f"no images found in {', '.join(map(str, paths))} "
            f"(looked for {', '.join(IMAGE_SUFFIXES)})"
        )
    return out


def unique_map_names(files: Sequence[Path]) -> list[str]:
    """``<stem>_map.png`` per image; images whose stems collide (same name in two folders, or
    ``a.png`` beside ``a.jpg``) get ``<stem>-<8 hex of a hash of the path>_map.png`` instead,
    so no map overwrites another."""
    import hashlib

    stems: dict[str, int] = {}
    for f in files:
        stems[f.stem] = stems.get(f.stem, 0) + 1
    names = []
    for f in files:
        if stems[f.stem] == 1:
            names.append(f"{f.stem}_map.png")
        else:
            digest = hashlib.sha1(str(Path(f).resolve()).encode()).hexdigest()[:8]
            names.append(f"{f.stem}-{digest}_map.png")
    return names


def score_images(
    model: str | Path,
    paths: Sequence[str | Path],
    out_csv: str | Path,
    maps_dir: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 16,
    workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Score image files; write a CSV of per-image scores and, optionally, anomaly-map PNGs."""
    from .stitch import colour_scale, save_map_png

    scorer = Scorer(model, device=device, batch_size=batch_size)
    files = collect_image_paths(paths)
    dataset = ImageFolderDataset(files, scorer.tile_px)
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    maps_path = Path(maps_dir) if maps_dir else None
    if maps_path is not None:
        maps_path.mkdir(parents=True, exist_ok=True)
    scale = colour_scale(scorer.calibration, "max")
    map_names = unique_map_names(dataset.files)
    n = 0
    with atomic_path(out_csv) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            ["path", "score_mean", "score_max"] + (["map"] if maps_path is not None else [])
        )
        for start, result in scorer.score_dataset(
            dataset, workers=workers, keep_maps=maps_path is not None, progress=progress
        ):
            for k in range(len(result.mean)):
                f = dataset.files[start + k]
                row = [str(f), f"{result.mean[k]:.6g}", f"{result.max[k]:.6g}"]
                if maps_path is not None:
                    assert result.maps is not None  # scored with keep_maps
                    name = map_names[start + k]
                    save_map_png(
                        result.maps[k],
                        scale,
                        maps_path / name,
                        size=scorer.tile_px,
                        image=dataset.load_rgb(start + k),
                    )
                    row.append(name)
                writer.writerow(row)
                n += 1
    return {
        "scored": n,
        "skipped": dataset.skipped,
        "csv": str(out_csv),
        "maps": str(maps_path) if maps_path else None,
    }
