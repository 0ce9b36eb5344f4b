import argparse
import logging

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("timm")
from safetensors.torch import save_file

from wsi_anomaly.errors import WeightsUnavailableError
from wsi_anomaly.models.foundation import (
    FOUNDATION_MODELS,
    build_foundation,
    dinov2_transformers_to_timm,
    reference_state,
)

# The published architectures: parameter counts (model cards / papers: UNI ~303 M, Virchow2
# 632 M, H-optimus-0 ~1.1 B, Phikon-v2 ViT-L ~303 M) and the shapes that set them apart.
FULL_ARCHITECTURE = {
    "uni": (303.35e6, {"pos_embed": (1, 197, 1024), "blocks.23.mlp.fc1.weight": (4096, 1024)}),
    "virchow2": (
        631.24e6,
        {
            "pos_embed": (1, 261, 1280),  # class + 4 registers + 16×16 patches
            "reg_token": (1, 4, 1280),
            "blocks.31.mlp.fc1.weight": (6832, 1280),  # SwiGLU packed: 2 × 3416
            "blocks.31.mlp.fc2.weight": (1280, 3416),
        },
    ),
    "h-optimus-0": (
        1134.77e6,
        {"pos_embed": (1, 256, 1536), "reg_token": (1, 4, 1536), "blocks.39.ls2.gamma": (1536,)},
    ),
    "phikon-v2": (303.35e6, {"pos_embed": (1, 197, 1024), "cls_token": (1, 1, 1024)}),
}


@pytest.mark.parametrize("name", sorted(FOUNDATION_MODELS))
def test_full_architecture_keys_and_shapes_on_the_meta_device(name):
    params, shapes = FULL_ARCHITECTURE[name]
    state = reference_state(name)
    assert sum(v.numel() for v in state.values()) == pytest.approx(params, rel=1e-4)
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape
    spec = FOUNDATION_MODELS[name]
    assert state["cls_token"].shape[-1] == spec.embed_dim
    assert spec.input_px == 224 and spec.grid * spec.patch_px == 224


@pytest.mark.parametrize("name", sorted(FOUNDATION_MODELS))
def test_forward_grid_embedding_and_conventions(name, caplog):
    spec = FOUNDATION_MODELS[name]
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING):
        model = build_foundation(name, "random", depth=1)
    assert "RANDOM" in caplog.text and model.backbone_identity == f"{name}-random"
    assert model.weights_sha256 is None
    assert not any(p.requires_grad for p in model.parameters())
    model.train()
    assert not model.training
    x = torch.rand(2, 3, 256, 256, requires_grad=True)  # another size than the model's
    grid, embedding = model.encode(x)
    g = spec.grid
    assert grid.shape == (2, spec.embed_dim, g, g) and not grid.requires_grad
    assert embedding.shape == (2, spec.embedding_dim)
    torch.testing.assert_close(model(x), grid)
    torch.testing.assert_close(model.tile_embedding(x), embedding)
    # the same from the timm model by hand: resize, normalise, tokens, drop prefix tokens
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    resized = F.interpolate(
        x.detach(), size=(224, 224), mode=spec.interpolation, antialias=True, align_corners=False
    )
    with torch.no_grad():
        tokens = model.vit.forward_features((resized - mean) / std)
    assert tokens.shape[1] == spec.n_prefix_tokens + g * g
    patches = tokens[:, spec.n_prefix_tokens :]
    torch.testing.assert_close(grid.flatten(2).transpose(1, 2), patches)
    # row-major grid: token 1 of the patches is the second column of the first row
    torch.testing.assert_close(grid[:, :, 0, 1], patches[:, 1])
    if spec.embedding == "cls+mean":
        expected = torch.cat([tokens[:, 0], patches.mean(1)], dim=-1)
    else:
        expected = tokens[:, 0]
    torch.testing.assert_close(embedding, expected)
    with pytest.raises(ValueError, match="B×3×H×W"):
        model(torch.rand(2, 1, 224, 224))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_file_round_trip(tmp_path, suffix):
    torch.manual_seed(1)
    source = build_foundation("virchow2", "random", depth=2)
    state = {k: v.contiguous() for k, v in source.vit.state_dict().items()}
    path = tmp_path / f"virchow2{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    loaded = build_foundation("virchow2", path, depth=2)
    assert loaded.backbone_identity.startswith("virchow2-file:")
    assert loaded.weights_sha256 is not None and len(loaded.weights_sha256) == 64
    assert loaded.backbone_identity.endswith(loaded.weights_sha256[:12])
    x = torch.rand(1, 3, 224, 224)
    torch.testing.assert_close(loaded.encode(x), source.encode(x))


