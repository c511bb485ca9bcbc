"""Routed attention as exact masked dense attention: one SDPA call over all tokens.

Each query token may attend to the key tokens whose region is routed to its own region. On small maps
(BiFormer's stage 3: 196 tokens, 2x2 regions) computing all N² logits and masking is cheaper than
walking tiny routed regions, because SDPA's kernels keep full tiles busy. The mask is an additive bias
``[B, 1, N, N]`` in q's dtype, shared by all heads: ``log(count)`` where the key token's region appears
``count`` times in the query region's routed list (0 for a single routing, so a repeated region counts
its keys twice, exactly as the gather formulation), ``-inf`` where it is not routed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Row stride of the bias, in elements: SDPA's memory-efficient kernel needs an aligned last dimension and
# otherwise pads the mask with one more copy.
_BIAS_ALIGN = 16


def routing_bias(region_index: torch.Tensor, n_win: int, H: int, W: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias ``[B, 1, H*W, H*W]`` of a region index ``[B, R, topk]`` (see module doc).

    Four kernels and no host sync: region-level counts (fill, scatter-add), their log, and one broadcast
    copy to token level (each region id repeated over its rows and columns), written into a buffer whose
    rows are padded to ``_BIAS_ALIGN`` elements; the returned tensor is a view without the padding.
    """
    B, R, topk = region_index.shape
    rh, rw, N = H // n_win, W // n_win, H * W
    counts = torch.zeros(B, R, R, dtype=dtype, device=region_index.device)
    counts.scatter_add_(2, region_index.long(), counts.new_ones(1, 1, 1).expand(B, R, topk))
    region_bias = counts.log_().view(B, n_win, 1, n_win, 1, n_win, 1, n_win, 1)
    n_pad = -(-N // _BIAS_ALIGN) * _BIAS_ALIGN
    bias = torch.empty(B, 1, N, n_pad, dtype=dtype, device=region_index.device)[..., :N]
    # Token (y, x) = (i * rh + a, j * rw + c) lies in region i * n_win + j: split both token axes that way.
    bias.view(B, n_win, rh, n_win, rw, n_win, rh, n_win, rw).copy_(
        region_bias.expand(B, n_win, rh, n_win, rw, n_win, rh, n_win, rw))
    return bias


def routed_attention_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, region_index: torch.Tensor,
                           n_win: int, scale: float) -> torch.Tensor:
    """Masked ``scaled_dot_product_attention`` over all tokens; heads-last in and out.

    q, k ``[B, H, W, heads, D]``, v ``[B, H, W, heads, Dv]`` -> ``[B, H, W, heads, Dv]``. The inputs are
    passed to SDPA as ``[B, heads, N, D]`` views (no copies); memory grows with ``B * N²`` for the mask.
    """
    B, H, W, heads, _ = q.shape
    bias = routing_bias(region_index, n_win, H, W, q.dtype)
    q_, k_, v_ = (t.flatten(1, 2).transpose(1, 2) for t in (q, k, v))  # [B, heads, N, *]
    # torch's kernel order (memory-efficient on CUDA). cuDNN first was 2x faster with a bias built once
    # but slower with a fresh bias per call, as here (benchmarks/NOTES_bra.md).
    out = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=bias, scale=scale)
    return out.transpose(1, 2).reshape(B, H, W, heads, v.shape[-1])
