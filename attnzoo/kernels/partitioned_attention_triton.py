"""Triton kernels for partitioned (window / grid) attention, reading and writing the NHWC map by index.

A program owns one block of tokens of one partition and one head. Token ``n`` of partition ``p`` is
found on the map by index arithmetic (:func:`_token`), so q/k/v are read straight from the projection
output (any strides, e.g. views of a fused qkv) and the output is written straight to ``[B, H, W, heads,
D]``: no window/grid partition or reverse copies, no padded copies. Padded tokens are masked loads.

Forward: flash-attention online softmax over key blocks, storing the log-sum-exp for the backward.
Backward: one kernel per key block recomputes the probabilities from the log-sum-exp and produces dk,
dv, dq and the bias gradient; a program walks ``PARTS`` partitions of one head so it can sum their
bias gradients in registers before a single atomic add (the table is shared by every partition).

Host side, each direction is one Triton launch plus at most two small torch ops for the bias (expand
the table into a tile; fold the tile gradient back into the table): at 7x7 maps the whole problem is a
few microseconds of GPU work, so every host-side op shows up in the step time.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake

from attnzoo.kernels._op import Launcher, dot_precision
from attnzoo.kernels.partitioned_attention_reference import padded_size, relative_index


def _alloc(shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised output buffer; tests replace it with a NaN-filling one to catch unwritten elements."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _token(n, p, N, H, W, Hp, Wp, PH, PW, SY, SX, GRID: tl.constexpr):
    """Map position of token ``n`` of partition ``p``: (y, x, row i and column j inside the partition,
    Swin region id, real-token flag). Window mode reads the map rolled by (-SY, -SX); grid mode puts
    member (i, j) of group (r0, c0) at (i * Hp/PH + r0, j * Wp/PW + c0)."""
    i = n // PW
    j = n % PW
    if GRID:
        sh = Hp // PH
        sw = Wp // PW
        y = i * sh + p // sw
        x = j * sw + p % sw
        region = tl.zeros_like(n)
    else:
        r = (p // (Wp // PW)) * PH + i
        c = (p % (Wp // PW)) * PW + j
        y = (r + SY) % Hp
        x = (c + SX) % Wp
        # Swin's three slices per axis; with no shift every partition lies in one slice
        region = ((r >= Hp - PH).to(tl.int32) + (r >= Hp - SY).to(tl.int32)) * 3 \
            + (c >= Wp - PW).to(tl.int32) + (c >= Wp - SX).to(tl.int32)
    valid = (n < N) & (y < H) & (x < W)
    return y, x, i, j, region, valid


@triton.jit
def _logits(q, k, offs_m, offs_n, qreg, kreg, kvalid, BIAS, h, scale,
            HAS_RPB: tl.constexpr, DOT_PRECISION: tl.constexpr, N_PAD: tl.constexpr):
    """Logits of a [BLOCK_M, BLOCK_N] tile in log2 units (scaled q·k + bias), -inf where not allowed.
    ``BIAS`` is the table expanded to [heads, N_PAD, N_PAD] (padding entries masked): a contiguous, L2-resident tile."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
    if HAS_RPB:
        s += tl.load(BIAS + (h * N_PAD + offs_m[:, None]) * N_PAD + offs_n[None, :])
    allowed = kvalid[None, :] & (qreg[:, None] == kreg[None, :])
    return tl.where(allowed, s * 1.4426950408889634, float("-inf"))


