"""The MVTec benchmark: adapters, metrics on a whole split, tables, the `mvtec` command end to end
(synthetic data and the shared hazelnut subset), resuming, --checkpoint-dir, the workflow and
one-line errors for bad input."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import HAZELNUT, tiny_config
from test_cli import assert_one_error_line, run

from wsi_anomaly.config import save_config
from wsi_anomaly.mvtec import (
    AdapterOutput,
    MVTecCategory,
    compute_metrics,
    evaluate,
    markdown_table,
    write_synthetic_category,
)

REPO = Path(__file__).resolve().parents[1]


class ColourOutlierAdapter:
    """A stand-in model: per pixel, the distance to the image's mean colour (64×64 maps)."""

    name = "colour-outlier"
    score_names = ("max", "mean")
    has_maps = True
    batch_size = 4
    device = torch.device("cpu")
    precision = "fp32"
    identity: dict = {}

    def __call__(self, images):
        distance = (images - images.mean(dim=(2, 3), keepdim=True)).norm(dim=1, keepdim=True)
        maps = F.avg_pool2d(distance, 4)[:, 0].numpy()
        return AdapterOutput({"max": maps.max(axis=(1, 2)), "mean": maps.mean(axis=(1, 2))}, maps)


class ImageOnlyAdapter(ColourOutlierAdapter):
    """Like an ATAC-Net: one score per image, no maps."""

    name = "image-only"
    score_names = ("score",)
    has_maps = False

    def __call__(self, images):
        out = super().__call__(images)
        return AdapterOutput({"score": out.scores["max"]}, None)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mvtec")
    write_synthetic_category(root, "widget", size_px=96)
    return root


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    save_config(tiny_config(), path)
    return path


def test_adapter_maps_are_aligned_with_native_masks(data_root):
    test = MVTecCategory(data_root / "widget").dataset("test")
    evaluation = evaluate(ColourOutlierAdapter(), test, progress=False)
    assert evaluation.maps.shape == (6, 64, 64) and evaluation.images_per_s > 0
    metrics = compute_metrics(evaluation, test)
    assert metrics["image_auroc"]["max"] == 1.0
    # Maps upsampled to the 96-px masks must line up with them (a transposed or shifted map
    # would not): the defects are exactly the colour outliers.
    assert metrics["pixel_auroc"] > 0.95 and metrics["pixel_auroc_128_paper"] > 0.95
    assert 0.6 < metrics["aupro"] <= 1.0 and metrics["mask_px"] == [[96, 96]]


