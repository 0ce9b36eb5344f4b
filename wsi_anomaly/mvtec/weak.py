"""The weakly supervised MVTec AD protocol (DevNet/DRA, as used by the ATAC-Net paper).

Image labels are all it needs: a category without ``ground_truth/`` masks runs as it is.

A few labelled anomalies are drawn, with a fixed seed, from a category's **test** anomalies (the
sorted file list, shuffled with the seed) and removed from the test set. The model trains on
train/good plus those anomalies and is evaluated (image AUROC) on what is left of the test set.

- ``general``: the anomalies are drawn across every defect type.
- ``hard``: they are drawn from one known defect type, and *every* anomaly of that type leaves
  the test set (the test anomalies are all of unseen types).

Per category and seed, ``<out>/<category>/seed<s>/`` holds ``split.json`` (the split, so runs
are comparable), ``model.pt``, ``scores.csv`` and ``metrics.json`` (written last: a re-run skips
finished runs). ``<out>/results.csv`` and ``<out>/results.md`` give per-category mean ± std over
seeds beside the ATAC-Net paper's Table 1 (general) or Table 2 (hard).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..checkpoint import load_checkpoint
from ..config import Config, save_config
from ..errors import InvalidInputError, OutputExistsError, WsiAnomalyError
from ..models.registry import get_family
from ..outputs import write_text
from .adapters import check_model_name
from .benchmark import (
    CHECKPOINT_NAME,
    METRICS_NAME,
    BenchmarkResult,
    BenchmarkSettings,
    _write_json,
    _write_scores_csv,
    compute_metrics,
    evaluate_checkpoint,
    input_px,
    train_category,
    write_csv,
)
from .data import GOOD, MVTecCategory, MVTecDataset, MVTecSample, resolve_categories
from .paper import (
    ATACNET_TABLE1,
    ATACNET_TABLE1_MEAN,
    ATACNET_VARIANT_COLUMNS,
    atacnet_paper_columns,
)

log = logging.getLogger(__name__)

SETTINGS = ("general", "hard")
SPLIT_NAME = "split.json"
#: The headline score of image-only models in the weak protocol (ATAC-Net's adapter).
SCORE = "score"


@dataclass(frozen=True)
class WeakSplit:
    """Labelled training anomalies and the remaining test set of one category and seed."""

    category: MVTecCategory = field(repr=False)
    setting: str
    known_type: str | None
    seed: int
    n: int
    train_anomalies: list[MVTecSample]
    test: list[MVTecSample]

    def _relative(self, samples: list[MVTecSample]) -> list[str]:
        return [s.image.relative_to(self.category.path).as_posix() for s in samples]

    def to_dict(self) -> dict[str, Any]:
        """The ``split.json`` record: image paths relative to the category folder."""
        return {
            "category": self.category.name,
            "category_path": str(self.category.path),
            "setting": self.setting,
            "known_type": self.known_type,
            "seed": self.seed,
            "n": self.n,
            "train_anomalies": self._relative(self.train_anomalies),
            "test": self._relative(self.test),
        }


def _variant(config: Config) -> str:
    """The variant the family says ``config`` trains (its name when it has none)."""
    return get_family(config.model.name).variant(config) or config.model.name


def draw_split(
    category: MVTecCategory,
    n: int,
    setting: str = "general",
    known_type: str | None = None,
    seed: int = 0,
) -> WeakSplit:
    """Draw ``n`` labelled anomalies from ``category``'s test anomalies and remove them from its
    test set (``hard``: remove every anomaly of ``known_type``).

    Raises:
        InvalidInputError: a bad setting, a missing or unknown known type, ``n`` < 1, fewer
            anomalies available than asked for, or no anomaly left to evaluate on.
    """
    if setting not in SETTINGS:
        raise InvalidInputError(f"--setting must be one of {', '.join(SETTINGS)}, got {setting!r}")
    if n < 1:
        raise InvalidInputError(f"--anomalies must be at least 1, got {n}")
    if setting == "hard":
        if not known_type:
            raise InvalidInputError(
                "--setting hard needs --known-type (the one defect type to train on)"
            )
        if known_type not in category.defect_types:
            raise InvalidInputError(
                f"{category.name}: defect type {known_type!r} not found "
                f"(available: {', '.join(category.defect_types)})"
            )
    elif known_type:
        raise InvalidInputError("--known-type is for --setting hard")

    def key(s: MVTecSample) -> str:
        return s.image.relative_to(category.path).as_posix()

    anomalies = sorted((s for s in category.test_samples if s.defect_type != GOOD), key=key)
    pool = [s for s in anomalies if s.defect_type == known_type] if setting == "hard" else anomalies
    where = f"of type {known_type!r} " if setting == "hard" else ""
    if len(pool) < n:
        raise InvalidInputError(
            f"{category.name}: {n} labelled anomalies asked for but only "
            f"{len(pool)} test anomalies {where}are available; lower "
            "--anomalies"
        )
    order = np.random.default_rng(seed).permutation(len(pool))
    drawn = [pool[i] for i in order[:n]]
    removed = {key(s) for s in (pool if setting == "hard" else drawn)}
    test = [s for s in category.test_samples if key(s) not in removed]
    if not any(s.label for s in test) or all(s.label for s in test):
        raise InvalidInputError(
            f"{category.name}: drawing {n} anomalies {where}leaves a test set "
            "without both good and defective images; lower --anomalies"
        )
    return WeakSplit(
        category, setting, known_type if setting == "hard" else None, seed, n, drawn, test
    )


#: ``WeakProtocol.n`` that draws, per category, as many anomalies as the ATAC-Net paper's Table 1 did.
PAPER_COUNTS = "paper"


def anomaly_count(text: str) -> int | str:
    """A ``--anomalies`` value: a number of labelled anomalies, or ``paper`` (the ATAC-Net
    paper's per-category counts). Raises ValueError otherwise (argparse reports it as one line)."""
    if text == PAPER_COUNTS:
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected a number or '{PAPER_COUNTS}', got {text!r}") from None


@dataclass
class WeakProtocol:
    """What the weak protocol draws: ``n`` anomalies per category (or :data:`PAPER_COUNTS`, the
    ATAC-Net paper's own per-category counts), the setting and its known type, and the split/training
    seeds ``first_seed``, …, ``first_seed + n_seeds - 1``."""

    n: int | str = 10
    setting: str = "general"
    known_type: str | None = None
    n_seeds: int = 3
    first_seed: int = 0

    @property
    def seeds(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.n_seeds))

    @property
    def paper_counts(self) -> bool:
        return self.n == PAPER_COUNTS

    def n_for(self, category: str) -> int:
        """How many labelled anomalies to draw from ``category``."""
        if not self.paper_counts:
            return int(self.n)
        if self.setting != "general":
            raise InvalidInputError(
                "--anomalies paper is for --setting general (the ATAC-Net "
                "paper's Table 1); its hard-setting Table 2 uses 1 and 10 "
                "anomalies"
            )
        row = ATACNET_TABLE1.get(category)
        if row is None:
            raise InvalidInputError(
                f"{category}: not an MVTec AD category of the ATAC-Net "
                "paper's Table 1, so there is no paper count; pass "
                "--anomalies N"
            )
        return row[0]

    def describe(self) -> str:
        """How many anomalies are drawn, for the table notes."""
        return (
            "the ATAC-Net paper's per-category count of labelled test anomalies (Table 1, "
            '"paper n anomalies")'
            if self.paper_counts
            else f"{self.n} labelled test anomalies per category"
        )


