"""Proof that HaloAE learns (slow: run with `pytest -m slow`).

Trained on one synthetic texture (tumour) with random VGG19 features, held-out tiles of that
texture must score lower than tiles of another texture (stroma): AUROC ≥ 0.9.
"""

import numpy as np
import pytest
import torch
from conftest import tiny_config
from sklearn.metrics import roc_auc_score
from torch.utils.data import Subset

from wsi_anomaly.score import Scorer
from wsi_anomaly.slide.synthetic import write_synthetic_slide
from wsi_anomaly.tiles import TileStore, TilingSettings, tile_slide
from wsi_anomaly.tiles.dataset import ZarrTileDataset
from wsi_anomaly.training import train_model


@pytest.mark.slow
def test_trained_texture_scores_lower_than_other_texture(tmp_path):
    slide = write_synthetic_slide(tmp_path / "s.tif", width=5120, height=5120, mpp=0.5, seed=3)
    store_path = tmp_path / "s.zarr"
    tile_slide(slide.path, store_path, TilingSettings(min_tissue=0.9), progress=False)
    store = TileStore(store_path)
    fractions = slide.tile_labels(store.coords, store.attrs["tile_size_l0"])
    tumour = np.flatnonzero(fractions[:, 2] > 0.9)
    stroma = np.flatnonzero(fractions[:, 1] > 0.9)
    assert len(tumour) >= 16 and len(stroma) >= 8, (len(tumour), len(stroma))
    rng = np.random.default_rng(0)
    tumour = rng.permutation(tumour)
    train_idx, held_out = tumour[: len(tumour) // 2], tumour[len(tumour) // 2 :][:12]
    stroma = rng.permutation(stroma)[:12]

    dataset = ZarrTileDataset(store_path)
    config = tiny_config(epochs=3, samples_per_epoch=8, batch_size=2, calibration_tiles=16)
    model = tmp_path / "m.pt"
    train_model(Subset(dataset, train_idx.tolist()), config, model, device="cpu", progress=False)

    scorer = Scorer(model, device="cpu", batch_size=8)
    idx = np.concatenate([held_out, stroma])
    scores = scorer.score(torch.stack([dataset[int(i)] for i in idx]), keep_maps=False).mean
    labels = np.r_[np.zeros(len(held_out)), np.ones(len(stroma))]
    auroc = roc_auc_score(labels, scores)
    print(f"held-out tumour vs stroma AUROC {auroc:.3f}")
    assert auroc >= 0.9
