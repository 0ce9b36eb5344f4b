"""The training loop and its checkpoints, the same for every model family.

The family (looked up by ``model.name`` in :mod:`wsi_anomaly.models.registry`) supplies the data,
the optimiser, one epoch's batches, the step and the calibration; this module owns the loop,
progress bars, logging, resumable checkpoints and the final checkpoint.

Determinism: every epoch's randomness (which tiles are drawn, the augmentations) comes from
generators seeded with ``(seed, epoch)``, so a run resumed from a checkpoint continues exactly as
if it had never stopped, whatever the number of data-loading workers.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import random
import time
from collections.abc import Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, save_checkpoint
from .config import config_from_dict, save_config
from .errors import InvalidInputError
from .models.calibration import Calibration
from .models.family import Epoch, ModelFamily
from .models.registry import FAMILIES, family_sections, get_family
from .outputs import check_free_space, check_output_file, validate_output_name
from .runtime import Runtime, resolve_device, return_freed_tensors_to_the_os
from .words import count

__all__ = [
    "TrainResult",
    "calibrate",
    "resolve_device",
    "resume_path",
    "seed_everything",
    "train_model",
]

log = logging.getLogger(__name__)

#: Room kept free beyond two copies of the model's weights (the checkpoint and its temporary).
CHECKPOINT_MARGIN_BYTES = 64 * 2**20


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """A reproducible generator for one purpose (``stream``) of one epoch of a run."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 7 + stream) % (2**63))


def resume_path(out: Path) -> Path:
    """Where periodic, resumable checkpoints go (the final name is written only at the end)."""
    return out.with_name(out.stem + ".resume" + out.suffix)


@dataclass
class TrainResult:
    checkpoint: Path
    epochs: int
    seconds: float
    images_per_s: float
    history: list[dict[str, float]] = field(default_factory=list)
    score_quantiles: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def calibrate(
    family: ModelFamily,
    model: torch.nn.Module,
    dataset: Dataset,
    runtime: Runtime,
    n_tiles: int,
    batch_size: int = 16,
    workers: int = 0,
    progress: bool = True,
    reference: Calibration | None = None,
) -> Calibration:
    """The family's calibration (training-normal mean map and/or score quantiles) from up to
    ``n_tiles`` tiles spread evenly over ``dataset`` (no augmentation). With ``reference`` (the
    training tiles' calibration), ``dataset`` holds held-out normal tiles scored as a slide's
    tiles will be."""
    model.eval()
    n = _size(dataset)
    idx = np.unique(np.linspace(0, n - 1, num=min(n_tiles, n)).astype(int))
    loader = DataLoader(Subset(dataset, idx.tolist()), batch_size=batch_size, num_workers=workers)
    parts = [
        family.calibration_batch(model, batch, runtime)
        for batch in tqdm(
            loader, desc="calibrating", unit="batch", disable=not progress, leave=False
        )
    ]
    try:
        return family.summarise_calibration(parts, reference)
    except ValueError as exc:
        raise InvalidInputError(f"calibration failed: {exc}; no checkpoint written") from None


def _size(dataset: Dataset) -> int:
    """The number of items of a map-style dataset (every dataset the loop takes has one)."""
    assert isinstance(dataset, Sized), "training datasets must have a length"
    return len(dataset)


#: Fewer held-out tiles than this make no score scale: calibrate in-sample then (and say so).
MIN_HOLDOUT_TILES = 20


def tiles_for_holdout(fraction: float, minimum: int = MIN_HOLDOUT_TILES) -> int:
    """The fewest normal tiles (from one source) of which ``fraction`` is ``minimum`` held-out
    tiles, with the rounding of :func:`holdout_split`."""
    n = max(1, math.ceil((minimum - 1) / fraction))
    while int(round(fraction * n)) < minimum:
        n += 1
    return n


