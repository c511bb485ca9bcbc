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

from attnzoo.kernels import _op
from attnzoo.kernels.partitioned_attention_reference import partitioned_attention_reference

MODES = ("window", "grid")
_OP = "partitioned_attention"
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
    _op.check_qkv(_OP, q, k, v)
    if mode not in MODES:
        raise ValueError(f"{_OP}: mode must be one of {MODES}, got {mode!r}")
    part = _pair(partition_size, "partition_size", 1)
    shift = _pair(shift, "shift", 0)
    if any(shift) and mode != "window":
        raise ValueError(f"{_OP}: shift must be 0 in mode='grid', got {shift}")
    if shift[0] >= part[0] or shift[1] >= part[1]:
        raise ValueError(f"{_OP}: shift must be smaller than partition_size {part}, got {shift}")
    _op.check_bias(_OP, "rpb", rpb, q, (q.shape[3], 2 * part[0] - 1, 2 * part[1] - 1), "[heads, 2*ph-1, 2*pw-1]")
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
        backend: ``"auto"`` (:func:`auto_backend` on CUDA, the reference elsewhere), ``"triton"``,
            ``"dense"`` (timm's route: partition copies + PyTorch's fused SDPA, in q's dtype) or
            ``"reference"`` (the same code: the reference is partition + SDPA).

    Returns:
        ``[B, H, W, heads, head_dim]`` in q's dtype.
    """
    part, shift = _check(q, k, v, partition_size, mode, shift, rpb)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if route(backend, q, part, shift, rpb) != "triton":  # the reference (partition + SDPA) is the dense path
        return partitioned_attention_reference(q, k, v, part, mode, shift, rpb, scale)
    _op.check_triton(_OP, q, {"q/k/v": q.shape[-1]}, lo=1, hi=MAX_TRITON_HEAD_DIM)
    if part[0] * part[1] > MAX_TRITON_PARTITION:
        raise ValueError(f"{_OP}: backend='triton' takes partitions of <= {MAX_TRITON_PARTITION} tokens, "
                         f"got partition_size {part}")
    if _op.interpreter_upcast(q):
        f32 = (t.float() for t in (q, k, v))
        return partitioned_attention(*f32, part, mode, shift, None if rpb is None else rpb.float(), scale,
                                     "triton").to(q.dtype)
    return _pa_triton(q, k, v, rpb, part[0], part[1], mode == "grid", shift[0], shift[1], scale)


def route(backend: str, x: torch.Tensor, part: tuple[int, int], shift: tuple[int, int],
          rpb: Optional[torch.Tensor]) -> str:
    """The path :func:`partitioned_attention` takes for ``backend`` on ``[B, H, W, ...]`` maps shaped and placed
    like ``x``: ``"triton"``, ``"dense"`` or ``"reference"``."""
    return _op.resolve_backend(_OP, backend, x.device, lambda: auto_backend(x, part, shift, rpb))


DENSE_MAX_PARTITIONS = 4  # partitions per image up to which "auto" prefers the dense path (see auto_backend)


def auto_backend(q: torch.Tensor, part: tuple[int, int], shift: tuple[int, int], rpb: Optional[torch.Tensor]) -> str:
    """What ``backend="auto"`` runs for CUDA tensors: ``"dense"`` (partition + PyTorch's fused SDPA) for
    maps with no bias, no shift, no padding and at most ``DENSE_MAX_PARTITIONS`` partitions per image
    (there SDPA runs unmasked flash attention and the partition copies are tiny), else ``"triton"``.
    The comparison behind it is in ``benchmarks/NOTES_partitioned_attention.md``."""
    H, W = q.shape[1:3]
    dense = (rpb is None and not any(shift) and H % part[0] == 0 and W % part[1] == 0
             and (H // part[0]) * (W // part[1]) <= DENSE_MAX_PARTITIONS)
    return "dense" if dense else "triton"


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: Optional[torch.Tensor], ph: int, pw: int,
             grid: bool, sy: int, sx: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output, fp32 log-sum-exp ``[B, H, W, heads]`` and the expanded bias tile (kept for the backward;
    empty without a bias)."""
    from attnzoo.kernels.partitioned_attention_triton import bias_tile, forward

    bias = bias_tile(rpb, ph, pw)
    out, lse = forward(q, k, v, bias, ph, pw, grid, sy, sx, scale)
    return out, lse, q.new_empty((0,), dtype=torch.float32) if bias is None else bias


def _fake_forward(q, k, v, rpb, ph, pw, grid, sy, sx, scale):
    from attnzoo.kernels.partitioned_attention_triton import tile_size

    n = tile_size(ph * pw)
    bias = q.new_empty((0,), dtype=torch.float32) if rpb is None else q.new_empty((rpb.shape[0], n, n),
                                                                                   dtype=torch.float32)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(q.shape[:4], dtype=torch.float32), bias)


def _backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: Optional[torch.Tensor],
              out: torch.Tensor, lse: torch.Tensor, bias: torch.Tensor, ph: int, pw: int, grid: bool, sy: int, sx: int,
              scale: float, needs_grad: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from attnzoo.kernels.partitioned_attention_triton import backward, fold_bias_grad

    dq, dk, dv, dbias = backward(dout, q, k, v, None if rpb is None else bias, out, lse, ph, pw, grid, sy, sx, scale)
    drpb = fold_bias_grad(dbias, ph, pw).to(rpb.dtype) if rpb is not None and needs_grad[3] else q.new_empty(0)
    return dq, dk, dv, drpb


def _fake_backward(dout, q, k, v, rpb, out, lse, bias, ph, pw, grid, sy, sx, scale, needs_grad):
    drpb = torch.empty_like(rpb) if rpb is not None and needs_grad[3] else q.new_empty(0)
    return (*(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v)), drpb)


_pa_triton = _op.FusedOp("partitioned_attention", 4, _forward, _backward, _fake_forward, _fake_backward,
                         inductor_launches=True)

__all__ = ["partitioned_attention", "auto_backend", "route", "MODES", "DENSE_MAX_PARTITIONS"]
