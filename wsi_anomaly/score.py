"""Batched scoring: tiles in, per-tile scores and anomaly maps out.

One :class:`Scorer` serves image folders (``wsi-anomaly score``), slide tile stores and MVTec:
it owns the device, precision (bf16 autocast on CUDA, fp32 on CPU), channels-last memory format
and batching; the maths is :func:`wsi_anomaly.models.scoring.score_batch`.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .checkpoint import file_hash, load_checkpoint
from .config import config_from_dict
from .errors import InvalidInputError
from .models.scoring import score_batch
from .models.transforms import normalise
from .tiles.dataset import IMAGE_SUFFIXES, ImageFolderDataset, find_images
from .train import build_from_config, resolve_device

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

    def __init__(self, checkpoint: str | Path, device: str = "auto", precision: str = "auto",
                 batch_size: int = 32):
        self.path = Path(checkpoint)
        ckpt = load_checkpoint(self.path)
        self.checkpoint = ckpt
        self.config = config_from_dict(ckpt["config"])
        self.device = resolve_device(device)
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        if precision not in ("fp32", "bf16"):
            raise InvalidInputError(f"precision must be auto, fp32 or bf16, got {precision!r}")
        self.precision = precision
        if batch_size < 1:
            raise InvalidInputError("--batch-size must be at least 1")
        self.batch_size = batch_size
        self.model_name: str = ckpt["model_name"]
        model = build_from_config(self.config, "checkpoint")
        model.load_state_dict(ckpt["state_dict"])
        model.eval().to(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.calibration: dict[str, Any] = ckpt["calibration"]
        mean_map = self.calibration.get("mean_map")
        self.mean_map = mean_map.to(self.device) if mean_map is not None else None
        self.tile_mpp: float | None = ckpt.get("tile_mpp")
        self.backbone: str = ckpt.get("backbone", "unknown")
        self.model_hash = file_hash(self.path)
        self.tile_px = self.config.tile_px

    @property
    def identity(self) -> dict[str, Any]:
        """What to record next to scores so they can be traced to this model."""
        return {"model_path": str(self.path.resolve()), "model_sha256": self.model_hash,
                "model_name": self.checkpoint["model_name"], "backbone": self.backbone,
                "tile_mpp": self.tile_mpp, "software_version": self.checkpoint["software_version"]}

    @torch.no_grad()
    def score(self, images: torch.Tensor, keep_maps: bool = True) -> ScoreBatch:
        """Score ``B×3×256×256`` float images in [0, 1] (any device)."""
        if self.model_name == "atacnet":
            return self._score_atacnet(images, keep_maps)
        x = normalise(images.to(self.device, non_blocking=True).float())
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            out = score_batch(self.model, x, self.mean_map)
        maps = out["map"].float().cpu().numpy() if keep_maps else None
        return ScoreBatch(out["mean"].float().cpu().numpy(), out["max"].float().cpu().numpy(), maps)

    def _score_atacnet(self, images: torch.Tensor, keep_maps: bool) -> ScoreBatch:
        """ATAC-Net: seed preprocessing, then the Algorithm 2 score; maps are its 7×7 cells."""
        from .models.atacnet_data import preprocess

        a = self.config.atacnet
        x = torch.stack([preprocess(img.cpu(), size=a.image_px, clahe=a.clahe) for img in images])
        x = x.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            score = self.model.score(x).float()
            maps = None
            if keep_maps:
                cells = self.model.anomaly_map(x).float()
                maps = F.interpolate(cells.unsqueeze(1), size=(64, 64), mode="bilinear",
                                     align_corners=False).squeeze(1).cpu().numpy()
        values = score.cpu().numpy()
        return ScoreBatch(values, values.copy(), maps)

    def score_dataset(self, dataset: Dataset, workers: int = 0, keep_maps: bool = False,
                      progress: bool = True, desc: str = "scoring") -> Iterator[tuple[int, ScoreBatch]]:
        """Yield ``(start_index, scores)`` for consecutive batches of ``dataset``, in order."""
        loader = DataLoader(dataset, batch_size=self.batch_size, num_workers=workers,
                            pin_memory=self.device.type == "cuda")
        start = 0
        with tqdm(total=len(dataset), desc=desc, unit="tile", disable=not progress, leave=False) as bar:
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
            from .errors import InputNotFoundError

            raise InputNotFoundError(f"not found: {p}")
    if not out:
        raise InvalidInputError(f"no images found in {', '.join(map(str, paths))} "
                                f"(looked for {', '.join(IMAGE_SUFFIXES)})")
    return out


def score_images(model: str | Path, paths: Sequence[str | Path], out_csv: str | Path,
                 maps_dir: str | Path | None = None, device: str = "auto",
                 batch_size: int = 16, workers: int = 0, progress: bool = True) -> dict[str, Any]:
    """Score image files; write a CSV of per-image scores and, optionally, anomaly-map PNGs."""
    from .stitch import colour_scale, save_map_png

    scorer = Scorer(model, device=device, batch_size=batch_size)
    files = collect_image_paths(paths)
    dataset = ImageFolderDataset(files, scorer.tile_px)
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_csv.with_name(f".{out_csv.name}.partial")
    maps_path = Path(maps_dir) if maps_dir else None
    if maps_path is not None:
        maps_path.mkdir(parents=True, exist_ok=True)
    scale = colour_scale(scorer.calibration, "max")
    n = 0
    with tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "score_mean", "score_max"])
        for start, result in scorer.score_dataset(dataset, workers=workers,
                                                  keep_maps=maps_path is not None,
                                                  progress=progress):
            for k in range(len(result.mean)):
                f = dataset.files[start + k]
                writer.writerow([str(f), f"{result.mean[k]:.6g}", f"{result.max[k]:.6g}"])
                if maps_path is not None:
                    save_map_png(result.maps[k], scale, maps_path / f"{f.stem}_map.png",
                                 size=scorer.tile_px, image=dataset.load_rgb(start + k))
                n += 1
    os.replace(tmp, out_csv)
    return {"scored": n, "skipped": dataset.skipped, "csv": str(out_csv),
            "maps": str(maps_path) if maps_path else None}
