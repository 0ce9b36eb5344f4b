"""Every registered model family side by side, with random backbone weights.

    python benchmarks/bench_families.py                          # CPU, small settings
    python benchmarks/bench_families.py --slide-px 8192 --json families.json

For each family (each in its own process, so its peak memory is its own), with its fast preset
shortened by ``--train-epochs`` / ``--train-steps`` and random backbone weights:

- MVTec: the shared hazelnut subset (``../shared/data/mvtec/hazelnut``: 50 train/good, 10 test
  images) through the benchmark code (``run_benchmark``; a weakly supervised family through the
  weak protocol with one labelled anomaly and one seed): fit/train seconds, evaluation images/s,
  image AUROC (the family's headline score);
- slide: the demo (``run_demo``: a synthetic slide, the family fitted on its tumour tiles, the
  whole slide scored through the heatmap pipeline): fit seconds, model tiles/s, tile AUROC of
  tumour against the rest (families that need labelled anomalies are skipped here);
- the size of the checkpoint's tensors and of its memory bank (rows × dims) when it has one;
- the process's peak RSS.

A family that takes tile features another tool extracted instead of images is listed and
skipped: ``benchmarks/bench_features.py`` measures it.

**Random weights say nothing about real accuracy**: the AUROCs only show that the path runs
end to end and what it costs. Real numbers need ImageNet or foundation-model weights.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO.parent / "shared" / "data" / "mvtec"


def _peak_rss_mib() -> float:
    scale = 1 / 1024 if platform.system() == "Linux" else 1 / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _overrides(family, epochs: int, steps: int) -> dict:
    """The family's fast preset, shortened: the schedule section's epochs and steps where it
    has them (a fit without gradients keeps its one pass)."""
    from wsi_anomaly.config import load_config

    base = load_config(family.fast_preset)
    schedule = getattr(base, family.schedule_section)
    short = {}
    if hasattr(schedule, "epochs"):
        short["epochs"] = epochs
    for key in ("samples_per_epoch", "steps_per_epoch"):
        if hasattr(schedule, key):
            short[key] = steps * (getattr(schedule, "batch_size", 1) if "samples" in key else 1)
    out: dict = {
        "model": {"backbone_weights": "random"},
        "train": {"workers": 0, "calibration_tiles": 64},
    }
    if short:
        out[family.schedule_section] = {**out.get(family.schedule_section, {}), **short}
    return out


def _bank(checkpoint: Path) -> dict:
    from wsi_anomaly.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint)["state_dict"]
    size = sum(t.numel() * t.element_size() for t in state.values())
    bank = state.get("memory_bank")
    return {
        "checkpoint_tensors_mib": size / 2**20,
        "bank_rows": int(bank.shape[0]) if bank is not None else None,
        "bank_dims": int(bank.shape[1]) if bank is not None else None,
    }


def one_family(name: str, args: argparse.Namespace) -> dict:
    import torch

    from wsi_anomaly.config import load_config
    from wsi_anomaly.demo import run_demo
    from wsi_anomaly.models.registry import get_family
    from wsi_anomaly.mvtec.benchmark import BenchmarkSettings, run_benchmark
    from wsi_anomaly.mvtec.weak import WeakProtocol, run_weak_benchmark

    torch.set_num_threads(args.threads)
    family = get_family(name)
    row: dict = {"family": name}
    work = Path(tempfile.mkdtemp(prefix=f"bench_{name}_"))
    config = load_config(
        family.fast_preset, _overrides(family, args.train_epochs, args.train_steps)
    )
    settings = BenchmarkSettings(
        device="cpu", eval_batch_size=8, workers=0, n_figures=0, progress=False
    )
    t0 = time.perf_counter()
    if family.weakly_supervised:
        runs: list[dict] = []
        run_weak_benchmark(
            args.root, ["hazelnut"], config, work / "mvtec", settings,
            WeakProtocol(n=1, n_seeds=1, first_seed=config.seed), on_run=runs.append,
        )  # fmt: skip
        record = runs[0]
    else:
        result = run_benchmark(args.root, ["hazelnut"], config, work / "mvtec", settings)
        record = result.records[0]
    row["mvtec_s"] = time.perf_counter() - t0
    timing = record.get("timing", {})
    row["mvtec_fit_s"] = timing.get("train_seconds")
    row["mvtec_eval_img_per_s"] = timing.get("eval_images_per_s")
    auroc = record["metrics"]["image_auroc"]
    row["mvtec_image_auroc"] = auroc.get(family.score_names[0])
    checkpoint = Path(record["checkpoint"]) if record.get("checkpoint") else None
    if checkpoint is not None and checkpoint.is_file():
        row.update(_bank(checkpoint))
    if family.weakly_supervised or not family.fast_preset:
        row["slide"] = "skipped: needs labelled anomalies"
    else:
        demo = run_demo(
            work / "demo", size_px=args.slide_px, backbone_weights="random", device="cpu",
            progress=False, echo=lambda *_: None, family=name,
        )  # fmt: skip
        summary = demo.summary
        row["slide_tiles"] = demo.n_tiles
        row["slide_model_tiles_per_s"] = summary["tiles_per_s"]["model"]
        row["slide_end_to_end_tiles_per_s"] = summary["tiles_per_s"]["end_to_end"]
        row["slide_auroc"] = demo.auroc
        row.update({f"slide_{k}": v for k, v in _bank(demo.model).items()})
    row["peak_rss_mib"] = _peak_rss_mib()
    return row


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(rows: list[dict]) -> str:
    header = (
        "| family | MVTec fit s | MVTec eval img/s | MVTec image AUROC | slide tiles | slide model "
        "tiles/s | slide AUROC | bank (rows × dims) | checkpoint tensors MiB | peak RSS MiB |"
    )
    lines = [header, "|" + "---|" * 10]
    for r in rows:
        bank = r.get("slide_bank_rows") or r.get("bank_rows")
        dims = r.get("slide_bank_dims") or r.get("bank_dims")
        lines.append(
            "| "
            + " | ".join(
                [
                    r["family"],
                    _fmt(r.get("mvtec_fit_s"), 1),
                    _fmt(r.get("mvtec_eval_img_per_s")),
                    _fmt(r.get("mvtec_image_auroc"), 3),
                    _fmt(r.get("slide_tiles")),
                    _fmt(r.get("slide_model_tiles_per_s")),
                    _fmt(r.get("slide_auroc"), 3) if "slide" not in r else r["slide"],
                    f"{bank} × {dims}" if bank else "n/a",
                    _fmt(
                        r.get("slide_checkpoint_tensors_mib") or r.get("checkpoint_tensors_mib"), 1
                    ),
                    _fmt(r.get("peak_rss_mib"), 0),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="MVTec root with hazelnut/")
    p.add_argument("--families", nargs="+", help="default: every registered family")
    p.add_argument("--slide-px", type=int, default=4096, help="synthetic slide side, px")
    p.add_argument("--train-epochs", type=int, default=1)
    p.add_argument("--train-steps", type=int, default=8, help="gradient steps per epoch")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    p.add_argument("--one", help=argparse.SUPPRESS)  # run one family, print its row as JSON
    args = p.parse_args(argv)
    if args.one:
        print("ROW " + json.dumps(one_family(args.one, args)), flush=True)
        return []
    from wsi_anomaly.models.registry import family_names, get_family

    rows = []
    for name in args.families or family_names():
        inputs = get_family(name).inputs
        if inputs != "images":  # neither MVTec images nor slide pixels: its own benchmark
            rows.append({"family": name, "slide": f"skipped: takes {inputs} (bench_features.py)"})
            print(f"  {rows[-1]}", flush=True)
            continue
        cmd = [sys.executable, __file__, "--one", name, "--root", str(args.root),
               "--slide-px", str(args.slide_px), "--train-epochs", str(args.train_epochs),
               "--train-steps", str(args.train_steps), "--threads", str(args.threads)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("ROW ")), None)
        if line is None:
            why = (
                f"killed by signal {-out.returncode} (out of memory?)"
                if out.returncode < 0
                else out.stderr.strip().splitlines()[-1][-300:]
                if out.stderr.strip()
                else f"exit code {out.returncode}"
            )
            rows.append({"family": name, "slide": f"failed: {why}"})
        else:
            rows.append(json.loads(line[4:]))
        print(f"  {rows[-1]}", flush=True)
    print(
        f"\n{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
        "random backbone weights (AUROCs say nothing about real accuracy)\n"
    )
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
