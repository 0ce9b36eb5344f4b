import numpy as np
import pytest

from wsi_anomaly.errors import InvalidInputError
from wsi_anomaly.slide.grid import box_fractions, make_grid, plan_read
from wsi_anomaly.slide.reader import LevelInfo

LEVELS = [
    LevelInfo(0, 40000, 30000, 1.0, 0.25),
    LevelInfo(1, 10000, 7500, 4.0, 1.0),
    LevelInfo(2, 2500, 1875, 16.0, 4.0),
]


def test_native_level_read_as_is():
    plan = plan_read(LEVELS, 0.25)
    assert (plan.level, plan.read_px, plan.resize) == (0, 256, False)
    plan = plan_read(LEVELS, 0.26)  # within 5 %
    assert plan.level == 0 and not plan.resize and plan.actual_mpp == 0.25


def test_between_levels_reads_finer_level_and_resizes():
    plan = plan_read(LEVELS, 0.5)
    assert plan.level == 0 and plan.read_px == 512 and plan.resize
    assert plan.actual_mpp == pytest.approx(0.5)
    assert plan.tile_size_l0 == 512
    plan = plan_read(LEVELS, 2.0)
    assert plan.level == 1 and plan.read_px == 512 and plan.tile_size_l0 == 2048


def test_slightly_coarser_level_counts_as_target():
    plan = plan_read(LEVELS, 0.97)
    assert plan.level == 1 and not plan.resize


def test_target_finer_than_level0_is_an_error():
    with pytest.raises(InvalidInputError, match="finer"):
        plan_read(LEVELS, 0.1)


def test_grid_fits_inside_level_and_stride_overlaps():
    plan = plan_read([LevelInfo(0, 1000, 600, 1.0, 0.5)], 0.5, tile_px=256)
    grid = make_grid(plan, (1000, 600))
    assert (grid.cols, grid.rows) == (3, 2)
    assert (grid.coords[:, 0] + 256 <= 1000).all() and (grid.coords[:, 1] + 256 <= 600).all()
    plan = plan_read([LevelInfo(0, 1000, 600, 1.0, 0.5)], 0.5, tile_px=256, stride_px=128)
    grid = make_grid(plan, (1000, 600))
    assert (grid.cols, grid.rows) == (6, 3)
    assert grid.coords[1, 0] == 128
    # row-major order, (col, row) indices consistent with coords
    np.testing.assert_array_equal(grid.coords, grid.grid_index * 128)


def test_box_fractions_exact_on_aligned_mask():
    mask = np.zeros((8, 8), bool)
    mask[:4, :2] = True
    coords = np.array([[0, 0], [64, 0], [0, 64], [32, 32]])
    frac = box_fractions(mask, 16.0, coords, 64.0)  # each box is 4×4 mask pixels
    np.testing.assert_allclose(frac, [0.5, 0.0, 0.0, 0.0])
    assert box_fractions(mask, 16.0, coords[:0], 64.0).shape == (0,)
