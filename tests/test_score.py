import csv

import numpy as np
import pytest
import torch
from PIL import Image

from wsi_anomaly.errors import DeviceUnavailableError, InvalidInputError
from wsi_anomaly.score import Scorer, probe_batch_size, score_images
from wsi_anomaly.stitch import colour_scale
from wsi_anomaly.tiles.dataset import ZarrTileDataset


def test_scorer_matches_calibration_definition(tiny_model, small_store):
    # fp32: the comparison is of memory layouts, not of precisions
    scorer = Scorer(tiny_model, device="cpu", precision="fp32", batch_size=4)
    ds = ZarrTileDataset(small_store)
    images = torch.stack([ds[i] for i in range(3)])
    out = scorer.score(images)
    assert out.mean.shape == (3,) and out.maps.shape == (3, 64, 64)
    np.testing.assert_allclose(out.mean, out.maps.reshape(3, -1).mean(1), rtol=1e-5)
    assert (out.max >= out.mean).all()
    # the same tiles in another batch composition give the same scores (eval-mode BN)
    again = scorer.score(images[1:2])
    np.testing.assert_allclose(again.mean, out.mean[1:2], rtol=1e-4)
    assert scorer.identity["model_sha256"] and scorer.identity["tile_mpp"] == 0.5


def test_colour_scale_is_fixed_by_training_distribution(tiny_model):
    scorer = Scorer(tiny_model, device="cpu")
    scale = colour_scale(scorer.calibration)
    q = scorer.calibration.score_quantiles
    assert scale.vmin == pytest.approx(q["0.5"])
    rgb = scale.to_rgb(np.array([scale.vmin, scale.vcenter, scale.vmax]))
    assert rgb[0, 2] > rgb[0, 0]  # blue at the training median
    assert rgb[2, 0] > rgb[2, 2]  # red far above the 99th percentile


