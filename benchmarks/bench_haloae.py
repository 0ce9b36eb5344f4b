"""Speed and memory of the HaloAE model core (random weights, synthetic 256×256 inputs).

Measures, in one run:

- inference images/s: VGG19 features (to relu3_4) + HaloNet encoder/decoder + scoring math,
  i.e. exactly :func:`wsi_anomaly.models.scoring.score_batch`;
- training images/s: one Adam step on ``B`` originals → ``3B`` images with Cut&Paste (the
  augmentation on the CPU is included), all losses, backward;
- the "released-style" inference path for comparison: full VGG19 through conv5, naive tap
  aggregation (nearest-upsample every tap to 256×256, then average-pool back to 64×64) and blocks
  D and E run although scoring does not need them;
- trainable parameters, FLOPs per image (``torch.utils.flop_counter``) and peak memory.

``--precision both`` (the default) measures fp32 and bf16 autocast in the same run, interleaved
(fp32, bf16, bf16, fp32, … so that other work on a shared machine slows both alike), and gives
for each the median images/s, the median CPU seconds per image (this process's CPU time, which
other processes disturb less than the wall clock) and the peak RSS; then the bf16/fp32 ratios.

Prints a Markdown table; ``--json`` also writes the numbers. Examples::

    python benchmarks/bench_haloae.py --batch-size 8 --iters 4 --skip-released
    python benchmarks/bench_haloae.py --device cuda --precision bf16 --channels-last
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import threading
import time
from collections.abc import Callable
from functools import partial

import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from wsi_anomaly.models import (
    HaloAE,
    aggregate_reference,
    anomaly_map,
    ews_weights,
    haloae_loss,
    load_vgg19,
    make_cutpaste_batch,
    normalise,
    score_batch,
)

IMAGE_SIZE = 256
_TAPS = (1, 6, 11, 17)  # relu1_1, relu2_1, relu3_1, relu3_4 in vgg19().features


class ReleasedStyleInference(nn.Module):
    """What the authors' inference computes for the same result (speed comparison only)."""

    def __init__(self, model: HaloAE) -> None:
        super().__init__()
        cfg = torchvision.models.vgg.cfgs["E"]
        self.vgg = torchvision.models.vgg.make_layers(cfg)  # all of vgg19().features
        for m in self.vgg.modules():
            if isinstance(m, nn.Conv2d):
                m.padding_mode = "reflect"
        self.vgg.requires_grad_(False)
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        taps = []
        for i, layer in enumerate(self.vgg):  # through conv5/pool5: wasted work
            x = layer(x)
            if i in _TAPS:
                taps.append(x)
        fm = aggregate_reference(taps)  # materialises 704×256×256 per image
        fm_hat = self.model.reconstruct_features(fm)
        self.model.classifier(self.model.image_reconstructor(fm_hat))  # D and E, unused
        return anomaly_map(fm, fm_hat)