def _as_transformers_dinov2(timm_state):
    """A timm ViT state dict renamed to transformers' Dinov2Model names (written independently
    of the module's mapping)."""
    out = {
        "embeddings.cls_token": timm_state["cls_token"],
        "embeddings.mask_token": torch.zeros(1, timm_state["cls_token"].shape[-1]),
        "embeddings.position_embeddings": timm_state["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": timm_state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": timm_state["patch_embed.proj.bias"],
        "layernorm.weight": timm_state["norm.weight"],
        "layernorm.bias": timm_state["norm.bias"],
    }
    blocks = {int(k.split(".")[1]) for k in timm_state if k.startswith("blocks.")}
    for i in blocks:
        t, h = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = timm_state[t + f"attn.qkv.{kind}"].chunk(3, dim=0)
            out[h + f"attention.attention.query.{kind}"] = q
            out[h + f"attention.attention.key.{kind}"] = k
            out[h + f"attention.attention.value.{kind}"] = v
            out[h + f"attention.output.dense.{kind}"] = timm_state[t + f"attn.proj.{kind}"]
            for part in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[h + f"{part}.{kind}"] = timm_state[t + f"{part}.{kind}"]
        out[h + "layer_scale1.lambda1"] = timm_state[t + "ls1.gamma"]
        out[h + "layer_scale2.lambda1"] = timm_state[t + "ls2.gamma"]
    return out


def test_phikon_v2_from_transformers_names(tmp_path):
    torch.manual_seed(2)
    source = build_foundation("phikon-v2", "random", depth=2)
    hf = _as_transformers_dinov2(source.vit.state_dict())
    assert set(dinov2_transformers_to_timm(hf)) == set(source.vit.state_dict())
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in hf.items()}, str(path))
    loaded = build_foundation("phikon-v2", path, depth=2)
    x = torch.rand(2, 3, 224, 224)
    torch.testing.assert_close(loaded.encode(x), source.encode(x))
    # with a "dinov2." prefix, and position embeddings of a 518 px (37×37) config
    pos = hf["embeddings.position_embeddings"]
    grid = pos[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    big = F.interpolate(grid, size=(37, 37), mode="bicubic", align_corners=False)
    hf["embeddings.position_embeddings"] = torch.cat(
        [pos[:, :1], big.permute(0, 2, 3, 1).reshape(1, 37 * 37, -1)], dim=1
    )
    prefixed = {f"dinov2.{k}": v.contiguous() for k, v in hf.items()}
    torch.save(prefixed, tmp_path / "phikon.pth")
    resampled = build_foundation("phikon-v2", tmp_path / "phikon.pth", depth=2)
    assert resampled.vit.pos_embed.shape == (1, 197, 1024)
    # down and up again: close to the original table, not equal
    torch.testing.assert_close(resampled.vit.pos_embed, source.vit.pos_embed, atol=0.05, rtol=0)


def test_mismatched_or_unsafe_files_are_one_line(tmp_path):
    torch.manual_seed(3)
    uni = build_foundation("uni", "random", depth=1)
    path = tmp_path / "uni.pth"
    torch.save(uni.vit.state_dict(), path)
    with pytest.raises(WeightsUnavailableError) as info:
        build_foundation("virchow2", path, depth=1)
    message = str(info.value)
    assert "\n" not in message
    assert "Virchow2" in message and "vit_huge_patch14_224" in message
    # the right model, but a full-depth file is expected: keys are missing
    with pytest.raises(WeightsUnavailableError, match="keys missing.*vit_large_patch16_224"):
        build_foundation("uni", path)
    # shapes: a tensor of the wrong size
    state = dict(uni.vit.state_dict())
    state["norm.weight"] = torch.ones(7)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(WeightsUnavailableError, match=r"norm.weight: expected shape \(1024,\)"):
        build_foundation("uni", tmp_path / "bad.pth", depth=1)

    torch.save({"x": argparse.Namespace(a=1)}, tmp_path / "pickle.pth")  # needs unpickling
    with pytest.raises(WeightsUnavailableError, match="cannot read") as info:
        build_foundation("uni", tmp_path / "pickle.pth", depth=1)
    assert "\n" not in str(info.value)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsUnavailableError, match="cannot read"):
        build_foundation("h-optimus-0", tmp_path / "junk.safetensors", depth=1)
    with pytest.raises(WeightsUnavailableError, match="neither 'random'"):
        build_foundation("uni", tmp_path / "absent.pth")
    with pytest.raises(WeightsUnavailableError, match="unknown foundation model"):
        build_foundation("gigapath", "random")
