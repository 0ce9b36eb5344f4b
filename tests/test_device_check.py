"""benchmarks/device_check.py --smoke: the GPU readiness check runs end to end on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_smoke_prints_the_table_and_bf16_agrees(tmp_path):
    out = tmp_path / "check.json"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "device_check.py"),
            "--smoke",
            "--json",
            str(out),
            "--work",
            str(tmp_path / "work"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| measure | setting | value | target | met |")
    text = "\n".join(table)
    for precision in ("fp32", "bf16"):
        for batch in (2, 4):
            assert f"| model tiles/s | {precision} eager batch {batch} |" in text
    for measure in (
        "bf16 vs fp32 Spearman",
        "bf16 vs fp32 calls differing",
        "bf16 vs fp32 Anomalous calls differing",
        "precision auto picks",
        "slide file → pictures s",
        "GPU busy % while scoring",
        "peak host RSS MiB",
    ):
        assert f"| {measure} |" in text, measure

    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["smoke"]
    eager = [r for r in result["model"] if r["mode"] == "eager"]
    assert len(eager) == 4 and all(r["tiles_per_s"] > 0 for r in eager)
    agreement = result["agreement"]
    assert agreement["tiles"] >= 32
    assert agreement["spearman"] >= 0.999, agreement
    assert agreement["calls_differing"] <= 1 / 32, agreement
    assert agreement["anomalous_calls_differing"] <= 0.005, agreement
    from wsi_anomaly.runtime import cpu_has_native_bf16

    assert agreement["auto_precision"] == ("bf16" if cpu_has_native_bf16() else "fp32")
    slide = result["slide"]
    # Tissue everywhere: 2048 px at 0.5 µm/px tiled at 1 µm/px is a 4 × 4 grid (tissue
    # detection may drop a few border tiles).
    assert slide["size_px"] == 2048 and 9 <= slide["tiles"] <= 16
    assert slide["file_to_pictures_s"] > 0 and "total_s" in slide["timings_s"]
    assert result["peak_rss_mib"] > 0
    bank = result["bank_family"]
    assert [r["precision"] for r in bank if "precision" in r] == ["fp32", "bf16"]
    assert all(r["tiles_per_s"] > 0 for r in bank if "tiles_per_s" in r)
    search = [r for r in bank if r.get("section") == "bank"]
    assert len(search) == 1 and search[0]["seconds"] > 0 and search[0]["bank_rows"] == 256
    for measure in ("patchcore tiles/s", "bank search s"):
        assert f"| {measure} |" in text, measure
