"""ATAC-Net through the shared training, checkpoint, scoring and heatmap code."""

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from wsi_anomaly.checkpoint import load_checkpoint
from wsi_anomaly.config import load_config
from wsi_anomaly.errors import InvalidInputError
from wsi_anomaly.pipeline import HeatmapSettings, process_slide
from wsi_anomaly.score import Scorer
from wsi_anomaly.tiles.dataset import ZarrTileDataset
from wsi_anomaly.training import resume_path, train_model


class Marked(Dataset):
    """Tiles of a store with a dark square painted in: synthetic labelled anomalies."""

    def __init__(self, base, indices):
        self.base, self.indices = base, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        x = self.base[self.indices[i]].clone()
        x[:, 64:192, 64:192] = torch.tensor([0.1, 0.6, 0.1]).view(3, 1, 1)
        return x


def atac_config(**atacnet):
    settings = {"epochs": 1, "steps_per_epoch": 2, "batch_size": 4, **atacnet}
    return load_config(
        "atacnet_fast",
        {
            "model": {"backbone_weights": "random"},
            "atacnet": settings,
            "train": {"calibration_tiles": 4, "workers": 0},
        },
    )


@pytest.fixture(scope="module")
def atac_model(small_store, tmp_path_factory):
    normals = ZarrTileDataset(small_store)
    anomalies = Marked(normals, range(3))
    out = tmp_path_factory.mktemp("atac") / "atac.pt"
    train_model(
        normals, atac_config(), out, device="cpu", anomalies=anomalies, tile_mpp=0.5, progress=False
    )
    return out


def test_checkpoint_in_the_common_format(atac_model):
    ckpt = load_checkpoint(atac_model, expect_model="atacnet")
    assert ckpt["complete"] and ckpt["backbone"] == "resnet50-random"
    assert ckpt["n_labelled_anomalies"] == 3 and ckpt["tile_mpp"] == 0.5
    q = ckpt["calibration"]["score_quantiles"]
    assert q["0"] <= q["0.5"] <= q["1"] and "mean_map" not in ckpt["calibration"]["extras"]
    assert not resume_path(atac_model).exists()


def test_scorer_and_heatmap_take_an_atacnet_checkpoint(atac_model, small_slide, tmp_path):
    scorer = Scorer(atac_model, device="cpu", batch_size=4)
    tiles = torch.rand(2, 3, 256, 256)
    out = scorer.score(tiles)
    assert out.mean.shape == (2,) and out.maps.shape == (2, 64, 64) and np.isfinite(out.mean).all()
    summary = process_slide(
        small_slide.path,
        tmp_path,
        atac_model,
        HeatmapSettings(device="cpu", batch_size=8, progress=False),
    )
    assert summary["model"]["model_name"] == "atacnet"
    assert (tmp_path / small_slide.path.name / "heatmap.png").is_file()


def test_haloae_refuses_labelled_anomalies(small_store, tmp_path):
    from conftest import tiny_config

    normals = ZarrTileDataset(small_store)
    with pytest.raises(InvalidInputError, match="ATAC-Net"):
        train_model(
            normals,
            tiny_config(),
            tmp_path / "m.pt",
            device="cpu",
            anomalies=Marked(normals, [0]),
            progress=False,
        )
