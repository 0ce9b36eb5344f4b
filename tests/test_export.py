"""``wsi-anomaly export``: the scoring path as ONNX, checked against PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    from wsi_anomaly.export import export_model

    out = tmp_path_factory.mktemp("export") / "tiny.onnx"
    return out, export_model(tiny_model, out)


def test_export_scores_as_pytorch_does(exported, tiny_model):
    import onnx

    from wsi_anomaly.checkpoint import file_hash
    from wsi_anomaly.export import INPUT_NAME, MAX_REL_DIFF, onnx_session
    from wsi_anomaly.score import Scorer

    out, done = exported
    assert out.is_file() and done["opset"] == 18 and done["nodes"] > 50
    assert 0 <= done["max_rel_diff"] <= MAX_REL_DIFF
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["model_sha256"] == file_hash(tiny_model)
    # Other tiles, another batch size: the graph's batch is free and its scores are PyTorch's.
    scorer = Scorer(tiny_model, device="cpu", precision="fp32", batch_size=2)
    g = torch.Generator().manual_seed(5)
    tiles = (torch.rand(2, 256, 256, 3, generator=g) * 255).to(torch.uint8)
    expected = scorer.score(tiles, keep_maps=True)
    x = scorer.family.transform(tiles, scorer.config)
    score, peak, maps = onnx_session(out).run(None, {INPUT_NAME: x.numpy()})
    assert score.shape == (2,) and maps.shape == (2, 64, 64)
    np.testing.assert_allclose(score, expected.mean, rtol=MAX_REL_DIFF)
    np.testing.assert_allclose(peak, expected.max, rtol=MAX_REL_DIFF)
    assert expected.maps is not None
    np.testing.assert_allclose(maps, expected.maps, rtol=1e-2, atol=1e-6 * np.abs(maps).max())


def test_export_refuses_what_it_cannot_do(tiny_model, tmp_path, monkeypatch, capsys):
    from wsi_anomaly.cli import main
    from wsi_anomaly.models.haloae_family import HaloAEFamily

    assert main(["export", str(tmp_path / "missing.pt")]) != 0
    assert "no checkpoint" in capsys.readouterr().err
    out = tmp_path / "m.onnx"
    monkeypatch.setattr(HaloAEFamily, "exportable", False)
    assert main(["export", str(tiny_model), "--out", str(out)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be exported" in err[0]
    assert not out.exists()
    out.write_text("x")
    assert main(["export", str(tiny_model), "--out", str(out)]) != 0
    assert "--overwrite" in capsys.readouterr().err


def test_missing_onnx_runtime_is_one_line(monkeypatch):
    import builtins

    from wsi_anomaly.errors import InvalidInputError
    from wsi_anomaly.export import require_onnx

    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    with pytest.raises(InvalidInputError, match=r"\.\[onnx\]"):
        require_onnx()


def test_onnx_runtime_scores_as_torch(exported, tiny_model, tmp_path):
    import shutil

    from PIL import Image

    from wsi_anomaly.cli import main
    from wsi_anomaly.errors import InputNotFoundError, InvalidInputError
    from wsi_anomaly.export import MAX_REL_DIFF
    from wsi_anomaly.score import Scorer

    out, _ = exported
    g = torch.Generator().manual_seed(7)
    tiles = (torch.rand(3, 256, 256, 3, generator=g) * 255).to(torch.uint8)
    torch_scores = Scorer(tiny_model, device="cpu", precision="fp32", batch_size=3).score(tiles)
    onnx_scorer = Scorer(tiny_model, device="cpu", engine="onnx", onnx_model=out, batch_size=3)
    assert (onnx_scorer.engine, onnx_scorer.precision) == ("onnx", "fp32")
    onnx_scores = onnx_scorer.score(tiles)
    np.testing.assert_allclose(onnx_scores.mean, torch_scores.mean, rtol=MAX_REL_DIFF)
    np.testing.assert_allclose(onnx_scores.max, torch_scores.max, rtol=MAX_REL_DIFF)

    with pytest.raises(InvalidInputError, match="fp32 graph"):
        Scorer(tiny_model, device="cpu", precision="bf16", engine="onnx", onnx_model=out)
    with pytest.raises(InputNotFoundError, match="wsi-anomaly export"):
        Scorer(tiny_model, device="cpu", engine="onnx", onnx_model=tmp_path / "none.onnx")

    # The command line: the graph beside the checkpoint is found and the runtime recorded.
    shutil.copy(tiny_model, tmp_path / "m.pt")
    shutil.copy(out, tmp_path / "m.onnx")
    Image.fromarray(tiles[0].numpy()).save(tmp_path / "a.png")
    args = ["score", str(tmp_path / "a.png"), "--model", str(tmp_path / "m.pt")]
    assert main([*args, "--runtime", "onnx", "--out", str(tmp_path / "s.csv"), "-q"]) == 0
    row = (tmp_path / "s.csv").read_text().splitlines()[1].split(",")
    assert float(row[1]) == pytest.approx(float(torch_scores.mean[0]), rel=1e-2)
