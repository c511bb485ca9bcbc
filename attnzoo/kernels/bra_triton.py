"""Fused Triton bi-level routing attention: routed K/V tiles are read straight from the feature map.

Layout: q, k ``[B, H, W, heads, D]``, v/out ``[B, H, W, heads, Dv]`` (any strides), region_index
``[B, R, topk]`` with ``R = n_win**2`` regions of ``T = rh * rw`` tokens in raster order.

* Forward: one program per (query region, block of its tokens, batch, head). It walks the flattened list of
  its ``topk * T`` routed keys in tiles of ``BLOCK_N`` rows; each row's map position is computed from the
  region index, so no gathered copy exists and memory does not depend on ``topk``. Online softmax as in
  the fused-attention tutorial (exp2 domain); the log-sum-exp is saved in fp32 for the backward.
* Backward dq: the same walk, recomputing probabilities from the saved log-sum-exp. In fast mode the same
  program also adds its dk/dv contributions with fp32 atomics.
* Backward dk/dv, deterministic mode: an inverted region index lists, for each key region, the query
  regions that routed to it (sorted, so the order is fixed); one program per (key region, block of its
  tokens, batch, head) walks those query tokens and owns its dk/dv rows, so no atomics are needed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnzoo.kernels._op import Launcher, dot_precision

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _token_offsets(region, tok, n_win, RH, RW, stride_h, stride_w):
    """Offsets (rows, columns strides) of token ``tok`` of ``region`` in the [H, W] map."""
    y = (region // n_win) * RH + tok // RW
    x = (region % n_win) * RW + tok % RW
    return y * stride_h + x * stride_w


@triton.jit
def _bra_fwd_kernel(
    Q, K, V, Out, Lse, Idx,
    sqb, sqh, sqw, sqn, sqd,
    skb, skh, skw, skn, skd,
    svb, svh, svw, svn, svd,
    sob, soh, sow, son, sod,
    n_heads, n_win, TOPK, RH, RW, D, DV, qk_scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    qk_scale_log2 = tl.cast(qk_scale_log2, tl.float32)  # fp64 when Inductor passes an unspecialised float
    T = RH * RW
    R = n_win * n_win
    n_mblocks = tl.cdiv(T, BLOCK_M)
    region = tl.program_id(0) // n_mblocks
    mblock = tl.program_id(0) % n_mblocks
    b = (tl.program_id(1) // n_heads).to(tl.int64)
    h = tl.program_id(1) % n_heads

    # Query tile: BLOCK_M tokens of this region (rows), head dim padded to BLOCK_D (columns).
    offs_m = mblock * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < T
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    tok_q = _token_offsets(region, offs_m, n_win, RH, RW, sqh, sqw)
    q = tl.load(Q + b * sqb + h * sqn + tok_q[:, None] + offs_d[None, :] * sqd,
                mask=mask_m[:, None] & (offs_d[None, :] < D), other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    idx_row = Idx + (b * R + region) * TOPK
    n_keys = TOPK * T
    for start_n in range(0, n_keys, BLOCK_N):
        # Key tile: BLOCK_N consecutive entries of the routed key list; entry n is token n % T of
        # routed region idx[n // T], located in the map by index (no gathered copy).
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_keys
        key_region = tl.load(idx_row + offs_n // T, mask=mask_n, other=0).to(tl.int32)
        tok_k = _token_offsets(key_region, offs_n % T, n_win, RH, RW, skh, skw)
        tok_v = _token_offsets(key_region, offs_n % T, n_win, RH, RW, svh, svw)
        kT = tl.load(K + b * skb + h * skn + tok_k[None, :] + offs_d[:, None] * skd,
                     mask=mask_n[None, :] & (offs_d[:, None] < D), other=0.0)
        s = tl.dot(q, kT, input_precision=PRECISION) * qk_scale_log2
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * svb + h * svn + tok_v[:, None] + offs_dv[None, :] * svd,
                    mask=mask_n[:, None] & (offs_dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    tok_o = _token_offsets(region, offs_m, n_win, RH, RW, soh, sow)
    tl.store(Out + b * sob + h * son + tok_o[:, None] + offs_dv[None, :] * sod, acc.to(Out.dtype.element_ty),
             mask=mask_m[:, None] & (offs_dv[None, :] < DV))
    # Lse is a contiguous [B, H, W, heads] fp32 tensor; natural-log log-sum-exp of the scaled logits.
    W = n_win * RW
    tok_l = _token_offsets(region, offs_m, n_win, RH, RW, W * n_heads, n_heads)
    tl.store(Lse + b * (n_win * RH) * W * n_heads + h + tok_l, (m_i + tl.math.log2(l_i)) * 0.6931471805599453,
             mask=mask_m)


@triton.jit
def _bra_bwd_dq_kernel(
    Q, K, V, O, DO, Lse, Delta, Idx, DQ, DKacc, DVacc,
    sqb, sqh, sqw, sqn, sqd,
    skb, skh, skw, skn, skd,
    svb, svh, svw, svn, svd,
    sob, soh, sow, son, sod,
    sgb, sgh, sgw, sgn, sgd,
    n_heads, n_win, TOPK, RH, RW, D, DV, qk_scale_log2, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr, ATOMIC_DKDV: tl.constexpr,
):
    """dq for one query block; with ATOMIC_DKDV also dk/dv contributions into fp32 accumulators, else
    the row sums delta = rowsum(dO * O) stored for the dk/dv kernel.

    DQ has q's strides; DKacc/DVacc are contiguous fp32 [B, H, W, heads, D/Dv]; O has strides s*o*, DO s*g*.
    """
    qk_scale_log2 = tl.cast(qk_scale_log2, tl.float32)
    scale = tl.cast(scale, tl.float32)
    T = RH * RW
    R = n_win * n_win
    W = n_win * RW
    n_mblocks = tl.cdiv(T, BLOCK_M)
    region = tl.program_id(0) // n_mblocks
    mblock = tl.program_id(0) % n_mblocks
    b = (tl.program_id(1) // n_heads).to(tl.int64)
    h = tl.program_id(1) % n_heads

    # Query-side tiles: q [BLOCK_M, BLOCK_D], O and dO [BLOCK_M, BLOCK_DV], lse/delta [BLOCK_M] of this region.
    offs_m = mblock * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < T
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_d = offs_d < D
    mask_dv = offs_dv < DV
    tok_q = _token_offsets(region, offs_m, n_win, RH, RW, sqh, sqw)
    q = tl.load(Q + b * sqb + h * sqn + tok_q[:, None] + offs_d[None, :] * sqd,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    mask_o = mask_m[:, None] & mask_dv[None, :]
    tok_o = _token_offsets(region, offs_m, n_win, RH, RW, soh, sow)
    o = tl.load(O + b * sob + h * son + tok_o[:, None] + offs_dv[None, :] * sod, mask=mask_o, other=0.0)
    tok_g = _token_offsets(region, offs_m, n_win, RH, RW, sgh, sgw)
    do = tl.load(DO + b * sgb + h * sgn + tok_g[:, None] + offs_dv[None, :] * sgd, mask=mask_o, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row = b * (n_win * RH) * W * n_heads + h + _token_offsets(region, offs_m, n_win, RH, RW, W * n_heads, n_heads)
    lse2 = tl.load(Lse + row, mask=mask_m, other=0.0) * 1.4426950408889634
    if not ATOMIC_DKDV:
        tl.store(Delta + row, delta, mask=mask_m)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    idx_row = Idx + (b * R + region) * TOPK
    n_keys = TOPK * T
    for start_n in range(0, n_keys, BLOCK_N):
        # Key tile: entries of the routed key list, as in the forward.
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_keys
        key_region = tl.load(idx_row + offs_n // T, mask=mask_n, other=0).to(tl.int32)
        tok_k = _token_offsets(key_region, offs_n % T, n_win, RH, RW, skh, skw)
        tok_v = _token_offsets(key_region, offs_n % T, n_win, RH, RW, svh, svw)
        kT = tl.load(K + b * skb + h * skn + tok_k[None, :] + offs_d[:, None] * skd,
                     mask=mask_n[None, :] & mask_d[:, None], other=0.0)
        vT = tl.load(V + b * svb + h * svn + tok_v[None, :] + offs_dv[:, None] * svd,
                     mask=mask_n[None, :] & mask_dv[:, None], other=0.0)
        s = tl.dot(q, kT, input_precision=PRECISION) * qk_scale_log2
        p = tl.math.exp2(s - lse2[:, None])
        p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
        dp = tl.dot(do, vT, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=PRECISION)
        if ATOMIC_DKDV:
            # Contributions of this query block to the routed key rows: dv += p^T dO, dk += ds^T q.
            tok_a = b * (n_win * RH) * W * n_heads + h + _token_offsets(
                key_region, offs_n % T, n_win, RH, RW, W * n_heads, n_heads)
            dv_part = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            tl.atomic_add(DVacc + tok_a[:, None] * DV + offs_dv[None, :], dv_part,
                          mask=mask_n[:, None] & mask_dv[None, :])
            dk_part = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION) * scale
            tl.atomic_add(DKacc + tok_a[:, None] * D + offs_d[None, :], dk_part,
                          mask=mask_n[:, None] & mask_d[None, :])

    tl.store(DQ + b * sqb + h * sqn + tok_q[:, None] + offs_d[None, :] * sqd, (dq * scale).to(DQ.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def _bra_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, InvQ, InvStart, DK, DV_,
    sqb, sqh, sqw, sqn, sqd,
    skb, skh, skw, skn, skd,
    svb, svh, svw, svn, svd,
    sgb, sgh, sgw, sgn, sgd,
    n_heads, n_win, TOPK, RH, RW, D, DV, qk_scale_log2, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dk/dv for one block of a key region's tokens, summed in a fixed order over the query regions
    routed to it (InvQ[b, InvStart[b, r]:InvStart[b, r + 1]]). DK has k's strides, DV_ v's strides."""
    qk_scale_log2 = tl.cast(qk_scale_log2, tl.float32)
    scale = tl.cast(scale, tl.float32)
    T = RH * RW
    R = n_win * n_win
    W = n_win * RW
    n_nblocks = tl.cdiv(T, BLOCK_N)
    region = tl.program_id(0) // n_nblocks
    nblock = tl.program_id(0) % n_nblocks
    b = (tl.program_id(1) // n_heads).to(tl.int64)
    h = tl.program_id(1) % n_heads

    # Key-side tiles: k [BLOCK_N, BLOCK_D], v [BLOCK_N, BLOCK_DV] of this region's tokens.
    offs_n = nblock * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < T
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_d = offs_d < D
    mask_dv = offs_dv < DV
    tok_k = _token_offsets(region, offs_n, n_win, RH, RW, skh, skw)
    tok_v = _token_offsets(region, offs_n, n_win, RH, RW, svh, svw)
    k = tl.load(K + b * skb + h * skn + tok_k[:, None] + offs_d[None, :] * skd,
                mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    v = tl.load(V + b * svb + h * svn + tok_v[:, None] + offs_dv[None, :] * svd,
                mask=mask_n[:, None] & mask_dv[None, :], other=0.0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    start = tl.load(InvStart + b * (R + 1) + region)
    n_queries = (tl.load(InvStart + b * (R + 1) + region + 1) - start) * T
    for start_m in range(0, n_queries, BLOCK_M):
        # Query tile: entry m of the inverted list is token m % T of query region InvQ[start + m // T].
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < n_queries
        q_region = tl.load(InvQ + b * R * TOPK + start + offs_m // T, mask=mask_m, other=0).to(tl.int32)
        tok_q = _token_offsets(q_region, offs_m % T, n_win, RH, RW, sqh, sqw)
        tok_g = _token_offsets(q_region, offs_m % T, n_win, RH, RW, sgh, sgw)
        row = b * (n_win * RH) * W * n_heads + h + _token_offsets(q_region, offs_m % T, n_win, RH, RW,
                                                                   W * n_heads, n_heads)
        qT = tl.load(Q + b * sqb + h * sqn + tok_q[None, :] + offs_d[:, None] * sqd,
                     mask=mask_m[None, :] & mask_d[:, None], other=0.0)
        doT = tl.load(DO + b * sgb + h * sgn + tok_g[None, :] + offs_dv[:, None] * sgd,
                      mask=mask_m[None, :] & mask_dv[:, None], other=0.0)
        lse2 = tl.load(Lse + row, mask=mask_m, other=0.0) * 1.4426950408889634
        delta = tl.load(Delta + row, mask=mask_m, other=0.0)
        sT = tl.dot(k, qT, input_precision=PRECISION) * qk_scale_log2
        pT = tl.math.exp2(sT - lse2[None, :])
        pT = tl.where(mask_n[:, None] & mask_m[None, :], pT, 0.0)
        dv += tl.dot(pT.to(doT.dtype), tl.trans(doT), input_precision=PRECISION)
        dpT = tl.dot(v, doT, input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=PRECISION)

    tl.store(DK + b * skb + h * skn + tok_k[:, None] + offs_d[None, :] * skd, (dk * scale).to(DK.dtype.element_ty),
             mask=mask_n[:, None] & mask_d[None, :])
    tl.store(DV_ + b * svb + h * svn + tok_v[:, None] + offs_dv[None, :] * svd, dv.to(DV_.dtype.element_ty),
             mask=mask_n[:, None] & mask_dv[None, :])


_FWD, _DQ, _DKDV = Launcher(_bra_fwd_kernel), Launcher(_bra_bwd_dq_kernel), Launcher(_bra_bwd_dkdv_kernel)


def kernel_config(kernel: str, T: int, D: int, Dv: int) -> dict:
    """Launch parameters of ``kernel`` ("fwd", "dq", "dkdv") for regions of ``T`` tokens.

    The owned side (queries for fwd/dq, keys for dkdv) covers up to 64 of one region's tokens, at least
    16 rows for tl.dot; the walked side is flattened across routed regions, so its block is full even for
    2x2 regions. Small tiles are latency-bound, so they get 2 warps (more programs resident per SM).
    Chosen from the sweep in benchmarks/NOTES_bra.md.
    """
    owned = min(64, max(16, triton.next_power_of_2(T)))
    walked = 64 if kernel == "fwd" or T >= 64 else 32
    config = dict(BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_DV=max(16, triton.next_power_of_2(Dv)),
                  num_warps=4 if owned >= 64 else 2, num_stages=2)
    if kernel == "dkdv":
        return dict(config, BLOCK_M=walked, BLOCK_N=owned)
    return dict(config, BLOCK_M=owned, BLOCK_N=walked)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if its gradient (``empty_like``) gets the same strides, else a contiguous copy."""
    return t if torch.empty_like(t, device="meta").stride() == t.stride() else t.contiguous()


def routed_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, region_index: torch.Tensor,
                         n_win: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Output ``[B, H, W, heads, Dv]`` and log-sum-exp ``[B, H, W, heads]`` (fp32)."""
    B, H, W, n_heads, D = q.shape
    RH, RW, Dv, topk = H // n_win, W // n_win, v.shape[-1], region_index.shape[-1]
    idx = region_index.contiguous()  # int32 or int64 (topk's output, no conversion kernel)
    out = torch.empty((*q.shape[:-1], Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    config = kernel_config("fwd", RH * RW, D, Dv)
    grid = (triton.cdiv(RH * RW, config["BLOCK_M"]) * n_win * n_win, B * n_heads)
    _FWD(grid, q, k, v, out, lse, idx, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
         n_heads, n_win, topk, RH, RW, D, Dv, scale * LOG2E, PRECISION=dot_precision(q.dtype), **config)
    return out, lse


def invert_region_index(region_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each key region, the query regions routed to it, in increasing order.

    Returns ``inv_q`` ``[B, R * topk]`` int64 (query regions grouped by key region) and ``inv_start``
    ``[B, R + 1]`` int32 (group ``r`` is ``inv_q[b, inv_start[b, r]:inv_start[b, r + 1]]``). A stable sort
    fixes the order, so the dk/dv sums are reproducible. Built only for the deterministic backward: a
    sort, a division and a searchsorted, no host sync.
    """
    B, R, topk = region_index.shape
    sorted_keys, order = torch.sort(region_index.reshape(B, R * topk), dim=1, stable=True)
    bounds = torch.arange(R + 1, dtype=sorted_keys.dtype, device=sorted_keys.device).expand(B, R + 1)
    inv_start = torch.searchsorted(sorted_keys, bounds.contiguous(), out_int32=True)
    return order.div_(topk, rounding_mode="floor"), inv_start


def routed_attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         out: torch.Tensor, lse: torch.Tensor, region_index: torch.Tensor, n_win: int,
                         scale: float, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv. ``deterministic`` selects the inverted-index dk/dv kernel instead of fp32 atomics."""
    B, H, W, n_heads, D = q.shape
    RH, RW, Dv, topk = H // n_win, W // n_win, v.shape[-1], region_index.shape[-1]
    R, T = n_win * n_win, RH * RW
    q, k, v = (_dense(t) for t in (q, k, v))
    idx = region_index.contiguous()
    dq = torch.empty_like(q)
    prec = dot_precision(q.dtype)
    strides = (*q.stride(), *k.stride(), *v.stride())
    geometry = (n_heads, n_win, topk, RH, RW, D, Dv, scale * LOG2E, scale)
    config = kernel_config("dq", T, D, Dv)
    grid = (triton.cdiv(T, config["BLOCK_M"]) * R, B * n_heads)
    if deterministic:
        delta = torch.empty_like(lse)
        _DQ(grid, q, k, v, out, grad_out, lse, delta, idx, dq, dq, dq, *strides, *out.stride(),
            *grad_out.stride(), *geometry, PRECISION=prec, ATOMIC_DKDV=False, **config)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        inv_q, inv_start = invert_region_index(idx)
        config = kernel_config("dkdv", T, D, Dv)
        grid = (triton.cdiv(T, config["BLOCK_N"]) * R, B * n_heads)
        _DKDV(grid, q, k, v, grad_out, lse, delta, inv_q, inv_start, dk, dv, *strides,
              *grad_out.stride(), *geometry, PRECISION=prec, **config)
        return dq, dk, dv
    dk_acc = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv_acc = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    _DQ(grid, q, k, v, out, grad_out, lse, lse, idx, dq, dk_acc, dv_acc, *strides, *out.stride(),
        *grad_out.stride(), *geometry, PRECISION=prec, ATOMIC_DKDV=True, **config)
    return dq, dk_acc.to(k.dtype), dv_acc.to(v.dtype)
