"""Partitioned attention: multi-head attention inside non-overlapping windows or over a dilated grid.

One op serves MaxViT (block and grid attention), DaViT (spatial windows) and Swin-style models
(windows with a cyclic shift). Tensors use NATTEN's heads-last layout ``[B, H, W, heads, D]``.

Partitions (``N = ph * pw`` tokens each), on the map zero-padded to ``Hp x Wp`` (multiples of the
partition):

* ``mode="window"``: ``ph x pw`` blocks of neighbouring tokens. ``shift=(sy, sx)`` is Swin's cyclic shift:
  the padded map is rolled by ``(-sy, -sx)`` before partitioning, and Swin's region mask keeps tokens
  that wrapped around from attending across the seam.
* ``mode="grid"``: MaxViT's grid attention with a ``ph x pw`` grid: group ``(r, c)`` holds the tokens
  ``(i * Hp/ph + r, j * Wp/pw + c)``, members spaced ``Hp/ph`` rows and ``Wp/pw`` columns apart.

Padded tokens are masked as keys, so they never receive attention, and the output has the input's size.
``rpb`` (``[heads, 2ph-1, 2pw-1]``) adds ``rpb[h, ky - qy + ph - 1, kx - qx + pw - 1]`` to the logit of
query ``(qy, qx)`` and key ``(ky, kx)``, positions taken inside the partition (group coordinates in grid
mode): the layout of NATTEN's and TF MaxViT's tables. Swin's ``[(2ph-1)(2pw-1), heads]`` table uses
query − key, so it maps on as ``t.T.reshape(heads, 2ph-1, 2pw-1).flip(1, 2)``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.autograd.function import once_differentiable

from attnzoo.kernels._dispatch import resolve_backend
from attnzoo.kernels.partitioned_attention_reference import partitioned_attention_reference

MODES = ("window", "grid")
_OP = "partitioned_attention"
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_TRITON_HEAD_DIM = 128
MAX_TRITON_PARTITION = 256  # tokens per partition (ph * pw), e.g. 14 x 14 = 196 padded to 256


def _pair(value: int | Sequence[int], name: str, minimum: int) -> tuple[int, int]:
    if isinstance(value, int):
        value = (value, value)
    value = tuple(value)
    if len(value) != 2 or not all(isinstance(v, int) and v >= minimum for v in value):
        raise ValueError(f"{_OP}: {name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return value


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, partition_size, mode: str, shift,
           rpb: Optional[torch.Tensor]) -> tuple[tuple[int, int], tuple[int, int]]:
    if q.dim() != 5:
        raise ValueError(f"{_OP}: q must be [B, H, W, heads, head_dim], got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{_OP}: {name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{_OP}: {name} must match q's dtype {q.dtype} and device {q.device}, "
                             f"got {t.dtype} on {t.device}")
    if not q.is_floating_point():
        raise ValueError(f"{_OP}: q, k, v must be floating point, got {q.dtype}")
    if mode not in MODES:
        raise ValueError(f"{_OP}: mode must be one of {MODES}, got {mode!r}")
    part = _pair(partition_size, "partition_size", 1)
    shift = _pair(shift, "shift", 0)
    if any(shift) and mode != "window":
        raise ValueError(f"{_OP}: shift must be 0 in mode='grid', got {shift}")
    if shift[0] >= part[0] or shift[1] >= part[1]:
        raise ValueError(f"{_OP}: shift must be smaller than partition_size {part}, got {shift}")
    if rpb is not None:
        expected = (q.shape[3], 2 * part[0] - 1, 2 * part[1] - 1)
        if tuple(rpb.shape) != expected:
            raise ValueError(f"{_OP}: rpb must have shape [heads, 2*ph-1, 2*pw-1] = {expected}, "
                             f"got {tuple(rpb.shape)}")
        if rpb.device != q.device or not rpb.is_floating_point():
            raise ValueError(f"{_OP}: rpb must be a floating-point tensor on {q.device}, got {rpb.dtype} on {rpb.device}")
    return part, shift


def partitioned_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    partition_size: int | Sequence[int],
    mode: str = "window",
    shift: int | Sequence[int] = 0,
    rpb: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of ``q`` over ``k``/``v`` within window or grid partitions; see the module docstring.

    Args:
        q, k, v: ``[B, H, W, heads, head_dim]``, any strides (e.g. views of a fused qkv projection).
        partition_size: window size (``mode="window"``) or grid size (``mode="grid"``), int or (ph, pw).
        mode: ``"window"`` or ``"grid"``.
        shift: Swin's cyclic shift (window mode only), each ``< partition_size``.
        rpb: relative-position-bias table ``[heads, 2ph-1, 2pw-1]`` (key − query offsets) or None.
        scale: logit scale, default ``head_dim ** -0.5``.
        backend: ``"auto"``, ``"triton"``, ``"reference"`` (see ``attnzoo.kernels._dispatch``) or ``"sdpa"``:
            timm's route, partition copies + PyTorch's fused SDPA (the reference's code, in q's dtype).
            ``"auto"`` on CUDA takes ``"sdpa"`` where :func:`_auto_prefers_sdpa` says so, else Triton.

    Returns:
        ``[B, H, W, heads, head_dim]`` in q's dtype.
    """
    part, shift = _check(q, k, v, partition_size, mode, shift, rpb)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    sdpa = backend == "sdpa" or (backend == "auto" and q.is_cuda and _auto_prefers_sdpa(q, part, shift, rpb))
    if sdpa or resolve_backend(backend, q.device, _OP, ("sdpa",)) == "reference":  # the reference is partition + SDPA
        return partitioned_attention_reference(q, k, v, part, mode, shift, rpb, scale)
    if q.dtype not in _TRITON_DTYPES:
        raise ValueError(f"{_OP}: backend='triton' takes dtypes {_TRITON_DTYPES}, got {q.dtype}")
    if not 1 <= q.shape[-1] <= MAX_TRITON_HEAD_DIM:
        raise ValueError(f"{_OP}: backend='triton' takes head_dim <= {MAX_TRITON_HEAD_DIM}, got {q.shape[-1]}")
    if part[0] * part[1] > MAX_TRITON_PARTITION:
        raise ValueError(f"{_OP}: backend='triton' takes partitions of <= {MAX_TRITON_PARTITION} tokens, "
                         f"got partition_size {part}")
    cfg = (part[0], part[1], mode == "grid", shift[0], shift[1], scale)
    if torch.compiler.is_compiling():  # traced: the custom op (schema, fake kernel) is what the compiler sees
        return _pa_forward(q, k, v, rpb, *cfg)[0]
    return _PartitionedAttention.apply(q, k, v, rpb, cfg)


