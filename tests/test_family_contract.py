"""The model-family contract, from outside: a family defined here — fitted without an
optimiser, with 16×16 maps, its own calibration extras — runs through train → score → heatmap →
mvtec with no edit outside this file; the training loop's rules (a non-finite loss stops training
with one line and no checkpoint, calibration quantiles are finite, config values are finite)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from test_cli import assert_one_error_line, run
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from wsi_anomaly.models import registry
from wsi_anomaly.models.calibration import Calibration
from wsi_anomaly.models.family import Epoch, EpochRng, ModelFamily, Prediction, Step
from wsi_anomaly.models.weights import Backbone

STUB_MAP_PX = 16


class ColourDistance(nn.Module):
    """Distance of each pixel's colour to the mean colour of the normal tiles, on a 16×16 grid.

    Fitted by accumulation (no gradient): :meth:`observe` sums colours, :meth:`finish` turns
    the sum into the mean (the fit-end hook)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("centre", torch.zeros(3))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self._sum = torch.zeros(3, dtype=torch.float64)
        self._count = 0

    def observe(self, x: Tensor) -> None:
        self._sum += x.double().sum(dim=(0, 2, 3)).cpu()
        self._count += x.shape[0] * x.shape[2] * x.shape[3]

    def finish(self) -> None:
        self.centre.copy_((self._sum / max(self._count, 1)).float())
        self.fitted.fill_(True)

    def forward(self, x: Tensor) -> Tensor:
        distance = (x - self.centre.view(1, 3, 1, 1)).norm(dim=1, keepdim=True)
        return F.adaptive_avg_pool2d(distance, STUB_MAP_PX)[:, 0]


class NoBackbone(nn.Module):
    def __init__(self, state: Any = None, backbone_identity: str = "none") -> None:
        super().__init__()
        self.backbone_identity = backbone_identity


STUB_BACKBONE: Backbone[nn.Module] = Backbone(
    name="none", label="no backbone", module=NoBackbone, reference=dict
)


class StubFamily(ModelFamily):
    name = "stub"
    title = "Stub"
    default_preset = ""
    schedule_section = "train"
    score_names = ("mean", "max")
    has_maps = True
    map_px = STUB_MAP_PX
    backbone = STUB_BACKBONE

    def describe_schedule(self, config: Any) -> str:
        return "one pass"

    def describe_training(self, config: Any, n_normal: int, n_anomalies: int) -> str:
        return f"fitting stub on {n_normal} tiles"

    def build(self, config: Any) -> nn.Module:
        return ColourDistance()

    def restore(
        self, config: Any, state_dict: Mapping[str, Tensor], identity: str, weights: Any = None
    ) -> nn.Module:
        model = ColourDistance()
        model.load_state_dict(state_dict)
        return model

    def epochs(self, config: Any) -> int:
        return 1

    def transform(self, images: Tensor, config: Any) -> Tensor:
        if images.dtype == torch.uint8:
            images = images.permute(0, 3, 1, 2).float() / 255
        return images

    def calibration_to(self, calibration: Calibration, device: torch.device) -> dict[str, Any]:
        return {"offset": float(calibration.extras["offset"])}

    def predict(
        self, model: nn.Module, x: Tensor, calibration: Mapping[str, Any], keep_maps: bool = True
    ) -> Prediction:
        maps = model(x) - calibration.get("offset", 0.0)
        return Prediction(maps.mean(dim=(1, 2)), maps.amax(dim=(1, 2)), maps if keep_maps else None)

    def training_data(self, normals: Dataset, anomalies: Dataset | None, config: Any) -> Dataset:
        return normals

    def calibration_data(self, normals: Dataset, config: Any) -> Dataset:
        return normals

    def loader(
        self, data: Dataset, config: Any, rng: EpochRng, workers: int, pin_memory: bool
    ) -> Iterable[Any]:
        return DataLoader(data, batch_size=4, num_workers=workers)

    def train_step(self, ep: Epoch, batch: Any) -> Step:
        assert ep.optimiser is None and not torch.is_grad_enabled()
        ep.model.observe(batch)
        return Step(None, {"images": float(len(batch))})

    def fit_end(self, model: nn.Module, config: Any) -> None:
        model.finish()

    def calibration_batch(self, model: nn.Module, batch: Any, runtime: Any) -> Tensor:
        assert bool(model.fitted), "calibration must come after the fit-end hook"
        maps = model(batch)
        return torch.stack([maps.mean(dim=(1, 2)), maps.amax(dim=(1, 2))], dim=1)

    def summarise_calibration(
        self, parts: list[Tensor], reference: Calibration | None = None
    ) -> Calibration:
        values = torch.cat(parts)
        offset = float(values[:, 0].min()) if reference is None else reference.extras["offset"]
        values = values - offset
        return Calibration.from_scores(values[:, 0], values[:, 1], {"offset": offset})


