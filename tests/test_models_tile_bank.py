"""The memory bank of tile vectors (features-knn): fit, exact distances, the family's pieces."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import ConcatDataset, Subset, TensorDataset

from wsi_anomaly.models.registry import get_family
from wsi_anomaly.models.tile_bank import TileBank, TileBankConfig
from wsi_anomaly.models.tile_bank_family import tile_features_record


def fitted(vectors: torch.Tensor, budget: int = 32) -> TileBank:
    bank = TileBank(budget, projection_dim=8, pool_factor=2, seed=0)
    for chunk in vectors.split(50):
        bank.observe(chunk)
    bank.finish_fit()
    return bank


def test_bank_is_a_coreset_of_the_vectors_and_scores_by_nearest_distance():
    g = torch.Generator().manual_seed(0)
    vectors = torch.randn(400, 16, generator=g)
    bank = fitted(vectors)
    assert bank.memory_bank.shape == (32, 16) and bank.feature_dim == 16
    # every bank row is one of the vectors streamed in
    assert (bank.memory_bank[:, None, :] == vectors[None]).all(dim=2).any(dim=1).all()
    queries = torch.randn(50, 16, generator=g) * 2
    exact = "donot_use_mm_for_euclid_dist"
    expected = torch.cdist(queries, bank.memory_bank, compute_mode=exact).min(dim=1).values
    assert torch.allclose(bank(queries), expected, atol=1e-4)
    assert bank(bank.memory_bank[:5]).abs().max() < 1e-3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_bf16 = bank(queries)
    assert under_bf16.dtype == torch.float32 and torch.allclose(under_bf16, expected, atol=1e-4)


def test_bank_refuses_what_it_cannot_use():
    bank = TileBank(4)
    with pytest.raises(ValueError, match="empty"):
        bank(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="nothing to build"):
        bank.finish_fit()
    with pytest.raises(ValueError, match=r"\(M, D\)"):
        bank.load_bank(torch.zeros(0, 3))
    bank.load_bank(torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        bank(torch.zeros(2, 5))


def test_config_section_ranges_name_the_key():
    with pytest.raises(ValueError, match="features_knn.coreset_budget"):
        TileBankConfig(coreset_budget=0).validate()
    with pytest.raises(ValueError, match="features_knn.pool_factor"):
        TileBankConfig(pool_factor=1).validate()


def test_family_predicts_one_score_per_tile_and_needs_tile_vectors():
    from wsi_anomaly.config import load_config
    from wsi_anomaly.errors import InvalidInputError

    family = get_family("features-knn")
    assert family.inputs == "tile features" and not family.has_maps
    config = load_config("features_knn")
    model = family.build(config)
    model.load_bank(torch.randn(8, 4))
    x = family.transform(torch.randn(5, 4), config)
    score, peak, maps = family.predict(model, x, {})
    assert score.shape == (5,) and torch.equal(score, peak) and maps.shape == (5, 1, 1)
    with pytest.raises(InvalidInputError, match="not images"):
        family.transform(torch.zeros(2, 256, 256, 3, dtype=torch.uint8), config)

    plain = TensorDataset(torch.randn(10, 4))
    with pytest.raises(ValueError, match="train --features"):
        family.training_data(plain, None, config)
    part = TensorDataset(torch.randn(10, 4))
    part.tile_features = {"dim": 4, "encoder": "uni_v1"}  # type: ignore[attr-defined]
    wrapped = Subset(ConcatDataset([part, part]), [0, 3])
    assert tile_features_record(wrapped) == {"dim": 4, "encoder": "uni_v1"}
    assert family.checkpoint_extras(wrapped, wrapped) == {"tile_features": part.tile_features}
    restored = family.restore(config, {"memory_bank": torch.ones(3, 4)}, "none")
    assert restored.memory_bank.shape == (3, 4)
    with pytest.raises(ValueError, match="one tensor"):
        family.restore(config, {"memory_bank": torch.ones(3, 4), "x": torch.ones(1)}, "none")
