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

from .errors import InputNotFoundError, InvalidInputError, WsiAnomalyError
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


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else 'no detail'}"


def check_exported(proto: Any, model_hash: str, input_shape: tuple[int, ...], where: str) -> None:
    """Refuse a graph that is not the export of the checkpoint whose sha256 is ``model_hash``:
    its metadata must record that hash, its tensors must all be inside it (no external data
    files, which would be read from paths the file names), and it must take one float input
    ``images`` of ``B×input_shape`` (``3×H×W``, what the family's transform gives) with a free
    batch size and give :data:`OUTPUT_NAMES`."""
    from onnx import TensorProto
    from onnx.external_data_helper import uses_external_data

    hint = "export it again with: wsi-anomaly export MODEL --overwrite"
    meta = {p.key: p.value for p in proto.metadata_props}
    recorded = meta.get("model_sha256")
    if recorded is None:
        raise InvalidInputError(
            f"{where} records no source checkpoint (not written by export); {hint}"
        )
    if recorded != model_hash:
        raise InvalidInputError(
            f"{where} was exported from another checkpoint (sha256 {recorded[:12]}…, this "
            f"model's is {model_hash[:12]}…); {hint}"
        )
    if any(uses_external_data(t) for t in proto.graph.initializer):
        raise InvalidInputError(f"{where} refers to external data files; {hint}")
    inputs = [
        i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}
    ]
    shape = None
    if len(inputs) == 1 and inputs[0].name == INPUT_NAME:
        tensor = inputs[0].type.tensor_type
        if tensor.elem_type == TensorProto.FLOAT:
            shape = [d.dim_param or d.dim_value for d in tensor.shape.dim]
    if shape is None or not isinstance(shape[0], str) or shape[1:] != list(input_shape):
        wanted = "×".join(str(n) for n in ("B", *input_shape))
        raise InvalidInputError(
            f"{where} does not take float32 {INPUT_NAME} of {wanted} with a free batch size "
            f"(it takes {shape}); {hint}"
        )
    outputs = tuple(o.name for o in proto.graph.output)
    if outputs != OUTPUT_NAMES:
        raise InvalidInputError(f"{where} gives {list(outputs)}, not {list(OUTPUT_NAMES)}; {hint}")


def load_exported(path: str | Path, model_hash: str, input_shape: tuple[int, ...]) -> Any:
    """ONNX Runtime's session on an exported file, once :func:`check_exported` accepts it.
    The file is untrusted: one-line errors for a missing, damaged or foreign file."""
    require_onnx()
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputNotFoundError(f"no exported model at {path}") from None
    except OSError as exc:
        raise InvalidInputError(f"{path} cannot be read ({_one_line(exc)})") from None
    try:
        proto = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise InvalidInputError(
            f"{path} is not an ONNX model (damaged or another kind of file: {_one_line(exc)})"
        ) from None
    check_exported(proto, model_hash, input_shape, str(path))
    try:
        return onnx_session(data)
    except Exception as exc:  # ONNX Runtime's errors are untyped
        raise InvalidInputError(
            f"{path} cannot be loaded by ONNX Runtime ({_one_line(exc)}); export it again"
        ) from None


def _max_difference(expected: list[np.ndarray], got: list[np.ndarray]) -> float:
    """The worst relative difference of the tile scores and maxima, and of the maps relative to
    their largest value (a map's near-zero pixels have no meaningful relative difference)."""
    worst = max(max_relative_difference(e, g) for e, g in zip(expected[:2], got[:2], strict=True))
    scale = max(float(np.abs(expected[2]).max()), 1e-12)
    maps = float(np.abs(np.asarray(got[2], np.float64) - expected[2]).max()) / scale
    return max(worst, maps)


def export_scoring_module(
    module: torch.nn.Module,
    x: torch.Tensor,
    metadata: dict[str, str],
    what: str,
    max_rel_diff: float = MAX_REL_DIFF,
) -> tuple[Any, float]:
    """``module`` (a family's :meth:`~wsi_anomaly.models.family.ModelFamily.scoring_module`)
    as an ONNX model proto with ``metadata`` recorded, checked on the sample inputs ``x``
    (``B×C×H×W``, ``B`` ≥ 2: a batch of one would fix the graph's batch size) and on one of
    them; returns the proto and the largest relative difference from PyTorch. ``ExportError``
    when the exporter fails, the graph fixes the batch size, or the difference is above
    ``max_rel_diff``. ``what`` names the model in those errors."""
    require_onnx()
    module = module.eval()
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
                f"{what}: the scoring path could not be exported to ONNX: {_one_line(exc)}"
            ) from None
    assert program is not None
    proto = program.model_proto
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    try:
        check_exported(proto, metadata["model_sha256"], tuple(x.shape[1:]), "the exported graph")
    except InvalidInputError as exc:  # e.g. an op that fixed the batch size while tracing
        raise ExportError(f"{what}: {str(exc).split('; ')[0]}: not written") from None
    session = onnx_session(proto.SerializeToString())
    # the sample tiles, and fewer of them: the same scores whatever the batch size
    rel = max(
        _max_difference(expected, session.run(None, {INPUT_NAME: x.numpy()})),
        _max_difference([e[:1] for e in expected], session.run(None, {INPUT_NAME: x[:1].numpy()})),
    )
    if not rel <= max_rel_diff:
        raise ExportError(
            f"{what}: ONNX Runtime's scores differ from PyTorch's by up to {rel:.2e} "
            f"(relative), above the bound {max_rel_diff:g}: not written"
        )
    return proto, rel


def export_model(
    checkpoint: str | Path,
    out: str | Path,
    fmt: str = "onnx",
    max_rel_diff: float = MAX_REL_DIFF,
    backbone_weights: str | None = None,
) -> dict[str, Any]:
    """Write ``checkpoint``'s scoring path to ``out`` as ONNX after checking it (see the
    module's description); returns what was written and the check's numbers.
    ``backbone_weights``: as :class:`~wsi_anomaly.score.Scorer` takes it (families whose
    checkpoints record their backbone instead of holding it)."""
    if fmt not in FORMATS:
        raise InvalidInputError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    require_onnx()
    import onnx

    from .score import Scorer

    scorer = Scorer(
        checkpoint,
        device="cpu",
        precision="fp32",
        batch_size=CHECK_TILES,
        backbone_weights=backbone_weights,
    )
    family = scorer.family
    if not family.exportable:
        raise ExportError(
            f"{family.title} models cannot be exported to ONNX: {family.not_exportable}"
        )
    meta = {
        "model_sha256": scorer.model_hash,
        "model_name": scorer.model_name,
        "backbone": scorer.backbone,
        "software_version": str(scorer.checkpoint["software_version"]),
    }
    module = family.scoring_module(scorer.model, scorer.calibration)
    x = sample_inputs(scorer)
    t0 = time.perf_counter()
    proto, rel = export_scoring_module(module, x, meta, family.title, max_rel_diff)
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
