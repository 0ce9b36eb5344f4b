"""``wsi-anomaly export MODEL.pt --format onnx --out model.onnx``: the scoring path as ONNX."""

from __future__ import annotations

import argparse

from . import options as opt

HELP = "export a model's scoring path (ONNX)"
DESCRIPTION = """Write a trained model's scoring path — backbone features, the family's model and
its scoring with the model's calibration baked in — as an ONNX graph (opset 18, any batch size)
that `score`/`heatmap --runtime onnx` use. ONNX Runtime scores a few sample tiles first; the
largest relative difference from PyTorch's scores is printed, and an export above the bound
(1e-3) is refused. Families that cannot be exported (ATAC-Net) are refused in one line. Needs
the onnx extra: pip install -e '.[onnx]'."""
EXAMPLES = (
    "wsi-anomaly export model.pt --format onnx --out model.onnx",
    "wsi-anomaly export patchcore.pt --backbone-weights wrn50.pth  # writes patchcore.onnx",
)


def add_parser(sub, parents: list[argparse.ArgumentParser]) -> None:
    p = opt.add_command(sub, parents, "export", HELP, DESCRIPTION, run, EXAMPLES)
    p.add_argument("model", metavar="MODEL", help="checkpoint written by `train`")
    p.add_argument("--format", choices=("onnx",), default="onnx", help="onnx (default)")
    p.add_argument("--out", help="file to write (default: MODEL with the .onnx suffix)")
    p.add_argument(
        "--backbone-weights",
        metavar="FILE",
        help="the backbone weights file the model was fitted with, for models whose checkpoint "
        "records the backbone instead of holding it (PatchCore)",
    )
    opt.add_overwrite_option(p)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import InputNotFoundError, InvalidInputError
    from ..export import export_model

    model = Path(args.model)
    if not model.is_file():
        raise InputNotFoundError(f"no checkpoint at {model}")
    out = opt.check_output_file(args.out or model.with_suffix(".onnx"))
    if out.exists() and not args.overwrite:
        raise InvalidInputError(f"{out} already exists; pass --overwrite to replace it")
    done = export_model(model, out, args.format, backbone_weights=args.backbone_weights)
    print(
        f"exported {done['nodes']} nodes (opset {done['opset']}) → {done['path']}; ONNX Runtime "
        f"vs PyTorch on {done['check_tiles']} tiles: max relative difference "
        f"{done['max_rel_diff']:.2e} (bound {done['bound']:g})"
    )
    return 0
