"""Batched scoring: tiles in, per-tile scores and anomaly maps out.

One :class:`Scorer` serves image folders (``wsi-anomaly score``), slide tile stores and MVTec:
it owns the device, precision and batching (:class:`wsi_anomaly.runtime.Runtime`); the model's
family (looked up by the checkpoint's ``model_name``) restores the model, turns tiles into its
input and predicts ``(score, max, map)``.

All scoring of a stream of batches goes through :meth:`Scorer.score_batches`. On CUDA it keeps
the GPU busy: batch k+1 is copied to the device (uint8, from pinned host memory) on a copy
stream while batch k runs on the compute stream, and the scores of batch k come back to pinned
host memory on a third stream while batch k+1 runs; a batch's result is handed over once its
copy back has finished (a lag of one batch). On the CPU it is a plain loop.

``batch_size="auto"`` picks the batch size: 32 on the CPU; on CUDA the largest of 512, 256, …
whose forward pass, at the run's precision, peaks below 85 % of the GPU's memory.
``compile`` runs the model through ``torch.compile`` (``default``, ``max-autotune`` or
``reduce-overhead``, the last with CUDA graphs); compiled models always see full batches (the
last one is padded and the padding's results dropped), so they are compiled for one shape only.
"""

from __future__ import annotations

import csv
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .errors import (
    DeviceUnavailableError,
    InputNotFoundError,
    InvalidInputError,
    NonFiniteScoresError,
)
from .hashing import tagged_name
from .loaded_model import LoadedModel, read_model
from .outputs import atomic_path
from .runtime import Runtime
from .tiles.dataset import IMAGE_SUFFIXES, ImageFolderDataset, find_images

log = logging.getLogger(__name__)

#: ``batch_size`` value that lets the scorer choose.
AUTO_BATCH = "auto"
#: The automatic batch size on the CPU.
CPU_AUTO_BATCH = 32
#: Batch sizes the automatic choice tries on CUDA, largest first.
AUTO_BATCH_CANDIDATES = (512, 256, 128, 64, 32, 16, 8, 4, 2, 1)
#: The automatic choice keeps a batch whose forward pass peaks below this share of GPU memory.
MEMORY_GUARD = 0.85
#: ``compile`` values: ``off`` runs eagerly; the others are ``torch.compile`` modes.
COMPILE_MODES = ("off", "default", "max-autotune", "reduce-overhead")
#: ``engine`` values (``--runtime``): PyTorch, or ONNX Runtime on a graph ``export`` wrote.
ENGINES = ("torch", "onnx")


def check_batch_size(value: int | str) -> int | str:
    """``auto`` or a whole number ≥ 1; anything else is an error naming ``--batch-size``."""
    if value == AUTO_BATCH:
        return AUTO_BATCH
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(f"--batch-size must be auto or a whole number, got {value!r}")
    if value < 1:
        raise InvalidInputError("--batch-size must be at least 1")
    return value


def check_compile_mode(value: str) -> str:
    """One of :data:`COMPILE_MODES`; anything else is an error naming ``--compile``."""
    if value not in COMPILE_MODES:
        raise InvalidInputError(
            f"--compile must be one of {', '.join(COMPILE_MODES)}, got {value!r}"
        )
    return value


@dataclass
class BatchChoice:
    """How the batch size was chosen: ``setting`` as given, ``batch_size`` as used, and for the
    automatic choice on CUDA the forward passes tried (``batch`` with ``peak_bytes`` or
    ``out_of_memory``) against ``limit_bytes``."""

    setting: int | str
    batch_size: int
    limit_bytes: int | None = None
    tried: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "setting": self.setting,
            "batch_size": self.batch_size,
            "limit_bytes": self.limit_bytes,
            "tried": self.tried,
            "seconds": self.seconds,
        }


