"""Peak memory of training HaloAE on the CPU: a preset's whole run, one process per setting.

Each setting runs ``wsi_anomaly.training.train_model`` in a fresh process (so one setting's
memory never counts in another's) on synthetic 256×256 tiles with random VGG19 weights: the
preset's batch (4 originals → 12 images with Cut&Paste for both presets), ``--steps`` optimiser
steps, then the calibration pass over ``--calibration-tiles`` tiles; its peak RSS is the child's
``ru_maxrss``. Settings:

- ``default``: what ``train`` does on this CPU (bf16 autocast where the CPU has native bf16,
  the frozen backbone without autograd state, activation checkpointing);
- ``fp32``: the same in fp32 (as on a CPU without native bf16);
- ``fp32, no checkpointing``: fp32 with every block's activations kept for the backward pass.

Prints a Markdown table; ``--json`` also writes the numbers. Example::

    python benchmarks/bench_train_memory.py --preset haloae_paper --preset haloae_fast
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = ("default", "fp32", "fp32, no checkpointing")


def _one(preset: str, setting: str, steps: int, calibration_tiles: int) -> dict[str, object]:
    """Train once in this process and report what it used (run in a child process)."""
    import torch

    from wsi_anomaly import runtime
    from wsi_anomaly.config import load_config
    from wsi_anomaly.models import haloae, losses
    from wsi_anomaly.training import train_model

    if setting != "default":
        runtime.cpu_has_native_bf16 = lambda: False  # what auto picks on other CPUs
    if setting == "fp32, no checkpointing":
        haloae.recompute = lambda module, x: module(x)
        losses._reconstruction_loss = losses._mse_plus_ssim
    config = load_config(preset, {"model": {"backbone_weights": "random"}})
    batch = config.haloae.batch_size
    config = load_config(
        preset,
        {
            "model": {"backbone_weights": "random"},
            "haloae": {"epochs": 1, "samples_per_epoch": steps * batch},
            "train": {
                "calibration_tiles": calibration_tiles,
                "calibration_holdout": 0.0,
                "workers": 0,
            },
        },
    )
    g = torch.Generator().manual_seed(0)
    tiles = [torch.rand(3, 256, 256, generator=g) for _ in range(max(batch, calibration_tiles))]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        train_model(tiles, config, Path(tmp) / "m.pt", device="cpu", progress=False)
    return {
        "preset": preset,
        "setting": setting,
        "precision": runtime.Runtime.resolve("cpu").precision,
        "batch_originals": batch,
        "images_per_step": 3 * batch,
        "steps": steps,
        "calibration_tiles": calibration_tiles,
        "seconds": time.perf_counter() - t0,
        # Linux reports ru_maxrss in KiB.
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset", action="append", help="haloae_paper and/or haloae_fast (default both)"
    )
    parser.add_argument("--setting", action="append", choices=SETTINGS, help="default: all")
    parser.add_argument("--steps", type=int, default=2, help="optimiser steps per run")
    parser.add_argument("--calibration-tiles", type=int, default=16)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--one", nargs=2, metavar=("PRESET", "SETTING"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(_one(*args.one, args.steps, args.calibration_tiles)))
        return []
    results = []
    for preset in args.preset or ["haloae_paper", "haloae_fast"]:
        for setting in args.setting or SETTINGS:
            cmd = [sys.executable, __file__, "--one", preset, setting, "--steps", str(args.steps)]
            cmd += ["--calibration-tiles", str(args.calibration_tiles)]
            done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            if done.returncode != 0:
                reason = f"exit {done.returncode}" + (" (killed)" if done.returncode < 0 else "")
                results.append({"preset": preset, "setting": setting, "failed": reason})
                print(done.stderr[-2000:], file=sys.stderr)
            else:
                results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"  {results[-1]}", file=sys.stderr, flush=True)
    print(
        f"HaloAE training memory: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, random weights, {args.steps} steps + calibration over "
        f"{args.calibration_tiles} tiles, one process per row\n"
    )
    print("| preset | setting | precision | images/step | peak RSS MiB | seconds |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if "failed" in r:
            print(f"| {r['preset']} | {r['setting']} | | | {r['failed']} | |")
            continue
        print(
            f"| {r['preset']} | {r['setting']} | {r['precision']} | {r['images_per_step']} | "
            f"{r['peak_rss_mib']:.0f} | {r['seconds']:.0f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
