"""2-D neighborhood attention with dilation and relative position bias: NATTEN's functional API.

``na2d(q, k, v, kernel_size, dilation, rpb, scale, backend)`` computes, for every query on a
``[B, H, W, heads, D]`` map, ``softmax((q * scale) · k + rpb) · v`` over its ``kh x kw`` neighbours with
NATTEN <=0.17 semantics (the version NAT and DiNAT were trained with): on an axis of length L with
dilation d, query i sees the positions j ≡ i (mod d); on that sub-grid its window of k consecutive
points is centred on i and shifted inward at the borders, never truncated; the bias added to the pair
is ``rpb[head, (jy - iy) / dy + kh - 1, (jx - ix) / dw + kw - 1]``.

Backends: ``"triton"`` (fused forward and backward, registered as the ``attnzoo::na2d_fwd`` /
``attnzoo::na2d_bwd`` custom ops so ``torch.compile(fullgraph=True)`` keeps them in one graph),
``"dense"`` (SDPA over all tokens with the neighbourhood + RPB as an additive mask: exact, and the
faster choice on small maps), ``"reference"`` (pure PyTorch: dense on small maps, chunked gather
otherwise), ``"flex"`` (FlexAttention baseline) and ``"auto"`` (see ``_prefer_dense``).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from attnzoo.kernels._dispatch import resolve_backend
from attnzoo.kernels.na2d_reference import na2d_dense, na2d_reference

IntPair = Union[int, Sequence[int]]
_OWN_BACKENDS = ("dense", "flex")  # beside _dispatch.BACKENDS
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_HEAD_DIMS = range(8, 129, 8)
# backend="auto" on CUDA runs the dense masked path up to this many windows' worth of tokens H*W/(kh*kw)
# and this many scores B*heads*(H*W)^2 (1 GiB of bf16 mask gradient); see _prefer_dense.
DENSE_MAX_WINDOWS = 4
DENSE_MAX_SCORES = 2**29


def _pair(value: IntPair, name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(x, int) and not isinstance(x, bool) for x in value):
        return int(value[0]), int(value[1])
    raise TypeError(f"na2d: {name} must be an int or a (height, width) pair of ints, got {value!r}")


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: tuple[int, int],
                  dilation: tuple[int, int], rpb: Optional[torch.Tensor]) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"na2d: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 5:
            raise ValueError(f"na2d: {name} must be [B, H, W, heads, head_dim] (5-D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"na2d: {name} must be a floating-point tensor, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"na2d: {name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"na2d: {name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"na2d: {name} must be on q's device {q.device}, got {t.device}")
    for axis, (size, ks, dil) in enumerate(zip(q.shape[1:3], kernel_size, dilation)):
        axis_name = ("height", "width")[axis]
        if ks < 3 or ks % 2 == 0:
            raise ValueError(f"na2d: kernel_size must be odd and >= 3 on each axis, got {kernel_size}")
        if dil < 1:
            raise ValueError(f"na2d: dilation must be >= 1 on each axis, got {dilation}")
        if size < ks * dil:
            raise ValueError(
                f"na2d: input {axis_name} {size} is smaller than kernel_size * dilation = {ks} * {dil} = {ks * dil}; "
                f"expected {axis_name} >= {ks * dil} (pad the input or use a smaller kernel or dilation)")
    if rpb is not None:
        expected = (q.shape[3], 2 * kernel_size[0] - 1, 2 * kernel_size[1] - 1)
        if not isinstance(rpb, torch.Tensor) or tuple(rpb.shape) != expected:
            got = tuple(rpb.shape) if isinstance(rpb, torch.Tensor) else type(rpb).__name__
            raise ValueError(f"na2d: rpb must have shape [heads, 2*kh-1, 2*kw-1] = {list(expected)}, got {got}")
        if rpb.dtype not in (q.dtype, torch.float32):
            raise TypeError(f"na2d: rpb must have q's dtype {q.dtype} or torch.float32, got {rpb.dtype}")
        if rpb.device != q.device:
            raise ValueError(f"na2d: rpb must be on q's device {q.device}, got {rpb.device}")


def _prefer_dense(H: int, W: int, kernel_size: tuple[int, int], B: int, heads: int) -> bool:
    """Whether ``backend="auto"`` runs a CUDA call as masked dense SDPA rather than the Triton kernel.

    Masked SDPA runs PyTorch's memory-efficient kernel (flash attention takes no mask), 1.6-4x slower
    than unmasked SDPA, and its cost grows with (H*W)^2; the Triton kernel's grows with H*W*kh*kw but has
    too few, too long programs on small maps. Measured (H200, bf16, B128, k7, fwd+bwd, Triton / dense,
    benchmarks/NOTES_na2d.md): 7×7 h16 1.09 / 0.79 ms (no rpb 0.99 / 0.51), 14×14 h8 1.01 / 0.91-0.96
    (no rpb 1.21 / 0.44-0.59; dil 2: 1.40 / 0.97-1.08), 28×28 h4 1.41 / 3.72. Rule: dense while the map
    holds at most ``DENSE_MAX_WINDOWS`` (4) windows' worth of tokens (196 = 14×14 for k7) and at most
    ``DENSE_MAX_SCORES`` scores ``B*heads*(H*W)^2`` (bounds the quadratic work and the mask gradient SDPA
    materialises at full batch size). Dilation does not change the dense cost and only slows Triton.
    """
    tokens = H * W
    return tokens <= DENSE_MAX_WINDOWS * kernel_size[0] * kernel_size[1] and B * heads * tokens ** 2 <= DENSE_MAX_SCORES


def _check_triton(q: torch.Tensor) -> None:
    D = q.shape[-1]
    if q.dtype not in TRITON_DTYPES:
        raise TypeError(f"na2d: the triton backend supports dtypes float16, bfloat16 and float32, got {q.dtype}; "
                        "use backend='reference' for it")
    if D not in TRITON_HEAD_DIMS:
        raise ValueError(f"na2d: the triton backend supports head_dim in 8..128 in multiples of 8, got {D}; "
                         "use backend='reference' for it")


# ------------------------------------------------------------------------------------------------
# Custom ops around the Triton kernels: opaque to torch.compile, with fake kernels and autograd.
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("attnzoo::na2d_fwd", mutates_args=())
def _na2d_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: Optional[torch.Tensor],
              kernel_size: list[int], dilation: list[int], scale: float,
              deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out, lse)``; ``deterministic`` only matters to the backward and is kept for it."""
    from attnzoo.kernels import na2d_triton

    return na2d_triton.na2d_forward(q, k, v, rpb, tuple(kernel_size), tuple(dilation), scale)


