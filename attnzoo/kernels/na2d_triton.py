"""Fused Triton 2-D neighborhood attention: one forward kernel, two backward kernels and d_rpb's reduction.

Structure (FNA-style). Dilation splits each axis into ``d`` interleaved sub-grids that never attend to
each other, so every program works on one sub-grid of one head for ``IMGS`` (1 or 2) images of the batch; two
images share each block's indices, window masks and gathered bias (``choose_tiles`` picks per kernel):

* forward: one program per tile of ``BY x BX`` queries. Window starts are monotone in the query
  position, so the union of the tile's neighbourhoods is a rectangle of at most
  ``(BY + kh - 1) x (BX + kw - 1)`` keys; one flat loop reads it in ``KBY x KBX`` key blocks straight
  from k/v (no gathered copies), masks non-neighbours and keeps an online softmax. It saves the
  log-sum-exp (fp32, base 2) for the backward.
* backward dq (+ delta, + dS for d_rpb): the forward's tiling. It computes ``delta = rowsum(dO * O)`` for
  its queries (stored for the dk/dv kernel), dq, and, when the bias needs a gradient, dS at each score's
  window offset summed over the program's images, ``[cdiv(B, IMGS), heads, H, kh, W, kw + 1]`` (every entry
  written exactly once, in 4-byte pairs of keys: no in-kernel binning).
* backward dk/dv: one program per tile of keys, looping over the rectangle of queries whose windows can
  hold them (the inverse neighbourhood), in the transposed orientation (``k @ q^T``: keys are rows, so
  dv and dk accumulate without transposing p or dS). Every gradient element is written once.
* d_rpb: a reduction kernel sums dq's window-layout dS over slices of the batch and bins each block by
  relative offset (two one-hot products); the host sums the partials: deterministic, no atomics, no extra
  pass over q/k/v.

Relative position bias: each program loads its head's whole ``(2kh-1) x (2kw-1)`` table once (padded to
``TBL``, a power of two, log2(e) folded in) and picks each score's bias with ``tl.gather``.

Scores live in the base-2 domain: ``s2 = (scale * q.k + rpb) * log2(e)``, so softmax uses ``exp2``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from attnzoo.kernels._op import Launcher

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
def _decode_tile(pid, H, W, NH: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, BY: tl.constexpr,
                 BX: tl.constexpr):
    """Program id -> (image group, head, row residue, column residue, tile row, tile column, sub-grid h, w)."""
    tiles_y = tl.cdiv(tl.cdiv(H, DH), BY)  # residue 0 has the longest sub-grid
    tiles_x = tl.cdiv(tl.cdiv(W, DW), BX)
    n_tiles = DH * DW * tiles_y * tiles_x
    bh = pid // n_tiles
    t = pid % n_tiles
    tx = t % tiles_x
    t = t // tiles_x
    ty = t % tiles_y
    t = t // tiles_y
    rx = t % DW
    ry = t // DW
    sub_h = (H - ry + DH - 1) // DH
    sub_w = (W - rx + DW - 1) // DW
    return bh // NH, bh % NH, ry, rx, ty, tx, sub_h, sub_w


@triton.jit
def _tile_ptrs(base, b, h, py, px, ry, rx, DH, DW, sb, sh, sw, sn, offs_d):
    """Pointers ``[len(py), BLOCK_D]`` to the rows of sub-grid points (py, px) for batch b, head h."""
    row = b.to(tl.int64) * sb + (py * DH + ry).to(tl.int64) * sh + (px * DW + rx).to(tl.int64) * sw + h * sn
    return base + row[:, None] + offs_d[None, :]


@triton.jit
def _lse_offsets(b, h, NH, H, W, py, px, ry, rx, DH, DW):
    """Offsets of sub-grid points (py, px) in a ``[B, heads, H, W]`` fp32 buffer (lse, delta)."""
    return ((b * NH + h).to(tl.int64) * H + py * DH + ry) * W + px * DW + rx


@triton.jit
def _load_table(RPB, h, srn, KH: tl.constexpr, KW: tl.constexpr, TBL: tl.constexpr):
    """The head's bias table, flattened ``[TBL]`` fp32 in the base-2 domain (padding entries are 0)."""
    offs = tl.arange(0, TBL)
    table = tl.load(RPB + h * srn + offs, mask=offs < (2 * KH - 1) * (2 * KW - 1), other=0.0)
    return table.to(tl.float32) * 1.4426950408889634


@triton.jit
def _in_window(d, KS: tl.constexpr):
    """``0 <= d < KS`` as one unsigned compare (negative offsets wrap to large values)."""
    return d.to(tl.uint32) < KS


@triton.jit
def _table_coord(py, px, KW: tl.constexpr):
    """A point's coordinate in the flattened bias table: the pair (query, key) reads entry
    ``key_coord - query_coord + centre``, so the index of a whole score tile is one subtraction."""
    return py * (2 * KW - 1) + px


@triton.jit
def _query_coord(py, px, KH: tl.constexpr, KW: tl.constexpr):
    """A query's table coordinate minus the table centre (``_table_coord`` of the offset (kh-1, kw-1))."""
    return _table_coord(py, px, KW) - ((KH - 1) * (2 * KW - 1) + KW - 1)


@triton.jit
def _gather_bias(table, key_c, query_c, M: tl.constexpr, N: tl.constexpr, TBL: tl.constexpr):
    """Bias ``[M, N]`` of the pairs ``key_c - query_c`` (``[M, N]`` by broadcasting). Indices off the window
    are wrapped into the table by the mask ``TBL - 1``: their values are garbage, and their scores are masked."""
    idx = (key_c - query_c) & (TBL - 1)
    return tl.reshape(tl.gather(table, tl.reshape(idx, (M * N,)), 0), (M, N))


@triton.jit
def _query_tile(ty, tx, sub_h, sub_w, BY: tl.constexpr, BX: tl.constexpr):
    """Sub-grid points of a ``BY x BX`` tile, row-major; padding repeats the last point (never stored)."""
    offs = tl.arange(0, BY * BX)
    py, px = ty * BY + offs // BX, tx * BX + offs % BX
    valid = (py < sub_h) & (px < sub_w)
    return tl.minimum(py, sub_h - 1), tl.minimum(px, sub_w - 1), valid


