import pytest
import torch

from wsi_anomaly.models.memory_bank import (
    CoresetBuilder,
    covering_radius,
    greedy_k_center,
    nearest_distance,
)


def _brute(queries, bank):
    d = torch.cdist(queries.double(), bank.double(), compute_mode="donot_use_mm_for_euclid_dist")
    return d.min(dim=1)


@pytest.mark.parametrize(
    ("n", "m", "chunk_rows", "chunk_bank"),
    [(50, 30, 4096, 65536), (103, 57, 16, 10), (7, 200, 3, 1), (1, 1, 1, 1)],
)
def test_nearest_distance_equals_brute_force(n, m, chunk_rows, chunk_bank):
    g = torch.Generator().manual_seed(n + m)
    queries = torch.randn(n, 24, generator=g)
    bank = torch.randn(m, 24, generator=g)
    dist, index = nearest_distance(
        queries, bank, chunk_rows=chunk_rows, chunk_bank=chunk_bank, return_index=True
    )
    ref_dist, ref_index = _brute(queries, bank)
    assert dist.shape == (n,) and dist.dtype == torch.float32
    assert index.shape == (n,) and index.dtype == torch.long
    torch.testing.assert_close(dist.double(), ref_dist, atol=1e-5, rtol=1e-5)
    assert torch.equal(index, ref_index)
    only = nearest_distance(queries, bank, chunk_rows=chunk_rows, chunk_bank=chunk_bank)
    assert torch.equal(only, dist)


def test_nearest_distance_is_accurate_for_close_points_far_from_origin():
    # |q|² - 2q·b + |b|² cancels catastrophically here; the distance is recomputed directly
    g = torch.Generator().manual_seed(0)
    bank = 1000.0 + torch.randn(40, 16, generator=g)
    offsets = 1e-3 * torch.randn(40, 16, generator=g)
    queries = bank + offsets
    dist, index = nearest_distance(queries, bank, chunk_bank=7, return_index=True)
    assert torch.equal(index, torch.arange(40))
    exact = (queries.double() - bank.double()).norm(dim=1)  # queries hold rounded offsets
    torch.testing.assert_close(dist.double(), exact, rtol=1e-4, atol=1e-7)
    # the expanded form alone would be off by far more than that
    expanded = queries.square().sum(1) - 2 * (queries * bank).sum(1) + bank.square().sum(1)
    assert float((expanded.clamp_min(0).sqrt().double() - exact).abs().max()) > 1e-2


def test_nearest_distance_handles_half_precision_and_rejects_bad_shapes():
    g = torch.Generator().manual_seed(1)
    queries = torch.randn(20, 8, generator=g)
    bank = torch.randn(9, 8, generator=g)
    dist = nearest_distance(queries.bfloat16(), bank.bfloat16())
    assert dist.dtype == torch.float32
    ref, _ = _brute(queries.bfloat16().float(), bank.bfloat16().float())
    torch.testing.assert_close(dist.double(), ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="same|got"):
        nearest_distance(queries, torch.randn(9, 7))
    with pytest.raises(ValueError, match="non-empty"):
        nearest_distance(queries, torch.empty(0, 8))
    with pytest.raises(ValueError, match="chunk"):
        nearest_distance(queries, bank, chunk_rows=0)


