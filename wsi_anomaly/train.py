"""Training loops and checkpoints.

Determinism: every epoch's randomness (which tiles are drawn, the Cut&Paste copies) comes from
generators seeded with ``(seed, epoch)``, so a run resumed from a checkpoint continues exactly as
if it had never stopped, whatever the number of data-loading workers.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, save_checkpoint
from .config import Config, config_from_dict, save_config
from .errors import DeviceUnavailableError, InvalidInputError, OutputExistsError
from .models.cutpaste import make_cutpaste_batch
from .models.losses import haloae_loss, loss_weights
from .models.registry import build_model
from .models.scoring import anomaly_map, normalise_map, smooth_map, tile_scores
from .models.transforms import normalise

log = logging.getLogger(__name__)

SCORE_QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when present, else CPU; ``cuda`` without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"--device {name} was requested but this machine has no usable CUDA GPU "
            "(torch.cuda.is_available() is False); use --device cpu or auto")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise InvalidInputError(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    # Distinct, reproducible streams per (seed, epoch, purpose).
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 7 + stream) % (2**63))


def resume_path(out: Path) -> Path:
    """Where periodic, resumable checkpoints go (the final name is written only at the end)."""
    return out.with_name(out.stem + ".resume" + out.suffix)


def build_from_config(config: Config, backbone_weights: str | None = None) -> torch.nn.Module:
    """The configured model; ``backbone_weights`` overrides the config's (e.g. "checkpoint")."""
    weights = backbone_weights or config.model.backbone_weights
    if config.model.name == "atacnet":
        a = config.atacnet
        return build_model("atacnet", variant=a.variant, backbone_weights=weights,
                           crop_threshold=a.crop_threshold, topk_ratio=a.topk_ratio,
                           margin=a.margin, min_box_px=a.min_box_px, box_pad_px=a.box_pad_px)
    return build_model(config.model.name, backbone_weights=weights,
                       attention=config.model.attention, released_mask=config.model.released_mask)


@dataclass
class TrainResult:
    checkpoint: Path
    epochs: int
    seconds: float
    images_per_s: float
    history: list[dict[str, float]] = field(default_factory=list)
    score_quantiles: dict[str, float] = field(default_factory=dict)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _loader(dataset: Dataset, config: Config, epoch: int) -> DataLoader:
    t = config.train
    sampler = RandomSampler(dataset, replacement=True, num_samples=t.samples_per_epoch,
                            generator=_epoch_generator(config.seed, epoch, 0))
    return DataLoader(dataset, batch_size=t.batch_size, sampler=sampler, num_workers=t.workers,
                      drop_last=False, persistent_workers=False,
                      pin_memory=torch.cuda.is_available())


@torch.no_grad()
def calibrate(model: torch.nn.Module, dataset: Dataset, device: torch.device, n_tiles: int,
              batch_size: int = 16, workers: int = 0, progress: bool = True) -> dict[str, Any]:
    """The training-normal mean anomaly map and the distribution of training tile scores.

    Uses up to ``n_tiles`` tiles spread evenly over ``dataset`` (no augmentation).
    """
    model.eval()
    idx = np.unique(np.linspace(0, len(dataset) - 1, num=min(n_tiles, len(dataset))).astype(int))
    loader = DataLoader(Subset(dataset, idx.tolist()), batch_size=batch_size, num_workers=workers)
    raw_maps = []
    for images in tqdm(loader, desc="calibrating", unit="batch", disable=not progress, leave=False):
        x = normalise(images.to(device))
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device):
            fm = model.features(x)
            raw = anomaly_map(fm, model.reconstruct_features(fm))
        raw_maps.append(raw.float().cpu())
    raw = torch.cat(raw_maps)
    mean_map = raw.mean(dim=0)
    maps = smooth_map(normalise_map(raw, mean_map))
    mean_scores, max_scores = (s.numpy().astype(np.float64) for s in tile_scores(maps))
    return {
        "mean_map": mean_map,
        "n_tiles": int(len(raw)),
        "score_quantiles": {f"{q:g}": float(np.quantile(mean_scores, q)) for q in SCORE_QUANTILES},
        "max_score_quantiles": {f"{q:g}": float(np.quantile(max_scores, q)) for q in SCORE_QUANTILES},
        "score_mean": float(mean_scores.mean()),
        "score_std": float(mean_scores.std()),
    }


