"""The weakly supervised MVTec protocol for ATAC-Net: splits (general and hard), split.json, the
`mvtec --family atacnet --anomalies` command end to end, and one-line errors for bad input."""

import csv
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import assert_one_error_line, run

from wsi_anomaly.config import load_config, save_config
from wsi_anomaly.errors import InvalidInputError
from wsi_anomaly.mvtec import MVTecCategory, write_synthetic_category
from wsi_anomaly.mvtec.paper import ATACNET_TABLE1, ATACNET_TABLE1_MEAN, ATACNET_TABLE2
from wsi_anomaly.mvtec.weak import WeakProtocol, draw_split


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Two tiny categories: ``widget`` (2 anomalies per type, for training) and ``many`` (6 per
    type, for split checks only)."""
    root = tmp_path_factory.mktemp("mvtec_weak")
    write_synthetic_category(root, "widget", size_px=64)
    write_synthetic_category(root, "many", size_px=32, n_per_defect=6, n_good=3)
    return root


@pytest.fixture(scope="module")
def atac_yaml(tmp_path_factory):
    config = load_config(
        "atacnet_fast",
        {
            "model": {"backbone_weights": "random"},
            "atacnet": {"epochs": 1, "steps_per_epoch": 1, "batch_size": 4},
            "train": {"calibration_tiles": 4, "workers": 0},
        },
    )
    path = tmp_path_factory.mktemp("config") / "atac_tiny.yaml"
    save_config(config, path)
    return path


def names(samples):
    return {s.image.as_posix() for s in samples}


@pytest.mark.parametrize("setting,known", [("general", None), ("hard", "spot")])
def test_no_training_anomaly_in_the_test_split(data_root, setting, known):
    category = MVTecCategory(data_root / "many")
    for seed in range(5):
        split = draw_split(category, 3, setting, known, seed)
        assert len(split.train_anomalies) == 3 and not names(split.train_anomalies) & names(
            split.test
        )
        assert all(s.label == 1 for s in split.train_anomalies)
        assert names(split.train_anomalies) | names(split.test) <= names(category.test_samples)
        if setting == "hard":
            assert {s.defect_type for s in split.train_anomalies} == {"spot"}
            assert not any(s.defect_type == "spot" for s in split.test)  # all of it left
            assert len(split.test) == len(category.test_samples) - 6
        else:
            assert len(split.test) == len(category.test_samples) - 3
        assert any(s.label == 0 for s in split.test) and any(s.label == 1 for s in split.test)


def test_split_is_deterministic_per_seed_and_differs_across_seeds(data_root):
    category = MVTecCategory(data_root / "many")
    a, b = draw_split(category, 4, seed=0), draw_split(category, 4, seed=0)
    assert a.to_dict() == b.to_dict()
    drawn = {tuple(draw_split(category, 4, seed=s).to_dict()["train_anomalies"]) for s in range(4)}
    assert len(drawn) > 1
    hard = {
        tuple(draw_split(category, 2, "hard", "scratch", s).to_dict()["train_anomalies"])
        for s in range(4)
    }
    assert len(hard) > 1


def test_split_errors(data_root):
    category = MVTecCategory(data_root / "many")
    with pytest.raises(InvalidInputError, match="only 6"):
        draw_split(category, 7, "hard", "spot")
    with pytest.raises(InvalidInputError, match="available: scratch, spot"):
        draw_split(category, 1, "hard", "crack")
    with pytest.raises(InvalidInputError, match="--known-type"):
        draw_split(category, 1, "hard")
    with pytest.raises(InvalidInputError, match="leaves a test set"):
        draw_split(category, 12)


def test_paper_tables_transcribed():
    assert len(ATACNET_TABLE1) == 15
    for i, printed in enumerate(ATACNET_TABLE1_MEAN):
        mean = sum(row[1 + i] for row in ATACNET_TABLE1.values()) / 15
        assert abs(mean - printed) < 0.002, (i, mean, printed)
    for cls, types in (("tile", 5), ("metal_nut", 4)):
        rows = [v for (c, t), v in ATACNET_TABLE2.items() if c == cls and t != "mean"]
        assert len(rows) == types
        for n in (1, 10):
            mean = sum(r[n][2] for r in rows) / types
            assert abs(mean - ATACNET_TABLE2[cls, "mean"][n][2]) < 0.002


@pytest.fixture(scope="module")
def weak_run(data_root, atac_yaml, tmp_path_factory):
    from wsi_anomaly.cli import main

    out = tmp_path_factory.mktemp("weak_results")
    code = main(
        [
            "mvtec",
            "--family",
            "atacnet",
            "--anomalies",
            "2",
            "--seeds",
            "2",
            "--root",
            str(data_root),
            "--category",
            "widget",
            "--config",
            str(atac_yaml),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--backbone-weights",
            "random",
            "--seed",
            "5",
            "--eval-batch-size",
            "8",
            "-q",
        ]
    )
    assert code == 0
    return out


def test_weak_command_end_to_end(weak_run, data_root):
    for seed in (5, 6):
        folder = weak_run / "widget" / f"seed{seed}"
        split = json.loads((folder / "split.json").read_text())
        assert split["seed"] == seed and split["n"] == 2 and split["setting"] == "general"
        assert split["known_type"] is None and len(split["train_anomalies"]) == 2
        assert not set(split["train_anomalies"]) & set(split["test"]) and len(split["test"]) == 4
        assert all((data_root / "widget" / p).is_file() for p in split["test"])
        record = json.loads((folder / "metrics.json").read_text())
        assert record["status"] == "ok" and record["model"] == "atacnet"
        assert record["config"]["seed"] == seed and record["n_test"] == 4
        auroc = record["metrics"]["image_auroc"]["score"]
        assert math.isfinite(auroc) and 0.0 <= auroc <= 1.0
        assert record["metrics"]["pixel_auroc"] is None
        scored = [r["image"] for r in csv.DictReader((folder / "scores.csv").open())]
        assert scored == split["test"]
    rows = list(csv.DictReader((weak_run / "results.csv").open()))
    assert [r["category"] for r in rows] == ["widget", "mean (1)"]
    for row in rows:
        assert math.isfinite(float(row["image AUROC mean"]))
        assert math.isfinite(float(row["image AUROC std"]))
    assert "paper ATAC-Net" in rows[0] and rows[0]["paper ATAC-Net"] == ""  # not MVTec
    table = (weak_run / "results.md").read_text()
    assert "| widget |" in table and "Table 1" in table


def test_weak_rerun_skips_done_seeds(capsys, weak_run, data_root, atac_yaml):
    model = weak_run / "widget" / "seed5" / "model.pt"
    before = model.stat().st_mtime_ns
    code, out, _ = run(
        capsys,
        "mvtec",
        "--family",
        "atacnet",
        "--anomalies",
        "2",
        "--seeds",
        "2",
        "--root",
        str(data_root),
        "--category",
        "widget",
        "--config",
        str(atac_yaml),
        "--out",
        str(weak_run),
        "--device",
        "cpu",
        "--seed",
        "5",
        "-q",
    )
    assert code == 0 and "widget seed 5: skipped (done)" in out
    assert model.stat().st_mtime_ns == before


@pytest.mark.parametrize(
    "extra,needles",
    [
        (["--family", "atacnet", "--anomalies", "5"], ["only 4", "--anomalies"]),
        (
            [
                "--family",
                "atacnet",
                "--anomalies",
                "3",
                "--setting",
                "hard",
                "--known-type",
                "spot",
            ],
            ["only 2", "'spot'"],
        ),
        # a HaloAE preset (the later --config wins): --anomalies needs a weakly supervised family
        (["--config", "haloae_fast", "--anomalies", "2"], ["--anomalies", "--family atacnet"]),
        (
            [
                "--family",
                "atacnet",
                "--anomalies",
                "1",
                "--setting",
                "hard",
                "--known-type",
                "crack",
            ],
            ["'crack'", "available: scratch, spot"],
        ),
        (["--family", "atacnet", "--anomalies", "1", "--setting", "hard"], ["--known-type"]),
        (["--family", "atacnet", "--anomalies", "paper"], ["widget", "--anomalies N"]),
        (
            [
                "--family",
                "atacnet",
                "--anomalies",
                "paper",
                "--setting",
                "hard",
                "--known-type",
                "spot",
            ],
            ["--anomalies paper", "--setting general"],
        ),
        (["--family", "atacnet", "--anomalies", "many"], ["--anomalies", "'paper'", "'many'"]),
    ],
)
def test_bad_input_is_one_line(capsys, data_root, atac_yaml, tmp_path, extra, needles):
    code, _, err = run(
        capsys,
        "mvtec",
        "--root",
        str(data_root),
        "--category",
        "widget",
        "--config",
        str(atac_yaml),
        "--out",
        str(tmp_path / "out"),
        "--device",
        "cpu",
        "-q",
        *extra,
    )
    assert_one_error_line(code, err, *needles)
    assert not (tmp_path / "out").exists()  # nothing trained or written


def test_paper_counts_follow_the_seeds_table1():
    paper = WeakProtocol(n="paper")
    assert [paper.n_for(c) for c in ("bottle", "toothbrush", "cable", "carpet")] == [3, 1, 8, 5]
    assert {paper.n_for(c) for c in ATACNET_TABLE1} == {row[0] for row in ATACNET_TABLE1.values()}
    assert WeakProtocol(n=10).n_for("bottle") == 10
    with pytest.raises(InvalidInputError, match="--anomalies N"):
        paper.n_for("widget")
    with pytest.raises(InvalidInputError, match="--setting general"):
        WeakProtocol(n="paper", setting="hard", known_type="crack").n_for("tile")


def test_workflow_runs_the_weak_protocol_with_paper_counts(capsys, atac_yaml, tmp_path):
    # A synthetic category named like an MVTec one, so that the paper's count (bottle: 3) applies.
    root = tmp_path / "mvtec"
    write_synthetic_category(root, "bottle", size_px=32, n_per_defect=3, n_good=3)
    spec = importlib.util.spec_from_file_location(
        "mvtec_workflow", Path(__file__).resolve().parents[1] / "workflows" / "mvtec_benchmark.py"
    )
    workflow = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(workflow)
    out = tmp_path / "out"
    code = workflow.main(
        [
            "--root",
            str(root),
            "--categories",
            "bottle",
            "--config",
            str(atac_yaml),
            "--anomalies",
            "paper",
            "--seeds",
            "1",
            "--epochs",
            "1",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--eval-batch-size",
            "8",
            "-q",
        ]
    )
    assert code == 0
    split = json.loads((out / "bottle" / "seed0" / "split.json").read_text())
    assert split["n"] == 3 == len(split["train_anomalies"]) and len(split["test"]) == 6
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert rows[0]["category"] == "bottle" and rows[0]["n labelled"] == "3"
    assert float(rows[0]["paper ATAC-Net"]) == ATACNET_TABLE1["bottle"][4]
    summary = (out / "summary.md").read_text()
    assert "| bottle seed 0 | ok |" in summary and "1 epoch × 1 batches of 4" in summary
    assert "per-category count" in summary


def test_atacnet_sees_each_image_at_its_own_size_clahe_then_one_bicubic_resize(tmp_path):
    """The ATAC-Net paper's order: CLAHE on the image as it is, then one bicubic resize to 224;
    not a bilinear resize to 256 first."""
    from PIL import Image

    from wsi_anomaly.models.atacnet_data import ATACNET_MEAN, ATACNET_STD, equalise_contrast
    from wsi_anomaly.models.registry import get_family
    from wsi_anomaly.models.transforms import normalise
    from wsi_anomaly.mvtec.benchmark import input_px

    config = load_config("atacnet_fast", {"model": {"backbone_weights": "random"}})
    assert input_px(config) is None and input_px(load_config("haloae_fast")) == 256
    folder = write_synthetic_category(tmp_path, "widget", size_px=300)
    test = MVTecCategory(folder).dataset("test", input_px(config))
    image = test[4]
    assert image.shape == (3, 300, 300)  # handed over at its own resolution
    x = get_family("atacnet").transform(image[None], config)[0]

    def by_hand(rgb):
        rgb = equalise_contrast(rgb)
        rgb = np.asarray(Image.fromarray(rgb).resize((224, 224), Image.Resampling.BICUBIC))
        return normalise(
            torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255.0, ATACNET_MEAN, ATACNET_STD
        )

    native = test.load_rgb(4)
    torch.testing.assert_close(x, by_hand(native))
    resized_first = np.asarray(
        Image.fromarray(native).resize((256, 256), Image.Resampling.BILINEAR)
    )
    assert (x - by_hand(resized_first)).abs().max() > 0.05  # the old order differs


def test_images_of_different_sizes_are_evaluated_in_same_size_batches():
    from wsi_anomaly.mvtec.benchmark import _same_size_batches

    images = [torch.zeros(3, 8, 8), torch.ones(3, 8, 8), torch.zeros(3, 6, 6), torch.ones(3, 8, 8)]
    batches = _same_size_batches(images)
    assert [tuple(b.shape) for b in batches] == [(2, 3, 8, 8), (1, 3, 6, 6), (1, 3, 8, 8)]
    assert torch.equal(
        torch.cat([b.flatten(1)[:, :1] for b in batches if b.shape[-1] == 8]),
        torch.tensor([[0.0], [1.0], [1.0]]),
    )


def test_hard_setting_prints_only_the_paper_column_of_the_same_anomaly_count():
    from wsi_anomaly.mvtec.paper import atacnet_paper_columns

    one = atacnet_paper_columns("tile", "atacnet", "hard", "crack", 1)
    assert one == {"paper DevNet (1)": 0.926, "paper DRA (1)": 0.975, "paper ATAC-Net (1)": 0.969}
    ten = atacnet_paper_columns("tile", "atacnet", "hard", "crack", 10)
    assert set(ten) == {"paper DevNet (10)", "paper DRA (10)", "paper ATAC-Net (10)"}
    assert len(atacnet_paper_columns("tile", "atacnet", "hard", "crack", 3)) == 6
