"""Block-local self-attention with a halo (HaloNet, Vaswani et al. 2021), as used by HaloAE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["HaloAttention"]


class HaloAttention(nn.Module):
    """Multi-head self-attention where each ``block×block`` query block attends to the
    ``(block + 2·halo)²`` window around it.

    Queries, keys and values are bias-free linear maps (1×1 convs) to ``heads·dim_head`` channels,
    independent of ``dim`` (so odd widths such as 29 or 703 work); an output projection with bias
    maps back to ``dim``. Relative-position logits come from separate height and width tables of
    shape ``(2·(block + 2·halo) − 1, dim_head)`` indexed by the key−query displacement (row
    ``window − 1`` is displacement 0); they are dotted with the scaled query and added to the
    content logits. Halo keys that fall outside the feature map are masked out of the softmax.

    ``released_mask=True`` reproduces the inverted mask of the layer the authors vendored: the
    *valid* keys are filled with ``−finfo.max`` instead of the padding. Every output block is then
    constant: the window mean of the values in the interior (all logits equal) and the output bias
    alone at the border (only zero-valued padding keys survive), and the position tables never
    receive gradient. Kept only to measure what the paper's numbers were produced with.

    Shapes:
        input ``B×dim×H×W`` with ``H`` and ``W`` divisible by ``block``; output ``B×dim×H×W``.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int = 16,
        block: int = 12,
        halo: int = 2,
        released_mask: bool = False,
    ) -> None:
        super().__init__()
        self.heads, self.dim_head, self.block, self.halo = heads, dim_head, block, halo
        self.released_mask = released_mask
        self.scale = dim_head**-0.5
        inner = heads * dim_head
        window = block + 2 * halo
        self.to_q = nn.Conv2d(dim, inner, 1, bias=False)
        self.to_kv = nn.Conv2d(dim, 2 * inner, 1, bias=False)
        self.to_out = nn.Conv2d(inner, dim, 1)
        self.rel_height = nn.Parameter(torch.randn(2 * window - 1, dim_head) * self.scale)
        self.rel_width = nn.Parameter(torch.randn(2 * window - 1, dim_head) * self.scale)
        # Table row for (query offset in its block, key offset in its window) along one axis.
        displacement = torch.arange(window)[None, :] - halo - torch.arange(block)[:, None]
        self.rel_index: torch.Tensor
        self.register_buffer("rel_index", displacement + window - 1, persistent=False)
        # One-hot (key row, key column) of each of the window² keys: (window², 2·window).
        eye = torch.eye(window)
        key_onehot = torch.cat([eye.repeat_interleave(window, 0), eye.repeat(window, 1)], dim=1)
        self.key_onehot: torch.Tensor
        self.register_buffer("key_onehot", key_onehot, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        b, n, d = self.block, self.heads, self.dim_head
        if height % b or width % b:
            raise ValueError(
                f"halo attention needs H and W divisible by the block size {b}, "
                f"got {height}×{width}"
            )
        nh, nw, win = height // b, width // b, b + 2 * self.halo
        blocks = batch * nh * nw

        # Queries: one row of b² pixels per block and head -> (blocks, n, b², d).
        q = (self.to_q(x) * self.scale).reshape(batch, n, d, nh, b, nw, b)
        q = q.permute(0, 3, 5, 1, 4, 6, 2).reshape(blocks, n, b * b, d)
        # Keys/values are computed once on the map and then windowed: to_kv has no bias, so
        # zero-padding its output equals zero-padding x first, without recomputing the overlaps.
        kv = F.pad(self.to_kv(x), (self.halo,) * 4).unfold(2, win, b).unfold(3, win, b)
        kv = kv.reshape(batch, 2, n, d, nh, nw, win * win).permute(1, 0, 4, 5, 2, 6, 3)
        k, v = kv.reshape(2, blocks, n, win * win, d).unbind(0)

        # Relative-position logits, factorised: q·(R_h[dy] + R_w[dx]) = q·R_h[dy] + q·R_w[dx],
        # one (blocks, n, b², win) table per axis, indexed by the key's row and column.
        qb = q.reshape(blocks, n, b, b, d)
        logit_h = torch.einsum("znxyd,xkd->znxyk", qb, self.rel_height[self.rel_index])
        logit_w = torch.einsum("znxyd,ykd->znxyk", qb, self.rel_width[self.rel_index])
        # Fold them into the content dot product: queries get [q, logit_h, logit_w], keys get
        # [k, onehot(row), onehot(col)], so q'·k' = q·k + logit_h[row] + logit_w[col]. No
        # b²×win² bias tensor is ever built, which lets the fused attention kernels run.
        rel_shape = (blocks, n, b * b, win)
        q = torch.cat([q, logit_h.reshape(rel_shape), logit_w.reshape(rel_shape)], dim=-1)
        k = torch.cat([k, self.key_onehot.to(k.dtype).expand(blocks, n, win * win, 2 * win)], -1)

        # Which window positions lie inside the map, per block: (blocks, 1, 1, win²).
        ones = F.pad(x.new_ones(1, 1, height, width), (self.halo,) * 4)
        valid = ones.unfold(2, win, b).unfold(3, win, b).reshape(1, nh * nw, win * win) > 0
        valid = valid.expand(batch, -1, -1).reshape(blocks, 1, 1, win * win)
        if self.released_mask:
            sim = q @ k.transpose(-1, -2)
            sim.masked_fill_(valid, -torch.finfo(sim.dtype).max)  # the upstream inversion
            out = sim.softmax(dim=-1) @ v
        else:
            # Every query sees its own block, so no softmax row is fully masked. The fused CPU
            # kernel wants equal head sizes for q, k and v: pad v with zeros and drop them after.
            v = F.pad(v, (0, 2 * win))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid, scale=1.0)[..., :d]

        out = out.reshape(batch, nh, nw, n, b, b, d).permute(0, 3, 6, 1, 4, 2, 5)
        return self.to_out(out.reshape(batch, n * d, height, width))