@triton.jit
def _key_rect(ty, tx, sub_h, sub_w, KH: tl.constexpr, KW: tl.constexpr, BY: tl.constexpr, BX: tl.constexpr):
    """Rectangle ``[y_lo, y_hi) x [x_lo, x_hi)`` holding every neighbourhood of a query tile."""
    y_lo = _win_start(tl.minimum(ty * BY, sub_h - 1), sub_h, KH)
    y_hi = _win_start(tl.minimum(ty * BY + BY - 1, sub_h - 1), sub_h, KH) + KH
    x_lo = _win_start(tl.minimum(tx * BX, sub_w - 1), sub_w, KW)
    x_hi = _win_start(tl.minimum(tx * BX + BX - 1, sub_w - 1), sub_w, KW) + KW
    return y_lo, y_hi, x_lo, x_hi


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_block(q, K, V, b, h, kpy, kpx, ry, rx, DH, DW, skb, skh, skw, skn, svb, svh, svw, svn, offs_d, k_in,
               nb, bias, m_i, l_i, acc, qk_scale, HAS_RPB: tl.constexpr, DOT_PREC: tl.constexpr):
    """One image's online-softmax step over one key block: k/v tiles [KBY*KBX, BLOCK_D] of batch b."""
    k = tl.load(_tile_ptrs(K, b, h, kpy, kpx, ry, rx, DH, DW, skb, skh, skw, skn, offs_d), mask=k_in, other=0.0)
    v = tl.load(_tile_ptrs(V, b, h, kpy, kpx, ry, rx, DH, DW, svb, svh, svw, svn, offs_d), mask=k_in, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # scores [BY*BX, KBY*KBX]
    if HAS_RPB:
        s += bias
    s = tl.where(nb, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit
def _fwd_store(O, LSE, b, h, NH, H, W, qpy, qpx, ry, rx, DH, DW, sob, soh, sow, son, offs_d, d_mask, row_ok,
               m_i, l_i, acc):
    """One image's output rows and log-sum-exp (base 2), for the rows in ``row_ok``."""
    tl.store(_tile_ptrs(O, b, h, qpy, qpx, ry, rx, DH, DW, sob, soh, sow, son, offs_d),
             (acc / l_i[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None] & d_mask[None, :])
    tl.store(LSE + _lse_offsets(b, h, NH, H, W, qpy, qpx, ry, rx, DH, DW), m_i + tl.math.log2(l_i), mask=row_ok)


@triton.jit
def _na2d_fwd_kernel(Q, K, V, RPB, O, LSE,
                     sqb, sqh, sqw, sqn, skb, skh, skw, skn, svb, svh, svw, svn, sob, soh, sow, son, srn,
                     B, H, W, qk_scale, NH: tl.constexpr, D: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                     KH: tl.constexpr, KW: tl.constexpr, BY: tl.constexpr, BX: tl.constexpr,
                     KBY: tl.constexpr, KBX: tl.constexpr, BLOCK_D: tl.constexpr, TBL: tl.constexpr,
                     IMGS: tl.constexpr, HAS_RPB: tl.constexpr, DOT_PREC: tl.constexpr):
    """IMGS (1 or 2) images per program share the key blocks' indices, masks and gathered bias."""
    tl.static_assert(IMGS == 1 or IMGS == 2)
    g, h, ry, rx, ty, tx, sub_h, sub_w = _decode_tile(tl.program_id(0), H, W, NH, DH, DW, BY, BX)
    b0 = g * IMGS
    qk_scale = tl.cast(qk_scale, tl.float32)  # compiled models pass unspecialised Python floats as fp64
    qpy, qpx, q_valid = _query_tile(ty, tx, sub_h, sub_w, BY, BX)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    # q tile [BY*BX, BLOCK_D] per image; m_i running max (finite: fully masked blocks stay NaN-free), l_i running
    # sum of exp2(s - m_i), acc running sum of p @ v
    q0 = tl.load(_tile_ptrs(Q, b0, h, qpy, qpx, ry, rx, DH, DW, sqb, sqh, sqw, sqn, offs_d), mask=d_mask[None, :],
                 other=0.0)
    m0, l0 = tl.full([BY * BX], -1.0e30, tl.float32), tl.zeros([BY * BX], tl.float32)
    acc0 = tl.zeros([BY * BX, BLOCK_D], tl.float32)
    if IMGS == 2:
        b1 = b0 + 1
        ok1 = b1 < B  # an odd batch leaves the last program one image
        q1 = tl.load(_tile_ptrs(Q, b1, h, qpy, qpx, ry, rx, DH, DW, sqb, sqh, sqw, sqn, offs_d),
                     mask=d_mask[None, :] & ok1, other=0.0)
        m1, l1 = tl.full([BY * BX], -1.0e30, tl.float32), tl.zeros([BY * BX], tl.float32)
        acc1 = tl.zeros([BY * BX, BLOCK_D], tl.float32)
    q_wy, q_wx = _win_start(qpy, sub_h, KH), _win_start(qpx, sub_w, KW)
    if HAS_RPB:
        table = _load_table(RPB, h, srn, KH, KW, TBL)
        q_c = _query_coord(qpy, qpx, KH, KW)
    y_lo, y_hi, x_lo, x_hi = _key_rect(ty, tx, sub_h, sub_w, KH, KW, BY, BX)

    offs_n = tl.arange(0, KBY * KBX)
    n_kx = tl.cdiv(x_hi - x_lo, KBX)
    for blk in range(0, tl.cdiv(y_hi - y_lo, KBY) * n_kx):
        # key block: KBY x KBX sub-grid points of the rectangle; its masks and bias serve every image
        kpy = y_lo + (blk // n_kx) * KBY + offs_n // KBX
        kpx = x_lo + (blk % n_kx) * KBX + offs_n % KBX
        k_in = ((kpy < y_hi) & (kpx < x_hi))[:, None] & d_mask[None, :]
        nb = _in_window(kpy[None, :] - q_wy[:, None], KH) & _in_window(kpx[None, :] - q_wx[:, None], KW)
        if HAS_RPB:
            bias = _gather_bias(table, _table_coord(kpy, kpx, KW)[None, :], q_c[:, None], BY * BX, KBY * KBX, TBL)
        else:
            bias = nb  # not read without a bias
        m0, l0, acc0 = _fwd_block(q0, K, V, b0, h, kpy, kpx, ry, rx, DH, DW, skb, skh, skw, skn, svb, svh, svw, svn,
                                  offs_d, k_in, nb, bias, m0, l0, acc0, qk_scale, HAS_RPB, DOT_PREC)
        if IMGS == 2:
            m1, l1, acc1 = _fwd_block(q1, K, V, b1, h, kpy, kpx, ry, rx, DH, DW, skb, skh, skw, skn, svb, svh, svw,
                                      svn, offs_d, k_in & ok1, nb, bias, m1, l1, acc1, qk_scale, HAS_RPB, DOT_PREC)

    _fwd_store(O, LSE, b0, h, NH, H, W, qpy, qpx, ry, rx, DH, DW, sob, soh, sow, son, offs_d, d_mask, q_valid,
               m0, l0, acc0)
    if IMGS == 2:
        _fwd_store(O, LSE, b1, h, NH, H, W, qpy, qpx, ry, rx, DH, DW, sob, soh, sow, son, offs_d, d_mask, q_valid & ok1,
                   m1, l1, acc1)


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------
@triton.jit
def _dq_prologue(Q, DO, O, LSE, DELTA, b, h, NH, H, W, qpy, qpx, ry, rx, DH, DW, sqb, sqh, sqw, sqn, sob, soh, sow,
                 son, offs_d, d_mask, row_ok, ok, MAY_SKIP: tl.constexpr):
    """One image's q and dO tiles ``[BY*BX, BLOCK_D]``, its lse and delta = rowsum(dO * O) (fp32; stored for the
    dk/dv kernel). With MAY_SKIP, an image past the batch (``ok`` false) loads zeros and lse = inf, so its p and dS
    are 0 (the program's first image is always in the batch: its loads keep their plain masks)."""
    m = d_mask[None, :]
    if MAY_SKIP:
        m = m & ok
        row_ok = row_ok & ok
    q = tl.load(_tile_ptrs(Q, b, h, qpy, qpx, ry, rx, DH, DW, sqb, sqh, sqw, sqn, offs_d), mask=m, other=0.0)
    do = tl.load(_tile_ptrs(DO, b, h, qpy, qpx, ry, rx, DH, DW, sob, soh, sow, son, offs_d), mask=m, other=0.0)
    o = tl.load(_tile_ptrs(O, b, h, qpy, qpx, ry, rx, DH, DW, sob, soh, sow, son, offs_d), mask=m, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    lse_off = _lse_offsets(b, h, NH, H, W, qpy, qpx, ry, rx, DH, DW)
    tl.store(DELTA + lse_off, delta, mask=row_ok)
    if MAY_SKIP:
        lse = tl.load(LSE + lse_off, mask=ok, other=float("inf"))
    else:
        lse = tl.load(LSE + lse_off)
    return q, do, lse, delta


@triton.jit
def _dq_block(q, do, lse, delta, K, V, b, h, kpy, kpx, ry, rx, DH, DW, skb, skh, skw, skn, svb, svh, svw, svn,
              offs_d, k_in, nb, bias, dq, qk_scale, HAS_RPB: tl.constexpr, DOT_PREC: tl.constexpr):
    """One image's step over one key block: ``(dq + dS @ k, dS)`` with dS ``[BY*BX, KBY*KBX]`` fp32."""
    k = tl.load(_tile_ptrs(K, b, h, kpy, kpx, ry, rx, DH, DW, skb, skh, skw, skn, offs_d), mask=k_in, other=0.0)
    v = tl.load(_tile_ptrs(V, b, h, kpy, kpx, ry, rx, DH, DW, svb, svh, svw, svn, offs_d), mask=k_in, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if HAS_RPB:
        s += bias
    p = tl.where(nb, tl.math.exp2(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC), ds


@triton.jit
def _na2d_bwd_dq_kernel(Q, K, V, RPB, O, DO, LSE, DELTA, DQ, DSNB,
                        sqb, sqh, sqw, sqn, skb, skh, skw, skn, svb, svh, svw, svn, sob, soh, sow, son, srn,
                        B, H, W, qk_scale, sm_scale, NH: tl.constexpr, D: tl.constexpr, DH: tl.constexpr,
                        DW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, BY: tl.constexpr, BX: tl.constexpr,
                        KBY: tl.constexpr, KBX: tl.constexpr, BLOCK_D: tl.constexpr, TBL: tl.constexpr,
                        IMGS: tl.constexpr, HAS_RPB: tl.constexpr, RPB_GRAD: tl.constexpr, DOT_PREC: tl.constexpr):
    """dq = scale * sum_j dS_ij k_j; also delta (stored for dk/dv) and, for d_rpb, dS in window layout
    (DSNB, ``[cdiv(B, IMGS), heads, H, kh, W, kw + 1]`` contiguous: the program's IMGS images summed, so one store
    serves them all). O, DO and DQ share the contiguous output strides (sob..son)."""
    tl.static_assert(IMGS == 1 or IMGS == 2)
    g, h, ry, rx, ty, tx, sub_h, sub_w = _decode_tile(tl.program_id(0), H, W, NH, DH, DW, BY, BX)
    b0 = g * IMGS
    qk_scale = tl.cast(qk_scale, tl.float32)  # compiled models pass unspecialised Python floats as fp64
    qpy, qpx, q_valid = _query_tile(ty, tx, sub_h, sub_w, BY, BX)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q0, do0, lse0, delta0 = _dq_prologue(Q, DO, O, LSE, DELTA, b0, h, NH, H, W, qpy, qpx, ry, rx, DH, DW, sqb, sqh,
                                         sqw, sqn, sob, soh, sow, son, offs_d, d_mask, q_valid, True, False)
    dq0 = tl.zeros([BY * BX, BLOCK_D], tl.float32)
    if IMGS == 2:
        b1 = b0 + 1
        ok1 = b1 < B  # an odd batch leaves the last program one image
        q1, do1, lse1, delta1 = _dq_prologue(Q, DO, O, LSE, DELTA, b1, h, NH, H, W, qpy, qpx, ry, rx, DH, DW, sqb,
                                             sqh, sqw, sqn, sob, soh, sow, son, offs_d, d_mask, q_valid, ok1, True)
        dq1 = tl.zeros([BY * BX, BLOCK_D], tl.float32)
    q_wy, q_wx = _win_start(qpy, sub_h, KH), _win_start(qpx, sub_w, KW)
    if HAS_RPB:
        table = _load_table(RPB, h, srn, KH, KW, TBL)
        q_c = _query_coord(qpy, qpx, KH, KW)
    y_lo, y_hi, x_lo, x_hi = _key_rect(ty, tx, sub_h, sub_w, KH, KW, BY, BX)
    if RPB_GRAD:
        # dS goes to DSNB [cdiv(B, IMGS), heads, H, KH, W, KW + 1] in pairs of adjacent keys (one 4-byte store each):
        # the query at full resolution (qy, qx) keeps key (ky, kx) of its window at row ky - wy, slot kx - wx_even
        # (wx_even = wx rounded down to even), so pairs of keys starting at even columns fill aligned pairs of
        # slots and a pair that overlaps the window stays inside the query's KW + 1 slots; its key outside the
        # window stores p = 0. The offset ((qy * KH + ky - wy) * W + qx) * (KW + 1) + kx - wx_even is a query
        # part plus a key part; the program's first query row goes into a 64-bit base pointer and y_lo moves
        # between the parts, so both fit int32.
        tl.static_assert(KW % 2 == 1 and KBX % 2 == 0)
        x_lo = x_lo // 2 * 2  # key blocks start at even columns
        qy0 = ty * BY * DH + ry
        ds_base = DSNB + ((g * NH + h).to(tl.int64) * H + qy0) * KH * W * (KW + 1)
        ds_q = (((qpy * DH + ry - qy0) * KH - (q_wy - y_lo)) * (W * (KW + 1)) + (qpx * DW + rx) * (KW + 1)
                - q_wx // 2 * 2)  # [BY*BX]
        ds_keep = q_valid[:, None]  # padded query rows are clamped duplicates: written by their owner

    offs_n = tl.arange(0, KBY * KBX)
    n_kx = tl.cdiv(x_hi - x_lo, KBX)
    for blk in range(0, tl.cdiv(y_hi - y_lo, KBY) * n_kx):
        # key block: KBY x KBX sub-grid points of the rectangle; its masks and bias serve every image
        ky0 = y_lo + (blk // n_kx) * KBY
        kx0 = x_lo + (blk % n_kx) * KBX
        kpy, kpx = ky0 + offs_n // KBX, kx0 + offs_n % KBX
        k_in = ((kpy < y_hi) & (kpx < x_hi))[:, None] & d_mask[None, :]
        nb_y = _in_window(kpy[None, :] - q_wy[:, None], KH)
        nb = nb_y & _in_window(kpx[None, :] - q_wx[:, None], KW)
        if HAS_RPB:
            bias = _gather_bias(table, _table_coord(kpy, kpx, KW)[None, :], q_c[:, None], BY * BX, KBY * KBX, TBL)
        else:
            bias = nb  # not read without a bias
        dq0, ds = _dq_block(q0, do0, lse0, delta0, K, V, b0, h, kpy, kpx, ry, rx, DH, DW, skb, skh, skw, skn, svb, svh,
                            svw, svn, offs_d, k_in, nb, bias, dq0, qk_scale, HAS_RPB, DOT_PREC)
        if IMGS == 2:
            dq1, ds1 = _dq_block(q1, do1, lse1, delta1, K, V, b1, h, kpy, kpx, ry, rx, DH, DW, skb, skh, skw, skn, svb,
                                 svh, svw, svn, offs_d, k_in & ok1, nb, bias, dq1, qk_scale, HAS_RPB, DOT_PREC)
            ds += ds1
        if RPB_GRAD:
            ds_k = (kpy - y_lo) * (W * (KW + 1)) + kpx  # [KBY*KBX]
            # the pair meets the window; its first key written as offs_n // 2 * 2 so that Triton sees the mask
            # constant over pairs (the store vectorizes)
            pair_nb = nb_y & _in_window((kx0 + offs_n // 2 * 2 % KBX)[None, :] - q_wx[:, None] + 1, KW + 1)
            tl.store(ds_base + (ds_q[:, None] + ds_k[None, :]), ds.to(DSNB.dtype.element_ty), mask=pair_nb & ds_keep)

    dq_mask = q_valid[:, None] & d_mask[None, :]
    tl.store(_tile_ptrs(DQ, b0, h, qpy, qpx, ry, rx, DH, DW, sob, soh, sow, son, offs_d),
             (dq0 * sm_scale).to(DQ.dtype.element_ty), mask=dq_mask)
    if IMGS == 2:
        tl.store(_tile_ptrs(DQ, b1, h, qpy, qpx, ry, rx, DH, DW, sob, soh, sow, son, offs_d),
                 (dq1 * sm_scale).to(DQ.dtype.element_ty), mask=dq_mask & ok1)


@triton.jit
def _dkdv_loads(Q, DO, LSE, DELTA, b, h, NH, H, W, qpy, qpx, ry, rx, DH, DW, sqb, sqh, sqw, sqn, sob, soh, sow, son,
                offs_d, d_mask, q_in, ok, MAY_SKIP: tl.constexpr):
    """One image's query block: q and dO tiles ``[QBY*QBX, BLOCK_D]``, lse and delta. With MAY_SKIP, an image past
    the batch (``ok`` false) loads zeros and lse = inf, so its p^T and dS^T are 0 (the program's first image is
    always in the batch: its loads keep their plain masks)."""
    q_ptrs = _tile_ptrs(Q, b, h, qpy, qpx, ry, rx, DH, DW, sqb, sqh, sqw, sqn, offs_d)
    do_ptrs = _tile_ptrs(DO, b, h, qpy, qpx, ry, rx, DH, DW, sob, soh, sow, son, offs_d)
    lse_off = _lse_offsets(b, h, NH, H, W, qpy, qpx, ry, rx, DH, DW)
    if MAY_SKIP:
        q = tl.load(q_ptrs, mask=d_mask[None, :] & ok, other=0.0)
        do = tl.load(do_ptrs, mask=(q_in & ok)[:, None] & d_mask[None, :], other=0.0)
        lse = tl.load(LSE + lse_off, mask=ok, other=float("inf"))
        delta = tl.load(DELTA + lse_off, mask=ok, other=0.0)
    else:
        q = tl.load(q_ptrs, mask=d_mask[None, :], other=0.0)
        do = tl.load(do_ptrs, mask=q_in[:, None] & d_mask[None, :], other=0.0)
        lse = tl.load(LSE + lse_off)
        delta = tl.load(DELTA + lse_off)
    return q, do, lse, delta


@triton.jit
def _dkdv_update(sT, v, q, do, lse, delta, nb, bias, dk, dv, HAS_RPB: tl.constexpr, DOT_PREC: tl.constexpr):
    """One image's step over one query block from its scaled scores ``sT = k @ q^T`` ([keys, queries]), keys as
    rows: ``(dk + dS^T @ q, dv + p^T @ dO)``."""
    if HAS_RPB:
        sT += bias
    pT = tl.where(nb, tl.math.exp2(sT - lse[None, :]), 0.0)
    dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    dsT = pT * (dpT - delta[None, :])
    return dk + tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PREC), dv


@triton.jit
def _dkdv_store(DK, DV, b, h, kpy, kpx, ry, rx, DH, DW, sob, soh, sow, son, offs_d, mask, dk, dv):
    """One image's dk and dv rows (dk already scaled)."""
    tl.store(_tile_ptrs(DK, b, h, kpy, kpx, ry, rx, DH, DW, sob, soh, sow, son, offs_d), dk.to(DK.dtype.element_ty),
             mask=mask)
    tl.store(_tile_ptrs(DV, b, h, kpy, kpx, ry, rx, DH, DW, sob, soh, sow, son, offs_d), dv.to(DV.dtype.element_ty),
             mask=mask)


@triton.jit
def _na2d_bwd_dkdv_kernel(Q, K, V, RPB, DO, LSE, DELTA, DK, DV,
                          sqb, sqh, sqw, sqn, skb, skh, skw, skn, svb, svh, svw, svn, sob, soh, sow, son, srn,
                          B, H, W, qk_scale, sm_scale, NH: tl.constexpr, D: tl.constexpr, DH: tl.constexpr,
                          DW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, BY: tl.constexpr, BX: tl.constexpr,
                          QBY: tl.constexpr, QBX: tl.constexpr, BLOCK_D: tl.constexpr, TBL: tl.constexpr,
                          IMGS: tl.constexpr, HAS_RPB: tl.constexpr, DOT_PREC: tl.constexpr):
    """dk, dv for a tile of BY x BX keys over the QBY x QBX query blocks of its inverse neighbourhood,
    keys as rows (s^T = k @ q^T), for IMGS (1 or 2) images sharing the blocks' indices, masks and gathered bias.
    DO, DK and DV share the contiguous output strides (sob..son)."""
    tl.static_assert(IMGS == 1 or IMGS == 2)
    g, h, ry, rx, ty, tx, sub_h, sub_w = _decode_tile(tl.program_id(0), H, W, NH, DH, DW, BY, BX)
    b0 = g * IMGS
    qk_scale = tl.cast(qk_scale, tl.float32)  # compiled models pass unspecialised Python floats as fp64
    kpy, kpx, k_valid = _query_tile(ty, tx, sub_h, sub_w, BY, BX)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    # k, v tiles [BY*BX, BLOCK_D] and the dk, dv accumulators per image
    k0 = tl.load(_tile_ptrs(K, b0, h, kpy, kpx, ry, rx, DH, DW, skb, skh, skw, skn, offs_d), mask=d_mask[None, :],
                 other=0.0)
    v0 = tl.load(_tile_ptrs(V, b0, h, kpy, kpx, ry, rx, DH, DW, svb, svh, svw, svn, offs_d), mask=d_mask[None, :],
                 other=0.0)
    dk0, dv0 = tl.zeros([BY * BX, BLOCK_D], tl.float32), tl.zeros([BY * BX, BLOCK_D], tl.float32)
    if IMGS == 2:
        b1 = b0 + 1
        ok1 = b1 < B  # an odd batch leaves the last program one image
        k1 = tl.load(_tile_ptrs(K, b1, h, kpy, kpx, ry, rx, DH, DW, skb, skh, skw, skn, offs_d),
                     mask=d_mask[None, :] & ok1, other=0.0)
        v1 = tl.load(_tile_ptrs(V, b1, h, kpy, kpx, ry, rx, DH, DW, svb, svh, svw, svn, offs_d),
                     mask=d_mask[None, :] & ok1, other=0.0)
        dk1, dv1 = tl.zeros([BY * BX, BLOCK_D], tl.float32), tl.zeros([BY * BX, BLOCK_D], tl.float32)
    if HAS_RPB:
        table = _load_table(RPB, h, srn, KH, KW, TBL)
        k_c = _table_coord(kpy, kpx, KW)
    # queries that can see any key of the tile: a rectangle, since window starts are monotone
    y_lo = _first_query(tl.minimum(ty * BY, sub_h - 1), KH)
    y_hi = _last_query(tl.minimum(ty * BY + BY - 1, sub_h - 1), sub_h, KH) + 1
    x_lo = _first_query(tl.minimum(tx * BX, sub_w - 1), KW)
    x_hi = _last_query(tl.minimum(tx * BX + BX - 1, sub_w - 1), sub_w, KW) + 1

    offs_m = tl.arange(0, QBY * QBX)
    n_qx = tl.cdiv(x_hi - x_lo, QBX)
    for blk in range(0, tl.cdiv(y_hi - y_lo, QBY) * n_qx):
        # query block: QBY x QBX sub-grid points; points past the rectangle are clamped and masked; its masks and
        # bias serve every image
        qpy = y_lo + (blk // n_qx) * QBY + offs_m // QBX
        qpx = x_lo + (blk % n_qx) * QBX + offs_m % QBX
        q_in = (qpy < y_hi) & (qpx < x_hi)
        qpy, qpx = tl.minimum(qpy, y_hi - 1), tl.minimum(qpx, x_hi - 1)
        q0, do0, lse0, delta0 = _dkdv_loads(Q, DO, LSE, DELTA, b0, h, NH, H, W, qpy, qpx, ry, rx, DH, DW, sqb, sqh,
                                            sqw, sqn, sob, soh, sow, son, offs_d, d_mask, q_in, True, False)
        if IMGS == 2:
            q1, do1, lse1, delta1 = _dkdv_loads(Q, DO, LSE, DELTA, b1, h, NH, H, W, qpy, qpx, ry, rx, DH, DW, sqb,
                                                sqh, sqw, sqn, sob, soh, sow, son, offs_d, d_mask, q_in, ok1, True)
        sT0 = tl.dot(k0, tl.trans(q0), input_precision=DOT_PREC) * qk_scale
        if IMGS == 2:
            sT1 = tl.dot(k1, tl.trans(q1), input_precision=DOT_PREC) * qk_scale
        nb = (_in_window(kpy[:, None] - _win_start(qpy, sub_h, KH)[None, :], KH)
              & _in_window(kpx[:, None] - _win_start(qpx, sub_w, KW)[None, :], KW) & q_in[None, :])
        if HAS_RPB:
            bias = _gather_bias(table, k_c[:, None], _query_coord(qpy, qpx, KH, KW)[None, :], BY * BX, QBY * QBX, TBL)
        else:
            bias = nb  # not read without a bias
        dk0, dv0 = _dkdv_update(sT0, v0, q0, do0, lse0, delta0, nb, bias, dk0, dv0, HAS_RPB, DOT_PREC)
        if IMGS == 2:
            dk1, dv1 = _dkdv_update(sT1, v1, q1, do1, lse1, delta1, nb, bias, dk1, dv1, HAS_RPB, DOT_PREC)

    kv_mask = k_valid[:, None] & d_mask[None, :]
    _dkdv_store(DK, DV, b0, h, kpy, kpx, ry, rx, DH, DW, sob, soh, sow, son, offs_d, kv_mask, dk0 * sm_scale, dv0)
    if IMGS == 2:
        _dkdv_store(DK, DV, b1, h, kpy, kpx, ry, rx, DH, DW, sob, soh, sow, son, offs_d, kv_mask & ok1,
                    dk1 * sm_scale, dv1)


# ------------------------------------------------------------------------------------------------
# d_rpb reduction
# ------------------------------------------------------------------------------------------------
@triton.jit
def _table_index(pos, n, offset, DIL: tl.constexpr, KS: tl.constexpr):
    """Bias-table index along one axis of the window slot ``offset`` (from the window start) of full-resolution
    query ``pos`` on an axis of ``n`` points; -1 outside the window."""
    p, res = pos // DIL, pos % DIL
    start = _win_start(p, (n - res + DIL - 1) // DIL, KS)
    return tl.where((offset >= 0) & (offset < KS), start + offset - p + KS - 1, -1)


@triton.jit
def _na2d_drpb_kernel(DSNB, PART, B, H, W, NH: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                      DH: tl.constexpr, DW: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
                      TRP: tl.constexpr, TCP: tl.constexpr, BIN_PREC: tl.constexpr):
    """Partials of d_rpb from the dq kernel's window-layout dS, seen per head as ``[R, C]`` (R = H*kh rows
    ``(y, window row)``, C = W*(kw+1) columns ``(x, slot)``).

    Program (g, split, h) walks blocks g, g + G, ... of BR x BC of head h; for each it sums the split-th slice
    of the batch (fp32) and bins the sum by relative offset with two one-hot products (one-hots built from the
    window starts); it writes its ``[2kh-1, 2kw-1]`` partial to PART[h, :, :, split * G + g] (``[NH, TR, TC,
    parts]``), which the host sums over its last axis. Every sum runs in a fixed order. BIN_PREC: the products'
    input precision (the one-hots are exact in any; it decides how the fp32 sums enter)."""
    g, split, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    R, C = H * KH, W * (KW + 1)
    n_cb = tl.cdiv(C, BC)
    per_split = tl.cdiv(B, tl.num_programs(1))
    b_lo = split * per_split
    b_hi = tl.minimum(b_lo + per_split, B)
    offs_tr, offs_tc = tl.arange(0, TRP), tl.arange(0, TCP)
    part = tl.zeros([TRP, TCP], tl.float32)
    for blk in range(g, tl.cdiv(R, BR) * n_cb, tl.num_programs(0)):
        offs_r = (blk // n_cb) * BR + tl.arange(0, BR)
        offs_c = (blk % n_cb) * BC + tl.arange(0, BC)
        ptrs = (DSNB + (b_lo.to(tl.int64) * NH + h) * R * C
                + (offs_r[:, None] * C + offs_c[None, :]))  # [BR, BC] of image b_lo
        mask = (offs_r < R)[:, None] & (offs_c < C)[None, :]
        acc = tl.zeros([BR, BC], tl.float32)  # the block summed over this slice of the batch
        for _ in range(b_lo, b_hi):
            acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            ptrs += NH * R * C
        # one-hots: row (y, i) -> table row, column (x, s) -> table column (slot s counts from the window start
        # rounded down to even); rows and columns past the map match no index
        y, x = offs_r // KH, offs_c // (KW + 1)
        t_row = tl.where(offs_r < R, _table_index(y, H, offs_r % KH, DH, KH), -1)
        x_start = _win_start(x // DW, (W - x % DW + DW - 1) // DW, KW)
        t_col = tl.where(offs_c < C, _table_index(x, W, x_start // 2 * 2 - x_start + offs_c % (KW + 1), DW, KW), -1)
        my = (offs_tr[:, None] == t_row[None, :]).to(tl.float32)  # [TRP, BR]
        mx = (t_col[:, None] == offs_tc[None, :]).to(tl.float32)  # [BC, TCP]
        part += tl.dot(my, tl.dot(acc, mx, input_precision=BIN_PREC), input_precision=BIN_PREC)
    TR: tl.constexpr = 2 * KH - 1
    TC: tl.constexpr = 2 * KW - 1
    parts = tl.num_programs(0) * tl.num_programs(1)
    tl.store(PART + ((h * TR + offs_tr[:, None]) * TC + offs_tc[None, :]) * parts + split * tl.num_programs(0) + g,
             part, mask=(offs_tr < TR)[:, None] & (offs_tc < TC)[None, :])


# ------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------
_FWD, _DQ, _DKDV = Launcher(_na2d_fwd_kernel), Launcher(_na2d_bwd_dq_kernel), Launcher(_na2d_bwd_dkdv_kernel)
_DRPB = Launcher(_na2d_drpb_kernel)


@dataclass(frozen=True)
class Tiles:
    """Block shapes on a dilation sub-grid: the owned tile BY x BX (queries for fwd/dq, keys for dk/dv)
    and the walked block KBY x KBX (keys for fwd/dq, queries for dk/dv), plus launch settings and the images
    per program (1 or 2: two images share each block's indices, masks and gathered bias)."""
    BY: int
    BX: int
    KBY: int
    KBX: int
    num_warps: int = 4
    num_stages: int = 2
    imgs: int = 1


PIPELINE_SMEM = 128 * 1024
"""Shared memory (bytes) the pipelined walked blocks may take; the rest of a Hopper block's 227 KiB holds the
owned tile, the bias table and layout conversions."""


def _p2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def choose_tiles(kernel: str, sub_h: int, sub_w: int, kernel_size: tuple[int, int], head_dim: int,
                 itemsize: int = 2, rpb_grad: bool = False) -> Tiles:
    """Tile shapes of ``kernel`` ("fwd", "dq", "dkdv") on sub-grids of ``sub_h x sub_w``; ``rpb_grad``: the dq
    kernel stores dS for d_rpb.

    8 x 8 owned tiles (the rectangle a tile walks grows as (8 + k - 1)^2 per 64 owned points). Walked blocks for
    head_dim <= 32: 2 x 16 on large sub-grids, 4 x 8 on sub-grids of one tile (NAT's 7x7 stage, DiNAT's dilated
    stages) and of 17-32 points per side (NAT's 28x28 stage); dq with a bias gradient walks 2 x 8 everywhere. Two
    images per program (they share each block's masks and gathered bias) in dq with a bias gradient except on one
    tile (their dS is summed and stored once), in dk/dv on one-tile sub-grids, and in the forward up to head_dim
    64. Larger heads take 4 x 8 blocks (8 x 8 for dq without a bias gradient), where 16-wide blocks score too many
    keys outside a k >= 13 rectangle; up to head_dim 64, dq with a bias gradient takes two images of them, the
    rest of the backward one.
    Chosen from the H200 sweeps in benchmarks/NOTES_na2d.md (``python -m benchmarks.na2d_tune sweep``).
    """
    by, bx = min(8, _p2(sub_h)), min(8, _p2(sub_w))
    one_tile = sub_h <= 8 and sub_w <= 8
    mid = 16 < max(sub_h, sub_w) <= 32
    small = head_dim <= 32
    imgs = 1
    if kernel == "fwd":
        kby, kbx, stages = (4, 8, 3) if one_tile or mid or not small else (2, 16, 3)
        imgs = 2 if head_dim <= 64 else 1
    elif kernel == "dq":
        if small and rpb_grad:
            kby, kbx, stages, imgs = (2, 8, 3, 1) if one_tile else (2, 8, 3, 2)
        elif rpb_grad and head_dim <= 64:
            kby, kbx, stages, imgs = 4, 8, 3, 2
        elif one_tile or (mid and small):
            kby, kbx, stages = 4, 8, 3
        else:
            kby, kbx, stages = (2, 16, 3) if small else (8, 8, 3)
    else:
        kby, kbx, stages = (4, 8, 3) if one_tile or not small or mid else (2, 16, 3)
        imgs = 2 if small and one_tile else 1
    # software pipelining keeps num_stages copies of the walked pair (k/v, or q/dO) per image in shared memory: cap
    # them so that wide float32 heads fit (3 stages of 8 x 8 x 128 fp32 pairs exceed an H100/H200 block's)
    walked_pair = 2 * imgs * kby * kbx * max(16, _p2(head_dim)) * itemsize
    stages = max(1, min(stages, PIPELINE_SMEM // walked_pair))
    return Tiles(by, bx, kby, kbx, num_warps=4, num_stages=stages, imgs=imgs)


def _prep(t: torch.Tensor) -> torch.Tensor:
    """Kernels need unit stride on head_dim; anything else is kept as a strided view."""
    return t if t.stride(-1) == 1 else t.contiguous()


@dataclass(frozen=True)
class _Plan:
    """One kernel's launch for one problem: programs per group of ``meta["IMGS"]`` images, constexprs and launch
    settings."""
    per_group: int
    meta: dict

    def groups(self, batch):
        """Image groups of ``batch`` images (an int, or a symbolic size while torch.compile traces)."""
        return (batch + self.meta["IMGS"] - 1) // self.meta["IMGS"]

    def grid(self, batch) -> tuple:
        """The launch grid for ``batch`` images."""
        return (self.groups(batch) * self.per_group,)


@functools.lru_cache(maxsize=512)
def _plan(kernel: str, map_shape: tuple[int, int, int, int], dtype: torch.dtype, kernel_size: tuple[int, int],
          dilation: tuple[int, int], has_rpb: bool, rpb_grad: bool, tf32: bool) -> _Plan:
    """Everything about a launch that depends only on the problem's ``(H, W, heads, head_dim)``, computed once
    (host time is the bound on small maps). The batch size stays out of the key, so that a compiled model
    keeps it symbolic."""
    H, W, N, D = map_shape
    sub_h, sub_w = -(-H // dilation[0]), -(-W // dilation[1])  # residue 0 has the longest sub-grid
    t = choose_tiles(kernel, sub_h, sub_w, kernel_size, D, dtype.itemsize, rpb_grad)
    tiles_y, tiles_x = -(-sub_h // t.BY), -(-sub_w // t.BX)
    walked = dict(QBY=t.KBY, QBX=t.KBX) if kernel == "dkdv" else dict(KBY=t.KBY, KBX=t.KBX)
    prec = "ieee" if dtype == torch.float32 and not tf32 else "tf32"
    meta = dict(NH=N, D=D, DH=dilation[0], DW=dilation[1], KH=kernel_size[0], KW=kernel_size[1], BY=t.BY, BX=t.BX,
                **walked, BLOCK_D=max(16, _p2(D)), IMGS=t.imgs,
                TBL=_p2((2 * kernel_size[0] - 1) * (2 * kernel_size[1] - 1)), HAS_RPB=has_rpb, DOT_PREC=prec,
                num_warps=t.num_warps, num_stages=t.num_stages)
    if kernel == "dq":
        meta.update(RPB_GRAD=rpb_grad)
    return _Plan(N * dilation[0] * dilation[1] * tiles_y * tiles_x, meta)


def _map_shape(q: torch.Tensor) -> tuple[int, int, int, int]:
    """``(H, W, heads, head_dim)`` as ints: the kernels' tiling is specialised on them (a compiled model
    guards on them); only the batch size may stay symbolic."""
    return tuple(int(n) for n in q.shape[1:])


DRPB_BR, DRPB_BC = 16, 64
"""The d_rpb reduction's block of window-layout dS: rows of H*kh, columns of W*(kw+1)."""
DRPB_PROGRAMS = 1024
"""Programs the d_rpb reduction aims for: the blocks are walked by at most this many programs, and the batch is
split (up to 8 ways) while there are fewer blocks."""
DRPB_BIN_PREC = "ieee"
"""Input precision of the reduction's one-hot products: exact fp32. Tensor-core products ("tf32x3", "tf32") ran
slower or lost accuracy on the H200 (``python -m benchmarks.na2d_tune drpb`` sweeps them)."""


def _drpb_grid(batch, heads: int, rows: int, cols: int) -> tuple:
    """(block walkers per head, batch slices, heads). ``batch`` may be symbolic (torch.compile): no guard on
    it."""
    blocks = -(-rows // DRPB_BR) * -(-cols // DRPB_BC)
    per_head = max(1, DRPB_PROGRAMS // heads)
    slices = max(1, min(8, per_head // blocks))
    return min(blocks, max(1, per_head // slices)), torch.sym_min(slices, batch), heads


def na2d_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: torch.Tensor | None,
                 kernel_size: tuple[int, int], dilation: tuple[int, int], scale: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward on validated inputs: ``(out [B, H, W, heads, D] contiguous, lse [B, heads, H, W] fp32)``."""
    q, k, v = _prep(q), _prep(k), _prep(v)
    B, H, W, N, D = shape = q.shape
    out = torch.empty(shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, N, H, W), dtype=torch.float32, device=q.device)
    plan = _plan("fwd", _map_shape(q), q.dtype, kernel_size, dilation, rpb is not None, False,
                 torch.backends.cuda.matmul.allow_tf32)
    rpb = q if rpb is None else rpb.contiguous()  # never read without HAS_RPB
    _FWD(plan.grid(B),
         q, k, v, rpb, out, lse, *q.stride()[:4], *k.stride()[:4], *v.stride()[:4], *out.stride()[:4], rpb.stride(0),
         B, H, W, scale * LOG2E, **plan.meta)
    return out, lse


def na2d_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: torch.Tensor | None,
                  out: torch.Tensor, lse: torch.Tensor, kernel_size: tuple[int, int], dilation: tuple[int, int],
                  scale: float, rpb_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Fused backward in two kernel launches: ``(dq, dk, dv, drpb)``, drpb (float32) None unless ``rpb_grad``
    (then the d_rpb reduction kernel and a sum of its partials follow).

    d_rpb is a fixed-order reduction of the window-layout dS, so it is bit-identical across runs.
    """
    q, k, v = _prep(q), _prep(k), _prep(v)
    dout = dout.contiguous()
    B, H, W, N, D = shape = q.shape
    rpb_grad = rpb_grad and rpb is not None
    key = (_map_shape(q), q.dtype, kernel_size, dilation, rpb is not None, rpb_grad,
           torch.backends.cuda.matmul.allow_tf32)
    p_dq, p_dkdv = _plan("dq", *key), _plan("dkdv", *key)
    # three allocations: outputs of a custom op may not alias each other
    dq, dk, dv = (torch.empty(shape, dtype=q.dtype, device=q.device) for _ in range(3))
    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    kh, kw = kernel_size
    # dS at each score's window offset, summed over each dq program's images (input dtype, as dS enters dq's
    # product; KW + 1 slots per query, see the dq kernel); every entry is written
    dsnb = (torch.empty((p_dq.groups(B), N, H, kh, W, kw + 1), dtype=q.dtype, device=q.device) if rpb_grad
            else q)
    rpb_t = q if rpb is None else rpb.contiguous()
    strides = (*q.stride()[:4], *k.stride()[:4], *v.stride()[:4], *out.stride()[:4], rpb_t.stride(0))
    _DQ(p_dq.grid(B), q, k, v, rpb_t, out, dout, lse, delta, dq, dsnb, *strides, B, H, W, scale * LOG2E, scale,
        **p_dq.meta)
    _DKDV(p_dkdv.grid(B), q, k, v, rpb_t, dout, lse, delta, dk, dv, *strides, B, H, W, scale * LOG2E, scale,
          **p_dkdv.meta)
    if not rpb_grad:
        return dq, dk, dv, None
    # fixed-order reductions (deterministic): per block, a batch slice's sum binned by relative offset; then the
    # sum of the partials
    return dq, dk, dv, rpb_grad_from_window_ds(dsnb, kernel_size, dilation)


def rpb_grad_from_window_ds(dsnb: torch.Tensor, kernel_size: tuple[int, int], dilation: tuple[int, int]
                            ) -> torch.Tensor:
    """d_rpb ``[heads, 2kh-1, 2kw-1]`` (float32) from the dq kernel's window-layout dS ``[G, heads, H, kh, W, kw+1]``
    (summed over its G image groups; ``na2d_reference.rpb_grad_from_window_ds`` computes the same), as one reduction
    kernel and a sum of its partials."""
    B, N, H, kh, W, _ = dsnb.shape
    kw = kernel_size[1]
    grid = _drpb_grid(B, N, H * kh, W * (kw + 1))
    part = torch.empty((N, 2 * kh - 1, 2 * kw - 1, grid[0] * grid[1]), dtype=torch.float32, device=dsnb.device)
    _DRPB(grid, dsnb, part, B, H, W, NH=N, KH=kh, KW=kw, DH=dilation[0], DW=dilation[1], BR=DRPB_BR, BC=DRPB_BC,
          TRP=max(16, _p2(2 * kh - 1)), TCP=max(16, _p2(2 * kw - 1)),
          BIN_PREC=DRPB_BIN_PREC, num_warps=4)
    return part.sum(-1)