@pytest.fixture
def stub_family(monkeypatch):
    family = StubFamily()
    monkeypatch.setitem(registry.FAMILIES, family.name, family)
    return family


@pytest.fixture
def stub_yaml(tmp_path):
    path = tmp_path / "stub.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"name": "stub", "backbone_weights": "random"},
                "train": {"workers": 0, "calibration_tiles": 64},
            }
        )
    )
    return path


def test_stub_family_runs_train_score_heatmap_mvtec(
    capsys, stub_family, stub_yaml, small_store, small_slide, tmp_path
):
    import zarr

    from wsi_anomaly.checkpoint import load_checkpoint
    from wsi_anomaly.mvtec import write_synthetic_category

    model = tmp_path / "stub.pt"
    code, out, err = run(
        capsys, "train", "--tiles", str(small_store), "--out", str(model),
        "--family", "stub", "--config", str(stub_yaml), "--device", "cpu", "-q",
    )  # fmt: skip
    assert code == 0, err
    ckpt = load_checkpoint(model)
    assert "optimizer" not in ckpt["train_state"]
    calibration = Calibration.from_dict(ckpt["calibration"])
    assert calibration.extras["offset"] > 0 and calibration.threshold() > calibration.median()
    assert bool(ckpt["state_dict"]["fitted"]) and ckpt["state_dict"]["centre"].abs().sum() > 0

    # score: a folder of images
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(
            images / f"im{i}.png"
        )
    scores_csv = tmp_path / "scores.csv"
    code, _, err = run(
        capsys, "score", str(images), "--model", str(model), "--out", str(scores_csv),
        "--device", "cpu", "-q",
    )  # fmt: skip
    assert code == 0, err
    assert len(scores_csv.read_text().strip().splitlines()) == 4

    # heatmap with the maps kept: the store and the NGFF pixel map at the family's map size
    results = tmp_path / "results"
    code, _, err = run(
        capsys, "heatmap", str(small_slide.path), "--model", str(model), "--out", str(results),
        "--keep-maps", "--device", "cpu", "-q",
    )  # fmt: skip
    assert code == 0, err
    folder = results / small_slide.path.name
    maps = np.asarray(zarr.open_group(str(folder / "tiles.zarr"), mode="r")["maps"][:])
    assert maps.shape[1:] == (STUB_MAP_PX, STUB_MAP_PX) and np.isfinite(maps).all()
    ngff = zarr.open_group(str(folder / "heatmap.ome.zarr"), mode="r")
    coarse, fine = np.asarray(ngff["0"][:]), np.asarray(ngff["pixel"]["0"][:])
    assert fine.shape == (coarse.shape[0] * STUB_MAP_PX, coarse.shape[1] * STUB_MAP_PX)

    # mvtec on a synthetic category
    root = tmp_path / "mvtec"
    write_synthetic_category(root, "widget", size_px=96)
    code, out, err = run(
        capsys, "mvtec", "--root", str(root), "--category", "widget", "--family", "stub",
        "--config", str(stub_yaml), "--out", str(tmp_path / "bench"), "--device", "cpu",
        "--figures", "1", "-q",
    )  # fmt: skip
    assert code == 0, err
    table = (tmp_path / "bench" / "results.md").read_text()
    assert "widget" in table and "HaloAE" not in table


class PeakStubFamily(StubFamily):
    """The stub ranking its tiles by their map's peak, as PatchCore does."""

    name = "stubpeak"
    score_names = ("max", "mean")
    tile_score = "max"


