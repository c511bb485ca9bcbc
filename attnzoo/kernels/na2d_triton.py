"""Fused Triton 2-D neighborhood attention: forward, backward (dq, dk, dv) and the rpb gradient.

Structure (FNA-style). Dilation splits each axis into ``d`` interleaved sub-grids that never attend to
each other, so every program works on one sub-grid of one (batch, head):

* forward / dq: one program per tile of ``BY x BX`` queries. Window starts are monotone in the query
  position, so the union of the tile's neighbourhoods is a rectangle of at most
  ``(BY + kh - 1) x (BX + kw - 1)`` keys; it is read in ``KBY x KBX`` key blocks straight from q/k/v
  (no gathered copies), non-neighbours are masked, and an online softmax keeps only a running max and
  sum. The forward saves the log-sum-exp (fp32, base 2) for the backward.
* dk / dv: one program per tile of keys, looping over the rectangle of queries whose windows can hold
  them (the inverse neighbourhood); every gradient element is written once, no atomics.
* d_rpb: one program per (head, query tile, key block) accumulates dS over the whole batch in
  registers, then bins it by relative offset; partial sums go either through float atomics or, in
  deterministic mode, to a per-program buffer summed in a fixed order.

Scores live in the base-2 domain: ``s2 = (scale * q.k + rpb) * log2(e)``, so softmax uses ``exp2``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = math.log2(math.e)


# ------------------------------------------------------------------------------------------------
# Index helpers. Positions ``p`` are on one dilation sub-grid of length ``sub_len``.
# ------------------------------------------------------------------------------------------------
@triton.jit
def _win_start(p, sub_len, KS: tl.constexpr):
    """First neighbour of sub-grid position ``p``: a window of ``KS`` centred on p, shifted inward."""
    return tl.minimum(tl.maximum(p - KS // 2, 0), sub_len - KS)


@triton.jit
def _first_query(j, KS: tl.constexpr):
    """Smallest sub-grid query whose window holds key ``j``."""
    return tl.where(j < KS, 0, j - KS // 2)


@triton.jit
def _last_query(j, sub_len, KS: tl.constexpr):
    """Largest sub-grid query whose window holds key ``j``."""
    return tl.where(j >= sub_len - KS, sub_len - 1, j + KS // 2)


@triton.jit
def _decode_tile(t, H, W, DH, DW, tiles_y, tiles_x):
    """Tile index -> (row residue, column residue, tile row, tile column, sub-grid height, width)."""
    tx = t % tiles_x
    t = t // tiles_x
    ty = t % tiles_y
    t = t // tiles_y
    rx = t % DW
    ry = t // DW
    sub_h = (H - ry + DH - 1) // DH
    sub_w = (W - rx + DW - 1) // DW
    return ry, rx, ty, tx, sub_h, sub_w


@triton.jit
def _scores(q, k, qpy, qpx, kpy, kpx, sub_h, sub_w, RPB, h, srn, sry, qk_scale,
            KH: tl.constexpr, KW: tl.constexpr, HAS_RPB: tl.constexpr, DOT_PREC: tl.constexpr):
    """Base-2 scores of queries (qpy, qpx) against keys (kpy, kpx): -inf outside each query's window."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    dy = kpy[None, :] - _win_start(qpy, sub_h, KH)[:, None]
    dx = kpx[None, :] - _win_start(qpx, sub_w, KW)[:, None]
    nb = (dy >= 0) & (dy < KH) & (dx >= 0) & (dx < KW)
    if HAS_RPB:
        by = kpy[None, :] - qpy[:, None] + KH - 1
        bx = kpx[None, :] - qpx[:, None] + KW - 1
        bias = tl.load(RPB + h * srn + by * sry + bx, mask=nb, other=0.0).to(tl.float32)
        s += bias * 1.4426950408889634
    return tl.where(nb, s, float("-inf")), nb


