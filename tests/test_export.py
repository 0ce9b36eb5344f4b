"""``wsi-anomaly export``: the scoring path as ONNX, checked against PyTorch, and ONNX files
treated as untrusted input when ``--runtime onnx`` loads them."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from test_cli import assert_one_error_line

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    from wsi_anomaly.export import export_model

    out = tmp_path_factory.mktemp("export") / "tiny.onnx"
    return out, export_model(tiny_model, out)


def test_export_scores_as_pytorch_does(exported, tiny_model):
    import onnx

    from wsi_anomaly.export import INPUT_NAME, MAX_REL_DIFF, onnx_session
    from wsi_anomaly.hashing import sha256_file as file_hash
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

    assert_one_error_line(main(["export", str(tmp_path / "missing.pt")]), capsys.readouterr().err,
                          "no checkpoint")  # fmt: skip
    out = tmp_path / "m.onnx"
    monkeypatch.setattr(HaloAEFamily, "exportable", False)
    monkeypatch.setattr(HaloAEFamily, "not_exportable", "its maps are made of string")
    code = main(["export", str(tiny_model), "--out", str(out)])
    assert_one_error_line(code, capsys.readouterr().err, "HaloAE", "its maps are made of string")
    assert not out.exists()
    out.write_text("x")
    code = main(["export", str(tiny_model), "--out", str(out)])
    assert_one_error_line(code, capsys.readouterr().err, "--overwrite")
    assert out.read_text() == "x"


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
    assert float(row[1]) == pytest.approx(float(torch_scores.mean[0]), rel=MAX_REL_DIFF)


def _rewritten(src, dst, change):
    import onnx

    proto = onnx.load_model_from_string(src.read_bytes())
    change(proto)
    dst.write_bytes(proto.SerializeToString())


def test_an_onnx_file_is_untrusted_input(exported, tiny_model, tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper

    from wsi_anomaly.cli import main
    from wsi_anomaly.hashing import sha256_file as file_hash

    out, _ = exported
    shutil.copy(tiny_model, tmp_path / "m.pt")
    (tmp_path / "a.png").write_bytes(b"")  # never read: the model is refused first
    args = ["score", str(tmp_path / "a.png"), "--model", str(tmp_path / "m.pt"), "--runtime",
            "onnx", "--out", str(tmp_path / "s.csv")]  # fmt: skip
    graph = tmp_path / "m.onnx"

    def refused(*needles):
        assert_one_error_line(main(args), capsys.readouterr().err, str(graph), *needles)
        assert not (tmp_path / "s.csv").exists()

    graph.write_bytes(b"\x08\x07garbage that is no protobuf\xff\xff")
    refused("not an ONNX model")

    def foreign(proto):
        for p in proto.metadata_props:
            if p.key == "model_sha256":
                p.value = "0" * 64

    _rewritten(out, graph, foreign)
    refused("another checkpoint")

    def unsigned(proto):
        del proto.metadata_props[:]

    _rewritten(out, graph, unsigned)
    refused("records no source checkpoint")

    # right metadata, wrong graph: a fixed batch of 64 px images
    node = helper.make_node("ReduceMean", ["images"], ["tile_score"], axes=[1, 2, 3], keepdims=0)
    small = helper.make_graph(
        [node, helper.make_node("Identity", ["tile_score"], ["tile_max"]),
         helper.make_node("Identity", ["tile_score"], ["tile_map"])],
        "small",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [2, 3, 64, 64])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
         for n in ("tile_score", "tile_max", "tile_map")],
    )  # fmt: skip
    model = helper.make_model(small, opset_imports=[helper.make_opsetid("", 13)])
    helper.set_model_props(model, {"model_sha256": file_hash(tmp_path / "m.pt")})
    onnx.save_model(model, str(graph))
    refused("B×3×256×256")

    def external(proto):
        tensor = proto.graph.initializer[0]
        tensor.data_location = TensorProto.EXTERNAL
        entry = tensor.external_data.add()
        entry.key, entry.value = "location", "/etc/passwd"

    _rewritten(out, graph, external)
    refused("external data")


def _colour_patchcore():
    """A fitted PatchCore on a stand-in backbone (the RGB values of 4×4 patches)."""
    from wsi_anomaly.models.patchcore import PatchCore

    class Colour(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.avg_pool2d(x, 4)

    torch.manual_seed(0)
    model = PatchCore(Colour(), input_px=32, aggregate=False, coreset_budget=30, search_chunk=7)
    model.observe(torch.rand(3, 3, 32, 32))
    model.finish_fit()
    return model


def test_patchcore_search_exports_for_any_batch():
    """PatchCore's nearest-neighbour search (chunked in PyTorch) exports as one product and a
    minimum, with a free batch size and PyTorch's distances."""
    from wsi_anomaly.export import INPUT_NAME, export_scoring_module, onnx_session
    from wsi_anomaly.models.calibration import Calibration
    from wsi_anomaly.models.registry import get_family

    model, family = _colour_patchcore(), get_family("patchcore")
    assert family.exportable
    module = family.scoring_module(model, Calibration.from_scores(torch.rand(4), torch.rand(4)))
    proto, rel = export_scoring_module(
        module, torch.rand(2, 3, 48, 48), {"model_sha256": "ab" * 32}, "PatchCore"
    )
    assert rel < 1e-5
    session = onnx_session(proto.SerializeToString())
    for n in (1, 5):  # 5 × 64 patches: more than the search's chunk of 7 rows
        tiles = torch.rand(n, 3, 48, 48)
        want = family.predict(model, tiles, {})
        got = session.run(None, {INPUT_NAME: tiles.numpy()})
        assert got[2].shape == (n, 8, 8)
        for ours, theirs in zip(got, want, strict=True):
            np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-4, atol=1e-6)


def test_export_refuses_scores_beyond_the_bound_and_fixed_batches(monkeypatch):
    from wsi_anomaly.export import ExportError, export_scoring_module
    from wsi_anomaly.models.calibration import Calibration
    from wsi_anomaly.models.registry import get_family

    family = get_family("patchcore")
    module = family.scoring_module(
        _colour_patchcore(), Calibration.from_scores(torch.rand(4), torch.rand(4))
    )
    x, meta = torch.rand(2, 3, 48, 48), {"model_sha256": "ab" * 32}
    # a bound no float32 reordering meets: the comparison is real
    with pytest.raises(ExportError, match="above the bound"):
        export_scoring_module(module, x, meta, "PatchCore", max_rel_diff=-1.0)
    # the chunked search of the PyTorch model traces to a graph of one batch size: refused
    monkeypatch.setattr(family, "scoring_module", super(type(family), family).scoring_module)
    plain = family.scoring_module(_colour_patchcore(), Calibration.from_scores(*torch.rand(2, 4)))
    with pytest.raises(ExportError, match="free batch size"):
        export_scoring_module(plain, x, meta, "PatchCore")


def test_runtime_is_not_part_of_a_results_identity():
    from wsi_anomaly.pipeline import HeatmapSettings, scoring_settings

    onnx = scoring_settings(HeatmapSettings(engine="onnx"), None)
    assert onnx == scoring_settings(HeatmapSettings(engine="torch"), None)
