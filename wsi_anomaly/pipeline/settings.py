"""What a heatmap run is asked to do: the per-slide settings and the progress it reports."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidInputError
from ..score import AUTO_BATCH
from ..slide.qc import QCSettings
from ..stitch import SCALE_BASES, DisplaySettings


@dataclass(frozen=True)
class ScoringProgress:
    """Where a slide's scoring stands, after each scored model batch."""

    slide: str  # the slide's file name
    done: int  # tiles scored so far
    total: int  # tiles to score
    seconds: float  # since the slide's scoring began

    @property
    def tiles_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else float("nan")

    @property
    def eta_s(self) -> float:
        """Seconds left at the speed so far (NaN before the first batch)."""
        rate = self.tiles_per_s
        return (self.total - self.done) / rate if rate > 0 else float("nan")


@dataclass
class HeatmapSettings:
    """Per-slide options. ``target_mpp`` None → the model's training mpp."""

    target_mpp: float | None = None
    min_tissue: float = 0.5
    stride_px: int | None = None
    batch_size: int | str = AUTO_BATCH  # auto → 32 on a CPU, the largest that fits on a GPU
    device: str = "auto"
    precision: str = "auto"
    compile: str = "off"  # off | default | max-autotune | reduce-overhead (torch.compile)
    backbone_weights: str | None = None  # for models whose checkpoint records the backbone's hash
    engine: str = "torch"  # torch | onnx (ONNX Runtime on the exported graph)
    read_workers: int = 0
    keep_maps: bool = False
    top_k: int = 16
    max_px: int = 2048
    cmap: str = "coolwarm"
    scale: str = "fixed"  # fixed: the model's training scale | slide: this slide's percentiles
    alpha: float = 0.5  # opacity of the heat colours in overlay.png
    slide_mpp: float | None = None
    mpp_csv: str | None = None
    overwrite: bool = False
    progress: bool = True
    #: called after every scored model batch with a ScoringProgress (in this process only:
    #: dask workers in other processes get no callback)
    on_progress: Callable[[ScoringProgress], None] | None = None
    slides_in_flight: int = 0  # 0 → two on a GPU, one on a CPU (see slides_in_flight)
    #: tissue QC: flag (every output carries the flags), exclude (flagged tiles are not
    #: scored) or off
    qc: str = "flag"
    qc_settings: QCSettings = field(default_factory=QCSettings)
    #: score tile features another tool extracted instead of tiling the slides
    #: (:class:`wsi_anomaly.features_run.FeatureSources`); None: tile and score pixels
    features: Any | None = None

    @property
    def display(self) -> DisplaySettings:
        """How the slide's outputs are drawn."""
        return DisplaySettings(
            cmap=self.cmap, scale=self.scale, alpha=self.alpha, max_px=self.max_px, top_k=self.top_k
        )

    def __post_init__(self) -> None:
        from ..score import check_batch_size, check_compile_mode

        check_batch_size(self.batch_size)
        check_compile_mode(self.compile)
        if self.scale not in SCALE_BASES:
            raise InvalidInputError(
                f"--scale must be one of {', '.join(SCALE_BASES)}, got {self.scale!r}"
            )
        if not 0.0 <= self.alpha <= 1.0:
            raise InvalidInputError(f"--alpha must be between 0 and 1, got {self.alpha}")
        if self.qc not in QC_MODES:
            raise InvalidInputError(f"--qc must be one of {', '.join(QC_MODES)}, got {self.qc!r}")


#: ``--qc`` choices.
QC_MODES = ("flag", "exclude", "off")


def scoring_settings(settings: HeatmapSettings, slide_mpp: float | None) -> dict[str, Any]:
    """The settings that change a slide's scores: a result is reused only when these, the
    slide's content and the model all match. The device, precision, runtime and batch size
    are not among them: they change scores only within the agreement measured for bf16
    (Spearman ≥ 0.999, ≤ 0.5 % of calls), and summary.json records them. How the scores are
    drawn is not among them either (:func:`display_settings`): a result that differs only
    there is re-drawn from its stored scores."""
    return {
        "target_mpp": settings.target_mpp,
        "min_tissue": settings.min_tissue,
        "stride_px": settings.stride_px,
        "slide_mpp": slide_mpp,
        "keep_maps": settings.keep_maps,
        "qc": settings.qc,
        "qc_settings": settings.qc_settings.to_dict() if settings.qc != "off" else None,
    }


#: The settings of :func:`display_settings` (older results kept them among the scoring ones).
DISPLAY_KEYS = ("cmap", "scale", "alpha", "max_px", "top_k")


def display_settings(settings: HeatmapSettings) -> dict[str, Any]:
    """How a slide's scores are drawn (``identity["display"]``): changing them re-draws the
    pictures, tables and GeoJSON from the stored scores — the results folder's tile store
    holds every tile, so the top tiles are re-drawn too — without scoring a tile."""
    return {key: getattr(settings, key) for key in DISPLAY_KEYS}