def holdout_split(
    dataset: Dataset, fraction: float, seed: int
) -> tuple[list[int], list[int], list[dict[str, Any]]]:
    """Indices of the tiles to train on and of the normal tiles held out of training for the
    score scale, stratified by source: each tile store (one slide) or image folder of a
    ``ConcatDataset`` gives ``fraction`` of its tiles. Seeded, so a resumed run trains on the
    same tiles. Returns (train, holdout, per-source counts)."""
    parts = list(dataset.datasets) if isinstance(dataset, ConcatDataset) else [dataset]
    rng = np.random.default_rng([seed, 7919])
    train: list[int] = []
    held: list[int] = []
    groups: list[dict[str, Any]] = []
    offset = 0
    for part in parts:
        n = _size(part)
        k = int(round(fraction * n))
        order = rng.permutation(n)
        held_part = sorted(int(i) + offset for i in order[:k])
        held.extend(held_part)
        train.extend(sorted(int(i) + offset for i in order[k:]))
        groups.append(
            {
                "source": str(getattr(part, "path", None) or getattr(part, "root", "")),
                "n_tiles": n,
                "n_held_out": k,
            }
        )
        offset += n
    return sorted(train), held, groups


def _without_epochs(section: Any) -> Any:
    return dataclasses.replace(section, epochs=0) if hasattr(section, "epochs") else section


def _prepare_run(
    out: Path, config: Any, resume: bool, overwrite: bool
) -> tuple[Any, dict[str, Any] | None]:
    """Refuse to clobber ``out``; load the resumable checkpoint when resuming."""
    check_output_file(out, overwrite or resume)
    if not resume:
        return config, None
    partial = resume_path(out)
    if not partial.exists():
        raise InvalidInputError(
            f"nothing to resume: {partial} does not exist (start without --resume)"
        )
    state = load_checkpoint(partial, expect_model=config.model.name, require_complete=False)
    saved = config_from_dict(state["config"])
    sections = [key for key, _ in family_sections()]
    if (
        saved.model != config.model
        or saved.seed != config.seed
        or any(
            _without_epochs(getattr(saved, key)) != _without_epochs(getattr(config, key))
            for key in sections
        )
    ):
        raise InvalidInputError(
            f"{partial} was trained with another model config or seed; "
            "resume with the same --config and --seed"
        )
    # The saved settings win; only the schedule length may be extended on resume.
    for key in ["train", *sections]:
        if not hasattr(getattr(saved, key), "epochs"):
            continue
        saved = dataclasses.replace(
            saved,
            **{key: dataclasses.replace(getattr(saved, key), epochs=getattr(config, key).epochs)},
        )
    log.info("resuming %s from epoch %d", partial, int(state["train_state"]["epoch"]) + 1)
    return saved, state