def _clusters(n_clusters=12, per_cluster=300, dim=64, spread=0.01, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = 10.0 * torch.randn(n_clusters, dim, generator=g)
    labels = torch.arange(n_clusters).repeat_interleave(per_cluster)
    points = centres[labels] + spread * torch.randn(labels.shape[0], dim, generator=g)
    perm = torch.randperm(labels.shape[0], generator=g)
    return points[perm], labels[perm], centres


def test_greedy_k_center_finds_every_cluster():
    points, labels, centres = _clusters()
    chosen = greedy_k_center(points, 12, start=5)
    assert chosen.shape == (12,) and chosen[0] == 5
    assert set(labels[chosen].tolist()) == set(range(12))
    # one row per cluster covers it within the cluster's diameter
    diameter = 2 * float((points - centres[labels]).norm(dim=1).max())
    assert covering_radius(points, points[chosen]) <= diameter
    # all rows when k exceeds them, each once
    assert sorted(greedy_k_center(points[:5], 9).tolist()) == [0, 1, 2, 3, 4]


def test_greedy_k_center_covers_better_than_random_subsets():
    g = torch.Generator().manual_seed(3)
    points = torch.rand(2000, 2, generator=g)
    greedy = covering_radius(points, points[greedy_k_center(points, 50)])
    randoms = [
        covering_radius(points, points[torch.randperm(2000, generator=g)[:50]]) for _ in range(5)
    ]
    assert greedy < min(randoms)


@pytest.mark.parametrize("chunk", [1000, 37, 3600])
def test_streamed_coreset_covers_clustered_data(chunk):
    points, labels, centres = _clusters(dim=256)
    diameter = 2 * float((points - centres[labels]).norm(dim=1).max())
    builder = CoresetBuilder(budget=16, projection_dim=32, seed=0, pool_factor=3)
    for i in range(0, points.shape[0], chunk):
        builder.add(points[i : i + chunk])
        assert builder.pooled <= builder.capacity == 48
    bank = builder.finish()
    assert builder.total_seen == points.shape[0]
    assert builder.reductions >= 1
    # once the clusters are covered, rows of later chunks are dropped on arrival
    if chunk < points.shape[0]:
        assert builder.filtered > (points.shape[0] - chunk) // 2
    assert builder.radius is not None and builder.radius <= diameter
    assert bank.shape == (16, 256) and bank.dtype == points.dtype
    # original rows, not projected ones
    dist = nearest_distance(bank, points)
    assert float(dist.max()) == 0.0
    _, index = nearest_distance(bank, points, return_index=True)
    assert set(labels[index].tolist()) == set(range(12))
    # 16 rows for 12 clusters: every cluster within its diameter (clusters are ~140 apart)
    assert covering_radius(points, bank) <= diameter


def test_coreset_is_deterministic_for_a_seed_and_small_inputs_are_kept():
    points, _, _ = _clusters(n_clusters=5, per_cluster=200, dim=32, spread=1.0)

    def build(seed):
        b = CoresetBuilder(budget=20, projection_dim=8, seed=seed)
        for i in range(0, 1000, 90):
            b.add(points[i : i + 90])
        return b.finish()

    assert torch.equal(build(4), build(4))
    assert not torch.equal(build(4), build(5))
    small = CoresetBuilder(budget=50)
    small.add(points[:30])
    small.add(points[:0])
    kept = small.finish()
    assert kept.shape == (30, 32)
    assert sorted(kept.sum(dim=1).tolist()) == sorted(points[:30].sum(dim=1).tolist())


def test_coreset_rejects_bad_input():
    with pytest.raises(ValueError, match="budget"):
        CoresetBuilder(budget=0)
    builder = CoresetBuilder(budget=4)
    with pytest.raises(ValueError, match="empty"):
        builder.finish()
    with pytest.raises(ValueError, match="float"):
        builder.add(torch.ones(3, 4, dtype=torch.long))
    builder.add(torch.randn(3, 4))
    with pytest.raises(ValueError, match="dimensions"):
        builder.add(torch.randn(3, 5))
    with pytest.raises(ValueError, match="NaN"):
        builder.add(torch.tensor([[0.0, float("nan"), 0.0, 0.0]]))


def test_streamed_coreset_keeps_regions_that_appear_late():
    # the first half of the stream shows 6 clusters, the second half 6 others
    points, labels, centres = _clusters(dim=48, per_cluster=400)
    order = torch.argsort(labels >= 6, stable=True)
    points, labels = points[order], labels[order]
    diameter = 2 * float((points - centres[labels]).norm(dim=1).max())
    builder = CoresetBuilder(budget=12, projection_dim=16, seed=2, pool_factor=2)
    for i in range(0, points.shape[0], 250):
        builder.add(points[i : i + 250])
    bank = builder.finish()
    _, index = nearest_distance(bank, points, return_index=True)
    assert set(labels[index].tolist()) == set(range(12))
    assert covering_radius(points, bank) <= diameter


def test_coreset_without_projection_when_dimensions_are_few():
    g = torch.Generator().manual_seed(5)
    points = torch.rand(3000, 3, generator=g, dtype=torch.float64)
    builder = CoresetBuilder(budget=64, projection_dim=128, pool_factor=2)
    for i in range(0, 3000, 500):
        builder.add(points[i : i + 500])
    bank = builder.finish()
    assert bank.dtype == torch.float64 and bank.shape == (64, 3)
    # a greedy k-center bank covers the cube better than random subsets of its size
    randoms = [
        covering_radius(points, points[torch.randperm(3000, generator=g)[:64]]) for _ in range(5)
    ]
    assert covering_radius(points, bank) < min(randoms)