def test_score_images_csv_and_maps(tiny_model, tmp_path, small_store):
    ds = ZarrTileDataset(small_store)
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i in range(3):
        rgb = (ds[i].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        Image.fromarray(rgb).save(folder / ("sub" if i else ".") / f"t{i}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    Image.new("RGB", (64, 64)).save(folder / "small.png")
    out = tmp_path / "scores.csv"
    summary = score_images(
        tiny_model, [folder], out, maps_dir=tmp_path / "maps", device="cpu", progress=False
    )
    assert summary["scored"] == 3
    assert summary["skipped"] == {"unreadable": 1, "too_small": 1}
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 3 and all(float(r["score_max"]) >= float(r["score_mean"]) for r in rows)
    assert len(list((tmp_path / "maps").glob("*_map.png"))) == 3


def test_score_nothing_usable(tiny_model, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidInputError, match="no images"):
        score_images(tiny_model, [empty], tmp_path / "s.csv", device="cpu", progress=False)
    (empty / "bad.jpg").write_bytes(b"xx")
    with pytest.raises(InvalidInputError, match="no usable images"):
        score_images(tiny_model, [empty], tmp_path / "s.csv", device="cpu", progress=False)


def test_scorer_takes_uint8_tiles_as_stored(tiny_model, small_store):
    """``B×H×W×3`` uint8 (numpy or tensor) scores like the same tiles as float ``B×3×H×W``."""
    # fp32: the comparison is of memory layouts, not of precisions
    scorer = Scorer(tiny_model, device="cpu", precision="fp32", batch_size=4)
    ds = ZarrTileDataset(small_store)
    floats = torch.stack([ds[i] for i in range(2)])
    stored = (floats.permute(0, 2, 3, 1) * 255).round().to(torch.uint8)
    reference = scorer.score(stored.permute(0, 3, 1, 2).float() / 255)
    for batch in (stored, stored.numpy()):
        out = scorer.score(batch)
        # float32 convolutions may accumulate in another order for another memory layout:
        # agreement to 1e-4 of each value (the maps square feature differences, doubling them).
        np.testing.assert_allclose(out.mean, reference.mean, rtol=1e-5)
        np.testing.assert_allclose(out.maps, reference.maps, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError):
        scorer.score(stored.permute(0, 3, 1, 2))  # uint8 must be channels-last, as stored


def test_maps_of_images_with_the_same_name_do_not_overwrite(tiny_model, tmp_path, small_store):
    ds = ZarrTileDataset(small_store)
    folder = tmp_path / "imgs"
    for i, sub in enumerate(("a", "b")):
        (folder / sub).mkdir(parents=True)
        rgb = (ds[i].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        Image.fromarray(rgb).save(folder / sub / "tile.png")
    Image.fromarray(rgb).save(folder / "tile.jpg")
    out = tmp_path / "scores.csv"
    score_images(
        tiny_model, [folder], out, maps_dir=tmp_path / "maps", device="cpu", progress=False
    )
    rows = list(csv.DictReader(out.open()))
    assert len({r["map"] for r in rows}) == 3
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == sorted(r["map"] for r in rows)


# -- one loop for streams of batches ---------------------------------------------------------------
def _stored_tiles(small_store, n):
    ds = ZarrTileDataset(small_store)
    floats = torch.stack([ds[i % len(ds)] for i in range(n)])
    return (floats.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()


@pytest.mark.parametrize("keep_maps", [False, True])
def test_score_batches_gives_the_numbers_of_score(tiny_model, small_store, keep_maps):
    """The streaming loop scores like batch-by-batch ``score``, last partial batch included."""
    scorer = Scorer(tiny_model, device="cpu", batch_size=2)
    tiles = _stored_tiles(small_store, 5)
    batches = [tiles[b : b + 2] for b in range(0, 5, 2)]  # 2, 2 and a partial 1
    streamed = list(scorer.score_batches(iter(batches), keep_maps=keep_maps))
    assert [len(r.mean) for r in streamed] == [2, 2, 1]
    for batch, got in zip(batches, streamed):
        want = scorer.score(batch, keep_maps=keep_maps)
        np.testing.assert_array_equal(got.mean, want.mean)
        np.testing.assert_array_equal(got.max, want.max)
        if keep_maps:
            np.testing.assert_array_equal(got.maps, want.maps)
        else:
            assert got.maps is None and want.maps is None
    assert list(scorer.score_batches([], keep_maps=keep_maps)) == []


def test_batch_size_auto_is_32_on_cpu_and_values_are_checked(tiny_model):
    scorer = Scorer(tiny_model, device="cpu")
    assert scorer.batch_size == 32 and scorer.batch_choice.setting == "auto"
    assert Scorer(tiny_model, device="cpu", batch_size=5).batch_choice.to_dict()["batch_size"] == 5
    for bad, needle in ((0, "at least 1"), ("many", "auto or a whole number"), (2.5, "whole")):
        with pytest.raises(InvalidInputError, match="--batch-size.*" + needle):
            Scorer(tiny_model, device="cpu", batch_size=bad)
    with pytest.raises(InvalidInputError, match="--compile must be one of off, default"):
        Scorer(tiny_model, device="cpu", compile="fast")


def test_probe_keeps_the_largest_batch_under_the_memory_guard():
    calls, emptied = [], []

    def forward(batch):  # out of memory above 100 tiles; 1000 bytes a tile otherwise
        calls.append(batch)
        if batch > 100:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return 1000 * batch

    choice = probe_batch_size(forward, 70_000, after_out_of_memory=lambda: emptied.append(1))
    assert choice.batch_size == 64 and calls == [512, 256, 128, 64] and len(emptied) == 3
    assert choice.tried[-1] == {"batch": 64, "peak_bytes": 64_000}
    assert choice.tried[0] == {"batch": 512, "out_of_memory": True}
    # Fits in memory but peaks above the guard: the next smaller one.
    calls.clear()
    assert probe_batch_size(forward, 50_000).batch_size == 32 and calls[-2:] == [64, 32]
    assert probe_batch_size(forward, 10**9, candidates=(8, 96, 16)).batch_size == 96


def test_probe_refuses_when_nothing_fits():
    def forward(batch):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(DeviceUnavailableError, match="does not fit in the GPU"):
        probe_batch_size(forward, 10**9)


def test_compiled_model_sees_full_batches_only(tiny_model, small_store):
    """With --compile every forward pass has the batch size (CUDA graphs need one shape): the
    last partial batch is padded and the padding's results dropped."""
    seen, modes = [], []

    def recording_compiler(fn, mode):
        modes.append(mode)

        def compiled(x):
            seen.append(tuple(x.shape))
            return fn(x)

        return compiled

    plain = Scorer(tiny_model, device="cpu", batch_size=3)
    compiled = Scorer(
        tiny_model, device="cpu", batch_size=3, compile="default", compiler=recording_compiler
    )
    tiles = _stored_tiles(small_store, 4)
    batches = [tiles[:3], tiles[3:]]
    for keep_maps in (True, False):
        got = list(compiled.score_batches(batches, keep_maps=keep_maps))
        want = list(plain.score_batches(batches, keep_maps=keep_maps)) if keep_maps else got
        assert [len(r.mean) for r in got] == [3, 1]
        for g, w in zip(got, want):
            # other batch compositions may accumulate in another order (eval-mode BN)
            np.testing.assert_allclose(g.mean, w.mean, rtol=1e-4)
            np.testing.assert_allclose(g.max, w.max, rtol=1e-4)
            if keep_maps:
                np.testing.assert_allclose(g.maps, w.maps, rtol=1e-3, atol=1e-6)
    assert modes == ["default", "default"]  # one compiled function per keep_maps
    assert {s[0] for s in seen} == {3}
    single = compiled.score(tiles[:1])
    assert single.mean.shape == (1,) and single.maps.shape == (1, 64, 64)
    assert seen[-1][0] == 3


def test_compile_with_torch_compile_eager_backend(tiny_model, small_store):
    """The real ``torch.compile`` path (dynamo tracing) on the CPU, without building kernels."""
    compiled = Scorer(
        tiny_model,
        device="cpu",
        batch_size=2,
        compile="default",
        compiler=lambda fn, mode: torch.compile(fn, backend="eager"),
    )
    plain = Scorer(tiny_model, device="cpu", batch_size=2)
    tiles = _stored_tiles(small_store, 1)
    (got,) = compiled.score_batches([tiles])  # padded to 2
    (want,) = plain.score_batches([tiles])
    np.testing.assert_allclose(got.mean, want.mean, rtol=1e-4)
