"""2-D neighborhood attention with dilation and relative position bias: NATTEN's functional API.

``na2d(q, k, v, kernel_size, dilation, rpb, scale, backend)`` computes, for every query on a
``[B, H, W, heads, D]`` map, ``softmax((q * scale) · k + rpb) · v`` over its ``kh x kw`` neighbours with
NATTEN <=0.17 semantics (the version NAT and DiNAT were trained with): on an axis of length L with
dilation d, query i sees the positions j ≡ i (mod d); on that sub-grid its window of k consecutive
points is centred on i and shifted inward at the borders, never truncated; the bias added to the pair
is ``rpb[head, (jy - iy) / dy + kh - 1, (jx - ix) / dw + kw - 1]``.

Backends (:data:`attnzoo.kernels._op.BACKENDS`): ``"triton"`` (fused forward, two-launch backward with a
deterministic bias gradient), ``"dense"`` (SDPA over all tokens with the neighbourhood + RPB as an
additive mask: exact), ``"reference"`` (pure PyTorch) and ``"auto"`` (:func:`auto_backend`).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from attnzoo.kernels import _op
from attnzoo.kernels.na2d_reference import na2d_dense, na2d_reference

IntPair = Union[int, Sequence[int]]
_OP = "na2d"


def _pair(value: IntPair, name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(x, int) and not isinstance(x, bool) for x in value):
        return int(value[0]), int(value[1])
    raise TypeError(f"{_OP}: {name} must be an int or a (height, width) pair of ints, got {value!r}")


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: tuple[int, int],
                  dilation: tuple[int, int], rpb: Optional[torch.Tensor]) -> None:
    _op.check_qkv(_OP, q, k, v)
    for axis, (size, ks, dil) in enumerate(zip(q.shape[1:3], kernel_size, dilation)):
        axis_name = ("height", "width")[axis]
        if ks < 3 or ks % 2 == 0:
            raise ValueError(f"{_OP}: kernel_size must be odd and >= 3 on each axis, got {kernel_size}")
        if dil < 1:
            raise ValueError(f"{_OP}: dilation must be >= 1 on each axis, got {dilation}")
        if size < ks * dil:
            raise ValueError(
                f"{_OP}: input {axis_name} {size} is smaller than kernel_size * dilation = {ks} * {dil} = {ks * dil}; "
                f"expected {axis_name} >= {ks * dil} (pad the input or use a smaller kernel or dilation)")
    _op.check_bias(_OP, "rpb", rpb, q, (q.shape[3], 2 * kernel_size[0] - 1, 2 * kernel_size[1] - 1),
                   "[heads, 2*kh-1, 2*kw-1]")


def auto_backend(q: torch.Tensor, kernel_size: tuple[int, int]) -> str:
    """What ``backend="auto"`` runs for CUDA tensors: always ``"triton"``.

    The masked dense path (SDPA over all tokens with the neighbourhood as a mask) was slower than the
    fused kernels on every NAT/DiNAT stage shape, 7x7 maps included, and its backward is not
    deterministic; ``benchmarks/NOTES_na2d.md`` has the comparison. ``"dense"`` stays available by name.
    """
    return "triton"


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: Optional[torch.Tensor], kernel_size: list[int],
             dilation: list[int], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    from attnzoo.kernels import na2d_triton

    return na2d_triton.na2d_forward(q, k, v, rpb, tuple(kernel_size), tuple(dilation), scale)


def _fake_forward(q, k, v, rpb, kernel_size, dilation, scale):
    B, H, W, N, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, N, H, W), dtype=torch.float32)


def _backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: Optional[torch.Tensor],
              out: torch.Tensor, lse: torch.Tensor, kernel_size: list[int], dilation: list[int], scale: float,
              needs_grad: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from attnzoo.kernels import na2d_triton

    rpb_grad = rpb is not None and needs_grad[3]
    dq, dk, dv, drpb = na2d_triton.na2d_backward(dout, q, k, v, rpb, out, lse, tuple(kernel_size), tuple(dilation),
                                                 scale, rpb_grad)
    return dq, dk, dv, drpb.to(rpb.dtype) if rpb_grad else q.new_empty((0,))


def _fake_backward(dout, q, k, v, rpb, out, lse, kernel_size, dilation, scale, needs_grad):
    drpb = torch.empty_like(rpb) if (rpb is not None and needs_grad[3]) else q.new_empty((0,))
    return (*(torch.empty_like(q, memory_format=torch.contiguous_format) for _ in range(3)), drpb)


_na2d_triton = _op.FusedOp("na2d", 4, _forward, _backward, _fake_forward, _fake_backward, inductor_launches=True)


def na2d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: IntPair, dilation: IntPair = 1,
         rpb: Optional[torch.Tensor] = None, scale: Optional[float] = None, backend: str = "auto", *,
         deterministic: Optional[bool] = None) -> torch.Tensor:
    """2-D neighborhood attention, NATTEN <=0.17 semantics, heads-last layout.

    Args:
        q, k, v: ``[B, H, W, heads, head_dim]``, same shape, dtype and device.
        kernel_size: odd window size >= 3, an int or per-axis ``(kh, kw)``.
        dilation: int or ``(dh, dw)``; H >= kh * dh and W >= kw * dw.
        rpb: optional relative position bias ``[heads, 2*kh-1, 2*kw-1]`` (q's dtype or float32).
        scale: multiplies q before q·k; defaults to ``head_dim ** -0.5``.
        backend: ``"auto"`` (:func:`auto_backend` on CUDA, the reference elsewhere), ``"triton"``,
            ``"dense"`` or ``"reference"``. All paths compute the same function: results agree up to
            floating-point rounding.
        deterministic: accepted for NATTEN compatibility; the Triton backward is always bit-reproducible
            (its bias gradient is a fixed-order sum), and ``"auto"`` always runs Triton on CUDA.

    Returns:
        ``[B, H, W, heads, head_dim]`` in q's dtype.
    """
    kernel_size, dilation = _pair(kernel_size, "kernel_size"), _pair(dilation, "dilation")
    _check_inputs(q, k, v, kernel_size, dilation, rpb)
    route = _op.resolve_backend(_OP, backend, q.device, lambda: auto_backend(q, kernel_size))
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if route == "dense":
        return na2d_dense(q, k, v, kernel_size, dilation, rpb, scale)
    if route == "reference":
        return na2d_reference(q, k, v, kernel_size, dilation, rpb, scale)
    _op.check_triton(_OP, q, {"q/k/v": q.shape[-1]})
    if _op.interpreter_upcast(q):
        f32 = (t.float() for t in (q, k, v))
        return na2d(*f32, kernel_size, dilation, None if rpb is None else rpb.float(), scale, "triton").to(q.dtype)
    return _na2d_triton(q, k, v, rpb, list(kernel_size), list(dilation), scale)