def test_image_only_models_get_no_pixel_metrics(data_root):
    test = MVTecCategory(data_root / "widget").dataset("test")
    evaluation = evaluate(ImageOnlyAdapter(), test, progress=False)
    metrics = compute_metrics(evaluation, test)
    assert evaluation.maps is None and metrics["image_auroc"]["score"] == 1.0
    assert metrics["pixel_auroc"] is None and metrics["aupro"] is None
    record = {
        "category": "hazelnut",
        "status": "ok",
        "score_names": ["score"],
        "metrics": metrics,
        "paper": {"image_auroc": 99.8, "pixel_auroc": 97.8},
        "timing": {},
    }
    table = markdown_table([record])
    row = next(line for line in table.splitlines() if line.startswith("| hazelnut"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "100.0" and cells[2:5] == ["n/a"] * 3 and cells[5:7] == ["99.8", "97.8"]


@pytest.fixture(scope="module")
def trained_run(data_root, tiny_yaml, tmp_path_factory):
    """`wsi-anomaly mvtec` on the synthetic category: 2 training steps, random VGG19."""
    from wsi_anomaly.cli import main

    out = tmp_path_factory.mktemp("results")
    code = main(
        [
            "mvtec",
            "--root",
            str(data_root),
            "--category",
            "widget",
            "--config",
            str(tiny_yaml),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--figures",
            "2",
            "-q",
        ]
    )
    assert code == 0
    return out


def assert_valid_metrics(record):
    m = record["metrics"]
    values = [*m["image_auroc"].values(), m["pixel_auroc"], m["pixel_auroc_128_paper"], m["aupro"]]
    assert all(v is not None and math.isfinite(v) and 0.0 <= v <= 1.0 for v in values), m
    t = record["timing"]
    assert t["train_images_per_s"] > 0 and t["eval_images_per_s"] > 0 and t["total_seconds"] > 0


def test_mvtec_command_writes_category_folder_and_tables(trained_run):
    folder = trained_run / "widget"
    for name in ("model.pt", "metrics.json", "scores.csv", "model.config.yaml"):
        assert (folder / name).is_file(), name
    record = json.loads((folder / "metrics.json").read_text())
    assert record["status"] == "ok" and record["trained_here"] and record["n_test"] == 6
    assert record["paper"] is None  # not an MVTec category
    assert record["config"]["model"]["backbone_weights"] == "random"
    assert_valid_metrics(record)
    assert len(record["figures"]) == 2 and all((folder / f).is_file() for f in record["figures"])
    assert len((folder / "scores.csv").read_text().splitlines()) == 1 + 6
    table = (trained_run / "results.md").read_text()
    assert "| widget |" in table and "| mean (1) |" in table and "128² (paper protocol)" in table
    assert (trained_run / "results.csv").read_text().startswith("category,")


def test_rerun_skips_done_categories(capsys, trained_run, data_root, tiny_yaml):
    model = trained_run / "widget" / "model.pt"
    before = model.stat().st_mtime_ns
    code, out, _ = run(
        capsys,
        "mvtec",
        "--root",
        str(data_root),
        "--config",
        str(tiny_yaml),
        "--out",
        str(trained_run),
        "--device",
        "cpu",
        "-q",
    )
    assert code == 0 and "widget: skipped (done)" in out
    assert model.stat().st_mtime_ns == before


def test_checkpoint_dir_evaluates_without_training(capsys, trained_run, data_root, tmp_path):
    code, out, _ = run(
        capsys,
        "mvtec",
        "--root",
        str(data_root),
        "--category",
        "widget",
        "--checkpoint-dir",
        str(trained_run),
        "--out",
        str(tmp_path),
        "--device",
        "cpu",
        "--figures",
        "0",
        "--loader-workers",
        "0",
        "-q",
    )
    assert code == 0 and "widget: ok" in out
    assert not (tmp_path / "widget" / "model.pt").exists()
    record = json.loads((tmp_path / "widget" / "metrics.json").read_text())
    first = json.loads((trained_run / "widget" / "metrics.json").read_text())
    assert record["trained_here"] is False and record["timing"]["train_images_per_s"] is None
    assert record["metrics"]["image_auroc"] == pytest.approx(first["metrics"]["image_auroc"])
    assert record["metrics"]["aupro"] == pytest.approx(first["metrics"]["aupro"])


def test_workflow_writes_a_summary(capsys, trained_run, data_root, tmp_path):
    spec = importlib.util.spec_from_file_location(
        "mvtec_workflow", REPO / "workflows" / "mvtec_benchmark.py"
    )
    workflow = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(workflow)
    code = workflow.main(
        [
            "--root",
            str(data_root),
            "--categories",
            "widget",
            "--checkpoint-dir",
            str(trained_run),
            "--out",
            str(tmp_path),
            "--device",
            "cpu",
            "--loader-workers",
            "0",
            "-q",
        ]
    )
    assert code == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "| widget |" in summary and "Runtime per category" in summary and "92.0" in summary
    # Without --categories the whole benchmark is required.
    assert workflow.main(["--root", str(data_root), "--out", str(tmp_path / "x")]) == 2
    assert "lacks 15 of the 15" in capsys.readouterr().err


def test_bad_input_gives_one_line(capsys, data_root, tmp_path):
    code, _, err = run(capsys, "mvtec", "--root", str(tmp_path))
    assert_one_error_line(code, err, "MVTec AD layout")
    code, _, err = run(capsys, "mvtec", "--root", str(tmp_path / "missing"))
    assert_one_error_line(code, err, "not found")
    code, _, err = run(capsys, "mvtec", "--root", str(data_root), "--category", "carpet")
    assert_one_error_line(code, err, "'carpet' not found", "available: widget")
    code, _, err = run(capsys, "mvtec", "--root", str(data_root), "--family", "nosuch")
    assert_one_error_line(code, err, "available: atacnet, haloae")
    code, _, err = run(
        capsys,
        "mvtec",
        "--root",
        str(data_root),
        "--checkpoint-dir",
        str(tmp_path),
        "--out",
        str(tmp_path / "o"),
    )
    assert_one_error_line(code, err, "no checkpoint for category 'widget'")

    broken = tmp_path / "broken"
    write_synthetic_category(broken, "widget", size_px=64)
    (broken / "widget" / "ground_truth" / "scratch" / "000_mask.png").unlink()
    code, _, err = run(capsys, "mvtec", "--root", str(broken), "--out", str(tmp_path / "o"))
    assert_one_error_line(code, err, "has no ground-truth mask")
    (broken / "widget" / "ground_truth" / "scratch" / "000_mask.png").write_bytes(
        (broken / "widget" / "ground_truth" / "scratch" / "001_mask.png").read_bytes()
    )
    from PIL import Image

    Image.new("L", (70, 64)).save(broken / "widget" / "ground_truth" / "spot" / "000_mask.png")
    code, _, err = run(capsys, "mvtec", "--root", str(broken), "--out", str(tmp_path / "o"))
    assert_one_error_line(code, err, "masks must match their images")
    assert not (tmp_path / "o" / "widget").exists()  # nothing started


@pytest.mark.skipif(not HAZELNUT.is_dir(), reason=f"shared MVTec subset not present: {HAZELNUT}")
def test_hazelnut_end_to_end(capsys, tiny_yaml, tmp_path):
    code, out, _ = run(
        capsys,
        "mvtec",
        "--root",
        str(HAZELNUT.parent),
        "--category",
        "hazelnut",
        "--config",
        str(tiny_yaml),
        "--out",
        str(tmp_path),
        "--device",
        "cpu",
        "--figures",
        "1",
        "-q",
    )
    assert code == 0
    record = json.loads((tmp_path / "hazelnut" / "metrics.json").read_text())
    assert record["n_train"] == 50 and record["n_test"] == 10 and record["n_defective"] == 8
    assert record["paper"]["image_auroc"] == 99.8 and record["paper"]["pixel_auroc"] == 97.8
    assert_valid_metrics(record)
    assert record["metrics"]["mask_px"] == [[256, 256]]
    assert "| hazelnut |" in out and "99.8" in out and "97.8" in out


@pytest.fixture(scope="module")
def no_mask_root(tmp_path_factory):
    """The same images as ``data_root`` with no ground_truth/ folder (image-level data)."""
    root = tmp_path_factory.mktemp("mvtec_no_masks")
    write_synthetic_category(root, "widget", size_px=96, masks=False)
    return root


def test_data_without_masks_gets_image_metrics_only(no_mask_root, tmp_path):
    from wsi_anomaly.mvtec.benchmark import write_tables

    test = MVTecCategory(no_mask_root / "widget").dataset("test")
    metrics = compute_metrics(evaluate(ColourOutlierAdapter(), test, progress=False), test)
    assert metrics["image_auroc"]["max"] == 1.0
    assert metrics["pixel_auroc"] is None and metrics["aupro"] is None
    assert metrics["pixel_metrics"] == "n/a — no masks"
    record = {
        "category": "widget",
        "status": "ok",
        "score_names": ["max", "mean"],
        "metrics": metrics,
        "paper": None,
        "timing": {},
    }
    _, _, table = write_tables([record], tmp_path)
    row = next(line for line in table.splitlines() if line.startswith("| widget"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "100.0" and cells[3:6] == ["n/a — no masks"] * 3
    assert "Pixel metrics skipped for widget" in table
    csv_row = (tmp_path / "results.csv").read_text().splitlines()[1].split(",")
    assert csv_row[3:6] == ["", "", ""]


def test_mvtec_command_runs_data_without_masks(capsys, trained_run, no_mask_root, tmp_path):
    code, out, _ = run(
        capsys,
        "mvtec",
        "--root",
        str(no_mask_root),
        "--category",
        "widget",
        "--checkpoint-dir",
        str(trained_run),
        "--out",
        str(tmp_path),
        "--device",
        "cpu",
        "--figures",
        "2",
        "--loader-workers",
        "0",
        "-q",
    )
    assert code == 0 and "widget: ok" in out
    record = json.loads((tmp_path / "widget" / "metrics.json").read_text())
    assert record["has_masks"] is False and record["metrics"]["pixel_metrics"] == "n/a — no masks"
    assert record["metrics"]["pixel_auroc"] is None
    assert record["metrics"]["image_auroc"]["mean"] is not None
    assert len(record["figures"]) == 2
    assert "n/a — no masks" in (tmp_path / "results.md").read_text()


def test_conv_attention_is_not_labelled_as_the_papers_cnn_row():
    from wsi_anomaly.mvtec.benchmark import markdown_table
    from wsi_anomaly.mvtec.paper import paper_reference

    record = {
        "category": "hazelnut",
        "status": "ok",
        "score_names": ["mean"],
        "metrics": {
            "image_auroc": {"mean": 0.9},
            "pixel_auroc": 0.9,
            "pixel_auroc_128_paper": 0.9,
            "aupro": 0.5,
        },
        "paper": {"image_auroc": 99.8, "pixel_auroc": 97.8},
        "timing": {},
    }
    conv = tiny_config()
    conv.haloae.attention = "conv"
    assert paper_reference(conv) is None
    table = markdown_table([record], conv)
    assert "Table 4" in table and "85.0" not in table and "90.4" not in table
    assert "3×3 convolutions in the same blocks) has no paper counterpart" in table
    assert "inverted" not in table  # no halo attention in this run

    corrected = markdown_table([record], tiny_config())
    assert "the paper's numbers came from the authors' released layer" in corrected
    assert "this run uses the corrected layer" in corrected
    released = tiny_config()
    released.haloae.released_mask = True
    assert paper_reference(released) == paper_reference(tiny_config())
    assert "reproduction switch" in markdown_table([record], released)
