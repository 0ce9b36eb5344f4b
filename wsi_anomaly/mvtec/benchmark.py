"""The MVTec AD protocol: per category, train on train/good, evaluate on test, write results.

Per category, ``<out>/<category>/`` holds ``model.pt`` (+ ``model.config.yaml``), ``scores.csv``
(one row per test image), ``figures/*.png`` and ``metrics.json`` — written last, so its presence
means the category is done and a re-run skips it (unless ``overwrite``). ``<out>/results.csv``
and ``<out>/results.md`` tabulate every category of the run beside the paper's Table 1.

The training-normal mean map that normalises HaloAE's anomaly maps comes from train/good (the
calibration inside :func:`wsi_anomaly.training.train_model`); test images are only ever scored.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .. import __version__
from ..checkpoint import load_checkpoint
from ..config import Config, config_from_dict, save_config
from ..errors import InputNotFoundError, OutputExistsError, WsiAnomalyError
from ..models.registry import family_names, get_family
from ..outputs import atomic_path, write_text
from .adapters import ModelAdapter, check_model_name, load_adapter
from .data import GOOD, NO_MASKS, MVTecCategory, MVTecDataset, resolve_categories
from .figures import pick_examples, save_example_figure
from .metrics import (
    AUPRO_FPR_LIMIT,
    PAPER_PIXEL_PX,
    aupro,
    image_auroc,
    paper_protocol_mask,
    pixel_auroc,
    resize_map,
)
from .paper import (
    OBJECTS,
    PUBLISHED,
    TEXTURES,
    ablation_note,
    configuration_notes,
    paper_category,
)

if TYPE_CHECKING:
    from ..training import TrainResult

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "model.pt"
METRICS_NAME = "metrics.json"


@dataclass
class BenchmarkSettings:
    """How to run (not what to train: that is the :class:`~wsi_anomaly.config.Config`).

    ``checkpoint_dir``: evaluate existing models, ``<dir>/<category>/model.pt`` or
    ``<dir>/<category>.pt``, instead of training. ``eval_batch_size``: test images per model
    call. ``workers``: image-decoding processes during evaluation. ``n_figures``: qualitative
    figures per category.
    """

    device: str = "auto"
    precision: str = "auto"
    eval_batch_size: int = 16
    workers: int = 0
    n_figures: int = 4
    checkpoint_dir: Path | None = None
    overwrite: bool = False
    skip_errors: bool = False
    progress: bool = True


@dataclass
class Evaluation:
    """A model's output on one test split.

    ``labels`` (N,) int64; ``scores`` name → (N,) float64; ``maps`` (N, h, w) float32 or
    ``None``; ``seconds``: wall time including decoding and resizing the images;
    ``model_seconds``: time inside the model calls only.
    """

    labels: np.ndarray
    scores: dict[str, np.ndarray]
    maps: np.ndarray | None
    seconds: float
    model_seconds: float

    @property
    def images_per_s(self) -> float:
        return len(self.labels) / self.seconds if self.seconds > 0 else math.nan

    @property
    def model_images_per_s(self) -> float:
        return len(self.labels) / self.model_seconds if self.model_seconds > 0 else math.nan


def input_px(config: Config) -> int | None:
    """The side images are resized to before the model sees them: ``config.tile_px``, or
    ``None`` (their own resolution) for families that resize their input themselves
    (ATAC-Net: CLAHE on the image as it is, then one bicubic resize)."""
    return None if get_family(config.model.name).resizes_own_input else config.tile_px


def _same_size_batches(images: list[torch.Tensor]) -> list[torch.Tensor]:
    """Consecutive images of one size stacked together (images at their own resolution may
    differ in size within a category)."""
    batches, start = [], 0
    for i in range(1, len(images) + 1):
        if i == len(images) or images[i].shape != images[start].shape:
            batches.append(torch.stack(images[start:i]))
            start = i
    return batches


def evaluate(
    adapter: ModelAdapter, dataset: MVTecDataset, workers: int = 0, progress: bool = True
) -> Evaluation:
    """Run ``adapter`` over every image of ``dataset`` in order, in batches of its batch size
    (split where images at their own resolution change size)."""
    loader = DataLoader(
        dataset, batch_size=adapter.batch_size, num_workers=workers, collate_fn=_same_size_batches
    )
    scores: dict[str, list[np.ndarray]] = {name: [] for name in adapter.score_names}
    maps: list[np.ndarray] = []
    model_seconds = 0.0
    t0 = time.perf_counter()
    with tqdm(
        total=len(dataset),
        desc=f"evaluating {dataset.name}",
        unit="image",
        disable=not progress,
        leave=False,
    ) as bar:
        for batches in loader:
            for images in batches:
                t = time.perf_counter()
                out = adapter(images)
                model_seconds += time.perf_counter() - t
                for name in adapter.score_names:
                    scores[name].append(np.asarray(out.scores[name], dtype=np.float64))
                if out.maps is not None:
                    maps.append(np.asarray(out.maps, dtype=np.float32))
                bar.update(len(images))
    seconds = time.perf_counter() - t0
    return Evaluation(
        dataset.labels,
        {k: np.concatenate(v) for k, v in scores.items()},
        np.concatenate(maps) if maps else None,
        seconds,
        model_seconds,
    )


def _finite_or_none(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def compute_metrics(
    evaluation: Evaluation, dataset: MVTecDataset, fpr_limit: float = AUPRO_FPR_LIMIT
) -> dict[str, Any]:
    """Image AUROC per score; pixel AUROC at the masks' resolution and at 128×128 (the paper's
    protocol); AUPRO up to ``fpr_limit``. Fractions in [0, 1]; ``None`` where not applicable
    (no maps, or a single class). A data set without masks gets image metrics only: its pixel
    metrics are ``None`` and ``pixel_metrics`` says why (:data:`~.data.NO_MASKS`)."""
    metrics: dict[str, Any] = {
        "image_auroc": {
            name: _finite_or_none(image_auroc(evaluation.labels, s))
            for name, s in evaluation.scores.items()
        },
        "pixel_auroc": None,
        "pixel_auroc_128_paper": None,
        "aupro": None,
        "aupro_fpr_limit": fpr_limit,
    }
    if evaluation.maps is None:
        return metrics
    if not dataset.has_masks:
        metrics["pixel_metrics"] = NO_MASKS
        return metrics
    masks, maps, masks_paper, maps_paper = [], [], [], []
    for i, score_map in enumerate(evaluation.maps):
        mask = dataset.load_mask(i)
        masks.append(mask)
        maps.append(resize_map(score_map, mask.shape))
        masks_paper.append(paper_protocol_mask(mask, PAPER_PIXEL_PX))
        maps_paper.append(resize_map(score_map, (PAPER_PIXEL_PX, PAPER_PIXEL_PX)))
    metrics["pixel_auroc"] = _finite_or_none(pixel_auroc(masks, maps))
    metrics["pixel_auroc_128_paper"] = _finite_or_none(pixel_auroc(masks_paper, maps_paper))
    metrics["aupro"] = _finite_or_none(aupro(masks, maps, fpr_limit))
    metrics["mask_px"] = [list(shape) for shape in sorted({m.shape for m in masks})]
    return metrics


def find_checkpoint(checkpoint_dir: str | Path, category: str) -> Path:
    """``<dir>/<category>/model.pt`` (the layout this benchmark writes) or ``<dir>/<category>.pt``."""
    checkpoint_dir = Path(checkpoint_dir)
    candidates = [checkpoint_dir / category / CHECKPOINT_NAME, checkpoint_dir / f"{category}.pt"]
    for path in candidates:
        if path.is_file():
            return path
    raise InputNotFoundError(
        f"no checkpoint for category {category!r} in {checkpoint_dir} "
        f"(looked for {candidates[0]} and {candidates[1]})"
    )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_text(path, json.dumps(data, indent=2))


def train_category(
    category: MVTecCategory,
    config: Config,
    checkpoint: Path,
    settings: BenchmarkSettings,
    anomalies: MVTecDataset | None = None,
) -> tuple[TrainResult | None, bool]:
    """Train ``category``'s model on train/good (and ``anomalies``, labelled ones) into
    ``checkpoint``, resuming an interrupted run unless ``settings.overwrite``.

    Returns ``(result, resumed)``; ``result`` is ``None`` when ``checkpoint`` is a finished model
    of the same ``config``, reused as it is.

    Raises:
        OutputExistsError: ``checkpoint`` was trained with another configuration.
    """
    from ..training import resume_path, train_model

    if checkpoint.exists() and not settings.overwrite:
        if config_from_dict(load_checkpoint(checkpoint)["config"]) != config:
            raise OutputExistsError(
                f"{checkpoint} was trained with another configuration; pass "
                "--overwrite to retrain it, or choose another --out"
            )
        return None, False
    resume = resume_path(checkpoint).exists() and not settings.overwrite
    result = train_model(
        category.dataset("train", input_px(config)),
        config,
        checkpoint,
        device=settings.device,
        resume=resume,
        overwrite=True,
        source=str(category.path / "train" / GOOD),
        progress=settings.progress,
        anomalies=anomalies,
    )
    return result, resume


def _train_or_reuse(
    category: MVTecCategory, config: Config, checkpoint: Path, settings: BenchmarkSettings
) -> dict[str, Any]:
    result, resume = train_category(category, config, checkpoint, settings)
    if result is None:
        log.info("%s: reusing the finished model %s", category.name, checkpoint)
        return {"trained": False}
    return {
        "trained": True,
        "resumed": resume,
        "train_seconds": result.seconds,
        "train_images_per_s": result.images_per_s / get_family(config.model.name).inputs_per_image,
        "train_network_images_per_s": result.images_per_s,
    }


def evaluate_checkpoint(
    checkpoint: Path, dataset: MVTecDataset, config: Config, settings: BenchmarkSettings
) -> tuple[ModelAdapter, Evaluation]:
    """Load ``checkpoint`` (a ``config.model.name`` model) and run it over ``dataset``."""
    adapter = load_adapter(
        checkpoint,
        device=settings.device,
        precision=settings.precision,
        batch_size=settings.eval_batch_size,
        expect_model=config.model.name,
    )
    return adapter, evaluate(adapter, dataset, workers=settings.workers, progress=settings.progress)


def _write_scores_csv(
    path: Path, category: MVTecCategory, dataset: MVTecDataset, evaluation: Evaluation
) -> None:
    names = list(evaluation.scores)
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "defect_type", "label", *(f"score_{n}" for n in names)])
        for i, sample in enumerate(dataset.samples):
            writer.writerow(
                [
                    sample.image.relative_to(category.path).as_posix(),
                    sample.defect_type,
                    sample.label,
                    *(f"{evaluation.scores[n][i]:.6g}" for n in names),
                ]
            )


def _write_figures(
    folder: Path, dataset: MVTecDataset, evaluation: Evaluation, n: int
) -> list[str]:
    if evaluation.maps is None or n <= 0:
        return []
    vmax = float(evaluation.maps.max())  # one colour scale per category
    headline = next(iter(evaluation.scores))
    written = []
    for i in pick_examples(dataset.samples, n):
        sample = dataset.samples[i]
        image = dataset.load_rgb(i)
        mask = dataset.load_mask(i) if dataset.has_masks else None
        name = f"{sample.defect_type}_{sample.image.stem}.png"
        save_example_figure(
            folder / name,
            image,
            mask,
            resize_map(evaluation.maps[i], image.shape[:2]),
            f"{sample.defect_type}/{sample.image.name}   image score "
            f"({headline}) {evaluation.scores[headline][i]:.4g}",
            vmax,
        )
        written.append(f"figures/{name}")
    return written


def run_category(
    category: MVTecCategory, config: Config, out_dir: str | Path, settings: BenchmarkSettings
) -> dict[str, Any]:
    """Train (or load) one category's model, evaluate it and write its folder.

    Returns the ``metrics.json`` record with ``status`` ``ok`` or ``skipped (done)``.
    """
    out_dir = Path(out_dir)
    metrics_path = out_dir / METRICS_NAME
    if metrics_path.exists() and not settings.overwrite:
        record = json.loads(metrics_path.read_text())
        record["status"] = "skipped (done)"
        log.info("%s: done already (%s); skipped", category.name, metrics_path)
        return record
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    if settings.checkpoint_dir is not None:
        checkpoint = find_checkpoint(settings.checkpoint_dir, category.name)
        training: dict[str, Any] = {"trained": False}
    else:
        checkpoint = out_dir / CHECKPOINT_NAME
        training = _train_or_reuse(category, config, checkpoint, settings)

    dataset = category.dataset("test", input_px(config))
    adapter, evaluation = evaluate_checkpoint(checkpoint, dataset, config, settings)
    t_metrics = time.perf_counter()
    metrics = compute_metrics(evaluation, dataset)
    metrics_seconds = time.perf_counter() - t_metrics
    _write_scores_csv(out_dir / "scores.csv", category, dataset, evaluation)
    figures = _write_figures(out_dir / "figures", dataset, evaluation, settings.n_figures)

    paper = paper_category(category.name, config.model.name)
    published = PUBLISHED.get(config.model.name)
    trained = config_from_dict(load_checkpoint(checkpoint)["config"])
    record = {
        "category": category.name,
        "status": "ok",
        "model": adapter.name,
        "score_names": list(adapter.score_names),
        "metrics": metrics,
        "paper": {
            "image_auroc": paper[0],
            "pixel_auroc": paper[1],
            "source": f"{published[0]} (percent)",
        }
        if paper and published
        else None,
        "n_train": len(category.train_files),
        "n_test": len(dataset),
        "n_defective": int(evaluation.labels.sum()),
        "defect_types": category.defect_types,
        "has_masks": category.has_masks,
        "timing": {
            "train_seconds": training.get("train_seconds"),
            "train_images_per_s": training.get("train_images_per_s"),
            "train_network_images_per_s": training.get("train_network_images_per_s"),
            "eval_seconds": evaluation.seconds,
            "eval_images_per_s": evaluation.images_per_s,
            "eval_model_images_per_s": evaluation.model_images_per_s,
            "metrics_seconds": metrics_seconds,
            "total_seconds": time.perf_counter() - t0,
        },
        "trained_here": training["trained"],
        "resumed": training.get("resumed", False),
        "checkpoint": str(checkpoint.resolve()),
        "model_identity": adapter.identity,
        "device": str(adapter.device),
        "precision": adapter.precision,
        "eval_batch_size": adapter.batch_size,
        "train_batch_size": get_family(trained.model.name).batch_size(trained),
        "config": trained.to_dict(),
        "figures": figures,
        "software_version": __version__,
    }
    _write_json(metrics_path, record)
    return record


@dataclass
class BenchmarkResult:
    records: list[dict[str, Any]]
    table_csv: Path
    table_md: Path
    markdown: str = field(repr=False, default="")


def run_benchmark(
    root: str | Path,
    categories: list[str] | None,
    config: Config,
    out: str | Path,
    settings: BenchmarkSettings,
    on_category: Callable[[dict[str, Any]], None] | None = None,
) -> BenchmarkResult:
    """Every requested category of ``root`` (``None``/``["all"]``: all found), then the tables.

    Everything that can be checked up front is (layout, masks, categories, checkpoints), so a
    mistake fails in seconds rather than after hours of training. With ``skip_errors``, a
    category that fails is recorded (``status`` ``error: …``) and the run goes on.
    """
    check_model_name(config.model.name)
    config.validate()
    selected = resolve_categories(root, categories)
    if settings.checkpoint_dir is not None:
        for category in selected:
            find_checkpoint(settings.checkpoint_dir, category.name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    records = []
    for category in selected:
        try:
            record = run_category(category, config, out / category.name, settings)
        except WsiAnomalyError as exc:
            if not settings.skip_errors:
                raise
            log.error("%s: %s", category.name, exc)
            record = {"category": category.name, "status": f"error: {exc}"}
        records.append(record)
        if on_category is not None:
            on_category(record)
    csv_path, md_path, markdown = write_tables(records, out, config)
    return BenchmarkResult(records, csv_path, md_path, markdown)


# -- tables ------------------------------------------------------------------------------------
def _percent(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


def _columns(records: list[dict[str, Any]]) -> list[tuple[str, Callable[[dict], Any], int]]:
    """(header, getter, decimals) of every numeric column. Image AUROC: one column per score."""
    score_names: list[str] = []
    for r in records:
        for name in r.get("score_names", []):
            if name not in score_names:
                score_names.append(name)

    def metric(key):
        def get(r):
            if "metrics" not in r:
                return None
            if r["metrics"].get("pixel_metrics") == NO_MASKS:
                return NO_MASKS
            return _percent(r["metrics"][key])

        return get

    def image(name):
        return lambda r: _percent(r["metrics"]["image_auroc"].get(name)) if "metrics" in r else None

    def paper(key):
        return lambda r: (r.get("paper") or {}).get(key)

    def timing(key):
        return lambda r: r.get("timing", {}).get(key)

    return [
        *((f"image AUROC ({n}) %", image(n), 1) for n in score_names),
        ("pixel AUROC %", metric("pixel_auroc"), 1),
        (f"pixel AUROC {PAPER_PIXEL_PX}² (paper protocol) %", metric("pixel_auroc_128_paper"), 1),
        (f"AUPRO@{AUPRO_FPR_LIMIT:g} %", metric("aupro"), 1),
        # A family without published numbers is never printed beside another's paper.
        *(
            (
                ("paper image AUROC %", paper("image_auroc"), 1),
                ("paper pixel AUROC %", paper("pixel_auroc"), 1),
            )
            if any(r.get("paper") for r in records)
            else ()
        ),
        ("train img/s", timing("train_images_per_s"), 2),
        ("eval img/s", timing("eval_images_per_s"), 2),
        ("time s", timing("total_seconds"), 0),
    ]


def _mean(values: list[Any]) -> float | None:
    """Mean when every value is present, else ``None`` (a partial mean would mislead)."""
    if not values or any(not isinstance(v, (int, float)) or not math.isfinite(v) for v in values):
        return None
    return float(np.mean(values))


def table_rows(records: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows (values or ``None``): one row per category, then mean rows (textures,
    objects and all, when both groups are present; otherwise one mean row)."""
    columns = _columns(records)
    header = ["category", *(c[0] for c in columns), "status"]
    rows = [[r["category"], *(get(r) for _, get, _ in columns), r["status"]] for r in records]
    done = [r for r in records if "metrics" in r]
    groups = [("mean", done)]
    textures = [r for r in done if r["category"] in TEXTURES]
    objects = [r for r in done if r["category"] in OBJECTS]
    if textures and objects:
        groups = [("mean textures", textures), ("mean objects", objects), ("mean", done)]
    for label, group in groups:
        if group:
            rows.append(
                [
                    f"{label} ({len(group)})",
                    *(_mean([get(r) for r in group]) for _, get, _ in columns),
                    "",
                ]
            )
    return header, rows