class PeakRSS:
    """Peak resident memory of this process during a phase, in MiB.

    Samples psutil's RSS from a background thread (the kernel's ``ru_maxrss`` is a
    process-lifetime maximum and cannot be reset between phases); falls back to ``ru_maxrss``
    when psutil is not installed.
    """

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import psutil

            self._process = psutil.Process()
        except ImportError:
            self._process = None

    def _rss_mib(self) -> float:
        if self._process is not None:
            return self._process.memory_info().rss / 2**20
        # Linux reports ru_maxrss in KiB (macOS in bytes).
        scale = 1 / 1024 if platform.system() == "Linux" else 1 / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_mib = max(self.peak_mib, self._rss_mib())

    def __enter__(self) -> PeakRSS:
        # Hand memory freed by earlier phases back to the OS, so it does not count here.
        gc.collect()
        if platform.system() == "Linux":
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.peak_mib = self._rss_mib()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak_mib = max(self.peak_mib, self._rss_mib())


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _timed(step: Callable[[], object], iters: int, warmup: int, device: torch.device) -> float:
    """Seconds per call of ``step`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def _flops(fn: Callable[[], object]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32, help="inference batch")
    parser.add_argument(
        "--train-batch-size",
        type=int,
        default=4,
        help="originals per training step (3× images with Cut&Paste); paper: 4",
    )
    parser.add_argument("--released-batch-size", type=int, default=8)
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16", "both"),
        default="both",
        help="both (default): fp32 and bf16 autocast interleaved in one run",
    )
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model paths")
    parser.add_argument("--skip-released", action="store_true")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(cores or 1)
    torch.manual_seed(0)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    precisions = ("fp32", "bf16") if args.precision == "both" else (args.precision,)

    def autocast(precision: str) -> contextlib.AbstractContextManager:
        if precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def measure(step: Callable[[str], object], batch_size: int) -> dict[str, dict[str, float]]:
        """Per precision: images/s, CPU s/image (medians over ``--iters`` calls) and peak memory
        of ``step(precision)`` processing ``batch_size`` images per call; the precisions take
        turns, in alternating order."""
        for precision in precisions:
            for _ in range(args.warmup):
                step(precision)
        walls: dict[str, list[float]] = {p: [] for p in precisions}
        cpus: dict[str, list[float]] = {p: [] for p in precisions}
        peaks = dict.fromkeys(precisions, 0.0)
        cuda_peaks = dict.fromkeys(precisions, 0.0)
        for i in range(args.iters):
            for precision in precisions if i % 2 == 0 else precisions[::-1]:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                with PeakRSS() as rss:
                    cpu0 = time.process_time()
                    walls[precision].append(_timed(partial(step, precision), 1, 0, device))
                    cpus[precision].append(time.process_time() - cpu0)
                peaks[precision] = max(peaks[precision], rss.peak_mib)
                if device.type == "cuda":
                    cuda_peaks[precision] = max(
                        cuda_peaks[precision], torch.cuda.max_memory_allocated() / 2**20
                    )
        return {
            p: {
                "images_per_s": batch_size / statistics.median(walls[p]),
                "cpu_s_per_image": statistics.median(cpus[p]) / batch_size,
                "peak_rss_mib": peaks[p],
                **({"peak_cuda_mib": cuda_peaks[p]} if device.type == "cuda" else {}),
            }
            for p in precisions
        }

    model = HaloAE(load_vgg19("random")).to(device, memory_format=memory_format).eval()
    released = ReleasedStyleInference(model).to(device, memory_format=memory_format).eval()
    trainable = sum(p.numel() for p in model.trainable_parameters())
    mean_map = torch.zeros(IMAGE_SIZE // 4, IMAGE_SIZE // 4, device=device)
    rows: list[tuple[str, str]] = []
    results: dict[str, object] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "precisions": list(precisions),
        "channels_last": args.channels_last,
        "compile": args.compile,
        "trainable_parameters": trainable,
    }

    def images(n: int) -> torch.Tensor:
        x = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
        return x.contiguous(memory_format=memory_format)

    # FLOPs of one image (fp32 on the chosen device; counted, not timed).
    one = images(1)
    with torch.no_grad():
        results["gflops_inference_per_image"] = (
            _flops(lambda: model.reconstruct_features(model.features(one))) / 1e9
        )
        if not args.skip_released:
            results["gflops_released_per_image"] = _flops(lambda: released(one)) / 1e9

    # Training FLOPs: forward + backward of one original with its two copies.
    weights = ews_weights(100)
    generator = torch.Generator().manual_seed(0)
    batch, labels = make_cutpaste_batch(torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE), generator)
    xt = normalise(batch).to(device)

    def one_step() -> None:
        loss, _ = haloae_loss(model.train()(xt), xt, labels.to(device), weights)
        loss.backward()

    results["gflops_train_per_original"] = _flops(one_step) / 1e9
    model.zero_grad(set_to_none=True)
    model.eval()

    if args.compile:
        # Compile every block in place, so that features(), reconstruct_features() and forward()
        # all run compiled code (torch.compile(model) would only wrap forward()).
        for block in (*model.children(), released.vgg):
            block.compile()

    # Inference: B + C + scoring math.
    x = images(args.batch_size)

    def infer(precision: str) -> None:
        with torch.inference_mode(), autocast(precision):
            score_batch(model, x, mean_map)

    results["inference"] = measure(infer, args.batch_size)

    # Released-style inference for comparison.
    if not args.skip_released:
        xr = images(args.released_batch_size)

        def infer_released(precision: str) -> None:
            with torch.inference_mode(), autocast(precision):
                released(xr)

        results["released"] = measure(infer_released, args.released_batch_size)

    # Training: Cut&Paste on the CPU, forward of 3B images, EWS loss, backward, Adam step.
    model.train()
    optimiser = torch.optim.Adam(model.trainable_parameters(), lr=1e-4, weight_decay=1e-5)
    originals = torch.rand(args.train_batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)

    def train_step(precision: str) -> None:
        batch, labels = make_cutpaste_batch(originals, generator)
        xt = normalise(batch).to(device).contiguous(memory_format=memory_format)
        with autocast(precision):
            out = model(xt)
            loss, _ = haloae_loss(out, xt, labels.to(device), weights)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    results["train"] = measure(train_step, args.train_batch_size)

    setup = (
        f"{results['device']}, {results['threads']} threads, torch {torch.__version__}, "
        f"{' vs '.join(precisions)}{', channels-last' if args.channels_last else ''}"
        f"{', compiled' if args.compile else ''}, random weights, 256×256 inputs, "
        f"median of {args.iters} timed iter(s) after {args.warmup} warm-up"
    )
    rows += [
        ("trainable parameters", f"{trainable:,}"),
        ("inference GFLOP/image", f"{results['gflops_inference_per_image']:.1f}"),
    ]

    def phase_rows(key: str, label: str, images_per_call: int = 1) -> None:
        """Rows of one measured phase: rate, CPU time and memory per precision, then ratios."""
        phase = results[key]
        assert isinstance(phase, dict)
        for p in precisions:
            m = phase[p]
            memory = f"{m['peak_rss_mib']:.0f} MiB RSS"
            if "peak_cuda_mib" in m:
                memory = f"{m['peak_cuda_mib']:.0f} MiB CUDA, " + memory
            rows.append((f"{label} images/s, {p}", f"{images_per_call * m['images_per_s']:.2f}"))
            rows.append(
                (f"{label} CPU s/image, {p}", f"{m['cpu_s_per_image'] / images_per_call:.2f}")
            )
            rows.append((f"{label} peak memory, {p}", memory))
        if len(precisions) == 2:
            fp32, bf16 = phase["fp32"], phase["bf16"]
            phase["bf16_speedup"] = bf16["images_per_s"] / fp32["images_per_s"]
            phase["bf16_cpu_speedup"] = fp32["cpu_s_per_image"] / bf16["cpu_s_per_image"]
            rows.append((f"{label}: bf16 / fp32 images/s", f"{phase['bf16_speedup']:.2f}×"))
            rows.append(
                (f"{label}: fp32 / bf16 CPU time per image", f"{phase['bf16_cpu_speedup']:.2f}×")
            )

    phase_rows("inference", f"inference (batch {args.batch_size}, B+C+scoring)")
    if not args.skip_released:
        released_phase = results["released"]
        inference_phase = results["inference"]
        assert isinstance(released_phase, dict) and isinstance(inference_phase, dict)
        phase_rows(
            "released",
            f"released-style (batch {args.released_batch_size}, VGG to conv5, naive "
            "aggregation, runs D+E)",
        )
        rows.append(("released-style GFLOP/image", f"{results['gflops_released_per_image']:.1f}"))
        for p in precisions:
            speedup = inference_phase[p]["images_per_s"] / released_phase[p]["images_per_s"]
            rows.append((f"inference speed-up vs released-style, {p}", f"{speedup:.2f}×"))
    phase_rows(
        "train",
        f"training (batch {args.train_batch_size} → {3 * args.train_batch_size} with Cut&Paste)",
        images_per_call=3,
    )
    rows.append(
        (
            "training GFLOP/original (fwd+bwd, 3 images)",
            f"{results['gflops_train_per_original']:.1f}",
        )
    )
    print(f"HaloAE benchmark: {setup}\n")
    print("| metric | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return results


if __name__ == "__main__":
    main()
