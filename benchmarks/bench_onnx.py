"""Tiles/s of HaloAE's scoring path: PyTorch (fp32, bf16 autocast) against ONNX Runtime (fp32).

Builds HaloAE with random weights and a random calibration mean map, exports its scoring module
(the graph ``wsi-anomaly export`` writes) to ONNX in memory, checks ONNX Runtime's tile scores
against PyTorch's, then times the three engines on the same batch, interleaved (each round runs
all three, in alternating order) so that other work on a shared machine slows them alike.
Reports the median tiles/s, the median CPU seconds per tile (this process's CPU time) and the
ratios to PyTorch fp32, and the process's peak RSS while each engine ran (the model, the
sessions and the inputs are all resident, so compare the rows' differences). ``--int8`` adds ONNX Runtime's dynamic int8 quantisation of the same
graph, with its largest relative score difference.

Example::

    python benchmarks/bench_onnx.py --batch-size 4 --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from wsi_anomaly.export import (
    INPUT_NAME,
    ONNX_OPSET,
    OUTPUT_NAMES,
    max_relative_difference,
    onnx_session,
)
from wsi_anomaly.models import HaloAE, load_vgg19
from wsi_anomaly.models.calibration import Calibration
from wsi_anomaly.models.registry import get_family


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (median reported)")
    parser.add_argument("--int8", action="store_true", help="also time dynamic int8")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(cores or 1)
    torch.manual_seed(0)
    family = get_family("haloae")
    model = HaloAE(load_vgg19("random")).eval()
    calibration = Calibration.from_scores(
        torch.rand(16), torch.rand(16), {"mean_map": torch.rand(64, 64)}
    )
    module = family.scoring_module(model, calibration).eval()
    x = torch.randn(args.batch_size, 3, 256, 256)
    t0 = time.perf_counter()
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            (x[:2],),  # two tiles trace it (the batch is free); less memory than the whole batch
            dynamo=True,
            opset_version=ONNX_OPSET,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}},
            verbose=False,
        )
    assert program is not None
    export_s = time.perf_counter() - t0
    data = program.model_proto.SerializeToString()
    nodes = len(program.model_proto.graph.node)
    del program  # the exporter's graphs and copies of the weights
    gc.collect()
    sessions = {"onnx fp32": onnx_session(data)}
    if args.int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "m.onnx", Path(tmp) / "m.int8.onnx"
            src.write_bytes(data)
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
            sessions["onnx int8"] = onnx_session(dst.read_bytes())
    feed = {INPUT_NAME: x.numpy()}

    def torch_run(precision: str) -> Callable[[], np.ndarray]:
        def run() -> np.ndarray:
            cast = (
                torch.autocast("cpu", dtype=torch.bfloat16)
                if precision == "bf16"
                else contextlib.nullcontext()
            )
            with torch.inference_mode(), cast:
                return module(x)[0].float().numpy()

        return run

    engines: dict[str, Callable[[], np.ndarray]] = {
        "torch fp32": torch_run("fp32"),
        "torch bf16": torch_run("bf16"),
    }
    for name, session in sessions.items():
        engines[name] = lambda s=session: s.run(None, feed)[0]
    reference = engines["torch fp32"]()
    rel = {name: max_relative_difference(reference, run()) for name, run in engines.items()}
    peak_rss = {n: 0.0 for n in engines}

    def rss_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    running = [""]

    def sample() -> None:  # the process's RSS while each engine runs, every 5 ms
        while True:
            if running[0]:
                peak_rss[running[0]] = max(peak_rss[running[0]], rss_mib())
            time.sleep(0.005)

    threading.Thread(target=sample, daemon=True).start()
    walls: dict[str, list[float]] = {n: [] for n in engines}
    cpus: dict[str, list[float]] = {n: [] for n in engines}
    names = list(engines)
    for i in range(args.rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            running[0] = name
            w0, c0 = time.perf_counter(), time.process_time()
            engines[name]()
            walls[name].append(time.perf_counter() - w0)
            cpus[name].append(time.process_time() - c0)
            running[0] = ""
    b = args.batch_size
    base_wall = statistics.median(walls["torch fp32"])
    base_cpu = statistics.median(cpus["torch fp32"])
    results: dict[str, object] = {
        "batch": b,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "export_s": export_s,
        "nodes": nodes,
        "engines": {
            n: {
                "tiles_per_s": b / statistics.median(walls[n]),
                "cpu_s_per_tile": statistics.median(cpus[n]) / b,
                "speedup": base_wall / statistics.median(walls[n]),
                "cpu_speedup": base_cpu / statistics.median(cpus[n]),
                "max_rel_diff_vs_torch_fp32": rel[n],
                "peak_rss_mib": peak_rss[n],
            }
            for n in engines
        },
    }
    print(
        f"HaloAE scoring, batch {b}, {results['threads']} threads, median of {args.rounds} "
        f"interleaved rounds; ONNX graph {results['nodes']} nodes, exported in {export_s:.0f} s\n"
    )
    print(
        "| engine | tiles/s | CPU s/tile | × torch fp32 (wall) | × (CPU time) | max rel. diff "
        "| peak RSS MiB |"
    )
    print("|---|---|---|---|---|---|---|")
    engines_out = results["engines"]
    assert isinstance(engines_out, dict)
    for n, r in engines_out.items():
        print(
            f"| {n} | {r['tiles_per_s']:.2f} | {r['cpu_s_per_tile']:.2f} | {r['speedup']:.2f}× | "
            f"{r['cpu_speedup']:.2f}× | {r['max_rel_diff_vs_torch_fp32']:.1e} | "
            f"{r['peak_rss_mib']:.0f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