@triton.jit
def _row_mask(valid, offs_d, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """[rows, BLOCK_D] load/store mask; without head-dim padding it stays constant along D, so the
    accesses vectorise."""
    if D == BLOCK_D:
        mask = valid[:, None]
    else:
        mask = valid[:, None] & (offs_d[None, :] < D)
    return mask


@triton.jit
def _pa_fwd(
    Q, K, V, O, LSE, BIAS,
    s_qb, s_qh, s_qw, s_qn, s_kb, s_kh, s_kw, s_kn, s_vb, s_vh, s_vw, s_vn,
    NP, NH, N, H, W, Hp, Wp, PH, PW, SY, SX, scale,
    D: tl.constexpr, GRID: tl.constexpr, HAS_RPB: tl.constexpr, DOT_PRECISION: tl.constexpr, N_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    scale = tl.cast(scale, tl.float32)  # fp64 when Inductor passes an unspecialised float
    bp = tl.program_id(0)
    h = tl.program_id(1) % NH
    m0 = (tl.program_id(1) // NH) * BLOCK_M
    b = (bp // NP).to(tl.int64)
    p = bp % NP
    offs_d = tl.arange(0, BLOCK_D)

    # query tile [BLOCK_M, BLOCK_D]: tokens m0.. of partition p, head h
    offs_m = m0 + tl.arange(0, BLOCK_M)
    qy, qx, qi, qj, qreg, qvalid = _token(offs_m, p, N, H, W, Hp, Wp, PH, PW, SY, SX, GRID)
    qmask = _row_mask(qvalid, offs_d, D, BLOCK_D)
    q = tl.load(Q + b * s_qb + (qy * s_qh + qx * s_qw + h * s_qn)[:, None] + offs_d[None, :], mask=qmask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the log2 logits
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(logit - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running sum of p · v
    for n0 in range(0, N, BLOCK_N):
        # key / value tiles [BLOCK_N, BLOCK_D]: tokens n0.. of the same partition
        offs_n = n0 + tl.arange(0, BLOCK_N)
        ky, kx, ki, kj, kreg, kvalid = _token(offs_n, p, N, H, W, Hp, Wp, PH, PW, SY, SX, GRID)
        kmask = _row_mask(kvalid, offs_d, D, BLOCK_D)
        k = tl.load(K + b * s_kb + (ky * s_kh + kx * s_kw + h * s_kn)[:, None] + offs_d[None, :], mask=kmask, other=0.0)
        v = tl.load(V + b * s_vb + (ky * s_vh + kx * s_vw + h * s_vn)[:, None] + offs_d[None, :], mask=kmask, other=0.0)
        s = _logits(q, k, offs_m, offs_n, qreg, kreg, kvalid, BIAS, h, scale, HAS_RPB, DOT_PRECISION, N_PAD)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet
        pr = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(pr, 1)
        acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tok = ((b * H + qy) * W + qx) * NH + h  # row of the contiguous [B, H, W, heads, D] output
    tl.store(O + tok[:, None] * D + offs_d[None, :], out.to(O.dtype.element_ty), mask=qmask)
    tl.store(LSE + tok, (m_i + tl.math.log2(l_safe)) / 1.4426950408889634, mask=qvalid)


@triton.jit
def _pa_bwd(
    Q, K, V, O, DO, LSE, BIAS, DQ, DK, DV, DBIAS,
    s_qb, s_qh, s_qw, s_qn, s_kb, s_kh, s_kw, s_kn, s_vb, s_vh, s_vw, s_vn,
    BP, NP, NH, N, H, W, Hp, Wp, PH, PW, SY, SX, scale,
    D: tl.constexpr, GRID: tl.constexpr, HAS_RPB: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PARTS: tl.constexpr, ONE_BLOCK: tl.constexpr, N_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    scale = tl.cast(scale, tl.float32)
    h = tl.program_id(1) % NH
    n0 = (tl.program_id(1) // NH) * BLOCK_N
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    # d(logit) summed over this program's partitions: the [query, key] slice of the bias gradient
    ds_sum = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for t in range(PARTS):
        bp = tl.program_id(0) * PARTS + t
        live = bp < BP
        b = (bp // NP).to(tl.int64)
        p = bp % NP
        # key / value tiles [BLOCK_N, BLOCK_D] of partition p, head h; their gradients accumulate here
        ky, kx, ki, kj, kreg, kvalid = _token(offs_n, p, N, H, W, Hp, Wp, PH, PW, SY, SX, GRID)
        kvalid = kvalid & live
        kmask = _row_mask(kvalid, offs_d, D, BLOCK_D)
        k = tl.load(K + b * s_kb + (ky * s_kh + kx * s_kw + h * s_kn)[:, None] + offs_d[None, :], mask=kmask, other=0.0)
        v = tl.load(V + b * s_vb + (ky * s_vh + kx * s_vw + h * s_vn)[:, None] + offs_d[None, :], mask=kmask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for m0 in range(0, N, BLOCK_M):
            # query-side tiles [BLOCK_M, BLOCK_D]: q, O, dO; per row the lse and delta = rowsum(dO * O)
            offs_m = m0 + tl.arange(0, BLOCK_M)
            qy, qx, qi, qj, qreg, qvalid = _token(offs_m, p, N, H, W, Hp, Wp, PH, PW, SY, SX, GRID)
            qvalid = qvalid & live
            qmask = _row_mask(qvalid, offs_d, D, BLOCK_D)
            q = tl.load(Q + b * s_qb + (qy * s_qh + qx * s_qw + h * s_qn)[:, None] + offs_d[None, :],
                        mask=qmask, other=0.0)
            tok = ((b * H + qy) * W + qx) * NH + h
            do = tl.load(DO + tok[:, None] * D + offs_d[None, :], mask=qmask, other=0.0)
            o = tl.load(O + tok[:, None] * D + offs_d[None, :], mask=qmask, other=0.0)
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
            lse = tl.load(LSE + tok, mask=qvalid, other=0.0) * 1.4426950408889634
            s = _logits(q, k, offs_m, offs_n, qreg, kreg, kvalid, BIAS, h, scale, HAS_RPB, DOT_PRECISION, N_PAD)
            pr = tl.where(qvalid[:, None], tl.math.exp2(s - lse[:, None]), 0.0)  # probabilities [BLOCK_M, BLOCK_N]
            dv += tl.dot(tl.trans(pr.to(do.dtype)), do, input_precision=DOT_PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = pr * (dp - delta[:, None])  # d(logit)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
            dq = tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION) * scale
            if ONE_BLOCK:  # this program saw every key of the partition: dq is final
                tl.store(DQ + tok[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=qmask)
            else:  # fp32 buffer shared by the key blocks of the partition
                tl.atomic_add(DQ + tok[:, None] * D + offs_d[None, :], dq, mask=qmask)
            if HAS_RPB:
                if ONE_BLOCK:
                    ds_sum += ds
                else:
                    tl.atomic_add(DBIAS + (h * N_PAD + offs_m[:, None]) * N_PAD + offs_n[None, :], ds)
        tok_k = ((b * H + ky) * W + kx) * NH + h
        tl.store(DK + tok_k[:, None] * D + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=kmask)
        tl.store(DV + tok_k[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kmask)
    if HAS_RPB:
        if ONE_BLOCK:
            offs_m = tl.arange(0, BLOCK_M)
            tl.atomic_add(DBIAS + (h * N_PAD + offs_m[:, None]) * N_PAD + offs_n[None, :], ds_sum)


_FWD, _BWD = Launcher(_pa_fwd), Launcher(_pa_bwd)

# launch settings (the benchmark sweeps alternatives; see benchmarks/NOTES_partitioned_attention.md)
FWD_LAUNCH = dict(num_warps=4, num_stages=2)
BWD_LAUNCH = dict(num_warps=4, num_stages=1)


def _blocks(N: int, D: int) -> tuple[int, int, int]:
    block = min(64, max(16, triton.next_power_of_2(N)))
    return block, block, max(16, triton.next_power_of_2(D))


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    if t.stride(-1) != 1:
        raise ValueError(f"partitioned_attention: q, k, v need unit stride in head_dim, got strides {t.stride()}")
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _size_hint(n: int | torch.SymInt) -> int:
    """``n``, or for a size symbolic under torch.compile the value it is being traced with, read without
    adding a guard (a launch parameter chosen from it holds for every value)."""
    return n if isinstance(n, int) else int(n.node.hint)


def _geometry(q: torch.Tensor, ph: int, pw: int) -> tuple[int, int, int, int]:
    B, H, W = q.shape[:3]
    Hp, Wp = padded_size(H, ph), padded_size(W, pw)
    return Hp, Wp, (Hp // ph) * (Wp // pw), ph * pw


def tile_size(N: int) -> int:
    """Side of the square bias tile for ``N``-token partitions: ``N`` rounded up to the query/key block."""
    block = _blocks(N, 16)[0]
    return triton.cdiv(N, block) * block


def _build_tile_index(ph: int, pw: int, device: torch.device) -> torch.Tensor:
    """``[n_pad * n_pad]`` index of each bias-tile entry in the flattened table. Padded rows and columns
    point at entry 0: the kernel masks those logits and their gradient is exactly zero, so they read a
    harmless value and add 0.0 when folded back."""
    N, n_pad = ph * pw, tile_size(ph * pw)
    idx = torch.zeros(n_pad, n_pad, dtype=torch.long, device=device)
    idx[:N, :N] = relative_index.__wrapped__(ph, pw, device).view(N, N)
    return idx.flatten()


@functools.lru_cache(maxsize=64)
def _tile_index(ph: int, pw: int, device: torch.device) -> torch.Tensor:
    """:func:`_build_tile_index`, cached per size and device for eager calls. Built outside inference mode so
    the cached tensor can be saved for backward by later autograd calls."""
    with torch.inference_mode(False):
        return _build_tile_index(ph, pw, device)


def _tile_index_for(t: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """The tile index on ``t``'s device: cached for real tensors; built in the graph while torch.compile traces
    (fake tensors), so no traced tensor enters the cache."""
    return (_build_tile_index if is_fake(t) else _tile_index)(ph, pw, t.device)


def bias_tile(rpb: torch.Tensor | None, ph: int, pw: int) -> torch.Tensor | None:
    """The table ``[heads, 2ph-1, 2pw-1]`` expanded to fp32 logit biases ``[heads, n_pad, n_pad]`` (one gather)."""
    if rpb is None:
        return None
    n_pad = tile_size(ph * pw)
    return rpb.float().flatten(1)[:, _tile_index_for(rpb, ph, pw)].view(-1, n_pad, n_pad)


def fold_bias_grad(dbias: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """Sum a tile gradient ``[heads, n_pad, n_pad]`` into the table layout ``[heads, 2ph-1, 2pw-1]`` (fp32)."""
    table = dbias.new_zeros(dbias.shape[0], (2 * ph - 1) * (2 * pw - 1))
    table.index_add_(1, _tile_index_for(dbias, ph, pw), dbias.flatten(1))
    return table.view(-1, 2 * ph - 1, 2 * pw - 1)


def forward(q, k, v, bias, ph, pw, grid, sy, sx, scale):
    """Output ``[B, H, W, heads, D]`` (contiguous, q's dtype) and the log-sum-exp ``[B, H, W, heads]`` (fp32).
    ``bias`` is :func:`bias_tile`'s expansion of the table, or None."""
    B, H, W, NH, D = q.shape
    Hp, Wp, NP, N = _geometry(q, ph, pw)
    BLOCK_M, BLOCK_N, BLOCK_D = _blocks(N, D)
    o = _alloc(q.shape, q.dtype, q.device)
    lse = _alloc(q.shape[:4], torch.float32, q.device)
    grid_ = (B * NP, NH * triton.cdiv(N, BLOCK_M))
    _FWD(grid_,
        q, k, v, o, lse, q if bias is None else bias, *_strides(q), *_strides(k), *_strides(v),
        NP, NH, N, H, W, Hp, Wp, ph, pw, sy, sx, scale,
        D=D, GRID=grid, HAS_RPB=bias is not None, DOT_PRECISION=dot_precision(q.dtype), N_PAD=tile_size(N),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, **FWD_LAUNCH)
    return o, lse


def backward(do, q, k, v, bias, out, lse, ph, pw, grid, sy, sx, scale):
    """Gradients dq, dk, dv (contiguous, q's dtype) and the fp32 bias-tile gradient (None without a bias;
    :func:`fold_bias_grad` turns it into the table's gradient)."""
    B, H, W, NH, D = q.shape
    Hp, Wp, NP, N = _geometry(q, ph, pw)
    BLOCK_M, BLOCK_N, BLOCK_D = _blocks(N, D)
    do = do.contiguous()
    one_block = N <= BLOCK_M
    dq = _alloc(q.shape, q.dtype, q.device) if one_block else \
        torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = _alloc(q.shape, q.dtype, q.device)
    dv = _alloc(q.shape, q.dtype, q.device)
    dbias = None if bias is None else torch.zeros_like(bias)  # atomic-add target
    BP = B * NP
    # enough programs to fill the GPU, as few atomic adds of the bias gradient as that allows; under
    # torch.compile chosen for the batch size traced with, and the grid stays symbolic (programs past BP idle)
    parts = 1 if bias is None or not one_block else max(1, min(32, _size_hint(BP) * NH // 4096))
    grid_ = ((BP + parts - 1) // parts, NH * triton.cdiv(N, BLOCK_N))
    _BWD(grid_,
        q, k, v, out, do, lse, q if bias is None else bias, dq, dk, dv, dq if dbias is None else dbias,
        *_strides(q), *_strides(k), *_strides(v),
        BP, NP, NH, N, H, W, Hp, Wp, ph, pw, sy, sx, scale,
        D=D, GRID=grid, HAS_RPB=bias is not None, DOT_PRECISION=dot_precision(q.dtype),
        PARTS=parts, ONE_BLOCK=one_block, N_PAD=tile_size(N),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, **BWD_LAUNCH)
    return dq.to(q.dtype), dk, dv, dbias