def _prepare_run(out: Path, config: Config, resume: bool, overwrite: bool
                 ) -> tuple[Config, dict[str, Any] | None]:
    """Refuse to clobber ``out``; load the resumable checkpoint when resuming."""
    if out.exists() and not (overwrite or resume):
        raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it")
    if not resume:
        return config, None
    partial = resume_path(out)
    if not partial.exists():
        raise InvalidInputError(f"nothing to resume: {partial} does not exist "
                                "(start without --resume)")
    state = load_checkpoint(partial, expect_model=config.model.name, require_complete=False)
    saved = config_from_dict(state["config"])
    if (saved.model != config.model or saved.seed != config.seed
            or dataclasses.replace(saved.atacnet, epochs=0) != dataclasses.replace(config.atacnet, epochs=0)):
        raise InvalidInputError(f"{partial} was trained with another model config or seed; "
                                "resume with the same --config and --seed")
    # The saved settings win; only the schedule length may be extended on resume.
    config = dataclasses.replace(
        saved, train=dataclasses.replace(saved.train, epochs=config.train.epochs),
        atacnet=dataclasses.replace(saved.atacnet, epochs=config.atacnet.epochs))
    log.info("resuming %s from epoch %d", partial, int(state["train_state"]["epoch"]) + 1)
    return config, state


def train_model(dataset: Dataset, config: Config, out: str | Path, device: str = "auto",
                resume: bool = False, overwrite: bool = False, tile_mpp: float | None = None,
                source: str | None = None, progress: bool = True,
                anomalies: Dataset | None = None) -> TrainResult:
    """Train the configured model on ``dataset`` (float tensors 3×256×256 in [0, 1]).

    ``anomalies``: the few labelled anomalous tiles, for ATAC-Net (``model.name: atacnet``).
    Periodic checkpoints go to :func:`resume_path`; the final checkpoint, with the calibration
    (mean map, score quantiles), is written to ``out`` only when training is complete.
    """
    out = Path(out)
    config.validate()
    if len(dataset) == 0:
        raise InvalidInputError("no training tiles")
    if config.model.name == "atacnet":
        return _train_atacnet(dataset, anomalies, config, out, device, resume, overwrite,
                              tile_mpp, source, progress)
    if anomalies is not None:
        raise InvalidInputError("labelled anomalies are used by ATAC-Net only "
                                "(pass --model atacnet); HaloAE trains on normal tiles")
    dev = resolve_device(device)
    partial = resume_path(out)
    config, state = _prepare_run(out, config, resume, overwrite)
    start_epoch = int(state["train_state"]["epoch"]) + 1 if state is not None else 0
    history = list(state.get("history", [])) if state is not None else []

    seed_everything(config.seed)
    # With a checkpoint the backbone weights come from its state dict: no download.
    model = build_from_config(config, "checkpoint" if state is not None else None)
    backbone = state["backbone"] if state is not None else model.backbone_identity
    if state is not None:
        model.load_state_dict(state["state_dict"])
    model.to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimiser = torch.optim.Adam(model.trainable_parameters(), lr=config.train.lr,
                                 weight_decay=config.train.weight_decay)
    if state is not None:
        optimiser.load_state_dict(state["train_state"]["optimizer"])

    def payload(epoch: int) -> dict[str, Any]:
        return _payload(config, model, backbone, tile_mpp, source, history,
                        {"epoch": epoch, "optimizer": optimiser.state_dict()})

    t = config.train
    total_epochs = t.epochs
    seen, t0 = 0, time.perf_counter()
    for epoch in range(start_epoch, total_epochs):
        model.train()
        weights = loss_weights(t.loss_weighting, epoch, total_epochs)
        aug = _epoch_generator(config.seed, epoch, 1)
        sums: dict[str, float] = {"loss": 0.0, "cls": 0.0, "fm": 0.0, "im": 0.0}
        steps = 0
        loader = _loader(dataset, config, epoch)
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{total_epochs}", unit="batch",
                   disable=not progress, leave=False)
        for images in bar:
            batch, labels = make_cutpaste_batch(images, aug, image_jitter=t.image_jitter,
                                                patch_jitter=t.patch_jitter)
            x = normalise(batch).to(dev, non_blocking=True)
            labels = labels.to(dev)
            if dev.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(dev):
                outputs = model(x)
                loss, parts = haloae_loss(outputs, x, labels, weights, t.loss_terms)
            if not torch.isfinite(loss):
                raise InvalidInputError(f"training diverged at epoch {epoch + 1} (loss {loss.item()}); "
                                        "lower train.lr")
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            steps += 1
            seen += len(x)
            loss_value = float(loss.detach())
            sums["loss"] += loss_value
            for k in ("cls", "fm", "im"):
                sums[k] += float(parts[k])
            bar.set_postfix(loss=f"{loss_value:.3f}", cls=f"{float(parts['cls']):.3f}",
                            fm=f"{float(parts['fm']):.3f}", im=f"{float(parts['im']):.3f}",
                            w="/".join(f"{w:.2f}" for w in weights))
        bar.close()
        record = {"epoch": epoch, **{k: v / max(steps, 1) for k, v in sums.items()},
                  "w_cls": weights[0], "w_fm": weights[1], "w_im": weights[2]}
        history.append(record)
        log.info("epoch %d/%d  loss %.4f  cls %.4f  fm %.4f  im %.4f  weights %.2f/%.2f/%.2f",
                 epoch + 1, total_epochs, record["loss"], record["cls"], record["fm"],
                 record["im"], *weights)
        if (epoch + 1) % t.checkpoint_every == 0 and epoch + 1 < total_epochs:
            save_checkpoint({**payload(epoch), "complete": False}, partial)
    seconds = time.perf_counter() - t0

    calibration = calibrate(model, dataset, dev, t.calibration_tiles, workers=t.workers,
                            progress=progress)
    return _finish(out, config, {**payload(total_epochs - 1), "train_seconds": seconds},
                   calibration, total_epochs, seconds, seen, history)