def _fmt(value: Any, decimals: int) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    return f"{value:.{decimals}f}"


def markdown_table(records: list[dict[str, Any]], config: Config | None = None) -> str:
    """The results as a Markdown table with the paper's Table 1 alongside, and notes."""
    header, rows = table_rows(records)
    decimals = [0, *(c[2] for c in _columns(records)), 0]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 2) + ["---"]) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(v, d) for v, d in zip(row, decimals)) + " |")
    notes = [
        "",
        "Image AUROC on raw scores (never flipped). Pixel AUROC over every pixel of every test "
        "image at the masks' own resolution (maps upsampled bilinearly); the "
        f"{PAPER_PIXEL_PX}² column follows the authors' scoring script (masks and maps resized to "
        f"{PAPER_PIXEL_PX}×{PAPER_PIXEL_PX}) and is the one comparable with the paper's pixel "
        f"AUROC. AUPRO: area under the per-region-overlap curve up to FPR {AUPRO_FPR_LIMIT:g}, "
        f"divided by {AUPRO_FPR_LIMIT:g}.",
    ]
    name = (
        config.model.name if config is not None else (records[0].get("model") if records else None)
    )
    family = get_family(name) if name in family_names() else None
    published = PUBLISHED.get(name or "")
    if published is not None:
        source, _, mean = published
        notes.append(
            f"Paper: {source} (mean over the 15 categories: {mean[0]} image / {mean[1]} pixel "
            "AUROC %). Its scoring script flipped labels when an AUROC fell below 0.5."
        )
    throughput = family.throughput_note if family is not None else "training images per second"
    notes.append(
        f"train img/s: {throughput}; eval img/s: test images per second end to end (decode, "
        "resize, model, maps); n/a for models loaded rather than trained here."
    )
    no_masks = [
        r["category"] for r in records if r.get("metrics", {}).get("pixel_metrics") == NO_MASKS
    ]
    if no_masks:
        notes.append(
            f"Pixel metrics skipped for {', '.join(no_masks)} ({NO_MASKS}): no "
            "ground_truth/ folder, so only image-level metrics were computed."
        )
    if config is not None:
        ablation = ablation_note(config)
        if ablation is not None:
            notes.append(ablation)
        notes.extend(configuration_notes(config))
    return "\n".join(lines + notes) + "\n"


def write_csv(path: Path, header: list[str], rows: list[list[Any]], float_format: str) -> None:
    """A results table as CSV (floats with ``float_format``, None empty), written atomically."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for row in rows:
            writer.writerow(
                [
                    "" if v is None else (float_format.format(v) if isinstance(v, float) else v)
                    for v in row
                ]
            )


def write_tables(
    records: list[dict[str, Any]], out: str | Path, config: Config | None = None
) -> tuple[Path, Path, str]:
    """``<out>/results.csv`` (percent, 3 decimals) and ``<out>/results.md``."""
    out = Path(out)
    header, rows = table_rows(records)
    csv_path, md_path = out / "results.csv", out / "results.md"
    # Numeric columns stay numeric in the CSV: a skipped pixel metric is an empty cell there.
    rows = [[None if v == NO_MASKS else v for v in row] for row in rows]
    write_csv(csv_path, header, rows, "{:.3f}")
    markdown = markdown_table(records, config)
    write_text(md_path, markdown)
    return csv_path, md_path, markdown
