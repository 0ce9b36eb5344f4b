"""Export a checkpoint's scoring path to ONNX, checked against PyTorch before it is kept.

The exported graph is the family's :meth:`~wsi_anomaly.models.family.ModelFamily.scoring_module`:
model inputs ``images`` (``B×3×256×256`` float32, what the family's ``transform`` makes of
tiles) → ``tile_score`` (``B``), ``tile_max`` (``B``) and ``tile_map`` (``B×64×64``), with the
checkpoint's calibration (HaloAE's training mean map) baked in; the batch size is free. Opset 18.

Before the file is written, ONNX Runtime scores a few sample tiles and its tile scores are
compared with PyTorch's in fp32: the largest relative difference is reported and an export
above :data:`MAX_REL_DIFF` is refused (nothing is written). The file's metadata records the
checkpoint's sha256, so a scorer can tell which checkpoint it belongs to.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import InvalidInputError, WsiAnomalyError
from .outputs import atomic_path

log = logging.getLogger(__name__)

#: ONNX opset of the exported graphs.
ONNX_OPSET = 18
#: Largest relative difference of ONNX Runtime's tile scores from PyTorch's (fp32) accepted at
#: export: the two run the same float32 maths in another order, so differences are rounding.
MAX_REL_DIFF = 1e-3
#: Sample tiles the export is checked on.
CHECK_TILES = 3
#: Names of the graph's input and outputs.
INPUT_NAME = "images"
OUTPUT_NAMES = ("tile_score", "tile_max", "tile_map")
FORMATS = ("onnx",)


class ExportError(WsiAnomalyError):
    """A model could not be exported, or its export did not score as PyTorch does."""


def require_onnx() -> Any:
    """The ``onnxruntime`` module; one clear error where the ``onnx`` extra is missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError:
        raise InvalidInputError(
            "ONNX export and scoring need onnx and onnxruntime: pip install -e '.[onnx]'"
        ) from None
    return onnxruntime


def sample_inputs(scorer: Any, n: int = CHECK_TILES) -> torch.Tensor:
    """``n`` model inputs from deterministic synthetic tiles (smooth colour gradients with noise),
    made as the scorer makes them from uint8 tiles."""
    rng = np.random.default_rng(0)
    px = scorer.tile_px
    ramp = np.linspace(0.0, 1.0, px, dtype=np.float32)
    tiles = []
    for _ in range(n):
        base = rng.uniform(0.2, 0.9, 3)
        tile = base * (0.7 + 0.3 * ramp[:, None, None]) + rng.normal(0, 0.05, (px, px, 3))
        tiles.append(np.clip(tile * 255, 0, 255).astype(np.uint8))
    x = scorer._host_input(np.stack(tiles))
    if scorer.family.transforms_on_device:
        x = scorer.family.transform(x, scorer.config)
    return x.float()


def onnx_session(path: str | Path | bytes) -> Any:
    """An ONNX Runtime session on the CPU for an exported file (or its bytes)."""
    ort = require_onnx()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(
        path if isinstance(path, bytes) else str(path), options, providers=["CPUExecutionProvider"]
    )


def max_relative_difference(reference: np.ndarray, other: np.ndarray) -> float:
    """``max |other − reference| / |reference|`` (denominator at least 1e-12)."""
    ref = np.asarray(reference, np.float64)
    diff = np.abs(np.asarray(other, np.float64) - ref)
    return float(np.max(diff / np.maximum(np.abs(ref), 1e-12)))


def export_model(
    checkpoint: str | Path, out: str | Path, fmt: str = "onnx", max_rel_diff: float = MAX_REL_DIFF
) -> dict[str, Any]:
    """Write ``checkpoint``'s scoring path to ``out`` as ONNX after checking it (see the
    module's description); returns what was written and the check's numbers."""
    if fmt not in FORMATS:
        raise InvalidInputError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    require_onnx()
    import onnx

    from .score import Scorer

    scorer = Scorer(checkpoint, device="cpu", precision="fp32", batch_size=CHECK_TILES)
    family = scorer.family
    if not family.exportable:
        raise ExportError(f"{family.title} models cannot be exported to ONNX (yet)")
    module = family.scoring_module(scorer.model, scorer.calibration).eval()
    x = sample_inputs(scorer)  # more than one tile: a batch of 1 would fix the batch size
    t0 = time.perf_counter()
    with torch.no_grad():
        expected = [t.numpy() for t in module(x)]
        try:
            program = torch.onnx.export(
                module,
                (x,),
                dynamo=True,
                opset_version=ONNX_OPSET,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}},
                verbose=False,
            )
        except Exception as exc:  # the exporter's errors are many and untyped
            raise ExportError(
                f"{family.title}: the scoring path could not be exported to ONNX: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            ) from None
    assert program is not None
    proto = program.model_proto
    meta = {
        "model_sha256": scorer.model_hash,
        "model_name": scorer.model_name,
        "backbone": scorer.backbone,
        "software_version": str(scorer.checkpoint["software_version"]),
    }
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    data = proto.SerializeToString()
    got = onnx_session(data).run(None, {INPUT_NAME: x.numpy()})
    rel = max_relative_difference(expected[0], got[0])
    if not rel <= max_rel_diff:
        raise ExportError(
            f"ONNX Runtime's tile scores differ from PyTorch's by up to {rel:.2e} (relative), "
            f"above the bound {max_rel_diff:g}: not written"
        )
    out = Path(out)
    with atomic_path(out) as tmp:
        onnx.save_model(proto, str(tmp))
    return {
        "path": str(out),
        "format": fmt,
        "opset": ONNX_OPSET,
        "nodes": len(proto.graph.node),
        "check_tiles": len(x),
        "max_rel_diff": rel,
        "bound": max_rel_diff,
        "seconds": time.perf_counter() - t0,
        **meta,
    }