class _PartitionedAttention(torch.autograd.Function):
    """Eager autograd around the Triton kernels, the same computation as the custom ops below.

    Eager calls skip the custom op's Python dispatch and autograd wrapper: on an H200 host these cost
    ~0.2-0.5 ms per forward+backward (measured), several times the whole GPU work of a 7x7-map layer,
    so they were the backward's fixed floor. The expanded bias tile is built once and kept for backward.
    """

    @staticmethod
    def forward(ctx, q, k, v, rpb, cfg):
        from attnzoo.kernels.partitioned_attention_triton import bias_tile, forward

        bias = bias_tile(rpb, cfg[0], cfg[1])
        out, lse = forward(q, k, v, bias, *cfg)
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.cfg, ctx.rpb_dtype = cfg, None if rpb is None else rpb.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        from attnzoo.kernels.partitioned_attention_triton import backward, fold_bias_grad

        q, k, v, bias, out, lse = ctx.saved_tensors
        dq, dk, dv, dbias = backward(dout, q, k, v, bias, out, lse, *ctx.cfg)
        drpb = None if dbias is None else fold_bias_grad(dbias, *ctx.cfg[:2]).to(ctx.rpb_dtype)
        return dq, dk, dv, drpb, None


SDPA_MAX_PARTITIONS = 4  # partitions per image up to which "auto" prefers SDPA (see _auto_prefers_sdpa)


def _auto_prefers_sdpa(q: torch.Tensor, part: tuple[int, int], shift: tuple[int, int],
                       rpb: Optional[torch.Tensor]) -> bool:
    """The one case where timm's partition + SDPA path measured faster than the fused kernel (H200, bf16,
    B128, fwd+bwd; benchmarks/NOTES_partitioned_attention.md): no bias, no shift, no padding, and at
    most ``SDPA_MAX_PARTITIONS`` partitions per image (DaViT-T stages 3-4: 14² and 7² maps). There SDPA
    runs unmasked flash attention and the partition copies are tiny, while the kernel pays its fixed
    Triton-launch host cost. Maps with a bias, a shift or padding keep the kernel, which was faster."""
    H, W = q.shape[1:3]
    return (rpb is None and not any(shift) and H % part[0] == 0 and W % part[1] == 0
            and (H // part[0]) * (W // part[1]) <= SDPA_MAX_PARTITIONS)


@torch.library.custom_op("attnzoo::partitioned_attention_fwd", mutates_args=())
def _pa_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: Optional[torch.Tensor], ph: int, pw: int,
                grid: bool, sy: int, sx: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward: output ``[B, H, W, heads, D]`` and the fp32 log-sum-exp ``[B, H, W, heads]``."""
    from attnzoo.kernels.partitioned_attention_triton import bias_tile, forward

    return forward(q, k, v, bias_tile(rpb, ph, pw), ph, pw, grid, sy, sx, scale)


@_pa_forward.register_fake
def _(q, k, v, rpb, ph, pw, grid, sy, sx, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:4], dtype=torch.float32)


@torch.library.custom_op("attnzoo::partitioned_attention_bwd", mutates_args=())
def _pa_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: Optional[torch.Tensor],
                 out: torch.Tensor, lse: torch.Tensor, ph: int, pw: int, grid: bool, sy: int, sx: int,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward: dq, dk, dv (q's layout) and d(rpb) (empty when rpb is None)."""
    from attnzoo.kernels.partitioned_attention_triton import backward, bias_tile, fold_bias_grad

    dq, dk, dv, dbias = backward(do, q, k, v, bias_tile(rpb, ph, pw), out, lse, ph, pw, grid, sy, sx, scale)
    drpb = q.new_empty(0) if dbias is None else fold_bias_grad(dbias, ph, pw).to(rpb.dtype)
    return dq, dk, dv, drpb


@_pa_backward.register_fake
def _(do, q, k, v, rpb, out, lse, ph, pw, grid, sy, sx, scale):
    drpb = torch.empty_like(rpb) if rpb is not None else q.new_empty(0)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format), drpb)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, rpb, ph, pw, grid, sy, sx, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, rpb, out, lse)
    ctx.cfg = (ph, pw, grid, sy, sx, scale)


def _backward(ctx, dout: torch.Tensor, dlse: torch.Tensor):
    q, k, v, rpb, out, lse = ctx.saved_tensors
    dq, dk, dv, drpb = _pa_backward(dout, q, k, v, rpb, out, lse, *ctx.cfg)
    return dq, dk, dv, (drpb if rpb is not None else None), None, None, None, None, None, None


_pa_forward.register_autograd(_backward, setup_context=_setup_context)

__all__ = ["partitioned_attention", "MODES", "SDPA_MAX_PARTITIONS"]