def test_a_family_ranking_by_the_peak_runs_train_and_heatmap(
    capsys, monkeypatch, small_store, small_slide, tmp_path
):
    import csv

    import zarr

    from wsi_anomaly.checkpoint import load_checkpoint

    family = PeakStubFamily()
    monkeypatch.setitem(registry.FAMILIES, family.name, family)
    config = tmp_path / "peak.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"name": family.name, "backbone_weights": "random"},
                "train": {"workers": 0, "calibration_tiles": 64},
            }
        )
    )
    model = tmp_path / "peak.pt"
    code, _, err = run(
        capsys, "train", "--tiles", str(small_store), "--out", str(model),
        "--family", family.name, "--config", str(config), "--device", "cpu", "-q",
    )  # fmt: skip
    assert code == 0, err
    threshold = Calibration.from_dict(load_checkpoint(model)["calibration"]).threshold("max")
    results = tmp_path / "results"
    code, _, err = run(
        capsys, "heatmap", str(small_slide.path), "--model", str(model), "--out", str(results),
        "--device", "cpu", "-q",
    )  # fmt: skip
    assert code == 0, err
    folder = results / small_slide.path.name
    store = zarr.open_group(str(folder / "tiles.zarr"), mode="r")
    peaks = np.asarray(store["max_scores"][:])
    with open(folder / "tiles.csv", newline="") as fh:
        classes = [row["class"] == "Anomalous" for row in csv.DictReader(fh)]
    assert classes == (peaks >= threshold).tolist()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["tile_score"] == "max"
    assert summary["fraction_anomalous"] == pytest.approx(float(np.mean(peaks >= threshold)))
    assert summary["score_max"] == pytest.approx(float(peaks.max()))
    grid = np.asarray(zarr.open_group(str(folder / "heatmap.ome.zarr"), mode="r")["0"][...])
    col, row = np.asarray(store["grid_index"][:]).T
    np.testing.assert_allclose(grid[row, col], peaks)


def test_pixel_map_side_keeps_patch_grids():
    from wsi_anomaly.stitch import pixel_map_side

    assert [pixel_map_side(m) for m in (64, 16, 14, 28, 7)] == [16, 16, 14, 14, 7]


# -- the loop's rules -----------------------------------------------------------------------------
class NanLossFamily(StubFamily):
    """A gradient family whose loss turns non-finite at the second step."""

    name = "nanloss"

    def build(self, config: Any) -> nn.Module:
        model = ColourDistance()
        model.weight = nn.Parameter(torch.ones(()))
        return model

    def optimiser(self, model: nn.Module, config: Any) -> torch.optim.Optimizer:
        return torch.optim.SGD([model.weight], lr=0.1)

    def train_step(self, ep: Epoch, batch: Any) -> Step:
        self.steps = getattr(self, "steps", 0) + 1
        loss = ep.model.weight * (1.0 if self.steps < 2 else float("nan"))
        return Step(loss, {"images": float(len(batch))})


def test_non_finite_loss_stops_with_one_line_and_no_checkpoint(
    capsys, monkeypatch, small_store, tmp_path
):
    family = NanLossFamily()
    monkeypatch.setitem(registry.FAMILIES, family.name, family)
    seen: list[float] = []
    step = torch.optim.SGD.step

    def recording_step(self, *args, **kwargs):
        seen.append(float(self.param_groups[0]["params"][0].detach()))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", recording_step)
    config = tmp_path / "nan.yaml"
    config.write_text(yaml.safe_dump({"model": {"name": "nanloss"}, "train": {"workers": 0}}))
    out = tmp_path / "nan.pt"
    code, _, err = run(
        capsys, "train", "--tiles", str(small_store), "--out", str(out), "--family", "nanloss",
        "--config", str(config), "--device", "cpu", "-q",
    )  # fmt: skip
    assert_one_error_line(code, err, "diverged", "epoch 1", "step 2", "no checkpoint")
    assert not out.exists()
    assert len(seen) == 1, "the optimiser must not step on a non-finite loss"


def test_non_finite_calibration_is_refused(capsys, monkeypatch, stub_yaml, small_store, tmp_path):
    class NanCalibration(StubFamily):
        def calibration_batch(self, model, batch, runtime):
            values = super().calibration_batch(model, batch, runtime)
            values[0, 0] = float("nan")
            return values

    monkeypatch.setitem(registry.FAMILIES, "stub", NanCalibration())
    out = tmp_path / "m.pt"
    code, _, err = run(
        capsys, "train", "--tiles", str(small_store), "--out", str(out), "--family", "stub",
        "--config", str(stub_yaml), "--device", "cpu", "-q",
    )  # fmt: skip
    assert_one_error_line(code, err, "calibration", "non-finite")
    assert not out.exists()


