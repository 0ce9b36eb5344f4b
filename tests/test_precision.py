"""bf16 autocast on the CPU ranks tiles as fp32 does, and ``auto`` picks it where the CPU has it.

A tiny HaloAE (random VGG19 weights, two training steps) scores 32 synthetic tiles of clearly
different content (colour, stripe frequency and direction, noise) in fp32 and under bf16
autocast; the two score orders must agree (Spearman ≥ 0.999) and at most 0.5 % of the
"Anomalous" calls may differ (none of 32), at the model's own threshold and at the fp32 99th
percentile.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

N_TILES = 32
#: Most "Anomalous" calls that may differ between bf16 and fp32, as a share of the tiles.
MAX_CALLS_DIFFERING = 0.005


def distinct_tiles(n: int, seed: int) -> list[torch.Tensor]:
    """``n`` 3×256×256 float tiles in [0, 1], each with its own colour, stripes and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:256, 0:256] / 256.0
    tiles = []
    for _ in range(n):
        base = rng.uniform(0.2, 0.95, 3)[:, None, None]
        freq, angle = rng.uniform(1, 40), rng.uniform(0, np.pi)
        wave = np.sin(
            2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 2 * np.pi)
        )
        tint = rng.uniform(-1, 1, 3)[:, None, None] * rng.uniform(0, 0.4)
        noise = rng.uniform(0, 0.25) * rng.standard_normal((3, 256, 256))
        tiles.append(torch.from_numpy(np.clip(base + tint * wave + noise, 0, 1).astype(np.float32)))
    return tiles


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation (the scores here have no ties)."""
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from conftest import tiny_config

    from wsi_anomaly.training import train_model

    out = tmp_path_factory.mktemp("precision") / "tiny.pt"
    train_model(
        distinct_tiles(4, seed=1), tiny_config(), out, device="cpu", tile_mpp=0.5, progress=False
    )
    return out


def test_helpers_can_tell_orders_apart():
    a = np.arange(10, dtype=float)
    assert spearman(a, a * 3 + 1) == pytest.approx(1.0)
    assert spearman(a, a[::-1].copy()) == pytest.approx(-1.0)
    tiles = distinct_tiles(4, seed=0)
    assert all(t.shape == (3, 256, 256) for t in tiles)
    assert len({round(float(t.mean()), 4) for t in tiles}) == 4  # clearly different content


def test_bf16_scores_rank_tiles_as_fp32(tiny_checkpoint):
    from wsi_anomaly.score import Scorer

    x = torch.stack(distinct_tiles(N_TILES, seed=0))
    scores = {}
    for precision in ("fp32", "bf16"):
        scorer = Scorer(tiny_checkpoint, device="cpu", precision=precision, batch_size=16)
        scores[precision] = np.concatenate(
            [scorer.score(x[i : i + 16], keep_maps=False).mean for i in range(0, N_TILES, 16)]
        )
    fp32, bf16 = scores["fp32"], scores["bf16"]
    assert np.isfinite(fp32).all() and np.isfinite(bf16).all()
    assert np.ptp(fp32) > 0.1 * np.abs(fp32).mean()  # the tiles really score differently
    assert not np.array_equal(fp32, bf16)  # bf16 really ran
    rho = spearman(fp32, bf16)
    assert rho >= 0.999, f"Spearman {rho:.5f} between bf16 and fp32 tile scores"
    from wsi_anomaly.stitch import colour_scale

    allowed = int(MAX_CALLS_DIFFERING * N_TILES)
    own = colour_scale(scorer.calibration).threshold
    for threshold in (own, float(np.quantile(fp32, 0.99))):
        differing = int(np.sum((fp32 >= threshold) != (bf16 >= threshold)))
        assert differing <= allowed, f"{differing} of {N_TILES} anomalous calls differ"


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_precision_follows_the_cpu(monkeypatch, native, expected):
    from wsi_anomaly import runtime

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    assert runtime.Runtime.resolve("cpu", "auto").precision == expected
    assert runtime.Runtime.resolve("cpu", "fp32").precision == "fp32"  # asked for: kept
    assert runtime.Runtime.resolve("cpu", "bf16").precision == "bf16"
    assert runtime.resolve_precision("auto", torch.device("cuda")) == "bf16"
    with pytest.raises(runtime.InvalidInputError, match="precision must be"):
        runtime.resolve_precision("fp16", torch.device("cpu"))


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    from wsi_anomaly.runtime import _cpuinfo_flags, cpu_has_native_bf16

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n\n")
    assert {"avx512_bf16", "avx2"} <= _cpuinfo_flags(str(info))
    assert _cpuinfo_flags(str(tmp_path / "missing")) == set()
    here = _cpuinfo_flags()
    if here:  # Linux: the answer is the flags' answer
        assert cpu_has_native_bf16() == bool(here & {"amx_bf16", "avx512_bf16"})


def test_scorer_records_the_precision_it_used(tiny_checkpoint, monkeypatch, tmp_path):
    from PIL import Image

    from wsi_anomaly import runtime
    from wsi_anomaly.score import score_images

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    tile = (distinct_tiles(1, seed=3)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    Image.fromarray(tile).save(tmp_path / "a.png")
    for asked, used in (("auto", "fp32"), ("bf16", "bf16")):
        out = score_images(
            tiny_checkpoint,
            [tmp_path / "a.png"],
            tmp_path / f"{asked}.csv",
            device="cpu",
            precision=asked,
            progress=False,
        )
        assert (out["precision"], out["scored"]) == (used, 1)
