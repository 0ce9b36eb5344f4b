"""The training loop and its checkpoints, the same for every model family.

The family (looked up by ``model.name`` in :mod:`wsi_anomaly.models.registry`) supplies the data,
the optimiser, one epoch's batches, the step and the calibration; this module owns the loop,
progress bars, logging, resumable checkpoints and the final checkpoint.

Determinism: every epoch's randomness (which tiles are drawn, the augmentations) comes from
generators seeded with ``(seed, epoch)``, so a run resumed from a checkpoint continues exactly as
if it had never stopped, whatever the number of data-loading workers.

Resume points: after every epoch, and when the run is stopped (Ctrl-C, or SIGTERM where the
caller turns it into :class:`KeyboardInterrupt` as the command line does), the loop writes
:func:`resume_path` atomically. A signal that arrives during a batch is held until that batch's
optimiser step is done (a second one stops at once), so the point written is never half a step:
the weights, the optimiser and the scheduler, the random states (the epoch's augmentation
generator and the global torch, NumPy and Python ones), the epoch and the batches of it done.
A fit without an optimiser (PatchCore's memory bank) gathers what it learns outside its weights
until :meth:`~wsi_anomaly.models.family.ModelFamily.fit_end`: its resume point is written once
the fit is finished, so a run stopped during calibration does not fit again, and one stopped
during the pass starts the pass again.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, save_checkpoint
from .config import config_from_dict, save_config
from .errors import CheckpointError, InvalidInputError
from .models.calibration import Calibration
from .models.family import Epoch, ModelFamily
from .models.registry import FAMILIES, family_sections, get_family
from .outputs import atomic_path, check_free_space, check_output_file, validate_output_name
from .runtime import Runtime, resolve_device, return_freed_tensors_to_the_os
from .words import about, count

__all__ = [
    "DurationEstimate",
    "TrainResult",
    "calibrate",
    "describe_resume_point",
    "resolve_device",
    "resume_path",
    "seed_everything",
    "snapshot_path",
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
    """Where the resume point goes (rewritten after every epoch and when a run is stopped; the
    final name is written only at the end)."""
    return out.with_name(out.stem + ".resume" + out.suffix)


def snapshot_path(out: Path, epoch: int) -> Path:
    """The numbered copy of the resume point after ``epoch`` (1-based) epochs, kept every
    ``train.checkpoint_every`` epochs."""
    return out.with_name(f"{out.stem}.epoch{epoch}.resume{out.suffix}")


#: Batches timed (after the first, which warms up) before the duration is estimated.
ESTIMATE_BATCHES = 2


@dataclass(frozen=True)
class DurationEstimate:
    """What the rest of a training run will take on this machine, from its first batches."""

    seconds: float
    seconds_per_batch: float
    batches_left: int
    #: ``cpu`` or ``cuda``: where the run trains.
    device: str

    @property
    def on_cpu(self) -> bool:
        return self.device == "cpu"

    def describe(self) -> str:
        """``"about 2 h 5 min (0.84 s per batch × 9000 batches to go, then calibration)"``."""
        return (
            f"{about(self.seconds)} ({self.seconds_per_batch:.3g} s per batch × "
            f"{self.batches_left} batches to go, then calibration)"
        )


def _seconds_per_batch(durations: list[float]) -> float:
    """The typical time of one batch from the timed ones (their median: one slow batch, e.g. a
    cold read, does not make the estimate)."""
    return float(np.median(durations))


def describe_resume_point(out: Path) -> str | None:
    """What the resume point of ``out`` holds, in words ("epochs 1–2 of 8 and 5 of 16 batches of
    epoch 3"), or ``None`` when there is none or it cannot be read."""
    try:
        state = load_checkpoint(resume_path(out), require_complete=False)
        train_state = state["train_state"]
        config = config_from_dict(state["config"])
        total = get_family(config.model.name).epochs(config)
        done = int(train_state["epoch"]) + 1
        step = int(train_state.get("step", 0))
    except Exception:  # noqa: BLE001 - only a detail of a message: any failure leaves it out
        return None
    if train_state.get("fitted"):
        return f"the finished fit ({count(total, 'epoch')}); it goes on with calibration"
    held = f"epochs 1–{done} of {total}" if done > 1 else f"epoch 1 of {total}" if done else ""
    if step:
        batches = int(train_state.get("epoch_batches", 0))
        part = f"{step} of {batches} batches" if batches else count(step, "batch", "batches")
        held = f"{held} and " if held else ""
        held += f"{part} of epoch {done + 1}"
    return held or None


def _rng_state(cuda: bool) -> dict[str, Any]:
    """The global random states (torch, NumPy, Python) as tensors and plain data, so that a
    checkpoint holding them loads with ``weights_only``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(version), "state": list(internal), "gauss_next": gauss_next},
    }
    if cuda:
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (
            n["kind"],
            n["keys"].numpy().astype(np.uint32),
            int(n["pos"]),
            int(n["has_gauss"]),
            float(n["cached_gaussian"]),
        )
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _SignalsWaitForStep:
    """Within the block, SIGINT and SIGTERM are held until it ends, then raised as their
    handlers would have raised them (``KeyboardInterrupt``, or the caller's own for SIGTERM), so
    one batch is never cut between its forward pass and its optimiser step. A second signal
    during the block raises at once. Signals whose handler is not a Python function (SIGTERM's
    default, which ends the process) are left alone, as is everything outside the main thread."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.previous: dict[int, Any] = {}
        self.pending: int | None = None

    def __enter__(self) -> _SignalsWaitForStep:
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.SIGNALS:
            handler = signal.getsignal(sig)
            if callable(handler):
                self.previous[sig] = handler
                signal.signal(sig, self._hold)
        return self

    def _hold(self, signum: int, frame: Any) -> None:
        handler = self.previous.get(signum, signal.default_int_handler)
        if self.pending is not None:
            self._restore()
            handler(signum, frame)
            return
        self.pending = signum
        log.warning(
            "stopping after this batch to write a resume point (press Ctrl-C again to stop now)"
        )

    def _restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        handler = self.previous.get(self.pending or 0, signal.default_int_handler)
        self._restore()
        if self.pending is not None and kind is None:
            handler(self.pending, None)


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


@dataclass
class _Position:
    """Where a fit stands: what a resume point records besides the weights, the optimiser and
    the scheduler."""

    #: The epoch in progress, or the next one to start (0-based).
    epoch: int = 0
    #: Its batches done, of ``batches`` (0: a length the loader does not know).
    step: int = 0
    batches: int = 0
    #: The step statistics summed over those batches (the epoch's record is made from them).
    sums: dict[str, float] = field(default_factory=dict)
    #: The epoch's augmentation generator and the global random states at this point.
    aug: torch.Tensor | None = None
    rng: dict[str, Any] | None = None
    #: ``fit_end`` has run: only calibration is left.
    fitted: bool = False
    #: The model and optimiser are at this point (not inside a batch or ``fit_end``).
    clean: bool = True
    #: The resume point on disk is this point.
    saved: bool = False
    #: Read from a resume point: its random states are still to be put back.
    restoring: bool = False
    seen_this_run: int = 0

    def train_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "step": self.step,
            "epoch_batches": self.batches,
            "epoch_sums": dict(self.sums),
            "fitted": self.fitted,
        }
        if self.rng is not None:
            state["rng"] = self.rng
        if self.aug is not None and self.step:
            state["aug_state"] = self.aug
        return state

    @classmethod
    def restored(cls, saved: dict[str, Any], path: Path) -> _Position:
        """The position of a resume point's ``train_state`` (one written before resume points
        held the step and random states resumes at its epoch, as it was written to)."""
        try:
            at = cls(
                epoch=int(saved["epoch"]) + 1,
                step=int(saved.get("step", 0)),
                batches=int(saved.get("epoch_batches", 0)),
                sums={str(k): float(v) for k, v in dict(saved.get("epoch_sums", {})).items()},
                aug=saved.get("aug_state"),
                rng=saved.get("rng"),
                fitted=bool(saved.get("fitted", False)),
                saved=True,
            )
        except (TypeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{path}: its training state is damaged ({exc})") from None
        if at.step and (at.aug is None or at.rng is None):
            raise CheckpointError(f"{path}: a resume point within an epoch lacks its random state")
        at.restoring = at.rng is not None
        return at

    def put_back(self, aug: torch.Generator | None, path: Path) -> None:
        """Restore the random states of the resume point (once)."""
        if not self.restoring or self.rng is None:
            return
        try:
            if aug is not None and self.aug is not None:
                aug.set_state(self.aug)
            _set_rng_state(self.rng)
        except (TypeError, ValueError, KeyError, RuntimeError, AttributeError) as exc:
            raise CheckpointError(f"{path}: its random state is damaged ({exc})") from None
        self.restoring = False


def _length(loader: Any) -> int:
    try:
        return len(loader)
    except TypeError:
        return 0


def _keep_snapshot(partial: Path, out: Path, epochs_done: int, every: int) -> None:
    """Copy the resume point to :func:`snapshot_path` every ``every`` epochs (0: never)."""
    if every and epochs_done % every == 0:
        with atomic_path(snapshot_path(out, epochs_done)) as tmp:
            shutil.copyfile(partial, tmp)


def _fit(
    family: ModelFamily,
    model: torch.nn.Module,
    optimiser: torch.optim.Optimizer | None,
    scheduler: Any,
    data: Dataset,
    config: Any,
    runtime: Runtime,
    at: _Position,
    history: list[dict[str, float]],
    total_epochs: int,
    save: Callable[[], None] | None,
    snapshot: Callable[[int], None],
    progress: bool,
    on_estimate: Callable[[DurationEstimate], None] | None,
    partial: Path,
) -> None:
    """The epochs from ``at`` to the end, ``at`` kept up to date after every batch; ``save``
    writes the resume point after every epoch but the last (``None``: a fit that cannot resume
    before its end)."""
    timed: list[float] = []
    estimated = False
    last = None  # when the previous batch ended (the first one, warming up, is not timed)
    for epoch in range(at.epoch, total_epochs):
        model.train()
        rng = functools.partial(epoch_generator, config.seed, epoch)
        ep = Epoch(model, optimiser, config, epoch, family.augmenter(rng), runtime)
        if at.step == 0:
            at.put_back(None, partial)
        loader = family.loader(data, config, rng, config.train.workers, pin_memory=runtime.is_cuda)
        at.epoch, at.batches = epoch, _length(loader)
        batches: Iterator[Any] = iter(loader)
        for _ in range(at.step):  # a resume within the epoch: the same draws, not trained again
            next(batches)
        at.put_back(ep.aug, partial)
        weights = family.loss_weights(config, epoch)
        desc = f"epoch {epoch + 1}/{total_epochs}"
        if weights:
            desc += " weights " + " ".join(f"{k} {w:.2f}" for k, w in weights.items())
        bar = tqdm(
            batches,
            total=at.batches or None,
            initial=at.step,
            desc=desc,
            unit="batch",
            disable=not progress,
            leave=False,
        )
        for batch in bar:
            with _SignalsWaitForStep():
                at.clean = False
                stats = _step(family, ep, batch, at.step)
                at.seen_this_run += int(stats.pop("images"))
                at.step += 1
                for k, v in stats.items():
                    at.sums[k] = at.sums.get(k, 0.0) + v
                at.aug, at.rng = ep.aug.get_state(), _rng_state(runtime.is_cuda)
                at.clean, at.saved = True, False
            bar.set_postfix({k: f"{v:.3f}" for k, v in stats.items()})
            now = time.perf_counter()
            if last is not None:
                timed.append(now - last)
            last = now
            if not estimated and len(timed) >= ESTIMATE_BATCHES and at.batches:
                estimated = True
                per_batch = _seconds_per_batch(timed)
                left = at.batches - at.step + (total_epochs - epoch - 1) * at.batches
                estimate = DurationEstimate(per_batch * left, per_batch, left, runtime.device.type)
                bar.clear()
                if on_estimate is not None:
                    try:
                        on_estimate(estimate)
                    except BaseException:  # a refusal, or Ctrl-C at a prompt: no bar left
                        bar.close()
                        raise
                else:
                    log.info("estimated time to the end of training: %s", estimate.describe())
                bar.refresh()
        bar.close()
        with _SignalsWaitForStep():
            at.clean = False
            if scheduler is not None:
                scheduler.step()
            record = family.epoch_record(ep, at.sums, at.step)
            history.append(record)
            at.epoch, at.step, at.sums, at.aug = epoch + 1, 0, {}, None
            at.rng = _rng_state(runtime.is_cuda)
            at.clean, at.saved = True, False
            log.info("epoch %d/%d  %s", epoch + 1, total_epochs, family.describe_epoch(record))
            if save is not None and epoch + 1 < total_epochs:
                save()
                snapshot(epoch + 1)


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
    on_estimate: Callable[[DurationEstimate], None] | None = None,
) -> TrainResult:
    """Train the configured model on ``dataset`` (float tensors 3×256×256 in [0, 1]).

    ``anomalies``: the few labelled anomalous tiles, for weakly supervised families (ATAC-Net).
    The resume point goes to :func:`resume_path` after every epoch and when the run is stopped
    (see the module's docstring); the final checkpoint, with the calibration (mean map, score
    quantiles), is written to ``out`` only when training is complete.

    ``on_estimate``: called once, after the first few batches, with the estimated duration of
    the rest of the run (logged when not given); it may raise to stop the run (e.g. a user who
    does not want to wait a week), nothing is written then.
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
    extras = family.checkpoint_extras(data, dataset)
    history: list[dict[str, float]] = []
    at = _Position()
    if state is not None:
        saved = state["train_state"]
        if optimiser is not None:
            optimiser.load_state_dict(saved["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
        history = list(state.get("history", []))
        at = _Position.restored(saved, partial)
        if at.fitted and at.epoch < family.epochs(config):  # --epochs extended the schedule
            at.fitted = False

    def payload(last_epoch: int) -> dict[str, Any]:
        train_state: dict[str, Any] = {"epoch": last_epoch}
        if optimiser is not None:
            train_state["optimizer"] = optimiser.state_dict()
        if scheduler is not None:
            train_state["scheduler"] = scheduler.state_dict()
        return {
            **_payload(config, model, backbone, tile_mpp, source, history, train_state),
            **extras,
        }

    def save_resume_point() -> None:
        record = payload(at.epoch - 1)
        record["train_state"].update(at.train_state())
        save_checkpoint({**record, "complete": False}, partial)
        at.saved = True

    total_epochs = family.epochs(config)
    # A fit without an optimiser keeps what it gathers outside the weights until fit_end:
    # only gradient fits can stop and resume between (and within) epochs.
    resumable_mid_fit = optimiser is not None
    explanation = family.explain_loss(config)
    if explanation and not at.fitted:
        log.info("%s", explanation)
    t0 = time.perf_counter()
    try:
        if not at.fitted:
            _fit(
                family,
                model,
                optimiser,
                scheduler,
                data,
                config,
                runtime,
                at,
                history,
                total_epochs,
                save_resume_point if resumable_mid_fit else None,
                lambda epoch: _keep_snapshot(partial, out, epoch, config.train.checkpoint_every),
                progress,
                on_estimate,
                partial,
            )
            at.clean = False  # a fit_end cut short leaves no state to resume from
            family.fit_end(model, config)
            at.fitted, at.clean, at.saved = True, True, False
            save_resume_point()
    except KeyboardInterrupt:
        if at.clean and not at.saved and (resumable_mid_fit or at.fitted):
            save_resume_point()
            log.info("resume point written to %s", partial)
        raise
    seconds = time.perf_counter() - t0

    t = config.train
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
        at.seen_this_run,
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