def test_calibration_from_scores_refuses_non_finite():
    with pytest.raises(ValueError, match="non-finite"):
        Calibration.from_scores(torch.tensor([1.0, float("inf")]), torch.tensor([1.0, 2.0]))
    ok = Calibration.from_scores(torch.arange(100.0), torch.arange(100.0) + 1, {"x": 1})
    back = Calibration.from_dict(ok.to_dict())
    assert back == ok and back.threshold() == pytest.approx(98.01)


def test_old_calibration_layout_loads():
    old = {
        "mean_map": torch.zeros(64, 64),
        "n_tiles": 3,
        "score_quantiles": {"0.5": 1.0, "0.99": 2.0},
        "max_score_quantiles": {"0.5": 1.5, "0.99": 3.0},
    }
    cal = Calibration.from_dict(old)
    assert cal.extras["mean_map"].shape == (64, 64) and cal.threshold("max") == 3.0


@pytest.mark.parametrize(
    "yaml_text, needles",
    [
        ("haloae:\n  lr: .inf\n", ["haloae.lr", "finite"]),
        ("train:\n  calibration_holdout: .nan\n", ["train.calibration_holdout", "finite"]),
        ("model:\n  name: atacnet\natacnet:\n  lr: .inf\n", ["atacnet.lr", "finite"]),
    ],
)
def test_config_with_non_finite_values_is_refused(
    capsys, small_store, tmp_path, yaml_text, needles
):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    code, _, err = run(
        capsys, "train", "--tiles", str(small_store), "--out", str(tmp_path / "m.pt"),
        "--config", str(config), "--device", "cpu",
    )  # fmt: skip
    assert_one_error_line(code, err, *needles)


def test_sections_validate_non_finite_values_set_in_code():
    import dataclasses

    from wsi_anomaly.config import load_config
    from wsi_anomaly.errors import InvalidInputError

    config = load_config("haloae_fast")
    bad = dataclasses.replace(config, haloae=dataclasses.replace(config.haloae, lr=float("inf")))
    with pytest.raises(InvalidInputError, match="haloae.lr must be a finite number"):
        bad.validate()


# -- every registered family, end to end ----------------------------------------------------------
#: Each family's smallest settings (a new family adds its entry here: the test fails without).
TINY: dict[str, dict[str, Any]] = {
    "haloae": {"haloae": {"epochs": 1, "samples_per_epoch": 2, "batch_size": 1}},
    "atacnet": {"atacnet": {"epochs": 1, "steps_per_epoch": 1, "batch_size": 4}},
    "patchcore": {"patchcore": {"target_dim": 32, "coreset_budget": 64, "image_px": 64}},
    "features-knn": {"features_knn": {"coreset_budget": 16, "batch_size": 8}},
}