def _train(
    split: WeakSplit, config: Config, checkpoint: Path, settings: BenchmarkSettings
) -> dict[str, Any]:
    category = split.category
    anomalies = MVTecDataset(
        split.train_anomalies, input_px(config), name=f"{category.name}/labelled-anomalies"
    )
    result, resume = train_category(category, config, checkpoint, settings, anomalies)
    if result is None:
        return {"trained": False}
    return {
        "trained": True,
        "resumed": resume,
        "train_seconds": result.seconds,
        "train_images_per_s": result.images_per_s,
    }


def run_weak_seed(
    split: WeakSplit, config: Config, out_dir: str | Path, settings: BenchmarkSettings
) -> dict[str, Any]:
    """Train on train/good + the split's anomalies, evaluate on its test set, write the folder."""
    out_dir = Path(out_dir)
    split_path, metrics_path = out_dir / SPLIT_NAME, out_dir / METRICS_NAME
    if split_path.exists() and not settings.overwrite:
        if json.loads(split_path.read_text()) != split.to_dict():
            raise OutputExistsError(
                f"{split_path} holds another split (different --anomalies, "
                "--setting or data); pass --overwrite or choose another --out"
            )
        if metrics_path.exists():
            record = json.loads(metrics_path.read_text())
            record["status"] = "skipped (done)"
            return record
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(split_path, split.to_dict())
    checkpoint = out_dir / CHECKPOINT_NAME
    training = _train(split, config, checkpoint, settings)
    dataset = MVTecDataset(
        split.test,
        input_px(config),
        name=f"{split.category.name}/test-weak",
        has_masks=split.category.has_masks,
    )
    adapter, evaluation = evaluate_checkpoint(checkpoint, dataset, config, settings)
    metrics = compute_metrics(evaluation, dataset)
    _write_scores_csv(out_dir / "scores.csv", split.category, dataset, evaluation)
    record = {
        "category": split.category.name,
        "status": "ok",
        "model": adapter.name,
        "variant": _variant(config),
        "seed": split.seed,
        "setting": split.setting,
        "known_type": split.known_type,
        "n_labelled_anomalies": split.n,
        "score_names": list(adapter.score_names),
        "metrics": metrics,
        "n_train": len(split.category.train_files),
        "n_test": len(dataset),
        "n_defective": int(evaluation.labels.sum()),
        "timing": {
            "train_seconds": training.get("train_seconds"),
            "train_images_per_s": training.get("train_images_per_s"),
            "eval_images_per_s": evaluation.images_per_s,
            "total_seconds": time.perf_counter() - t0,
        },
        "trained_here": training["trained"],
        "checkpoint": str(checkpoint.resolve()),
        "model_identity": adapter.identity,
        "device": str(adapter.device),
        "config": load_checkpoint(checkpoint)["config"],
        "software_version": __version__,
    }
    _write_json(metrics_path, record)
    return record


