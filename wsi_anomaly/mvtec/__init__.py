"""MVTec AD: data layout, protocol and metrics — the benchmark path on the same model core.

``data``: categories and datasets; ``metrics``: AUROC and AUPRO; ``adapters``: the small interface
a model implements to be benchmarked; ``benchmark``: train → evaluate → write, per category, and
the results table; ``figures``: qualitative examples; ``paper``: the HaloAE paper's numbers.
"""

from .adapters import AdapterOutput, ModelAdapter, ScorerAdapter, load_adapter
from .benchmark import (
    BenchmarkResult,
    BenchmarkSettings,
    Evaluation,
    compute_metrics,
    evaluate,
    markdown_table,
    run_benchmark,
    run_category,
    write_tables,
)
from .data import (
    MVTecCategory,
    MVTecDataset,
    MVTecSample,
    find_categories,
    resolve_categories,
)
from .metrics import (
    aupro,
    image_auroc,
    paper_protocol_mask,
    pixel_auroc,
    pro_curve,
    resize_map,
)
from .paper import CATEGORIES, TABLE1_HALOAE, TABLE1_MEAN, paper_reference
from .synthetic import write_synthetic_category

__all__ = [
    "AdapterOutput",
    "BenchmarkResult",
    "BenchmarkSettings",
    "CATEGORIES",
    "Evaluation",
    "ScorerAdapter",
    "MVTecCategory",
    "MVTecDataset",
    "MVTecSample",
    "ModelAdapter",
    "TABLE1_HALOAE",
    "TABLE1_MEAN",
    "aupro",
    "compute_metrics",
    "evaluate",
    "find_categories",
    "image_auroc",
    "load_adapter",
    "markdown_table",
    "paper_protocol_mask",
    "paper_reference",
    "pixel_auroc",
    "pro_curve",
    "resize_map",
    "resolve_categories",
    "run_benchmark",
    "run_category",
    "write_synthetic_category",
    "write_tables",
]
