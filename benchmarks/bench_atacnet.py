"""Speed and memory of the ATAC-Net model core (random weights, synthetic 224×224 inputs).

Measures, in one run:

- preprocessing images/s on the CPU: CLAHE on LAB lightness + bicubic resize to 224 +
  standardisation of a 1024×1024 RGB image (MVTec's largest size), one process;
- inference images/s of one view (φ σ τ, ``model(x)``) and of the full Algorithm 2 score
  (``model.score(x)``: a second pass on the attention crops). In eval mode only images whose
  crop is not the whole image take the second pass, so the share of real crops is reported; with
  random weights it depends on ω, hence ``--crop-threshold``;
- training images/s: one :func:`train_step` on a balanced batch (CutMix of the anomalous half
  and random rotation on the CPU included, both views, deviation loss, backward, clipping, Adam);
- peak memory (RSS, and CUDA when used).

Prints a Markdown table; ``--json`` also writes the numbers. Example::

    python benchmarks/bench_atacnet.py --device cuda --precision bf16 --batch-size 128 \\
        --train-batch-size 48
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Callable

import numpy as np
import torch

# Shared with the HaloAE benchmark (same folder, run as a script): phase-wise peak RSS, the CPU
# name and the timing loop.
from bench_haloae import PeakRSS, _cpu_name, _timed

from wsi_anomaly.models.atacnet import (
    ATACNet,
    AtacNetConfig,
    load_resnet50,
    make_optimiser,
    train_step,
)
from wsi_anomaly.models.atacnet_data import (
    IMAGE_SIZE,
    cutmix_anomalous_half,
    preprocess,
    random_rotation,
)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--variant", default="atacnet", choices=("cutmix_bce", "weighted_ce", "devnet", "atacnet")
    )
    parser.add_argument("--batch-size", type=int, default=16, help="inference batch")
    parser.add_argument(
        "--train-batch-size",
        type=int,
        default=8,
        help="images per training step (half normal); the recipe uses 48",
    )
    parser.add_argument("--crop-threshold", type=float, default=0.5, help="ω of Algorithm 1")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument(
        "--preprocess-images",
        type=int,
        default=8,
        help="images timed for the CPU preprocessing (0 skips it)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.train_batch_size < 2:
        parser.error("--train-batch-size must be at least 2 (half normal, half anomalous)")
    device = torch.device(args.device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(cores or 1)
    torch.manual_seed(0)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if args.precision == "bf16"
        else contextlib.nullcontext
    )

    def measure(step: Callable[[], object], batch_size: int) -> tuple[float, str]:
        """(images/s, peak memory) of ``step`` processing ``batch_size`` images per call."""
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with PeakRSS() as rss:
            seconds = _timed(step, args.iters, args.warmup, device)
        memory = f"{rss.peak_mib:.0f} MiB RSS"
        if device.type == "cuda":
            memory = f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB CUDA, " + memory
        return batch_size / seconds, memory

    results: dict[str, object] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "variant": args.variant,
        "precision": args.precision,
        "channels_last": args.channels_last,
        "crop_threshold": args.crop_threshold,
    }
    rows: list[tuple[str, str]] = []

    if args.preprocess_images > 0:
        rng = np.random.default_rng(0)
        raw = [
            rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
            for _ in range(args.preprocess_images)
        ]

        def prep() -> None:
            for image in raw:
                preprocess(image)

        per_s, _ = measure(prep, len(raw))
        results["preprocess_images_per_s"] = per_s
        rows += [("preprocessing images/s (1024² → CLAHE → 224², CPU, 1 process)", f"{per_s:.2f}")]

    model = ATACNet(
        args.variant, backbone=load_resnet50("random"), crop_threshold=args.crop_threshold
    )
    model = model.to(device, memory_format=memory_format).eval()
    results["parameters"] = sum(p.numel() for p in model.parameters())

    x = torch.randn(args.batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
    x = x.contiguous(memory_format=memory_format)

    def one_view() -> None:
        with torch.inference_mode(), autocast():
            model(x)

    def algorithm2() -> None:
        with torch.inference_mode(), autocast():
            model.score(x)

    with torch.inference_mode(), autocast():
        details = model.score_details(x)
    if "boxes" in details:
        full = torch.tensor([0, 0, IMAGE_SIZE, IMAGE_SIZE], device=details["boxes"].device)
        cropped = float((details["boxes"] != full).any(dim=1).float().mean())
    else:
        cropped = 0.0
    results["cropped_fraction"] = cropped

    results["one_view_images_per_s"], results["one_view_peak_memory"] = measure(
        one_view, args.batch_size
    )
    results["score_images_per_s"], results["score_peak_memory"] = measure(
        algorithm2, args.batch_size
    )

    settings = AtacNetConfig()
    optimiser = make_optimiser(model, settings)
    generator = torch.Generator().manual_seed(0)
    pool = torch.randn(args.train_batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    half = args.train_batch_size // 2
    # The anomalous half alternates CutMix pseudo-anomalies (label 0 here) and labelled ones.
    dataset_labels = torch.zeros(args.train_batch_size, dtype=torch.long)
    dataset_labels[half + 1 :: 2] = 1

    def training() -> None:
        images, targets = cutmix_anomalous_half(pool, dataset_labels, generator)
        images = random_rotation(images, generator, settings.rotation_degrees)
        images = images.to(device).contiguous(memory_format=memory_format)
        train_step(
            model,
            optimiser,
            images,
            targets.to(device),
            grad_clip_norm=settings.grad_clip_norm,
            precision=args.precision,
        )

    results["train_images_per_s"], results["train_peak_memory"] = measure(
        training, args.train_batch_size
    )

    setup = (
        f"{results['device']}, {results['threads']} threads, torch {torch.__version__}, "
        f"{args.precision}{', channels-last' if args.channels_last else ''}, "
        f"variant {args.variant}, random weights, {IMAGE_SIZE}×{IMAGE_SIZE} inputs, "
        f"{args.iters} timed iter(s) after {args.warmup} warm-up"
    )
    rows += [
        ("parameters (all trainable)", f"{results['parameters']:,}"),
        (
            f"inference images/s, one view (batch {args.batch_size})",
            f"{results['one_view_images_per_s']:.2f}",
        ),
        ("inference peak memory, one view", str(results["one_view_peak_memory"])),
        (
            f"inference images/s, Algorithm 2 score (batch {args.batch_size}, "
            f"{100 * cropped:.0f} % cropped at ω = {args.crop_threshold})",
            f"{results['score_images_per_s']:.2f}",
        ),
        ("inference peak memory, Algorithm 2", str(results["score_peak_memory"])),
        (
            f"training images/s (batch {args.train_batch_size}, both views, CutMix + rotation)",
            f"{results['train_images_per_s']:.2f}",
        ),
        ("training peak memory", str(results["train_peak_memory"])),
    ]
    print(f"ATAC-Net benchmark: {setup}\n")
    print("| metric | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return results


if __name__ == "__main__":
    main()
