"""Pure-PyTorch bi-level routing attention: the gather formulation of BiFormer.

Routed K/V regions are gathered into a ``[B, R, topk * T, heads, D]`` copy (``T`` tokens per region),
then each query region attends densely to its copy. Memory grows with ``topk``; this is the CPU path,
the fallback and the baseline the Triton kernel is checked and timed against.

Regions are numbered in raster order: region ``r = i * n_win + j`` covers rows
``[i * H / n_win, (i + 1) * H / n_win)`` and columns ``[j * W / n_win, (j + 1) * W / n_win)``.
"""
from __future__ import annotations

import torch


def region_partition(x: torch.Tensor, n_win: int) -> torch.Tensor:
    """``[B, H, W, heads, D]`` -> ``[B, R, T, heads, D]`` with ``R = n_win**2`` regions of ``T`` tokens each."""
    B, H, W, nh, D = x.shape
    rh, rw = H // n_win, W // n_win
    x = x.reshape(B, n_win, rh, n_win, rw, nh, D).permute(0, 1, 3, 2, 4, 5, 6)
    return x.reshape(B, n_win * n_win, rh * rw, nh, D)


def region_reverse(x: torch.Tensor, n_win: int, H: int, W: int) -> torch.Tensor:
    """Inverse of :func:`region_partition`."""
    B, _, _, nh, D = x.shape
    rh, rw = H // n_win, W // n_win
    x = x.reshape(B, n_win, n_win, rh, rw, nh, D).permute(0, 1, 3, 2, 4, 5, 6)
    return x.reshape(B, H, W, nh, D)


def _region_sums(x: torch.Tensor, n_win: int) -> torch.Tensor:
    """Sums of ``x`` over each region on the flattened ``heads * D`` channels: ``[B, R, heads * D]``.

    One strided reduction over the rows and columns of each region (views only, so a q/k slice of a
    fused qkv tensor is not copied), accumulated in at least float32.
    """
    B, H, W = x.shape[:3]
    x = x.unflatten(2, (n_win, W // n_win)).unflatten(1, (n_win, H // n_win))  # [B, i, a, j, c, heads, D]
    sums = x.sum(dim=(2, 4), dtype=torch.promote_types(x.dtype, torch.float32))  # [B, i, j, heads, D]
    return sums.reshape(B, n_win * n_win, -1)


@torch.no_grad()
def route_regions(q: torch.Tensor, k: torch.Tensor, n_win: int, topk: int, routing_scale: float) -> torch.Tensor:
    """Top-``topk`` key regions per query region, shared by all heads: ``[B, R, topk]`` int64.

    Region queries/keys are the means of ``q``/``k`` over each region on the full ``heads * D`` channel
    vector (as BiFormer routes); affinity ``(q_r * routing_scale) @ k_r^T``; ``torch.topk`` picks the
    regions, so the index is sorted by decreasing affinity. Computed in at least float32 so that every
    backend routes identically; no gradient flows through routing. Four kernels, no host sync: two region
    sums, one product whose ``alpha`` folds the means' ``1 / T`` and ``routing_scale``, and the top-k.
    """
    T = (q.shape[1] // n_win) * (q.shape[2] // n_win)
    q_s, k_s = _region_sums(q, n_win), _region_sums(k, n_win)  # [B, R, heads * D]
    affinity = torch.baddbmm(q_s.new_empty(q_s.shape[0], q_s.shape[1], k_s.shape[1]), q_s, k_s.transpose(1, 2),
                             beta=0, alpha=routing_scale / (T * T))  # [B, R, R]
    return torch.topk(affinity, k=topk, dim=-1).indices


def routed_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, region_index: torch.Tensor,
                               n_win: int, scale: float) -> torch.Tensor:
    """Each query token attends, per head, to every token of its region's routed regions.

    q, k ``[B, H, W, heads, D]``, v ``[B, H, W, heads, Dv]``, region_index ``[B, R, topk]`` ->
    ``[B, H, W, heads, Dv]``. Softmax runs in at least float32; products stay in the input dtype.
    """
    B, H, W = q.shape[:3]
    q_r, k_r, v_r = (region_partition(t, n_win) for t in (q, k, v))  # [B, R, T, heads, *]
    idx = region_index.long()
    batch = torch.arange(B, device=q.device).view(B, 1, 1)
    k_g = k_r[batch, idx].flatten(2, 3)  # gathered copy [B, R, topk * T, heads, D]
    v_g = v_r[batch, idx].flatten(2, 3)
    logits = torch.einsum("brqhd,brkhd->brhqk", q_r, k_g) * scale
    p = logits.softmax(dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(v.dtype)
    out = torch.einsum("brhqk,brkhd->brqhd", p, v_g)
    return region_reverse(out, n_win, H, W)