def probe_batch_size(
    forward: Callable[[int], int],
    limit_bytes: int,
    candidates: Sequence[int] = AUTO_BATCH_CANDIDATES,
    after_out_of_memory: Callable[[], None] = lambda: None,
) -> BatchChoice:
    """The largest of ``candidates`` whose ``forward(batch)`` — one real forward pass that
    returns its peak allocated bytes — neither runs out of memory nor peaks above
    ``limit_bytes``. ``after_out_of_memory`` runs after each out-of-memory error (to empty the
    allocator's cache), outside the handler so the failed pass's tensors are already freed."""
    t0 = time.perf_counter()
    tried: list[dict[str, Any]] = []
    for batch in sorted(set(candidates), reverse=True):
        out_of_memory = False
        try:
            peak = int(forward(batch))
        except torch.cuda.OutOfMemoryError:
            out_of_memory = True
        if out_of_memory:
            tried.append({"batch": batch, "out_of_memory": True})
            after_out_of_memory()
            continue
        tried.append({"batch": batch, "peak_bytes": peak})
        if peak <= limit_bytes:
            choice = BatchChoice(AUTO_BATCH, batch, limit_bytes, tried)
            choice.seconds = time.perf_counter() - t0
            return choice
    raise DeviceUnavailableError(
        f"the model does not fit in the GPU's memory even one tile at a time (limit "
        f"{limit_bytes / 2**30:.1f} GiB); free the GPU or use --device cpu"
    )


@dataclass
class ScoreBatch:
    """Scores of a batch: ``mean`` and ``max`` (B,) float32, ``maps`` (B, m, m) float32 (``m``:
    the family's map size)."""

    mean: np.ndarray
    max: np.ndarray
    maps: np.ndarray | None


def _torch_compile(fn: Callable, mode: str) -> Callable:
    return torch.compile(fn, mode=mode)


@dataclass
class _InFlight:
    """A batch whose results are on their way back to pinned host memory."""

    done: Any  # torch.cuda.Event, recorded after the copies back
    mean: torch.Tensor
    peak: torch.Tensor | None  # None: the peak is the mean (the family's max is its score)
    maps: torch.Tensor | None
    keep: tuple  # device tensors that must outlive the copies