@_na2d_fwd.register_fake
def _(q, k, v, rpb, kernel_size, dilation, scale, deterministic):
    B, H, W, N, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, N, H, W), dtype=torch.float32)


@torch.library.custom_op("attnzoo::na2d_bwd", mutates_args=())
def _na2d_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: Optional[torch.Tensor],
              out: torch.Tensor, lse: torch.Tensor, kernel_size: list[int], dilation: list[int], scale: float,
              rpb_grad: bool, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from attnzoo.kernels import na2d_triton

    return na2d_triton.na2d_backward(dout, q, k, v, rpb, out, lse, tuple(kernel_size), tuple(dilation), scale,
                                     rpb_grad, deterministic)


@_na2d_bwd.register_fake
def _(dout, q, k, v, rpb, out, lse, kernel_size, dilation, scale, rpb_grad, deterministic):
    drpb = torch.empty_like(rpb) if (rpb is not None and rpb_grad) else q.new_empty((0,))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), drpb


def _setup_context(ctx, inputs, output):
    q, k, v, rpb, kernel_size, dilation, scale, deterministic = inputs
    ctx.save_for_backward(q, k, v, rpb, *output)
    ctx.kernel_size, ctx.dilation, ctx.scale = kernel_size, dilation, scale
    ctx.rpb_grad = rpb is not None and rpb.requires_grad
    ctx.deterministic = deterministic


def _backward(ctx, dout, dlse):
    q, k, v, rpb, out, lse = ctx.saved_tensors
    dq, dk, dv, drpb = _na2d_bwd(dout, q, k, v, rpb, out, lse, ctx.kernel_size, ctx.dilation, ctx.scale,
                                 ctx.rpb_grad, ctx.deterministic)
    return dq, dk, dv, (drpb if ctx.rpb_grad else None), None, None, None, None


_na2d_fwd.register_autograd(_backward, setup_context=_setup_context)


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
        backend: ``"auto"``, ``"triton"`` (always the fused kernel), ``"dense"`` (always masked SDPA),
            ``"reference"``, or ``"flex"`` (FlexAttention with the same mask; a baseline for benchmarks).
            ``"auto"`` on CUDA runs ``"dense"`` where ``_prefer_dense`` predicts it faster (maps of at most
            4 windows' worth of tokens, e.g. NAT/DiNAT's 14×14 and 7×7 stages) and Triton elsewhere; on other devices the reference
            (which is itself dense on small maps). All paths compute the same function: results agree
            up to floating-point rounding.
        deterministic: reduce the rpb gradient without float atomics, so repeated runs are bit-identical
            (triton backward; with it, ``"auto"`` keeps to Triton). ``None`` follows
            ``torch.are_deterministic_algorithms_enabled()``.

    Returns:
        ``[B, H, W, heads, head_dim]`` in q's dtype.
    """
    route = resolve_backend(backend, q.device, "na2d", _OWN_BACKENDS)
    kernel_size, dilation = _pair(kernel_size, "kernel_size"), _pair(dilation, "dilation")
    _check_inputs(q, k, v, kernel_size, dilation, rpb)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if route == "flex":
        from attnzoo.kernels.na2d_flex import na2d_flex

        return na2d_flex(q, k, v, kernel_size, dilation, rpb, scale)
    if route == "dense":
        return na2d_dense(q, k, v, kernel_size, dilation, rpb, scale)
    if route == "reference":
        return na2d_reference(q, k, v, kernel_size, dilation, rpb, scale)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    B, H, W, N, _ = q.shape
    if backend == "auto" and not deterministic and _prefer_dense(H, W, kernel_size, B, N):
        return na2d_dense(q, k, v, kernel_size, dilation, rpb, scale)
    _check_triton(q)
    out, _ = _na2d_fwd(q, k, v, rpb, list(kernel_size), list(dilation), scale, bool(deterministic))
    return out