@triton.jit
def _tile_ptrs(base, b, h, py, px, ry, rx, DH, DW, sb, sh, sw, sn, offs_d):
    """Pointers ``[len(py), BLOCK_D]`` to the rows of sub-grid points (py, px) for batch b, head h."""
    row = b.to(tl.int64) * sb + (py * DH + ry).to(tl.int64) * sh + (px * DW + rx).to(tl.int64) * sw + h * sn
    return base + row[:, None] + offs_d[None, :]


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------
@triton.jit
def _na2d_fwd_kernel(Q, K, V, RPB, O, LSE,
                     sqb, sqh, sqw, sqn, skb, skh, skw, skn, svb, svh, svw, svn, sob, soh, sow, son, srn, sry,
                     H, W, NH, D, DH, DW, tiles_y, tiles_x, qk_scale,
                     KH: tl.constexpr, KW: tl.constexpr, BY: tl.constexpr, BX: tl.constexpr,
                     KBY: tl.constexpr, KBX: tl.constexpr, BLOCK_D: tl.constexpr,
                     HAS_RPB: tl.constexpr, DOT_PREC: tl.constexpr):
    n_tiles = DH * DW * tiles_y * tiles_x
    pid = tl.program_id(0)
    bh = pid // n_tiles
    b, h = bh // NH, bh % NH
    ry, rx, ty, tx, sub_h, sub_w = _decode_tile(pid % n_tiles, H, W, DH, DW, tiles_y, tiles_x)

    # Query tile: BY x BX sub-grid points, row-major; padding rows repeat the last point (never stored).
    offs_m = tl.arange(0, BY * BX)
    qpy, qpx = ty * BY + offs_m // BX, tx * BX + offs_m % BX
    q_valid = (qpy < sub_h) & (qpx < sub_w)
    qpy, qpx = tl.minimum(qpy, sub_h - 1), tl.minimum(qpx, sub_w - 1)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q = tl.load(_tile_ptrs(Q, b, h, qpy, qpx, ry, rx, DH, DW, sqb, sqh, sqw, sqn, offs_d), mask=d_mask[None, :],
                other=0.0)

    # Key rectangle holding every neighbourhood of the tile, on the same sub-grid.
    y_lo = _win_start(tl.minimum(ty * BY, sub_h - 1), sub_h, KH)
    y_hi = _win_start(tl.minimum(ty * BY + BY - 1, sub_h - 1), sub_h, KH) + KH
    x_lo = _win_start(tl.minimum(tx * BX, sub_w - 1), sub_w, KW)
    x_hi = _win_start(tl.minimum(tx * BX + BX - 1, sub_w - 1), sub_w, KW) + KW

    m_i = tl.full([BY * BX], -1.0e30, tl.float32)  # running max (finite: fully masked blocks stay NaN-free)
    l_i = tl.zeros([BY * BX], tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BY * BX, BLOCK_D], tl.float32)  # running sum of p @ v
    offs_n = tl.arange(0, KBY * KBX)
    for ky0 in range(y_lo, y_hi, KBY):
        for kx0 in range(x_lo, x_hi, KBX):
            # Key block: KBY x KBX sub-grid points of the rectangle.
            kpy, kpx = ky0 + offs_n // KBX, kx0 + offs_n % KBX
            k_in = ((kpy < y_hi) & (kpx < x_hi))[:, None] & d_mask[None, :]
            k = tl.load(_tile_ptrs(K, b, h, kpy, kpx, ry, rx, DH, DW, skb, skh, skw, skn, offs_d), mask=k_in,
                        other=0.0)
            v = tl.load(_tile_ptrs(V, b, h, kpy, kpx, ry, rx, DH, DW, svb, svh, svw, svn, offs_d), mask=k_in,
                        other=0.0)
            s, _ = _scores(q, k, qpy, qpx, kpy, kpx, sub_h, sub_w, RPB, h, srn, sry, qk_scale, KH, KW, HAS_RPB,
                           DOT_PREC)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            m_i = m_new

    out = acc / l_i[:, None]
    o_mask = q_valid[:, None] & d_mask[None, :]
    tl.store(_tile_ptrs(O, b, h, qpy, qpx, ry, rx, DH, DW, sob, soh, sow, son, offs_d), out.to(O.dtype.element_ty),
             mask=o_mask)
    lse_off = (bh.to(tl.int64) * H + qpy * DH + ry) * W + qpx * DW + rx
    tl.store(LSE + lse_off, m_i + tl.math.log2(l_i), mask=q_valid)


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------
@triton.jit
def _na2d_bwd_dq_kernel(Q, K, V, RPB, DO, LSE, DELTA, DQ,
                        sqb, sqh, sqw, sqn, skb, skh, skw, skn, svb, svh, svw, svn, sob, soh, sow, son, srn, sry,
                        H, W, NH, D, DH, DW, tiles_y, tiles_x, qk_scale, sm_scale,
                        KH: tl.constexpr, KW: tl.constexpr, BY: tl.constexpr, BX: tl.constexpr,
                        KBY: tl.constexpr, KBX: tl.constexpr, BLOCK_D: tl.constexpr,
                        HAS_RPB: tl.constexpr, DOT_PREC: tl.constexpr):
    """dq = scale * sum_j dS_ij k_j over each query's window; same tiling as the forward.
    DO and DQ share the contiguous output strides (sob..son)."""
    n_tiles = DH * DW * tiles_y * tiles_x
    pid = tl.program_id(0)
    bh = pid // n_tiles
    b, h = bh // NH, bh % NH
    ry, rx, ty, tx, sub_h, sub_w = _decode_tile(pid % n_tiles, H, W, DH, DW, tiles_y, tiles_x)

    offs_m = tl.arange(0, BY * BX)
    qpy, qpx = ty * BY + offs_m // BX, tx * BX + offs_m % BX
    q_valid = (qpy < sub_h) & (qpx < sub_w)
    qpy, qpx = tl.minimum(qpy, sub_h - 1), tl.minimum(qpx, sub_w - 1)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q = tl.load(_tile_ptrs(Q, b, h, qpy, qpx, ry, rx, DH, DW, sqb, sqh, sqw, sqn, offs_d), mask=d_mask[None, :],
                other=0.0)
    do = tl.load(_tile_ptrs(DO, b, h, qpy, qpx, ry, rx, DH, DW, sob, soh, sow, son, offs_d), mask=d_mask[None, :],
                 other=0.0)
    lse_off = (bh.to(tl.int64) * H + qpy * DH + ry) * W + qpx * DW + rx
    lse = tl.load(LSE + lse_off)
    delta = tl.load(DELTA + lse_off)

    y_lo = _win_start(tl.minimum(ty * BY, sub_h - 1), sub_h, KH)
    y_hi = _win_start(tl.minimum(ty * BY + BY - 1, sub_h - 1), sub_h, KH) + KH
    x_lo = _win_start(tl.minimum(tx * BX, sub_w - 1), sub_w, KW)
    x_hi = _win_start(tl.minimum(tx * BX + BX - 1, sub_w - 1), sub_w, KW) + KW

    dq = tl.zeros([BY * BX, BLOCK_D], tl.float32)
    offs_n = tl.arange(0, KBY * KBX)
    for ky0 in range(y_lo, y_hi, KBY):
        for kx0 in range(x_lo, x_hi, KBX):
            kpy, kpx = ky0 + offs_n // KBX, kx0 + offs_n % KBX
            k_in = ((kpy < y_hi) & (kpx < x_hi))[:, None] & d_mask[None, :]
            k = tl.load(_tile_ptrs(K, b, h, kpy, kpx, ry, rx, DH, DW, skb, skh, skw, skn, offs_d), mask=k_in,
                        other=0.0)
            v = tl.load(_tile_ptrs(V, b, h, kpy, kpx, ry, rx, DH, DW, svb, svh, svw, svn, offs_d), mask=k_in,
                        other=0.0)
            s, _ = _scores(q, k, qpy, qpx, kpy, kpx, sub_h, sub_w, RPB, h, srn, sry, qk_scale, KH, KW, HAS_RPB,
                           DOT_PREC)
            p = tl.math.exp2(s - lse[:, None])
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)

    tl.store(_tile_ptrs(DQ, b, h, qpy, qpx, ry, rx, DH, DW, sob, soh, sow, son, offs_d),
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_valid[:, None] & d_mask[None, :])