def _headline(record: dict[str, Any]) -> float | None:
    values = record.get("metrics", {}).get("image_auroc", {})
    return values.get(SCORE, next(iter(values.values()), None)) if values else None


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    present = [v for v in values if v is not None and math.isfinite(v)]
    if not values or len(present) < len(values):
        return None, None
    std = float(np.std(present, ddof=1)) if len(present) > 1 else 0.0
    return float(np.mean(present)), std


def run_weak_benchmark(
    root: str | Path,
    categories: list[str] | None,
    config: Config,
    out: str | Path,
    settings: BenchmarkSettings,
    protocol: WeakProtocol,
    on_run: Callable[[dict[str, Any]], None] | None = None,
) -> BenchmarkResult:
    """Every requested category × seed of the weak protocol, then the tables.

    Every split is drawn (and so checked) before any training starts. Returns the per-category
    summaries (``image_auroc_mean``, ``image_auroc_std``, ``per_seed``…) as ``records``.
    """
    check_model_name(config.model.name)
    config.validate()
    if protocol.n_seeds < 1:
        raise InvalidInputError(f"--seeds must be at least 1, got {protocol.n_seeds}")
    if settings.checkpoint_dir is not None:
        raise InvalidInputError(
            "--checkpoint-dir is not supported with --anomalies (each split trains its own model)"
        )
    selected = resolve_categories(root, categories)
    splits = {
        (c.name, s): draw_split(c, protocol.n_for(c.name), protocol.setting, protocol.known_type, s)
        for c in selected
        for s in protocol.seeds
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    summaries = []
    for category in selected:
        runs = []
        for seed in protocol.seeds:
            try:
                record = run_weak_seed(
                    splits[category.name, seed],
                    replace(config, seed=seed),
                    out / category.name / f"seed{seed}",
                    settings,
                )
            except WsiAnomalyError as exc:
                if not settings.skip_errors:
                    raise
                log.error("%s seed %d: %s", category.name, seed, exc)
                record = {"category": category.name, "seed": seed, "status": f"error: {exc}"}
            runs.append(record)
            if on_run is not None:
                on_run(record)
        n_labelled = protocol.n_for(category.name)
        per_seed = [_headline(r) for r in runs]
        mean, std = _mean_std(per_seed)
        failed = [r["status"] for r in runs if r["status"].startswith("error")]
        summaries.append(
            {
                "category": category.name,
                "status": failed[0] if failed else "ok",
                "seeds": protocol.seeds,
                "per_seed": per_seed,
                "image_auroc_mean": mean,
                "image_auroc_std": std,
                "n_labelled": n_labelled,
                "n_test": runs[0].get("n_test"),
                "n_defective": runs[0].get("n_defective"),
                "paper": atacnet_paper_columns(
                    category.name,
                    _variant(config),
                    protocol.setting,
                    protocol.known_type,
                    n_labelled,
                ),
            }
        )
    csv_path, md_path, markdown = write_weak_tables(summaries, out, config, protocol)
    return BenchmarkResult(summaries, csv_path, md_path, markdown)


# -- tables ------------------------------------------------------------------------------------
def weak_table_rows(
    summaries: list[dict[str, Any]], protocol: WeakProtocol
) -> tuple[list[str], list[list[Any]]]:
    """Header and rows: one per category, then the mean over categories (its ± is the std over
    seeds of the per-seed category mean)."""
    paper_keys = list(summaries[0]["paper"]) if summaries else []
    header = [
        "category",
        "image AUROC mean",
        "image AUROC std",
        *(f"seed {s}" for s in protocol.seeds),
        "n labelled",
        "n test",
        "n defective",
        *paper_keys,
        "status",
    ]
    rows = [
        [
            s["category"],
            s["image_auroc_mean"],
            s["image_auroc_std"],
            *s["per_seed"],
            s["n_labelled"],
            s["n_test"],
            s["n_defective"],
            *(s["paper"][k] for k in paper_keys),
            s["status"],
        ]
        for s in summaries
    ]
    if summaries:
        by_seed = [[s["per_seed"][i] for s in summaries] for i in range(len(protocol.seeds))]
        seed_means = [_mean_std(v)[0] for v in by_seed]
        mean, std = _mean_std(seed_means)

        def paper_mean(key):
            values = [s["paper"][key] for s in summaries]
            return _mean_std(values)[0] if all(v is not None for v in values) else None

        rows.append(
            [
                f"mean ({len(summaries)})",
                mean,
                std,
                *seed_means,
                None,
                None,
                None,
                *(paper_mean(k) for k in paper_keys),
                "",
            ]
        )
    return header, rows


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def write_weak_tables(
    summaries: list[dict[str, Any]], out: str | Path, config: Config, protocol: WeakProtocol
) -> tuple[Path, Path, str]:
    """``<out>/results.csv`` and ``<out>/results.md`` (image AUROC as fractions, as the ATAC-Net paper)."""
    out = Path(out)
    header, rows = weak_table_rows(summaries, protocol)
    csv_path, md_path = out / "results.csv", out / "results.md"
    write_csv(csv_path, header, rows, "{:.4f}")
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 2) + ["---"]) + "|",
    ]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    variant = _variant(config)
    what = (
        f"of known type {protocol.known_type!r} only; every anomaly of that type left the test set"
        if protocol.setting == "hard"
        else "drawn across all defect types and removed from the test set"
    )
    notes = [
        "",
        (
            f"Weakly supervised protocol ({protocol.setting}): {protocol.describe()}, {what}; seeds {', '.join(map(str, protocol.seeds))} "
            "(std: sample std over seeds). Image AUROC on raw scores, as fractions."
        ),
        (
            f"Model: {config.model.name}, variant {variant} "
            f'(the ATAC-Net paper\'s Table 1 column "{ATACNET_VARIANT_COLUMNS.get(variant, variant)}").'
        ),
    ]
    if protocol.setting == "general":
        printed = ", ".join(
            f"{ATACNET_VARIANT_COLUMNS[v]} {m}"
            for v, m in zip(ATACNET_VARIANT_COLUMNS, ATACNET_TABLE1_MEAN)
        )
        notes.append(
            f"Paper: ATAC-Net, Table 1 (its own per-category anomaly counts, "
            f'"paper n anomalies"); printed MVTec mean: {printed}.'
        )
    else:
        counts = sorted({int(s["n_labelled"]) for s in summaries})
        matched = counts in ([1], [10])
        notes.append(
            "Paper: ATAC-Net, Table 2 (hard setting; (1)/(10): one/ten labelled "
            "anomalies of the known type); only tile and metal_nut were reported. "
            + (
                "Only the paper's column with this run's number of labelled anomalies is printed."
                if matched
                else "This run's number of labelled anomalies is neither 1 nor 10: neither "
                "paper column is a like-for-like comparison."
            )
        )
    markdown = "\n".join(lines + notes) + "\n"
    write_text(md_path, markdown)
    return csv_path, md_path, markdown