def _state_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def train_model(
    dataset: Dataset,
    config: Any,
    out: str | Path,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    tile_mpp: float | None = None,
    source: str | None = None,
    progress: bool = True,
    anomalies: Dataset | None = None,
) -> TrainResult:
    """Train the configured model on ``dataset`` (float tensors 3×256×256 in [0, 1]).

    ``anomalies``: the few labelled anomalous tiles, for weakly supervised families (ATAC-Net).
    Periodic checkpoints go to :func:`resume_path`; the final checkpoint, with the calibration
    (mean map, score quantiles), is written to ``out`` only when training is complete.
    """
    out = Path(out)
    validate_output_name(out)
    config.validate()
    if _size(dataset) == 0:
        raise InvalidInputError("no training tiles")
    family = get_family(config.model.name)
    if anomalies is not None and not family.weakly_supervised:
        weak = ", ".join(
            f"{f.title}: pass --model {f.name}" for f in FAMILIES.values() if f.weakly_supervised
        )
        raise InvalidInputError(
            f"labelled anomalies are used by weakly supervised models only "
            f"({weak}); {family.title} trains on normal tiles"
        )
    runtime = Runtime.resolve(device)
    if runtime.device.type == "cpu":  # freed activations go back to the OS: a lower peak RSS
        return_freed_tensors_to_the_os()
    partial = resume_path(out)
    config, state = _prepare_run(out, config, resume, overwrite)
    normals = dataset
    train_idx, held_idx, groups = holdout_split(
        dataset, config.train.calibration_holdout, config.seed
    )
    n_given, n_held = len(train_idx) + len(held_idx), len(held_idx)
    if len(held_idx) >= MIN_HOLDOUT_TILES and train_idx:
        dataset = Subset(normals, train_idx)
        log.info("%d normal tiles held out of training for the score scale", len(held_idx))
    else:
        held_idx = []
    try:
        data = family.training_data(dataset, anomalies, config)
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from None

    seed_everything(config.seed)
    if state is None:
        model = family.build(config)
        backbone = str(getattr(model, "backbone_identity", "none"))
    else:  # the backbone's weights and identity come from the checkpoint: no download
        backbone = state["backbone"]
        model = family.restore(config, state["state_dict"], backbone)
    check_free_space(
        out.parent, 2 * _state_bytes(model) + CHECKPOINT_MARGIN_BYTES, f"the checkpoint {out.name}"
    )
    model = runtime.prepare_model(model)
    optimiser = family.optimiser(model, config)
    scheduler = family.scheduler(optimiser, config) if optimiser is not None else None
    start_epoch, history = 0, []
    if state is not None:
        if optimiser is not None:
            optimiser.load_state_dict(state["train_state"]["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["train_state"]["scheduler"])
        start_epoch = int(state["train_state"]["epoch"]) + 1
        history = list(state.get("history", []))
    extras = family.checkpoint_extras(data, dataset)

    def payload(epoch: int) -> dict[str, Any]:
        train_state: dict[str, Any] = {"epoch": epoch}
        if optimiser is not None:
            train_state["optimizer"] = optimiser.state_dict()
        if scheduler is not None:
            train_state["scheduler"] = scheduler.state_dict()
        return {
            **_payload(config, model, backbone, tile_mpp, source, history, train_state),
            **extras,
        }

    t = config.train
    total_epochs = family.epochs(config)
    seen, t0 = 0, time.perf_counter()
    for epoch in range(start_epoch, total_epochs):
        model.train()
        rng = functools.partial(epoch_generator, config.seed, epoch)
        ep = Epoch(model, optimiser, config, epoch, family.augmenter(rng), runtime)
        loader = family.loader(data, config, rng, t.workers, pin_memory=runtime.is_cuda)
        sums: dict[str, float] = {}
        steps = 0
        bar = tqdm(
            loader,
            desc=f"epoch {epoch + 1}/{total_epochs}",
            unit="batch",
            disable=not progress,
            leave=False,
        )
        for batch in bar:
            stats = _step(family, ep, batch, steps)
            seen += int(stats.pop("images"))
            steps += 1
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix({k: f"{v:.3f}" for k, v in stats.items()})
        bar.close()
        if scheduler is not None:
            scheduler.step()
        record = family.epoch_record(ep, sums, steps)
        history.append(record)
        log.info("epoch %d/%d  %s", epoch + 1, total_epochs, family.describe_epoch(record))
        # A fit without an optimiser keeps what it gathers outside the weights until
        # fit_end: only gradient fits can stop and resume between epochs.
        resumable = optimiser is not None
        if resumable and (epoch + 1) % t.checkpoint_every == 0 and epoch + 1 < total_epochs:
            save_checkpoint({**payload(epoch), "complete": False}, partial)
    family.fit_end(model, config)
    seconds = time.perf_counter() - t0

    calibration = calibrate(
        family,
        model,
        family.calibration_data(dataset, config),
        runtime,
        t.calibration_tiles,
        workers=t.workers,
        progress=progress,
    )
    in_sample = {
        "n_tiles": calibration.n_tiles,
        "score_quantiles": calibration.score_quantiles,
        "max_score_quantiles": calibration.max_score_quantiles,
    }
    if held_idx:
        held = calibrate(
            family,
            model,
            family.calibration_data(Subset(normals, held_idx), config),
            runtime,
            t.calibration_tiles,
            workers=t.workers,
            progress=progress,
            reference=calibration,
        )
        calibration = held.with_scale(
            extras=calibration.extras,
            scale_source="held-out normal tiles",
            in_sample=in_sample,
            holdout={
                "fraction": float(t.calibration_holdout),
                "n_tiles": len(held_idx),
                "sources": groups,
            },
        )
    else:
        if t.calibration_holdout == 0:
            log.info(
                "train.calibration_holdout is 0: the score scale comes from the training tiles"
            )
        else:
            log.warning(
                "%s given; a held-out calibration needs at least %d tiles (%d held out at "
                "%g %%, here %d); calibrating on the training tiles instead, so more unseen "
                "normal tissue may be called anomalous than the 1 %% its threshold suggests "
                "(train.calibration_holdout: 0 calibrates on the training tiles without this "
                "warning)",
                count(n_given, "normal tile"),
                tiles_for_holdout(t.calibration_holdout),
                MIN_HOLDOUT_TILES,
                100 * t.calibration_holdout,
                n_held,
            )
        calibration = calibration.with_scale(
            scale_source="training tiles (in-sample)",
            holdout={"fraction": 0.0, "n_tiles": 0, "sources": groups},
        )
    return _finish(
        out,
        config,
        {**payload(total_epochs - 1), "train_seconds": seconds},
        calibration,
        total_epochs,
        seconds,
        seen,
        history,
    )


def _payload(
    config: Any,
    model: torch.nn.Module,
    backbone: str,
    tile_mpp: float | None,
    source: str | None,
    history: list[dict[str, float]],
    train_state: dict[str, Any],
) -> dict[str, Any]:
    """The checkpoint fields every model family writes (see :mod:`wsi_anomaly.checkpoint`).

    Only tensors, dicts, lists, tuples, str, int, float, bool and None, so that the checkpoint
    loads with ``torch.load(weights_only=True)``.
    """
    return {
        "model_name": config.model.name,
        "config": config.to_dict(),
        "state_dict": {
            k: v.detach().cpu()
            for k, v in get_family(config.model.name).checkpoint_state(model).items()
        },
        "backbone": str(backbone),
        "tile_mpp": None if tile_mpp is None else float(tile_mpp),
        "training_source": None if source is None else str(source),
        "history": [
            {k: float(v) if k != "epoch" else int(v) for k, v in r.items()} for r in history
        ],
        "train_state": train_state,
    }


def _finish(
    out: Path,
    config: Any,
    payload: dict[str, Any],
    calibration: Calibration,
    epochs: int,
    seconds: float,
    seen: int,
    history: list[dict[str, float]],
) -> TrainResult:
    """Write the final checkpoint and the resolved config; drop the resumable checkpoint."""
    save_checkpoint({**payload, "complete": True, "calibration": calibration.to_dict()}, out)
    save_config(config, out.with_name(out.stem + ".config.yaml"))
    resume_path(out).unlink(missing_ok=True)
    return TrainResult(
        out,
        epochs,
        seconds,
        seen / seconds if seconds > 0 else math.nan,
        history,
        calibration.score_quantiles,
    )


def _step(family: ModelFamily, ep: Epoch, batch: Any, step: int) -> dict[str, float]:
    """One batch of a fit: the family's step, then, with an optimiser, ``backward`` and the
    optimiser's step. A non-finite loss stops training before the weights change."""
    if ep.optimiser is None:
        with torch.no_grad():
            result = family.train_step(ep, batch)
    else:
        result = family.train_step(ep, batch)
    stats = dict(result.stats)
    if result.loss is None:
        if ep.optimiser is not None:
            raise RuntimeError(f"{family.name}: a family with an optimiser must give a loss")
        return stats
    value = float(result.loss.detach())
    if not math.isfinite(value):
        raise InvalidInputError(
            f"training diverged at epoch {ep.epoch + 1}, step {step + 1} (loss {value}); "
            f"no checkpoint written — lower {family.schedule_section}.lr"
        )
    stats["loss"] = value
    if ep.optimiser is not None:
        ep.optimiser.zero_grad(set_to_none=True)
        result.loss.backward()
        stats.update(family.before_optimiser_step(ep))
        ep.optimiser.step()
    return stats