def _payload(config: Config, model: torch.nn.Module, backbone: str, tile_mpp: float | None,
             source: str | None, history: list[dict[str, float]], train_state: dict[str, Any]
             ) -> dict[str, Any]:
    """The checkpoint fields every model family writes (see :mod:`wsi_anomaly.checkpoint`)."""
    return {"model_name": config.model.name, "config": config.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "backbone": backbone, "tile_mpp": tile_mpp, "training_source": source,
            "history": history, "train_state": train_state}


def _finish(out: Path, config: Config, payload: dict[str, Any], calibration: dict[str, Any],
            epochs: int, seconds: float, seen: int, history: list[dict[str, float]]
            ) -> TrainResult:
    """Write the final checkpoint and the resolved config; drop the resumable checkpoint."""
    save_checkpoint({**payload, "complete": True, "calibration": calibration}, out)
    save_config(config, out.with_name(out.stem + ".config.yaml"))
    resume_path(out).unlink(missing_ok=True)
    return TrainResult(out, epochs, seconds, seen / seconds if seconds > 0 else math.nan,
                       history, calibration["score_quantiles"])


# -- ATAC-Net ----------------------------------------------------------------------------------
class AtacNetData(Dataset):
    """Normal tiles then labelled anomalies, preprocessed as the seed states: ``(x, label)``.

    ``x`` is 3×P×P standardised (CLAHE on lightness, bicubic resize to P = ``image_px``).
    """

    def __init__(self, normals: Dataset, anomalies: Dataset | None, image_px: int, clahe: bool):
        self.normals, self.anomalies = normals, anomalies
        self.image_px, self.clahe = image_px, clahe
        self.labels = [0] * len(normals) + [1] * (len(anomalies) if anomalies is not None else 0)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from .models.atacnet_data import preprocess

        n = len(self.normals)
        image = self.normals[index] if index < n else self.anomalies[index - n]
        return preprocess(image, size=self.image_px, clahe=self.clahe), self.labels[index]


@torch.no_grad()
def calibrate_scores(model: torch.nn.Module, dataset: Dataset, device: torch.device,
                     n_tiles: int, batch_size: int = 16, workers: int = 0,
                     progress: bool = True) -> dict[str, Any]:
    """Score quantiles of up to ``n_tiles`` normal training tiles (models with image scores)."""
    model.eval()
    idx = np.unique(np.linspace(0, len(dataset) - 1, num=min(n_tiles, len(dataset))).astype(int))
    loader = DataLoader(Subset(dataset, idx.tolist()), batch_size=batch_size, num_workers=workers)
    scores = []
    for x, _ in tqdm(loader, desc="calibrating", unit="batch", disable=not progress, leave=False):
        with _autocast(device):
            scores.append(model.score(x.to(device)).float().cpu())
    values = torch.cat(scores).numpy().astype(np.float64)
    quantiles = {f"{q:g}": float(np.quantile(values, q)) for q in SCORE_QUANTILES}
    return {"mean_map": None, "n_tiles": int(len(values)), "score_quantiles": quantiles,
            "max_score_quantiles": dict(quantiles), "score_mean": float(values.mean()),
            "score_std": float(values.std())}


