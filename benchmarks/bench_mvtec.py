"""Training and evaluation speed of the MVTec AD benchmark path on one category.

    python benchmarks/bench_mvtec.py                       # ../shared/data/mvtec/hazelnut, CPU
    python benchmarks/bench_mvtec.py --root /data/mvtec/bottle --device cuda --train-steps 20 \\
        --eval-repeats 5 --json bench_mvtec.json

- training: ``train_model`` on the category's train/good for ``--train-steps`` steps of
  ``--train-batch`` originals (each also yields two Cut&Paste copies, so the network sees 3×);
  a one-step warm-up run comes first; calibration is not counted. Precision is what training
  uses: bf16 autocast on CUDA, fp32 on CPU.
- evaluation: the model's adapter over the whole test split, exactly as the benchmark runs it
  (images at the benchmark's ``input_px``: the tile size, or their own size for families that
  resize their input themselves): end to end (decode and resize the PNGs, model, maps) and the
  model calls alone.

Speed does not depend on the backbone weights, so ``--backbone-weights random`` is the default
(no download). Prints a Markdown table; ``--json`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch

from wsi_anomaly.config import Config, load_config
from wsi_anomaly.mvtec import MVTecCategory, evaluate, load_adapter
from wsi_anomaly.mvtec.benchmark import input_px
from wsi_anomaly.training import resolve_device, train_model

DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec" / "hazelnut"


def bench_config(args: argparse.Namespace, steps: int) -> Config:
    """The ``--config`` preset shortened to one epoch of ``steps`` batches."""
    return load_config(
        args.config,
        {
            "model": {"backbone_weights": args.backbone_weights},
            "haloae": {
                "epochs": 1,
                "samples_per_epoch": steps * args.train_batch,
                "batch_size": args.train_batch,
            },
            "train": {
                "workers": args.loader_workers,
                "calibration_tiles": args.train_batch,
            },
        },
    )


def train_speed(
    category: MVTecCategory, args: argparse.Namespace, folder: Path
) -> tuple[dict, Path]:
    def run(steps: int, name: str):
        config = bench_config(args, steps)
        return train_model(
            category.dataset("train", input_px(config)),
            config,
            folder / name,
            device=args.device,
            overwrite=True,
            progress=False,
        )

    if not args.no_warmup:
        run(1, "warmup.pt")
    result = run(args.train_steps, "model.pt")
    originals = args.train_steps * args.train_batch
    return {
        "originals": originals,
        "seconds": result.seconds,
        "originals_per_s": originals / result.seconds,
        "network_images_per_s": result.images_per_s,
    }, result.checkpoint


def eval_speed(category: MVTecCategory, checkpoint: Path, args: argparse.Namespace) -> dict:
    adapter = load_adapter(
        checkpoint, device=args.device, precision=args.precision, batch_size=args.eval_batch
    )
    dataset = category.dataset("test", input_px(bench_config(args, args.train_steps)))
    adapter(torch.stack([dataset[i] for i in range(min(len(dataset), args.eval_batch))]))  # warm-up
    runs = [
        evaluate(adapter, dataset, workers=args.loader_workers, progress=False)
        for _ in range(args.eval_repeats)
    ]
    images = len(dataset) * len(runs)
    seconds = sum(r.seconds for r in runs)
    model_seconds = sum(r.model_seconds for r in runs)
    return {
        "images": images,
        "seconds": seconds,
        "images_per_s": images / seconds,
        "model_seconds": model_seconds,
        "model_images_per_s": images / model_seconds,
        "precision": adapter.precision,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="one MVTec AD category folder")
    ap.add_argument("--config", default="haloae_fast", help="preset or YAML (model settings)")
    ap.add_argument("--backbone-weights", default="random")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", help="evaluation: auto, fp32 or bf16")
    ap.add_argument("--train-batch", type=int, default=4, help="originals per step (paper: 4)")
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--eval-repeats", type=int, default=1, help="passes over the test split")
    ap.add_argument("--loader-workers", type=int, default=0, help="DataLoader worker processes")
    ap.add_argument("--no-warmup", action="store_true", help="skip the one-step training warm-up")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args(argv)
    if not args.root.is_dir():
        ap.error(f"category folder not found: {args.root} (pass --root)")

    device = resolve_device(args.device)
    category = MVTecCategory(args.root)
    with tempfile.TemporaryDirectory() as tmp:
        train, checkpoint = train_speed(category, args, Path(tmp))
        evaluation = eval_speed(category, checkpoint, args)

    device_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (
            f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        )
    )
    train_precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    rows = [
        (
            "train (originals)",
            train["originals"],
            train["seconds"],
            train["originals_per_s"],
            args.train_batch,
            train_precision,
        ),
        (
            "train (network inputs, ×3 with Cut&Paste)",
            3 * train["originals"],
            train["seconds"],
            train["network_images_per_s"],
            3 * args.train_batch,
            train_precision,
        ),
        (
            "evaluate, end to end",
            evaluation["images"],
            evaluation["seconds"],
            evaluation["images_per_s"],
            args.eval_batch,
            evaluation["precision"],
        ),
        (
            "evaluate, model only",
            evaluation["images"],
            evaluation["model_seconds"],
            evaluation["model_images_per_s"],
            args.eval_batch,
            evaluation["precision"],
        ),
    ]
    print(
        f"MVTec AD speed on {category.name} ({len(category.train_files)} train, "
        f"{len(category.test_samples)} test images); device: {device_name}; torch "
        f"{torch.__version__}\n"
    )
    print("| phase | images | seconds | images/s | batch | precision | device |")
    print("|---|---:|---:|---:|---:|---|---|")
    for phase, n, seconds, rate, batch, precision in rows:
        print(
            f"| {phase} | {n} | {seconds:.2f} | {rate:.2f} | {batch} | {precision} | "
            f"{device.type} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "category": category.name,
                    "device": device_name,
                    "torch": torch.__version__,
                    "train": {**train, "batch": args.train_batch, "precision": train_precision},
                    "evaluate": {**evaluation, "batch": args.eval_batch},
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