class Scorer:
    """A trained model ready to score batches of 256×256 RGB tiles.

    Args:
        checkpoint: path of a finished checkpoint, or the model read from one
            (:class:`~wsi_anomaly.loaded_model.LoadedModel`).
        device: ``auto`` | ``cpu`` | ``cuda[:N]``.
        precision: ``auto`` (bf16 autocast on CUDA and on CPUs with native bf16, else fp32,
            see :mod:`wsi_anomaly.runtime`) | ``fp32`` | ``bf16``.
        batch_size: tiles per forward pass, or ``auto`` (see the module's description).
        compile: ``off`` | ``default`` | ``max-autotune`` | ``reduce-overhead`` (CUDA graphs).
        backbone_weights: the backbone weights file, for a family whose checkpoints record the
            backbone's identity (name, sha256) instead of holding it; refused when its hash
            differs.
        compiler: ``compiler(fn, mode)`` compiles the prediction function (``torch.compile``).
        engine: ``torch``, or ``onnx``: ONNX Runtime on the CPU runs the fp32 graph that
            ``wsi-anomaly export`` wrote for this checkpoint (``onnx_model``, by default the
            checkpoint's path with the ``.onnx`` suffix).
    """

    def __init__(
        self,
        checkpoint: str | Path | LoadedModel,
        device: str = "auto",
        precision: str = "auto",
        batch_size: int | str = AUTO_BATCH,
        compile: str = "off",
        compiler: Callable[[Callable, str], Callable] = _torch_compile,
        backbone_weights: str | None = None,
        engine: str = "torch",
        onnx_model: str | Path | None = None,
    ):
        if engine not in ENGINES:
            raise InvalidInputError(f"--runtime must be torch or onnx, got {engine!r}")
        if engine == "onnx" and (device.startswith("cuda") or precision == "bf16"):
            raise InvalidInputError(
                "--runtime onnx scores the exported fp32 graph on the CPU: use --device cpu "
                "and --precision fp32 or auto with it"
            )
        self.engine = engine
        batch_setting = check_batch_size(batch_size)
        self.compile_mode = check_compile_mode(compile)
        loaded = checkpoint if isinstance(checkpoint, LoadedModel) else read_model(checkpoint)
        #: The checkpoint as read (identity, family, config, calibration, tile size and mpp).
        self.loaded = loaded
        self.path = loaded.path
        self.checkpoint = loaded.checkpoint
        self.config = loaded.config
        self.runtime = Runtime.resolve(
            "cpu" if engine == "onnx" else device, "fp32" if engine == "onnx" else precision
        )
        self.device = self.runtime.device
        self.precision = self.runtime.precision
        self.model_name: str = loaded.model_name
        self.family = loaded.family
        self.backbone: str = loaded.backbone
        self.calibration = loaded.calibration
        self.model = self.runtime.prepare_model(loaded.restore(backbone_weights))
        #: Side of the maps the model gives (its family's patch grid or map size).
        self.map_px: int = loaded.map_px
        self._predict_calibration = self.family.calibration_to(self.calibration, self.device)
        self.tile_mpp: float | None = loaded.tile_mpp
        self.model_hash = loaded.sha256
        self.tile_px = loaded.tile_px
        self._onnx = self._onnx_session(onnx_model) if engine == "onnx" else None
        # One forward pass at a time (slides in flight share the scorer); on CUDA all of them
        # run on one compute stream, so their memory peaks do not add up.
        self._lock = threading.Lock()
        self._streams: tuple[Any, Any, Any] | None = None
        self._compiler = compiler
        self._compiled: dict[bool, Callable] = {}
        if batch_setting == AUTO_BATCH:
            self.batch_choice = self._auto_batch_size()
        else:
            assert isinstance(batch_setting, int)
            self.batch_choice = BatchChoice(batch_setting, batch_setting)
        self.batch_size: int = self.batch_choice.batch_size

    def _onnx_session(self, onnx_model: str | Path | None) -> Any:
        """ONNX Runtime's session on this checkpoint's exported graph (an untrusted file: its
        recorded checkpoint sha256, tensors and input shape are checked first)."""
        from .export import load_exported

        path = Path(onnx_model) if onnx_model else self.path.with_suffix(".onnx")
        if not path.is_file():
            raise InputNotFoundError(
                f"--runtime onnx: no exported model at {path}; write it with: "
                f"wsi-anomaly export {self.path} --out {path}"
            )
        px = self.tile_px
        tile = torch.zeros(1, px, px, 3, dtype=torch.uint8)
        shape = tuple(self.family.transform(tile, self.config).shape[1:])
        return load_exported(path, self.model_hash, shape)

    @property
    def identity(self) -> dict[str, Any]:
        """What to record next to scores so they can be traced to this model."""
        return self.loaded.identity

    # -- batch size ------------------------------------------------------------------------------
    def _auto_batch_size(self) -> BatchChoice:
        if not self.runtime.is_cuda:
            return BatchChoice(AUTO_BATCH, CPU_AUTO_BATCH)
        total = torch.cuda.get_device_properties(self.device).total_memory
        choice = probe_batch_size(
            self._peak_bytes, int(MEMORY_GUARD * total), after_out_of_memory=torch.cuda.empty_cache
        )
        torch.cuda.empty_cache()
        log.info(
            "batch size %d (peak %.1f of %.1f GiB allowed)",
            choice.batch_size,
            choice.tried[-1]["peak_bytes"] / 2**30,
            (choice.limit_bytes or 0) / 2**30,
        )
        return choice

    @torch.no_grad()
    def _peak_bytes(self, batch: int) -> int:
        """Peak allocated CUDA memory of one eager forward pass of ``batch`` tiles (the
        compiled model, when asked for, is compiled later for the chosen size only)."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        tiles = torch.zeros((batch, self.tile_px, self.tile_px, 3), dtype=torch.uint8)
        x = self.runtime.to_device(self._host_input(tiles))
        out = self._predict(x, keep_maps=True, compiled=False)
        torch.cuda.synchronize(self.device)
        del x, out
        return int(torch.cuda.max_memory_allocated(self.device))

    # -- one batch -------------------------------------------------------------------------------
    def _host_input(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The batch as a tensor, ready to copy: uint8 ``B×H×W×3`` tiles stay as they are (4×
        fewer bytes to copy; converted and normalised on the device), float ``B×3×H×W`` images
        in [0, 1] too, unless the family transforms on the host."""
        x = (
            torch.from_numpy(np.ascontiguousarray(images))
            if isinstance(images, np.ndarray)
            else images
        )
        if x.dtype != torch.uint8 and not x.is_floating_point():
            raise InvalidInputError(f"tiles must be uint8 or float, got {x.dtype}")
        if not self.family.transforms_on_device:
            x = self.family.transform(x, self.config)
        return x

    def _prediction_fn(self, keep_maps: bool, compiled: bool) -> Callable:
        def predict(x: torch.Tensor):
            return self.family.predict(
                self.model, x, self._predict_calibration, keep_maps=keep_maps
            )

        if not compiled or self.compile_mode == "off":
            return predict
        if keep_maps not in self._compiled:
            self._compiled[keep_maps] = self._compiler(predict, self.compile_mode)
        return self._compiled[keep_maps]

    def _predict(
        self, x: torch.Tensor, keep_maps: bool, compiled: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(score, max, maps)`` of a batch already on the device (as :meth:`_host_input`
        gives it). A compiled model sees full batches only: a short batch is padded with
        zeros to the batch size, and the padding's results are dropped."""
        if self._onnx is not None:  # the exported fp32 graph; --compile does not apply
            return self._predict_onnx(x, keep_maps)
        n = len(x)
        compiled = compiled and self.compile_mode != "off"
        if compiled and n < self.batch_size:
            x = torch.cat([x, x.new_zeros((self.batch_size - n, *x.shape[1:]))])
        if self.family.transforms_on_device:
            x = self.family.transform(x, self.config)
        x = self.runtime.layout(x)
        fn = self._prediction_fn(keep_maps, compiled)
        if compiled and self.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        with self.runtime.autocast():
            score, peak, maps = fn(x)
        if compiled:
            # CUDA graphs write their outputs to the same memory on every run: copy them out.
            # Padding's results are dropped either way.
            same = peak is score
            score = score[:n].clone()
            peak = score if same else peak[:n].clone()
            maps = maps[:n].clone() if maps is not None else None
        return score, peak, maps

    def _predict_onnx(
        self, x: torch.Tensor, keep_maps: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        from .export import INPUT_NAME

        if self.family.transforms_on_device:
            x = self.family.transform(x, self.config)
        assert self._onnx is not None
        arrays = self._onnx.run(None, {INPUT_NAME: x.float().numpy()})
        tile_score, tile_max, tile_map = (torch.from_numpy(a) for a in arrays)
        return tile_score, tile_max, (tile_map if keep_maps else None)

    @torch.no_grad()
    def score(self, images: torch.Tensor | np.ndarray, keep_maps: bool = True) -> ScoreBatch:
        """Score a batch: ``B×H×W×3`` uint8 tiles (numpy or tensor, as the tile store gives
        them) or ``B×3×H×W`` float images in [0, 1] (any device).

        Raises:
            NonFiniteScoresError when a score or map value is NaN or infinite.
        """
        return self._checked(self._score_unchecked(images, keep_maps), 0)

    @torch.no_grad()
    def _score_unchecked(self, images: torch.Tensor | np.ndarray, keep_maps: bool) -> ScoreBatch:
        x = self.runtime.to_device(self._host_input(images))
        with self._lock:
            score, peak, maps = self._predict(x, keep_maps)
        mean = score.float().cpu().numpy()
        peak_values = peak.float().cpu().numpy()
        if peak is score:
            peak_values = peak_values.copy()
        out_maps = maps.float().cpu().numpy() if keep_maps and maps is not None else None
        return ScoreBatch(mean, peak_values, out_maps)

    def _checked(self, result: ScoreBatch, start: int) -> ScoreBatch:
        """``result`` when every score and map value is finite; otherwise one error naming the
        tiles (their index in the stream: ``start`` is the batch's first)."""
        bad = ~(np.isfinite(result.mean) & np.isfinite(result.max))
        what = "scores"
        if not bad.any() and result.maps is not None:
            bad = ~np.isfinite(result.maps.reshape(len(result.maps), -1)).all(axis=1)
            what = "anomaly maps"
        if not bad.any():
            return result
        tiles = (np.flatnonzero(bad) + start).tolist()
        shown = ", ".join(map(str, tiles[:5])) + (", …" if len(tiles) > 5 else "")
        raise NonFiniteScoresError(
            f"{self.path.name} produced non-finite {what} (NaN or infinity) for {len(tiles)} of "
            f"{len(result.mean)} tiles (tile {shown}); the model is unusable — retrain it or use "
            "another checkpoint"
        )

    # -- a stream of batches ---------------------------------------------------------------------
    def score_batches(
        self, batches: Iterable[torch.Tensor | np.ndarray], keep_maps: bool = False
    ) -> Iterator[ScoreBatch]:
        """The scores of each batch of ``batches`` (as :meth:`score` takes them), in order.

        On CUDA the copies to the device, the forward passes and the copies back overlap (see
        the module's description); elsewhere each batch is scored in turn."""
        start = 0
        if not self.runtime.is_cuda:
            for images in batches:
                result = self._checked(self._score_unchecked(images, keep_maps), start)
                start += len(result.mean)
                yield result
            return
        for result in self._score_batches_cuda(batches, keep_maps):
            self._checked(result, start)
            start += len(result.mean)
            yield result

    def _cuda_streams(self) -> tuple[Any, Any, Any]:
        """Host→device copies, compute, device→host copies: one set per scorer."""
        with self._lock:
            if self._streams is None:
                self._streams = (
                    torch.cuda.Stream(self.device),
                    torch.cuda.Stream(self.device),
                    torch.cuda.Stream(self.device),
                )
            return self._streams

    @torch.no_grad()
    def _score_batches_cuda(
        self, batches: Iterable[torch.Tensor | np.ndarray], keep_maps: bool
    ) -> Iterator[ScoreBatch]:
        to_gpu, compute, to_host = self._cuda_streams()

        def stage(images: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, Any, Any]:
            """Start the copy of a batch to the device on the copy stream."""
            x = self._host_input(images)
            if x.device.type != "cpu":
                ready = torch.cuda.Event()
                ready.record(torch.cuda.current_stream(self.device))
                return x, ready, None
            host = x if x.is_pinned() else x.pin_memory()
            with torch.cuda.stream(to_gpu):
                x = host.to(self.device, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(to_gpu)
            return x, ready, host  # the pinned copy is kept until the batch has run

        def launch(staged: tuple[torch.Tensor, Any, Any]) -> _InFlight:
            """Queue a batch's forward pass after its copy, and its results' copy back."""
            x, ready, _host = staged
            with self._lock, torch.cuda.stream(compute):
                compute.wait_event(ready)
                x.record_stream(compute)  # allocated on the copy stream, used here
                score, peak, maps = self._predict(x, keep_maps)
                outputs = [
                    score.float(),
                    None if peak is score else peak.float(),
                    maps.float() if keep_maps and maps is not None else None,
                ]
                computed = torch.cuda.Event()
                computed.record(compute)
            with torch.cuda.stream(to_host):
                to_host.wait_event(computed)
                host_out: list[torch.Tensor | None] = []
                for t in outputs:
                    if t is None:
                        host_out.append(None)
                        continue
                    t.record_stream(to_host)  # made on the compute stream, read here
                    h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                    h.copy_(t, non_blocking=True)
                    host_out.append(h)
                done = torch.cuda.Event(blocking=True)  # waiting for it leaves the CPU free
                done.record(to_host)
            mean_h, peak_h, maps_h = host_out
            assert mean_h is not None
            return _InFlight(done, mean_h, peak_h, maps_h, (x, _host, *outputs))

        def finish(batch: _InFlight) -> ScoreBatch:
            batch.done.synchronize()
            mean = batch.mean.numpy()
            peak = mean.copy() if batch.peak is None else batch.peak.numpy()
            maps = batch.maps.numpy() if batch.maps is not None else None
            return ScoreBatch(mean, peak, maps)

        source = iter(batches)
        first = next(source, None)
        staged = stage(first) if first is not None else None
        previous: _InFlight | None = None
        while staged is not None:
            current = launch(staged)
            following = next(source, None)  # read and copied while the batch runs
            staged = stage(following) if following is not None else None
            if previous is not None:
                yield finish(previous)
            previous = current
        if previous is not None:
            yield finish(previous)

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
            for result in self.score_batches(loader, keep_maps=keep_maps):
                n = len(result.mean)
                yield start, result
                start += n
                bar.update(n)


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
    stems: dict[str, int] = {}
    for f in files:
        stems[f.stem] = stems.get(f.stem, 0) + 1
    names = []
    for f in files:
        if stems[f.stem] == 1:
            names.append(f"{f.stem}_map.png")
        else:
            names.append(f"{tagged_name(f.stem, Path(f).resolve())}_map.png")
    return names


def score_images(
    model: str | Path,
    paths: Sequence[str | Path],
    out_csv: str | Path,
    maps_dir: str | Path | None = None,
    device: str = "auto",
    batch_size: int | str = AUTO_BATCH,
    workers: int = 0,
    progress: bool = True,
    compile: str = "off",
    backbone_weights: str | None = None,
    precision: str = "auto",
    engine: str = "torch",
) -> dict[str, Any]:
    """Score image files; write a CSV of per-image scores and, optionally, anomaly-map PNGs."""
    from .stitch import colour_scale, save_map_png

    scorer = Scorer(
        model,
        device=device,
        precision=precision,
        batch_size=batch_size,
        compile=compile,
        backbone_weights=backbone_weights,
        engine=engine,
    )
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
        "device": str(scorer.device),
        "precision": scorer.precision,
        "runtime": scorer.engine,
    }


_SHARED: dict[tuple[int, str, str, int | str, str, str | None, str], Scorer] = {}
_SHARED_LOCK = threading.Lock()


def shared_scorer(
    model: LoadedModel,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int | str = AUTO_BATCH,
    compile: str = "off",
    backbone_weights: str | None = None,
    engine: str = "torch",
) -> Scorer:
    """One scorer per loaded model and runtime settings in a process: the slides of a run, the
    slides in flight in one process and a dask worker's slides share it."""
    key = (id(model), device, precision, batch_size, compile, backbone_weights, engine)
    with _SHARED_LOCK:
        scorer = _SHARED.get(key)
        if scorer is None or scorer.loaded is not model:
            scorer = _SHARED[key] = Scorer(
                model,
                device=device,
                precision=precision,
                batch_size=batch_size,
                compile=compile,
                backbone_weights=backbone_weights,
                engine=engine,
            )
        return scorer


def score_shards(
    scorer: Any,
    shards: Iterable[tuple[int, np.ndarray]],
    skip: dict[int, np.ndarray] | None = None,
    keep_maps: bool = False,
    on_batch: Callable[[int, int, float], None] | None = None,
) -> Iterator[tuple[int, ScoreBatch]]:
    """The scores of consecutive shards of (n, T, T, 3) uint8 tiles, ``(start, tiles)`` in
    order, as ``(start, scores)`` per shard, in order: the tiles are scored in model batches of
    ``scorer.batch_size`` (a batch may span shards) through ``scorer.score_batches``, and a
    shard's scores come out once all its tiles are scored.

    ``skip``: shard start → (n,) bool, the tiles not to score (filled in by the time the shard
    is drawn from ``shards``); their scores are NaN (maps too; a shard skipped whole has no
    maps). ``on_batch(done, scored, seconds)`` runs after every model batch, and once more at
    the end with ``scored`` 0: ``done`` tiles so far (skipped tiles count when their shard is
    drawn), ``scored`` in this batch, ``seconds`` spent waiting for its scores less the time
    spent waiting for shards.
    """
    skip = skip if skip is not None else {}
    # shards whose tiles are being scored: start, tiles, tiles to score, the mask of skipped
    pending: deque[tuple[int, int, int, np.ndarray | None]] = deque()
    upstream = [0.0]  # seconds spent waiting for shards
    passed = [0]  # tiles skipped so far (they count as done)
    batch_size = scorer.batch_size

    def batches() -> Iterator[np.ndarray]:
        held: list[np.ndarray] = []  # tiles not yet in a batch (views of the shards)
        count = 0
        source = iter(shards)
        while True:
            t0 = time.perf_counter()
            item = next(source, None)
            upstream[0] += time.perf_counter() - t0
            if item is None:
                break
            start, tiles = item
            skipped = skip.get(start)
            if skipped is not None and skipped.any():
                tiles = tiles[~skipped]
                passed[0] += int(skipped.sum())
            else:
                skipped = None
            pending.append(
                (start, len(skipped) if skipped is not None else len(tiles), len(tiles), skipped)
            )
            if len(tiles):
                held.append(tiles)
                count += len(tiles)
            while count >= batch_size:
                joined = held[0] if len(held) == 1 else np.concatenate(held)
                # uint8 as stored: conversion and normalisation happen on the scoring device.
                yield joined[:batch_size]
                rest = joined[batch_size:]
                held, count = ([rest] if len(rest) else []), len(rest)
        if count:
            yield held[0] if len(held) == 1 else np.concatenate(held)

    parts: list[ScoreBatch] = []
    have = done = 0
    results = scorer.score_batches(batches(), keep_maps=keep_maps)
    while True:
        t0, before = time.perf_counter(), upstream[0]
        result = next(results, None)
        seconds = time.perf_counter() - t0 - (upstream[0] - before)
        if result is None:
            break
        parts.append(result)
        have += len(result.mean)
        while pending and have >= pending[0][2]:
            start, shard_scores, parts, have = _take_shard(pending.popleft(), parts, have)
            yield start, shard_scores
        done += len(result.mean)
        if on_batch is not None:
            on_batch(done + passed[0], len(result.mean), seconds)
    while pending and pending[0][2] == 0:  # shards at the end with every tile skipped
        start, shard_scores, parts, have = _take_shard(pending.popleft(), parts, have)
        yield start, shard_scores
    if on_batch is not None:
        on_batch(done + passed[0], 0, seconds)
    assert not pending and have == 0, "every shard's tiles were scored"


def _take_shard(
    shard: tuple[int, int, int, np.ndarray | None], parts: list[ScoreBatch], have: int
) -> tuple[int, ScoreBatch, list[ScoreBatch], int]:
    """One shard's scores (the first ``n`` of ``parts``; NaN for its skipped tiles); returns its
    start, its scores, the scores left over and their count."""
    start, n_tiles, n, skipped = shard
    if n == 0:
        nan = np.full(n_tiles, np.nan, np.float32)
        return start, ScoreBatch(nan, nan, None), parts, have
    merged = _concat_scores(parts)
    mean, peak = merged.mean[:n], merged.max[:n]
    maps = merged.maps[:n] if merged.maps is not None else None
    if skipped is not None:
        mean, peak = _spread(mean, skipped), _spread(peak, skipped)
        maps = _spread(maps, skipped) if maps is not None else None
    rest = ScoreBatch(
        merged.mean[n:],
        merged.max[n:],
        merged.maps[n:] if merged.maps is not None else None,
    )
    return start, ScoreBatch(mean, peak, maps), ([rest] if len(rest.mean) else []), have - n


def _spread(scored: np.ndarray, skipped: np.ndarray) -> np.ndarray:
    """Values of the scored tiles back in their shard's places, NaN for the skipped ones."""
    out = np.full((len(skipped), *scored.shape[1:]), np.nan, np.float32)
    out[~skipped] = scored
    return out


def _concat_scores(parts: Sequence[ScoreBatch]) -> ScoreBatch:
    if len(parts) == 1:
        return parts[0]
    maps = [p.maps for p in parts if p.maps is not None]
    return ScoreBatch(
        np.concatenate([p.mean for p in parts]),
        np.concatenate([p.max for p in parts]),
        np.concatenate(maps) if len(maps) == len(parts) else None,
    )