def _train_atacnet(normals: Dataset, anomalies: Dataset | None, config: Config, out: Path,
                   device: str, resume: bool, overwrite: bool, tile_mpp: float | None,
                   source: str | None, progress: bool) -> TrainResult:
    """Seed Algorithm 2 training on balanced batches (normals vs. labelled anomalies ∪ CutMix)."""
    from .models.atacnet import make_optimiser, make_scheduler, train_step
    from .models.atacnet_data import BalancedBatchSampler, cutmix_anomalous_half, random_rotation

    dev = resolve_device(device)
    partial = resume_path(out)
    config, state = _prepare_run(out, config, resume, overwrite)
    a, t = config.atacnet, config.train
    data = AtacNetData(normals, anomalies, a.image_px, a.clahe)
    seed_everything(config.seed)
    model = build_from_config(config, "checkpoint" if state is not None else None)
    backbone = state["backbone"] if state is not None else model.backbone_identity
    if state is not None:
        model.load_state_dict(state["state_dict"])
    model.to(dev)
    optimiser = make_optimiser(model, a)
    scheduler = make_scheduler(optimiser, a)
    start_epoch, history = 0, []
    if state is not None:
        optimiser.load_state_dict(state["train_state"]["optimizer"])
        scheduler.load_state_dict(state["train_state"]["scheduler"])
        start_epoch = int(state["train_state"]["epoch"]) + 1
        history = list(state.get("history", []))

    def payload(epoch: int) -> dict[str, Any]:
        return {**_payload(config, model, backbone, tile_mpp, source, history,
                           {"epoch": epoch, "optimizer": optimiser.state_dict(),
                            "scheduler": scheduler.state_dict()}),
                "n_labelled_anomalies": len(data) - len(normals)}

    precision = "bf16" if dev.type == "cuda" else "fp32"
    seen, t0 = 0, time.perf_counter()
    for epoch in range(start_epoch, a.epochs):
        sampler = BalancedBatchSampler(data.labels, a.batch_size, a.steps_per_epoch,
                                       _epoch_generator(config.seed, epoch, 2),
                                       a.real_anomaly_fraction)
        aug = _epoch_generator(config.seed, epoch, 3)
        loader = DataLoader(data, batch_sampler=sampler, num_workers=t.workers,
                            pin_memory=dev.type == "cuda")
        sums = {"loss": 0.0, "score_normal": 0.0, "score_anomalous": 0.0}
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{a.epochs}", unit="batch",
                   disable=not progress, leave=False)
        for images, labels in bar:
            images, targets = cutmix_anomalous_half(images, labels, aug)
            images = random_rotation(images, aug, a.rotation_degrees)
            stats = train_step(model, optimiser, images.to(dev, non_blocking=True), targets,
                               grad_clip_norm=a.grad_clip_norm, precision=precision)
            if not math.isfinite(stats["loss"]):
                raise InvalidInputError(f"training diverged at epoch {epoch + 1}; lower atacnet.lr")
            seen += len(images)
            for k in sums:
                sums[k] += stats[k]
            bar.set_postfix(loss=f"{stats['loss']:.3f}", normal=f"{stats['score_normal']:.2f}",
                            anomalous=f"{stats['score_anomalous']:.2f}")
        bar.close()
        scheduler.step()
        record = {"epoch": epoch, **{k: v / a.steps_per_epoch for k, v in sums.items()},
                  "lr": optimiser.param_groups[0]["lr"]}
        history.append(record)
        log.info("epoch %d/%d  loss %.4f  score normal %.3f  anomalous %.3f", epoch + 1,
                 a.epochs, record["loss"], record["score_normal"], record["score_anomalous"])
        if (epoch + 1) % t.checkpoint_every == 0 and epoch + 1 < a.epochs:
            save_checkpoint({**payload(epoch), "complete": False}, partial)
    seconds = time.perf_counter() - t0
    normal_only = AtacNetData(normals, None, a.image_px, a.clahe)
    calibration = calibrate_scores(model, normal_only, dev, t.calibration_tiles,
                                   workers=t.workers, progress=progress)
    return _finish(out, config, {**payload(a.epochs - 1), "train_seconds": seconds},
                   calibration, a.epochs, seconds, seen, history)