@pytest.mark.parametrize("name", registry.family_names())
def test_every_family_runs_train_score_heatmap_mvtec(
    capsys, name, small_store, small_slide, tmp_path
):
    """train (CLI) → score (CLI) → heatmap with maps (CLI) → mvtec (CLI) for a registered family."""
    import zarr

    from wsi_anomaly.checkpoint import load_checkpoint
    from wsi_anomaly.mvtec import write_synthetic_category

    assert name in TINY, f"add the smallest settings of the {name!r} family to TINY"
    family = registry.get_family(name)
    settings: dict[str, Any] = {
        "model": {"name": name, "backbone_weights": "random"},
        "train": {"workers": 0, "calibration_tiles": 8},
    }
    for key, values in TINY[name].items():
        settings[key] = {**settings.get(key, {}), **values}
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(settings))
    common = ["--family", name, "--config", str(config), "--device", "cpu", "-q"]

    model = tmp_path / "model.pt"
    if family.inputs == "tile features":
        tile_features_family_runs(capsys, family, common, small_slide, tmp_path)
        return
    weak = ["--anomalies", str(small_store)] if family.weakly_supervised else []
    code, _, err = run(
        capsys, "train", "--tiles", str(small_store), "--out", str(model), *weak, *common
    )
    assert code == 0, err
    ckpt = load_checkpoint(model)
    calibration = Calibration.from_dict(ckpt["calibration"])
    assert calibration.threshold() >= calibration.median()

    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    for i in range(2):
        Image.fromarray(np.full((256, 256, 3), 60 * (i + 1), np.uint8)).save(images / f"{i}.png")
    code, _, err = run(
        capsys, "score", str(images), "--model", str(model), "--out", str(tmp_path / "s.csv"),
        "--device", "cpu", "-q",
    )  # fmt: skip
    assert code == 0, err

    results = tmp_path / "results"
    code, _, err = run(
        capsys, "heatmap", str(small_slide.path), "--model", str(model), "--out", str(results),
        "--keep-maps", "--device", "cpu", "-q",
    )  # fmt: skip
    assert code == 0, err
    folder = results / small_slide.path.name
    side = family.map_size(ckpt_config(ckpt))
    maps = zarr.open_group(str(folder / "tiles.zarr"), mode="r")["maps"]
    assert maps.shape[1:] == (side, side)
    assert (folder / "heatmap.ome.zarr" / "pixel").is_dir()

    root = tmp_path / "mvtec"
    write_synthetic_category(root, "widget", size_px=64, n_per_defect=3, n_good=4)
    protocol = ["--anomalies", "1", "--seeds", "1"] if family.weakly_supervised else []
    code, _, err = run(
        capsys, "mvtec", "--root", str(root), "--category", "widget", "--out",
        str(tmp_path / "bench"), "--figures", "0", *protocol, *common,
    )  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "bench" / "results.md").is_file()


def tile_features_family_runs(capsys, family, common, small_slide, tmp_path) -> None:
    """A family of tile vectors (TRIDENT/CLAM .h5 files): train → heatmap from features; image
    commands (score, mvtec) refuse it with one line."""
    from test_features_run import grid_coords, slide_vectors, write_features

    coords = grid_coords(2048, 1536)
    features, _ = slide_vectors(coords)
    h5 = write_features(tmp_path / "features" / f"{small_slide.path.stem}.h5", features, coords)
    model = tmp_path / "model.pt"
    code, _, err = run(capsys, "train", "--features", str(h5), "--out", str(model), *common)
    assert code == 0, err
    calibration = Calibration.from_dict(load_checkpoint_dict(model)["calibration"])
    assert calibration.threshold() >= calibration.median()
    results = tmp_path / "results"
    code, _, err = run(
        capsys, "heatmap", str(small_slide.path), "--features", str(h5.parent), "--model",
        str(model), "--out", str(results), "--device", "cpu", "-q",
    )  # fmt: skip
    assert code == 0, err
    assert (results / small_slide.path.name / "heatmap.ome.zarr").is_dir()
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((256, 256, 3), np.uint8)).save(images / "a.png")
    code, _, err = run(
        capsys, "score", str(images), "--model", str(model), "--out", str(tmp_path / "s.csv"),
        "--device", "cpu", "-q",
    )  # fmt: skip
    assert_one_error_line(code, err, "tile feature vectors", "not images")
    from wsi_anomaly.mvtec import write_synthetic_category

    write_synthetic_category(tmp_path / "mvtec", "widget", size_px=64, n_per_defect=3, n_good=4)
    code, _, err = run(
        capsys, "mvtec", "--root", str(tmp_path / "mvtec"), "--category", "widget", "--out",
        str(tmp_path / "bench"), "--figures", "0", *common,
    )  # fmt: skip
    assert_one_error_line(code, err, "family of tile features, not images", "available:")


def load_checkpoint_dict(path) -> dict[str, Any]:
    from wsi_anomaly.checkpoint import load_checkpoint

    return load_checkpoint(path)


def ckpt_config(ckpt: dict[str, Any]) -> Any:
    from wsi_anomaly.config import config_from_dict

    return config_from_dict(ckpt["config"])


def test_backbone_weights_are_refused_for_a_checkpoint_that_holds_them(
    capsys, tiny_model, tmp_path
):
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((256, 256, 3), np.uint8)).save(images / "a.png")
    code, _, err = run(
        capsys, "score", str(images), "--model", str(tiny_model), "--out",
        str(tmp_path / "s.csv"), "--backbone-weights", str(tiny_model), "--device", "cpu",
    )  # fmt: skip
    assert_one_error_line(code, err, "holds its backbone", "--backbone-weights")
