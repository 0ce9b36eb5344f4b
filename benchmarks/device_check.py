"""One run on a GPU machine: model throughput, bf16 agreement and a whole slide, in one table.

Run once on the GPU machine from the repository root::

    python benchmarks/device_check.py --json device_check.json

It first installs what is missing there from wheels in ``.device_wheels/`` (made here by
``benchmarks/fetch_device_wheels.sh``; ``pip install --no-index``), makes the project importable,
then measures:

- the automatic batch size (``--batch-size auto``: the largest of 512, 256, … whose forward
  pass stays under 85 % of the GPU's memory);
- model throughput (tiles/s through :meth:`wsi_anomaly.score.Scorer.score_batches`, the
  overlapped loop every command scores with) in fp32 and bf16: eager at batches 64 to 512 and
  at the automatic size, and at the automatic size compiled with ``torch.compile`` modes
  ``default`` and ``reduce-overhead`` (CUDA graphs);
- bf16-vs-fp32 agreement: Spearman rank correlation of the tile scores (must be ≥ 0.999) and the
  fraction of tiles whose anomalous call (score ≥ the fp32 99th percentile) differs;
- a synthetic slide (tissue everywhere, 0.5 µm/px; 70 000 × 70 000 px on the GPU) from file to
  pictures through :func:`wsi_anomaly.pipeline.run_cohort` at the automatic batch size, with
  the per-stage times of its ``summary.json``, the GPU's busy fraction while scoring
  (``nvidia-smi`` sampled every 200 ms) and peak GPU and host memory.

The model is a tiny HaloAE trained for two steps with random backbone weights: speed does not
depend on the weights. The memory-bank family (PatchCore: Wide ResNet-50-2 features, random
weights) gets its own rows: fp32 and bf16 tiles/s through the scorer with a bank of
``--bank-rows`` rows (16 384 on the GPU), and the exact nearest-neighbour search alone (one
batch of patch queries against that bank). ``--smoke`` runs the same code on the CPU with tiny sizes (batches 2 and
4, a 2048² slide tiled at 1 µm/px, no compile, no throughput row at the automatic size) in
about a minute and a half.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".device_wheels"
# import name → distribution name, for what a bare torch install may lack.
NEEDED = {
    "openslide": "openslide-python",
    "openslide_bin": "openslide-bin",
    "zarr": "zarr",
    "numcodecs": "numcodecs",
    "google_crc32c": "google-crc32c",
    "imagecodecs": "imagecodecs",
    "tifffile": "tifffile",
    "dask": "dask",
    "distributed": "distributed",
    "skimage": "scikit-image",
    "sklearn": "scikit-learn",
    "matplotlib": "matplotlib",
    "yaml": "pyyaml",
    "tqdm": "tqdm",
    "PIL": "pillow",
}

TARGETS = {
    "model_tiles_per_s": 3000.0,
    "slide_total_s": 60.0,
    "gpu_busy_pct": 90.0,
    "spearman": 0.999,
    "anomalous_calls_differing": 0.005,
}


# --- environment -----------------------------------------------------------------------------


def ensure_packages(wheels: Path) -> list[str]:
    """Install the missing distributions from ``wheels`` (no index); returns what was installed."""
    missing = [dist for mod, dist in NEEDED.items() if importlib.util.find_spec(mod) is None]
    if missing:
        if not wheels.is_dir():
            raise SystemExit(
                f"missing {', '.join(missing)} and no wheel folder {wheels}; "
                "make it with benchmarks/fetch_device_wheels.sh"
            )
        have = {w.name.split("-")[0].lower() for w in wheels.glob("*.whl")}
        absent = [d for d in missing if d.replace("-", "_").lower() not in have]
        if absent:
            raise SystemExit(
                f"missing {', '.join(absent)} and no wheel for it in {wheels}; "
                f"add it: EXTRA_PACKAGES='{' '.join(absent)}' "
                "bash benchmarks/fetch_device_wheels.sh"
            )
        print(f"installing from {wheels}: {' '.join(missing)}", flush=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-index",
                "--find-links",
                str(wheels),
                *missing,
            ],
            check=True,
        )
        importlib.invalidate_caches()
    if importlib.util.find_spec("wsi_anomaly") is None:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--no-build-isolation",
                "-e",
                str(REPO),
            ],
            check=False,
        )
        importlib.invalidate_caches()
    # Always measure this checkout, whatever copy of the package the environment points at.
    sys.path.insert(0, str(REPO))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
    )
    return missing


class GpuSampler:
    """``nvidia-smi`` utilisation samples every 200 ms, with their times, in the background."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi") is None:
            return self
        self._proc = subprocess.Popen(
            [
                "nvidia-smi",
                "--query-gpu=utilization.gpu",
                "--format=csv,noheader,nounits",
                "-lms",
                "200",
                "-i",
                os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0],
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                self.samples.append((time.perf_counter(), float(line.strip())))
            except ValueError:
                pass

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def busy_pct(self, start: float, end: float) -> float | None:
        values = [u for t, u in self.samples if start <= t <= end]
        return sum(values) / len(values) if values else None


def peak_rss_mib() -> float:
    scale = 1 / 1024 if platform.system() == "Linux" else 1 / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


# --- inputs ----------------------------------------------------------------------------------


def distinct_tiles(n: int, seed: int):
    """``n`` 3×256×256 float tiles in [0, 1], each with its own colour, stripes and noise."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:256, 0:256] / 256.0
    tiles = []
    for _ in range(n):
        base = rng.uniform(0.2, 0.95, 3)[:, None, None]
        freq, angle = rng.uniform(1, 40), rng.uniform(0, np.pi)
        wave = np.sin(
            2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 2 * np.pi)
        )
        tint = rng.uniform(-1, 1, 3)[:, None, None] * rng.uniform(0, 0.4)
        noise = rng.uniform(0, 0.25) * rng.standard_normal((3, 256, 256))
        tiles.append(torch.from_numpy(np.clip(base + tint * wave + noise, 0, 1).astype(np.float32)))
    return tiles


def tiny_checkpoint(out: Path, device: str) -> Path:
    """A HaloAE trained for two single-tile steps with random backbone weights."""
    from wsi_anomaly.config import load_config
    from wsi_anomaly.training import train_model

    config = load_config(
        "haloae_fast",
        {
            "model": {"backbone_weights": "random"},
            "haloae": {"epochs": 1, "samples_per_epoch": 2, "batch_size": 1},
            "train": {
                "workers": 0,
                "calibration_tiles": 4,
                "checkpoint_every": 1,
            },
        },
    )
    train_model(
        distinct_tiles(4, seed=1),
        config,
        out,
        device=device,
        tile_mpp=0.5,
        progress=False,
        overwrite=True,
    )
    return out


def bank_checkpoint(out: Path, device: str, bank_rows: int, dims: int) -> Path:
    """A PatchCore checkpoint (random Wide ResNet-50-2) whose bank is ``bank_rows`` random
    rows: a fit over a handful of tiles, then the bank replaced (speed depends on its size,
    not on its values)."""
    import torch

    from wsi_anomaly.checkpoint import load_checkpoint, save_checkpoint
    from wsi_anomaly.config import load_config
    from wsi_anomaly.training import train_model

    config = load_config(
        "patchcore_fast",
        {
            "model": {"backbone_weights": "random"},
            "patchcore": {"target_dim": dims, "coreset_budget": 64},
            "train": {"workers": 0, "calibration_tiles": 8},
        },
    )
    train_model(
        distinct_tiles(8, seed=2), config, out, device=device, tile_mpp=0.5, progress=False,
        overwrite=True,
    )  # fmt: skip
    ckpt = load_checkpoint(out)
    ckpt["state_dict"]["memory_bank"] = torch.rand(bank_rows, dims)
    save_checkpoint({k: v for k, v in ckpt.items() if not k.startswith("format")}, out)
    return out


def bank_search(device: str, bank_rows: int, dims: int, queries: int, iters: int) -> dict:
    """Seconds of one exact nearest-neighbour search of ``queries`` patch rows against a bank of
    ``bank_rows`` (chunked matrix products on ``device``)."""
    import torch

    from wsi_anomaly.models.memory_bank import nearest_distance

    bank = torch.rand(bank_rows, dims, device=device)
    q = torch.rand(queries, dims, device=device)
    nearest_distance(q, bank)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        nearest_distance(q, bank)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / iters
    return {"section": "bank", "bank_rows": bank_rows, "dims": dims, "queries": queries,
            "seconds": seconds}  # fmt: skip


def spearman(a, b) -> float:
    import numpy as np

    ra = np.argsort(np.argsort(a, kind="stable"), kind="stable").astype(float)
    rb = np.argsort(np.argsort(b, kind="stable"), kind="stable").astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


# --- measurements ----------------------------------------------------------------------------


def model_throughput(
    ckpt: Path, device: str, precision: str, compile_mode: str, batch: int | str, iters: int
) -> dict:
    """Tiles/s through ``Scorer.score_batches`` (the loop every command scores with: on CUDA
    the copies to and from the GPU overlap the forward passes) at ``batch`` tiles a batch
    (``auto``: the scorer's own choice), ``compile_mode`` ``off`` (eager) or a torch.compile
    mode."""
    import torch

    from wsi_anomaly.score import Scorer

    scorer = Scorer(
        ckpt, device=device, precision=precision, batch_size=batch, compile=compile_mode
    )
    size = scorer.batch_size
    # uint8 tiles in host memory, as the tile store hands them to the scorer: the measured rate
    # includes the host→device copy and the conversion on the device.
    tiles = torch.randint(0, 256, (size, 256, 256, 3), dtype=torch.uint8).numpy()

    def run(n: int) -> None:
        for _ in scorer.score_batches((tiles for _ in range(n)), keep_maps=False):
            pass  # each result is on the host: the device has finished that batch

    if scorer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(scorer.device)
    t0 = time.perf_counter()
    run(1)  # warm-up (and compilation)
    warm_s = time.perf_counter() - t0
    if compile_mode != "off" or iters > 1:
        run(2)  # CUDA graphs record on a later call
    t0 = time.perf_counter()
    run(iters)
    seconds = time.perf_counter() - t0
    row = {
        "section": "model",
        "precision": precision,
        "mode": "eager" if compile_mode == "off" else f"compile {compile_mode}",
        "batch": size,
        "batch_setting": batch,
        "tiles_per_s": size * iters / seconds,
        "first_call_s": warm_s,
    }
    if batch == "auto":
        row["batch_choice"] = scorer.batch_choice.to_dict()
    if scorer.device.type == "cuda":
        row["peak_gpu_mib"] = torch.cuda.max_memory_allocated(scorer.device) / 2**20
    scorer = tiles = None  # free the model before the next configuration
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def agreement(ckpt: Path, device: str, n_tiles: int, batch: int) -> dict:
    import numpy as np
    import torch

    from wsi_anomaly.score import Scorer

    scores = {}
    for precision in ("fp32", "bf16"):
        scorer = Scorer(ckpt, device=device, precision=precision, batch_size=batch)
        batches = (
            torch.stack(distinct_tiles(min(batch, n_tiles - start), seed=start))
            for start in range(0, n_tiles, batch)
        )
        parts = [r.mean for r in scorer.score_batches(batches, keep_maps=False)]
        scores[precision] = np.concatenate(parts)
    fp32, bf16 = scores["fp32"], scores["bf16"]
    threshold = float(np.quantile(fp32, 0.99))
    differ = float(np.mean((fp32 >= threshold) != (bf16 >= threshold)))
    from wsi_anomaly.runtime import Runtime, cpu_has_native_bf16
    from wsi_anomaly.stitch import colour_scale

    # The "Anomalous" class of tiles.csv and tiles.geojson: the model's own threshold.
    anomalous_at = colour_scale(scorer.calibration).threshold
    return {
        "section": "agreement",
        "tiles": n_tiles,
        "spearman": spearman(fp32, bf16),
        "threshold": threshold,
        "calls_differing": differ,
        "anomalous_calls_differing": float(
            np.mean((fp32 >= anomalous_at) != (bf16 >= anomalous_at))
        ),
        "auto_precision": Runtime.resolve(device, "auto").precision,
        "cpu_native_bf16": cpu_has_native_bf16(),
        "max_rel_diff": float(np.max(np.abs(bf16 - fp32) / np.maximum(np.abs(fp32), 1e-12))),
    }


def whole_slide(
    ckpt: Path,
    work: Path,
    size: int,
    device: str,
    precision: str,
    batch: int | str,
    target_mpp: float | None = None,
) -> dict:
    """The slide from file to pictures through ``run_cohort``: tiles scored through the
    overlapped loop, at ``batch`` tiles a batch (``auto`` on a GPU: the scorer's choice)."""
    import torch

    from wsi_anomaly.pipeline import HeatmapSettings, run_cohort
    from wsi_anomaly.slide.synthetic import SyntheticLayout, write_synthetic_slide

    t0 = time.perf_counter()
    # One ellipse whose radii exceed the half-diagonal: tissue everywhere.
    layout = SyntheticLayout(
        width=size,
        height=size,
        boundary_wave=0.0,
        tissue_ellipses=((size / 2, size / 2, size, size),),
    )
    slide = write_synthetic_slide(
        work / f"synthetic_{size}.tif", width=size, height=size, mpp=0.5, layout=layout, seed=3
    )
    write_s = time.perf_counter() - t0
    settings = HeatmapSettings(
        device=device,
        precision=precision,
        batch_size=batch,
        target_mpp=target_mpp,
        progress=False,
        overwrite=True,
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with GpuSampler() as gpu:
        t0 = time.perf_counter()
        rows = run_cohort([slide.path], work / "out", ckpt, settings)
        t1 = time.perf_counter()
    if not rows or rows[0].get("error"):
        raise RuntimeError(f"slide run failed: {rows}")
    summary = json.loads(next((work / "out").glob("*/summary.json")).read_text())
    timings = summary.get("timings_s", {})
    # Busy fraction while scoring: the samples from the first to the last one with the GPU
    # in use (tiling before and drawing after use the CPU only).
    busy = None
    used = [t for t, u in gpu.samples if u > 0 and t0 <= t <= t1]
    if used:
        busy = gpu.busy_pct(used[0], used[-1])
    row = {
        "section": "slide",
        "size_px": size,
        "precision": precision,
        "batch": summary.get("batch_size"),
        "batch_setting": batch,
        "tile_mpp": summary.get("actual_mpp"),
        "tiles": summary.get("n_tiles"),
        "write_slide_s": write_s,
        "file_to_pictures_s": t1 - t0,
        "timings_s": timings,
        "gpu_busy_pct": busy,
        "gpu_samples": len(gpu.samples),
    }
    if torch.cuda.is_available():
        row["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return row


# --- report ----------------------------------------------------------------------------------


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def table(result: dict) -> str:
    lines = ["| measure | setting | value | target | met |", "| --- | --- | --- | --- | --- |"]
    gpu = result["device"] == "cuda"

    def add(measure, setting, value, target="", met=None):
        lines.append(
            f"| {measure} | {setting} | {_fmt(value)} | {target} | "
            f"{'' if met is None else ('yes' if met else 'NO')} |"
        )

    for r in result["model"]:
        tps = r.get("tiles_per_s")
        batch = r["batch"] if r.get("batch_setting") != "auto" else f"auto ({r['batch']})"
        setting = f"{r['precision']} {r['mode']} batch {batch}"
        if "skipped" in r:
            add("model tiles/s", setting, r["skipped"])
            continue
        on_target = gpu and r["precision"] == "bf16"
        add(
            "model tiles/s",
            setting,
            tps,
            f"≥ {TARGETS['model_tiles_per_s']:.0f}" if on_target else "",
            tps >= TARGETS["model_tiles_per_s"] if on_target else None,
        )
    a = result["agreement"]
    add(
        "bf16 vs fp32 Spearman",
        f"{a['tiles']} tiles",
        a["spearman"],
        "≥ 0.999",
        a["spearman"] >= TARGETS["spearman"],
    )
    add("bf16 vs fp32 calls differing", "score ≥ fp32 p99", a["calls_differing"])
    add(
        "bf16 vs fp32 Anomalous calls differing",
        "score ≥ the model's threshold",
        a["anomalous_calls_differing"],
        f"≤ {TARGETS['anomalous_calls_differing']:g}",
        a["anomalous_calls_differing"] <= TARGETS["anomalous_calls_differing"],
    )
    add(
        "precision auto picks",
        f"{result['device']}, CPU native bf16: {'yes' if a['cpu_native_bf16'] else 'no'}",
        a["auto_precision"],
    )
    choice = result["auto_batch"]
    add("batch size auto", f"{result['device']}, {choice['precision']}", choice["batch_size"])
    s = result["slide"]
    batch = s["batch"] if s["batch_setting"] != "auto" else f"auto ({s['batch']})"
    setting = (
        f"{s['size_px']}² px, {s['tiles']} tiles at {s['tile_mpp']:g} µm/px, {s['precision']}, "
        f"batch {batch}"
    )
    add(
        "slide file → pictures s",
        setting,
        s["file_to_pictures_s"],
        f"< {TARGETS['slide_total_s']:.0f}" if gpu else "",
        s["file_to_pictures_s"] < TARGETS["slide_total_s"] if gpu else None,
    )
    for stage, v in s["timings_s"].items():
        add("slide stage s", stage, v)
    add(
        "GPU busy % while scoring",
        setting,
        s["gpu_busy_pct"],
        "≥ 90" if gpu else "",
        (s["gpu_busy_pct"] or 0) >= TARGETS["gpu_busy_pct"] if gpu else None,
    )
    for r in result.get("bank_family", []):
        if r.get("section") == "bank":
            add(
                "bank search s",
                f"{r['queries']} patches vs {r['bank_rows']} × {r['dims']}",
                r["seconds"],
            )
        elif "skipped" in r:
            add("patchcore tiles/s", f"{r['precision']} batch {r['batch']}", r["skipped"])
        else:
            add("patchcore tiles/s", f"{r['precision']} eager batch {r['batch']}", r["tiles_per_s"])
    add("peak GPU MiB", "max over model rows and slide", result.get("peak_gpu_mib"))
    add("peak host RSS MiB", "whole run", result["peak_rss_mib"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, about a minute")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--wheels", type=Path, default=WHEELS, help="wheel folder for missing packages")
    p.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    p.add_argument("--slide-px", type=int, help="slide side, px (70000 on a GPU, 2048 smoke)")
    p.add_argument("--batches", type=int, nargs="+", help="batch sizes for the eager rows")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--bank-rows", type=int, help="memory-bank rows (16384 on a GPU, 256 smoke)")
    args = p.parse_args(argv)

    installed = ensure_packages(args.wheels)
    import torch

    from wsi_anomaly.runtime import Runtime
    from wsi_anomaly.score import Scorer
    from wsi_anomaly.tiles.tiler import available_cores

    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    smoke = args.smoke or device == "cpu"
    batches = args.batches or ([2, 4] if smoke else [64, 128, 256, 512])
    slide_px = args.slide_px or (2048 if smoke else 70_000)
    iters = 1 if smoke else 20
    # Compiled rows at the automatic batch size only: each compilation takes a while.
    compile_modes = [] if (smoke or args.no_compile) else ["default", "reduce-overhead"]
    work_ctx = tempfile.TemporaryDirectory(prefix="device_check_") if args.work is None else None
    work = Path(work_ctx.name) if work_ctx else args.work
    work.mkdir(parents=True, exist_ok=True)
    if smoke:
        torch.set_num_threads(max(1, min(4, available_cores())))

    t_start = time.perf_counter()
    result: dict = {
        "device": device,
        "smoke": smoke,
        "installed_from_wheels": installed,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "targets": TARGETS,
    }
    ckpt = tiny_checkpoint(work / "tiny.pt", device)
    # The slide runs at the default precision: bf16 on a GPU and on a CPU with native bf16.
    slide_precision = Runtime.resolve(device, "auto").precision
    auto = Scorer(ckpt, device=device, precision=slide_precision, batch_size="auto")
    result["auto_batch"] = {"precision": slide_precision, **auto.batch_choice.to_dict()}
    auto = None
    print(f"  auto batch {result['auto_batch']}", flush=True)
    rows = []
    configurations: list[tuple[str, str, int | str]] = []
    for precision in ("fp32", "bf16"):
        configurations += [(precision, "off", batch) for batch in batches]
        if not smoke:  # on the CPU auto is 32 tiles: too slow for the smoke run
            configurations.append((precision, "off", "auto"))
        for mode in ("default", "reduce-overhead"):
            if mode in compile_modes:
                configurations.append((precision, mode, "auto"))
            else:
                rows.append(
                    {
                        "section": "model",
                        "precision": precision,
                        "mode": f"compile {mode}",
                        "batch": "auto",
                        "skipped": "skipped",
                    }
                )
    for precision, mode, batch in configurations:
        try:
            rows.append(model_throughput(ckpt, device, precision, mode, batch, iters))
        except Exception as exc:  # e.g. out of memory at the largest batch
            rows.append(
                {
                    "section": "model",
                    "precision": precision,
                    "mode": "eager" if mode == "off" else f"compile {mode}",
                    "batch": batch,
                    "skipped": f"failed: {type(exc).__name__}: {str(exc)[:200]}",
                }
            )
        print(f"  model {rows[-1]}", flush=True)
    result["model"] = rows
    result["agreement"] = agreement(ckpt, device, 32 if smoke else 2048, min(64, max(batches)))
    print(f"  agreement {result['agreement']}", flush=True)
    slide_batch: int | str = "auto" if not smoke else 4
    # The smoke run tiles its slide at 1 µm/px (≤ 16 tiles): the CPU scores ~2 tiles/s.
    result["slide"] = whole_slide(
        ckpt,
        work,
        slide_px,
        device,
        slide_precision,
        slide_batch,
        1.0 if smoke else None,
    )
    bank_rows = args.bank_rows or (256 if smoke else 16384)
    dims = 1024
    bank_ckpt = bank_checkpoint(work / "bank.pt", device, bank_rows, dims)
    bank_rows_out: list[dict] = []
    for precision in ("fp32", "bf16"):
        batch = 2 if smoke else 64
        try:
            bank_rows_out.append(
                model_throughput(bank_ckpt, device, precision, "off", batch, iters)
            )
        except Exception as exc:
            bank_rows_out.append(
                {"precision": precision, "batch": batch, "skipped": f"failed: {exc}"[:200]}
            )
        print(f"  patchcore {bank_rows_out[-1]}", flush=True)
    # one batch of 64 tiles on the 28×28 patch grid: 50 176 queries (smoke: 2 tiles)
    bank_rows_out.append(
        bank_search(device, bank_rows, dims, (2 if smoke else 64) * 28 * 28, 1 if smoke else 5)
    )
    print(f"  bank search {bank_rows_out[-1]}", flush=True)
    result["bank_family"] = bank_rows_out
    peaks = [r["peak_gpu_mib"] for r in rows + bank_rows_out if "peak_gpu_mib" in r]
    if "peak_gpu_mib" in result["slide"]:
        peaks.append(result["slide"]["peak_gpu_mib"])
    result["peak_gpu_mib"] = max(peaks) if peaks else None
    result["peak_rss_mib"] = peak_rss_mib()
    result["total_s"] = time.perf_counter() - t_start
    print(
        f"\ndevice check: {device}{' (smoke)' if smoke else ''}, torch {torch.__version__}, "
        f"{result['gpu'] or platform.processor() or 'CPU'}, {result['total_s']:.0f} s"
    )
    print(table(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    if work_ctx:
        work_ctx.cleanup()
    return result


if __name__ == "__main__":
    main()