@triton.jit
def _na2d_bwd_dkdv_kernel(Q, K, V, RPB, DO, LSE, DELTA, DK, DV,
                          sqb, sqh, sqw, sqn, skb, skh, skw, skn, svb, svh, svw, svn, sob, soh, sow, son, srn, sry,
                          H, W, NH, D, DH, DW, tiles_y, tiles_x, qk_scale, sm_scale,
                          KH: tl.constexpr, KW: tl.constexpr, BY: tl.constexpr, BX: tl.constexpr,
                          QBY: tl.constexpr, QBX: tl.constexpr, BLOCK_D: tl.constexpr,
                          HAS_RPB: tl.constexpr, DOT_PREC: tl.constexpr):
    """dk, dv for a tile of BY x BX keys, looping over the QBY x QBX query blocks of its inverse
    neighbourhood. DO, DK and DV share the contiguous output strides (sob..son)."""
    n_tiles = DH * DW * tiles_y * tiles_x
    pid = tl.program_id(0)
    bh = pid // n_tiles
    b, h = bh // NH, bh % NH
    ry, rx, ty, tx, sub_h, sub_w = _decode_tile(pid % n_tiles, H, W, DH, DW, tiles_y, tiles_x)

    offs_n = tl.arange(0, BY * BX)
    kpy, kpx = ty * BY + offs_n // BX, tx * BX + offs_n % BX
    k_valid = (kpy < sub_h) & (kpx < sub_w)
    kpy, kpx = tl.minimum(kpy, sub_h - 1), tl.minimum(kpx, sub_w - 1)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    k = tl.load(_tile_ptrs(K, b, h, kpy, kpx, ry, rx, DH, DW, skb, skh, skw, skn, offs_d), mask=d_mask[None, :],
                other=0.0)
    v = tl.load(_tile_ptrs(V, b, h, kpy, kpx, ry, rx, DH, DW, svb, svh, svw, svn, offs_d), mask=d_mask[None, :],
                other=0.0)

    # Queries that can see any key of the tile: a rectangle, since window starts are monotone.
    y_lo = _first_query(tl.minimum(ty * BY, sub_h - 1), KH)
    y_hi = _last_query(tl.minimum(ty * BY + BY - 1, sub_h - 1), sub_h, KH) + 1
    x_lo = _first_query(tl.minimum(tx * BX, sub_w - 1), KW)
    x_hi = _last_query(tl.minimum(tx * BX + BX - 1, sub_w - 1), sub_w, KW) + 1

    dk = tl.zeros([BY * BX, BLOCK_D], tl.float32)
    dv = tl.zeros([BY * BX, BLOCK_D], tl.float32)
    offs_m = tl.arange(0, QBY * QBX)
    for qy0 in range(y_lo, y_hi, QBY):
        for qx0 in range(x_lo, x_hi, QBX):
            # Query block: QBY x QBX sub-grid points; points past the rectangle are clamped and masked.
            qpy, qpx = qy0 + offs_m // QBX, qx0 + offs_m % QBX
            q_in = (qpy < y_hi) & (qpx < x_hi)
            qpy, qpx = tl.minimum(qpy, y_hi - 1), tl.minimum(qpx, x_hi - 1)
            q = tl.load(_tile_ptrs(Q, b, h, qpy, qpx, ry, rx, DH, DW, sqb, sqh, sqw, sqn, offs_d),
                        mask=d_mask[None, :], other=0.0)
            do = tl.load(_tile_ptrs(DO, b, h, qpy, qpx, ry, rx, DH, DW, sob, soh, sow, son, offs_d),
                         mask=q_in[:, None] & d_mask[None, :], other=0.0)
            lse_off = (bh.to(tl.int64) * H + qpy * DH + ry) * W + qpx * DW + rx
            lse = tl.load(LSE + lse_off)
            delta = tl.load(DELTA + lse_off)
            s, _ = _scores(q, k, qpy, qpx, kpy, kpx, sub_h, sub_w, RPB, h, srn, sry, qk_scale, KH, KW, HAS_RPB,
                           DOT_PREC)
            p = tl.where(q_in[:, None], tl.math.exp2(s - lse[:, None]), 0.0)  # [queries, keys]
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)

    kv_mask = k_valid[:, None] & d_mask[None, :]
    tl.store(_tile_ptrs(DK, b, h, kpy, kpx, ry, rx, DH, DW, sob, soh, sow, son, offs_d),
             (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(_tile_ptrs(DV, b, h, kpy, kpx, ry, rx, DH, DW, sob, soh, sow, son, offs_d),
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _na2d_bwd_drpb_kernel(Q, K, V, RPB, DO, LSE, DELTA, DRPB, PARTIAL,
                          sqb, sqh, sqw, sqn, skb, skh, skw, skn, svb, svh, svw, svn, sob, soh, sow, son, srn, sry,
                          B, H, W, NH, D, DH, DW, tiles_y, tiles_x, kblocks_y, kblocks_x, qk_scale,
                          KH: tl.constexpr, KW: tl.constexpr, BY: tl.constexpr, BX: tl.constexpr,
                          KBY: tl.constexpr, KBX: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_A: tl.constexpr, DETERMINISTIC: tl.constexpr, DOT_PREC: tl.constexpr):
    """d_rpb[h, a, c] = sum of dS over pairs with offset (a, c). One program per (head, query tile, key
    block of the tile's rectangle) sums dS over the batch, then bins it: first over column offsets
    (a masked [BY, BX, KBY, KBX] reduction per c), then over row offsets (BLOCK_A >= 2*KH-1 at once), so
    each program adds (2*KH-1)*(2*KW-1) values, not one per score."""
    n_tiles = DH * DW * tiles_y * tiles_x
    pid = tl.program_id(0)
    kb = pid % (kblocks_y * kblocks_x)
    t = pid // (kblocks_y * kblocks_x)
    h = t // n_tiles
    ry, rx, ty, tx, sub_h, sub_w = _decode_tile(t % n_tiles, H, W, DH, DW, tiles_y, tiles_x)

    offs_m = tl.arange(0, BY * BX)
    qpy, qpx = ty * BY + offs_m // BX, tx * BX + offs_m % BX
    q_valid = (qpy < sub_h) & (qpx < sub_w)
    qpy, qpx = tl.minimum(qpy, sub_h - 1), tl.minimum(qpx, sub_w - 1)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D

    y_lo = _win_start(tl.minimum(ty * BY, sub_h - 1), sub_h, KH)
    y_hi = _win_start(tl.minimum(ty * BY + BY - 1, sub_h - 1), sub_h, KH) + KH
    x_lo = _win_start(tl.minimum(tx * BX, sub_w - 1), sub_w, KW)
    x_hi = _win_start(tl.minimum(tx * BX + BX - 1, sub_w - 1), sub_w, KW) + KW
    offs_n = tl.arange(0, KBY * KBX)
    kpy = y_lo + (kb // kblocks_x) * KBY + offs_n // KBX
    kpx = x_lo + (kb % kblocks_x) * KBX + offs_n % KBX
    k_in = (kpy < y_hi) & (kpx < x_hi)
    kpy, kpx = tl.minimum(kpy, y_hi - 1), tl.minimum(kpx, x_hi - 1)

    acc = tl.zeros([BY * BX, KBY * KBX], tl.float32)  # dS summed over the batch
    for b_it in range(0, B):
        b = b_it + tl.zeros([], tl.int64)  # a tensor in compiled and interpreted runs alike
        bh = b * NH + h
        q = tl.load(_tile_ptrs(Q, b, h, qpy, qpx, ry, rx, DH, DW, sqb, sqh, sqw, sqn, offs_d),
                    mask=d_mask[None, :], other=0.0)
        do = tl.load(_tile_ptrs(DO, b, h, qpy, qpx, ry, rx, DH, DW, sob, soh, sow, son, offs_d),
                     mask=d_mask[None, :], other=0.0)
        lse_off = (bh.to(tl.int64) * H + qpy * DH + ry) * W + qpx * DW + rx
        lse = tl.load(LSE + lse_off)
        delta = tl.load(DELTA + lse_off)
        k = tl.load(_tile_ptrs(K, b, h, kpy, kpx, ry, rx, DH, DW, skb, skh, skw, skn, offs_d),
                    mask=d_mask[None, :], other=0.0)
        v = tl.load(_tile_ptrs(V, b, h, kpy, kpx, ry, rx, DH, DW, svb, svh, svw, svn, offs_d),
                    mask=d_mask[None, :], other=0.0)
        s, _ = _scores(q, k, qpy, qpx, kpy, kpx, sub_h, sub_w, RPB, h, srn, sry, qk_scale, KH, KW, True, DOT_PREC)
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        acc += p * (dp - delta[:, None])

    # Only real query/key pairs count (padding rows/columns were clamped duplicates).
    acc = tl.where(q_valid[:, None] & k_in[None, :], acc, 0.0)
    bx = kpx[None, :] - qpx[:, None] + KW - 1  # [M, N] column offset index
    key_rows = y_lo + (kb // kblocks_x) * KBY + tl.arange(0, KBY)
    query_rows = ty * BY + tl.arange(0, BY)
    by = key_rows[None, :] - query_rows[:, None] + KH - 1  # [BY, KBY] row offset index
    offs_a = tl.arange(0, BLOCK_A)
    for c in range(0, 2 * KW - 1):
        col = tl.reshape(tl.where(bx == c, acc, 0.0), (BY, BX, KBY, KBX))
        col = tl.sum(tl.sum(col, 3), 1)  # [BY, KBY]: dS with column offset c, per (query row, key row)
        vals = tl.sum(tl.sum(tl.where(by[:, :, None] == offs_a[None, None, :], col[:, :, None], 0.0), 0), 0)
        idx = offs_a * (2 * KW - 1) + c  # bins (a, c) for every row offset a
        if DETERMINISTIC:
            tl.store(PARTIAL + pid.to(tl.int64) * ((2 * KH - 1) * (2 * KW - 1)) + idx, vals, mask=offs_a < 2 * KH - 1)
        else:
            tl.atomic_add(DRPB + h * ((2 * KH - 1) * (2 * KW - 1)) + idx, vals, mask=offs_a < 2 * KH - 1)


# ------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tiles:
    """Block shapes on a dilation sub-grid: query tile BY x BX, key block KBY x KBX (forward and dq),
    key tile BY x BX with query blocks KBY x KBX (dk/dv), plus launch settings."""
    BY: int
    BX: int
    KBY: int
    KBX: int
    num_warps: int = 4
    num_stages: int = 2


def _p2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _tiles(sub_h: int, sub_w: int, kernel_size: tuple[int, int], head_dim: int) -> Tiles:
    """Tile shapes for sub-grids of ``sub_h x sub_w`` (the largest residue's). Measured on an H200
    (benchmarks/NOTES_na2d.md): 8 x 8 query tiles beat 16 x 8 and larger ones by 1.5-2.8x, because the
    rectangle of keys a tile must score grows as (8 + k - 1) x (8 + k - 1) per 64 queries; key blocks
    of 64 (head_dim <= 32) or 32 points keep registers in bounds. Every dot stays >= 16 wide."""
    bx, by = min(8, _p2(sub_w)), min(8, _p2(sub_h))
    kbx = min(_p2(bx + kernel_size[1] - 1), 32)
    kby = max(1, (64 if head_dim <= 32 else 32) // kbx)
    return Tiles(by, bx, kby, kbx, num_warps=4, num_stages=2)


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _prep(t: torch.Tensor) -> torch.Tensor:
    """Kernels need unit stride on head_dim; anything else is kept as a strided view."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 products follow PyTorch's TF32 switch for matmuls (off by default: exact fp32)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _launch_args(q: torch.Tensor, dilation: tuple[int, int], kernel_size: tuple[int, int], tiles: Tiles | None):
    """Tiles (defaulted), tile counts and the launch grid size over all (batch, head, residue, tile)."""
    B, H, W, N, D = q.shape
    dh, dw = dilation
    sub_h, sub_w = -(-H // dh), -(-W // dw)  # residue 0 has the longest sub-grid
    tiles = tiles or _tiles(sub_h, sub_w, kernel_size, D)
    tiles_y, tiles_x = triton.cdiv(sub_h, tiles.BY), triton.cdiv(sub_w, tiles.BX)
    return tiles, tiles_y, tiles_x, dh * dw * tiles_y * tiles_x


def _rpb_args(rpb: torch.Tensor | None, like: torch.Tensor):
    if rpb is None:
        return like, 0, 0  # never read: HAS_RPB=False
    rpb = rpb.contiguous()
    return rpb, rpb.stride(0), rpb.stride(1)


def _common(q: torch.Tensor, kernel_size: tuple[int, int]) -> dict:
    return dict(KH=kernel_size[0], KW=kernel_size[1], BLOCK_D=max(16, _p2(q.shape[-1])),
                DOT_PREC=_dot_precision(q.dtype))


def na2d_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: torch.Tensor | None,
                 kernel_size: tuple[int, int], dilation: tuple[int, int], scale: float, tiles: Tiles | None = None):
    """Fused forward on validated inputs: ``(out [B, H, W, heads, D] contiguous, lse [B, heads, H, W] fp32)``."""
    q, k, v = _prep(q), _prep(k), _prep(v)
    B, H, W, N, D = q.shape
    out = torch.empty((B, H, W, N, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, N, H, W), dtype=torch.float32, device=q.device)
    t, tiles_y, tiles_x, n_tiles = _launch_args(q, dilation, kernel_size, tiles)
    rpb_t, srn, sry = _rpb_args(rpb, q)
    _na2d_fwd_kernel[(B * N * n_tiles,)](
        q, k, v, rpb_t, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out), srn, sry,
        H, W, N, D, dilation[0], dilation[1], tiles_y, tiles_x, scale * LOG2E,
        BY=t.BY, BX=t.BX, KBY=t.KBY, KBX=t.KBX, HAS_RPB=rpb is not None, **_common(q, kernel_size),
        num_warps=t.num_warps, num_stages=t.num_stages)
    return out, lse


def na2d_backward_dq(dout, q, k, v, rpb, lse, delta, kernel_size, dilation, scale, tiles: Tiles | None = None):
    """dq (contiguous) from the saved lse and delta = rowsum(dO * O); inputs already prepared."""
    B, H, W, N, D = q.shape
    dq = torch.empty((B, H, W, N, D), dtype=q.dtype, device=q.device)
    t, tiles_y, tiles_x, n_tiles = _launch_args(q, dilation, kernel_size, tiles)
    rpb_t, srn, sry = _rpb_args(rpb, q)
    _na2d_bwd_dq_kernel[(B * N * n_tiles,)](
        q, k, v, rpb_t, dout, lse, delta, dq, *_strides(q), *_strides(k), *_strides(v), *_strides(dq), srn, sry,
        H, W, N, D, dilation[0], dilation[1], tiles_y, tiles_x, scale * LOG2E, scale,
        BY=t.BY, BX=t.BX, KBY=t.KBY, KBX=t.KBX, HAS_RPB=rpb is not None, **_common(q, kernel_size),
        num_warps=t.num_warps, num_stages=t.num_stages)
    return dq


def na2d_backward_dkdv(dout, q, k, v, rpb, lse, delta, kernel_size, dilation, scale, tiles: Tiles | None = None):
    """(dk, dv), contiguous, one program per key tile over its inverse neighbourhood."""
    B, H, W, N, D = q.shape
    dk, dv = (torch.empty((B, H, W, N, D), dtype=q.dtype, device=q.device) for _ in range(2))
    t, tiles_y, tiles_x, n_tiles = _launch_args(q, dilation, kernel_size, tiles)
    rpb_t, srn, sry = _rpb_args(rpb, q)
    _na2d_bwd_dkdv_kernel[(B * N * n_tiles,)](
        q, k, v, rpb_t, dout, lse, delta, dk, dv, *_strides(q), *_strides(k), *_strides(v), *_strides(dk), srn, sry,
        H, W, N, D, dilation[0], dilation[1], tiles_y, tiles_x, scale * LOG2E, scale,
        BY=t.BY, BX=t.BX, QBY=t.KBY, QBX=t.KBX, HAS_RPB=rpb is not None, **_common(q, kernel_size),
        num_warps=t.num_warps, num_stages=t.num_stages)
    return dk, dv


def na2d_backward_drpb(dout, q, k, v, rpb, lse, delta, kernel_size, dilation, scale, deterministic: bool,
                       tiles: Tiles | None = None):
    """d_rpb (float32, rpb's shape): batch-summed dS binned by offset; no float atomics if deterministic."""
    B, H, W, N, D = q.shape
    t, tiles_y, tiles_x, n_tiles = _launch_args(q, dilation, kernel_size, tiles)
    sub_h, sub_w = -(-H // dilation[0]), -(-W // dilation[1])
    kblocks_y = triton.cdiv(min(t.BY + kernel_size[0] - 1, sub_h), t.KBY)  # key blocks per tile rectangle
    kblocks_x = triton.cdiv(min(t.BX + kernel_size[1] - 1, sub_w), t.KBX)
    grid = N * n_tiles * kblocks_y * kblocks_x
    bins = (2 * kernel_size[0] - 1) * (2 * kernel_size[1] - 1)
    drpb = torch.zeros((N, bins), dtype=torch.float32, device=q.device)
    partial = torch.empty((grid, bins) if deterministic else (0,), dtype=torch.float32, device=q.device)
    rpb_t, srn, sry = _rpb_args(rpb, q)
    _na2d_bwd_drpb_kernel[(grid,)](
        q, k, v, rpb_t, dout, lse, delta, drpb, partial, *_strides(q), *_strides(k), *_strides(v), *_strides(dout),
        srn, sry, B, H, W, N, D, dilation[0], dilation[1], tiles_y, tiles_x, kblocks_y, kblocks_x, scale * LOG2E,
        BY=t.BY, BX=t.BX, KBY=t.KBY, KBX=t.KBX, BLOCK_A=_p2(2 * kernel_size[0] - 1), DETERMINISTIC=deterministic,
        **_common(q, kernel_size), num_warps=t.num_warps, num_stages=t.num_stages)
    if deterministic:
        drpb = partial.view(N, -1, bins).sum(1)
    return drpb.view(N, 2 * kernel_size[0] - 1, 2 * kernel_size[1] - 1)


def na2d_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: torch.Tensor | None,
                  out: torch.Tensor, lse: torch.Tensor, kernel_size: tuple[int, int], dilation: tuple[int, int],
                  scale: float, rpb_grad: bool, deterministic: bool, tiles: dict[str, Tiles] | None = None):
    """Fused backward: ``(dq, dk, dv, drpb)``; drpb is an empty tensor unless ``rpb_grad``. ``tiles`` maps
    "dq", "dkdv", "drpb" to tile shapes (benchmark tuning); missing kinds use the defaults."""
    q, k, v = _prep(q), _prep(k), _prep(v)
    dout = dout.contiguous()
    tiles = tiles or {}
    delta = (dout.float() * out.float()).sum(-1).permute(0, 3, 1, 2).contiguous()  # rowsum(dO * O), [B, N, H, W]
    args = (dout, q, k, v, rpb, lse, delta, kernel_size, dilation, scale)
    dq = na2d_backward_dq(*args, tiles=tiles.get("dq"))
    dk, dv = na2d_backward_dkdv(*args, tiles=tiles.get("dkdv"))
    if not (rpb_grad and rpb is not None):
        return dq, dk, dv, q.new_empty((0,))
    return dq, dk, dv, na2d_backward_drpb(*args, deterministic, tiles=tiles.get("drpb")).to(rpb.dtype)
