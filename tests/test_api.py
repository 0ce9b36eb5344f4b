"""The README's Python API example runs as written and does what it says."""

import json
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_api_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return code


def test_readme_api_example_runs(tmp_path):
    code = readme_api_example()
    assert "import wsi_anomaly as wa" in code
    for name in ("wa.open_slide", "wa.tile", "wa.train", "wa.Scorer", "wa.heatmap"):
        assert name in code
    # A fresh interpreter, as a reader would run it, in an empty folder.
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=1500
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = tmp_path / "api-demo" / "results" / "slide.tif"
    for name in ("heatmap.png", "overlay.png", "tiles.geojson", "tiles.csv", "summary.json"):
        assert (results / name).is_file(), name
    summary = json.loads((results / "summary.json").read_text())
    lines = done.stdout.splitlines()
    assert lines[-1] == f"ok {summary['n_tiles']}"
    assert any(line.endswith(" tiles") and int(line.split()[0]) > 0 for line in lines)


def test_import_is_cheap_and_names_the_api():
    probe = (
        "import sys, wsi_anomaly as wa; "
        "assert 'torch' not in sys.modules, 'torch imported by import wsi_anomaly'; "
        "missing = [n for n in ('open_slide', 'tile', 'train', 'Scorer', 'heatmap') "
        "if n not in wa.__all__]; assert not missing, missing; "
        "assert callable(wa.heatmap) and 'torch' in sys.modules; "
        "print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]
    import wsi_anomaly as wa

    try:
        wa.not_a_function  # noqa: B018
    except AttributeError as exc:
        assert "not_a_function" in str(exc)
    else:
        raise AssertionError("an unknown attribute must raise AttributeError")
