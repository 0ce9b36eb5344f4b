import pytest
import torch

from wsi_anomaly.models.halo import HaloAttention


def _brute_force(layer: HaloAttention, x: torch.Tensor) -> torch.Tensor:
    """Dense per-pixel attention: every pixel attends to all pixels of the image, masked to the
    ones inside its block's (block + 2·halo)² window. Shares no code with the blocked layer."""
    batch, dim, height, width = x.shape
    b, h, heads, d = layer.block, layer.halo, layer.heads, layer.dim_head
    centre = (layer.rel_height.shape[0] - 1) // 2  # table row of displacement 0
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()  # P pixels, row-major

    def in_window(coord: torch.Tensor) -> torch.Tensor:  # P×P: key within query's window
        start = coord[:, None] // b * b - h
        return (coord[None, :] >= start) & (coord[None, :] < start + b + 2 * h)

    mask = in_window(ys) & in_window(xs)
    idx_h = (ys[None, :] - ys[:, None] + centre).clamp(0, 2 * centre)  # key − query
    idx_w = (xs[None, :] - xs[:, None] + centre).clamp(0, 2 * centre)

    w_q = layer.to_q.weight.view(heads, d, dim)
    w_k, w_v = layer.to_kv.weight.view(2, heads, d, dim)
    pixels = x.flatten(2)  # B×C×P
    q = torch.einsum("ndc,bcp->bnpd", w_q, pixels) * layer.scale
    k = torch.einsum("ndc,bcp->bnpd", w_k, pixels)
    v = torch.einsum("ndc,bcp->bnpd", w_v, pixels)
    logits = q @ k.transpose(-1, -2)
    logits = logits + torch.gather(q @ layer.rel_height.T, -1, idx_h.expand_as(logits))
    logits = logits + torch.gather(q @ layer.rel_width.T, -1, idx_w.expand_as(logits))
    attn = logits.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    inner = (attn @ v).permute(0, 1, 3, 2).reshape(batch, heads * d, height, width)
    out = torch.einsum("oc,bchw->bohw", layer.to_out.weight.view(dim, -1), inner)
    return out + layer.to_out.bias.view(1, -1, 1, 1)


@pytest.mark.parametrize("shape", [(1, 8, 24, 24), (2, 8, 24, 36)])
def test_blocked_matches_brute_force(shape):
    torch.manual_seed(0)
    layer = HaloAttention(shape[1], heads=2, dim_head=16, block=12, halo=2).double()
    x = torch.randn(*shape, dtype=torch.float64)
    with torch.no_grad():
        expected = _brute_force(layer, x)
        actual = layer(x)
    assert actual.shape == x.shape
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_position_tables_have_spec_shape_and_get_gradient():
    layer = HaloAttention(29, heads=8)
    assert layer.rel_height.shape == layer.rel_width.shape == (2 * (12 + 2 * 2) - 1, 16)
    assert layer.to_q.bias is None and layer.to_kv.bias is None and layer.to_out.bias is not None
    layer(torch.randn(1, 29, 24, 24)).sum().backward()
    assert layer.rel_height.grad.abs().sum() > 0 and layer.rel_width.grad.abs().sum() > 0


def test_gradients_match_finite_differences():
    torch.manual_seed(0)
    layer = HaloAttention(4, heads=2, dim_head=4, block=4, halo=1).double()
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    params = (layer.rel_height, layer.rel_width, layer.to_q.weight)

    # In-place logit updates must not break autograd; check input and parameter gradients.
    assert torch.autograd.gradcheck(
        lambda x, rh, rw, wq: torch.func.functional_call(
            layer, {"rel_height": rh, "rel_width": rw, "to_q.weight": wq}, (x,)
        ),
        (x, *(p.detach().clone().requires_grad_() for p in params)),
        fast_mode=True,
    )


def test_released_mask_makes_blocks_constant():
    torch.manual_seed(0)
    layer = HaloAttention(8, heads=2, released_mask=True).double()
    x = torch.randn(1, 8, 36, 36, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    blocks = out.detach().reshape(1, 8, 3, 12, 3, 12)
    spread = blocks.amax(dim=(3, 5)) - blocks.amin(dim=(3, 5))
    assert spread.max() < 1e-9, "each 12×12 block must be constant"

    bias = layer.to_out.bias.detach().view(8)
    for by in range(3):
        for bx in range(3):
            if (by, bx) != (1, 1):  # border block: only zero-valued padding keys survive
                torch.testing.assert_close(blocks[0, :, by, 0, bx, 0], bias)
    # Interior block: uniform attention over its 16×16 window, i.e. the window mean of v.
    with torch.no_grad():
        v = layer.to_kv(x)[:, 2 * 16 :]
        mean_v = v[:, :, 10:26, 10:26].mean(dim=(2, 3), keepdim=True)
        expected = layer.to_out(mean_v).view(8)
    torch.testing.assert_close(blocks[0, :, 1, 0, 1, 0], expected)

    out.sum().backward()
    assert layer.rel_height.grad.abs().max() == 0 and layer.rel_width.grad.abs().max() == 0


def test_correct_mask_is_not_blockwise_constant():
    torch.manual_seed(0)
    layer = HaloAttention(8, heads=2)
    out = layer(torch.randn(1, 8, 36, 36)).detach().reshape(1, 8, 3, 12, 3, 12)
    assert (out.amax(dim=(3, 5)) - out.amin(dim=(3, 5))).min() > 1e-3


def test_rejects_sizes_not_divisible_by_block():
    with pytest.raises(ValueError, match="divisible"):
        HaloAttention(8, heads=2)(torch.randn(1, 8, 20, 24))


def test_bf16_autocast_stays_close_to_fp32():
    # On CUDA, scoring runs under bf16 autocast: the folded position logits and the masked fused
    # attention must survive the lower precision (no NaN from the mask, errors at bf16's level).
    torch.manual_seed(0)
    layer = HaloAttention(32, heads=4, dim_head=16, block=12, halo=2)
    x = torch.randn(2, 32, 24, 36)
    with torch.no_grad():
        reference = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = layer(x)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    relative = (low.float() - reference).abs().max() / reference.abs().max()
    assert relative < 0.03, relative
