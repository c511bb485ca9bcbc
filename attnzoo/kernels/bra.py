"""Bi-level routing attention (BiFormer), NATTEN-style functional API.

``bra`` routes and attends; ``routed_attention`` is the attention half for a given region index, exposed
for other routed/sparse attentions. Tensors are heads-last ``[B, H, W, heads, D]``; ``v`` may have a
different head dim than ``q``/``k`` (BiFormer's ``qk_dim`` and ``dim`` can differ). The map is split into
an ``n_win x n_win`` grid of regions numbered in raster order; H and W must be divisible by ``n_win``
(padding is the backbone's job, as BiFormer's ``auto_pad``).

Backends (:data:`attnzoo.kernels._op.BACKENDS`): ``"reference"`` (the gather formulation), ``"triton"``
(fused kernels reading routed regions by index), ``"dense"`` (exact masked SDPA over all tokens,
:mod:`attnzoo.kernels.bra_dense`) and ``"auto"`` (:func:`auto_backend`):

* **Dense rule** (:func:`dense_predicted_faster`). On CUDA, ``auto`` runs ``dense`` when the ``B * N²``
  bias fits ``DENSE_MAX_BIAS_BYTES`` and each query's ``N = H * W`` dense keys are at most
  ``DENSE_KEY_RATIO`` times its routed keys ``topk * T``, weighted by ``SMALL_REGION_PENALTY`` for
  regions of ``T < SMALL_REGION_TOKENS`` tokens (the Triton kernel pads their rows and loses that much per
  key); otherwise Triton. The timings the constants were fitted to are in ``benchmarks/NOTES_bra.md``.
* **Backward rule** (:func:`choose_deterministic`). The Triton dK/dV backward has two modes: fp32 atomics
  (run-to-run rounding noise) or an inverted region index with a fixed summation order
  (bit-reproducible). ``deterministic=None`` picks the inverted index for regions of
  ``T >= DETERMINISTIC_MIN_REGION_TOKENS`` tokens: with the eager autograd path it measured faster at
  every BiFormer shape, so the threshold is 0 and atomics run only when asked for. ``True``/``False``
  force a mode; ``torch.use_deterministic_algorithms(True)`` always forces the inverted index. The dense
  and reference backends are deterministic as far as torch's own kernels are.
"""
from __future__ import annotations

import torch

from attnzoo.kernels import _op
from attnzoo.kernels.bra_dense import routed_attention_dense
from attnzoo.kernels.bra_reference import route_regions, routed_attention_reference

__all__ = ["bra", "routed_attention"]

DENSE_KEY_RATIO = 6
SMALL_REGION_TOKENS, SMALL_REGION_PENALTY = 8, 2.5
DENSE_MAX_BIAS_BYTES = 2**28
DETERMINISTIC_MIN_REGION_TOKENS = 0



def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_win: int, op: str) -> None:
    _op.check_qkv(op, q, k, v, v_dim_may_differ=True)
    if isinstance(n_win, bool) or not isinstance(n_win, int) or n_win < 1:
        raise ValueError(f"{op}: n_win must be a positive int, got {n_win!r}")
    H, W = q.shape[1:3]
    if H % n_win or W % n_win:
        raise ValueError(f"{op}: H and W must be divisible by n_win={n_win}, got H={H}, W={W}; pad the map "
                         f"to multiples of n_win first")


def _check_scale(scale: float | None, name: str, op: str) -> None:
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0):
        raise ValueError(f"{op}: {name} must be None or a positive float, got {scale!r}")


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, region_index: torch.Tensor, n_win: int, scale: float,
             deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and the fp32 log-sum-exp ``[B, H, W, heads]`` (``deterministic`` is for the backward)."""
    from attnzoo.kernels import bra_triton

    return bra_triton.routed_attention_fwd(q, k, v, region_index, n_win, scale)


def _fake_forward(q, k, v, region_index, n_win, scale, deterministic):
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(q.shape[:-1], dtype=torch.float32)


def _backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, region_index: torch.Tensor,
              out: torch.Tensor, lse: torch.Tensor, n_win: int, scale: float, deterministic: bool,
              needs_grad: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from attnzoo.kernels import bra_triton

    dq, dk, dv = bra_triton.routed_attention_bwd(dout, q, k, v, out, lse, region_index, n_win, scale, deterministic)
    return dq, dk, dv, region_index.new_empty(0)


def _fake_backward(dout, q, k, v, region_index, out, lse, n_win, scale, deterministic, needs_grad):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), region_index.new_empty(0)


_bra_triton = _op.FusedOp("routed_attention", 4, _forward, _backward, _fake_forward, _fake_backward,
                          inductor_launches=True)


def routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, region_index: torch.Tensor, n_win: int,
                     scale: float | None = None, backend: str = "auto",
                     deterministic: bool | None = None) -> torch.Tensor:
    """Attention of every query token to all tokens of its region's routed regions.

    Args:
        q, k: ``[B, H, W, heads, D]``; v: ``[B, H, W, heads, Dv]``.
        region_index: ``[B, n_win**2, topk]`` integer tensor; row ``r`` lists the key regions that query
            region ``r`` attends to (raster order, ``0 <= index < n_win**2``). A repeated entry counts
            its region's keys twice.
        n_win: regions per side; H and W must be divisible by it.
        scale: softmax scale, default ``D**-0.5``.
        backend: ``"auto"`` (:func:`auto_backend` on CUDA, the reference elsewhere), ``"triton"``,
            ``"dense"`` (masked SDPA over all tokens) or ``"reference"``.
        deterministic: Triton backward mode: ``True`` inverted index (bit-reproducible), ``False`` fp32
            atomics, ``None`` by region size (module doc). ``torch.use_deterministic_algorithms(True)``
            forces ``True``.

    Returns:
        ``[B, H, W, heads, Dv]`` in q's dtype.
    """
    op = "routed_attention"
    _check_inputs(q, k, v, n_win, op)
    _check_scale(scale, "scale", op)
    B, R = q.shape[0], n_win * n_win
    if not isinstance(region_index, torch.Tensor) or region_index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: region_index must be an int32/int64 tensor, got "
                        f"{getattr(region_index, 'dtype', type(region_index).__name__)}")
    if region_index.dim() != 3 or region_index.shape[:2] != (B, R) or not 1 <= region_index.shape[2] <= R:
        raise ValueError(f"{op}: region_index must be [B, n_win**2, topk] = [{B}, {R}, 1..{R}], "
                         f"got {tuple(region_index.shape)}")
    if region_index.device != q.device:
        raise ValueError(f"{op}: region_index must be on q's device {q.device}, got {region_index.device}")
    if not torch.compiler.is_compiling():  # checked on the device: no host sync (bra() routes itself and skips it)
        torch._assert_async(((region_index >= 0) & (region_index < R)).all(),
                            f"{op}: region_index values must be in [0, n_win**2) = [0, {R})")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _attend(q, k, v, region_index, n_win, scale, backend, deterministic, op)


def auto_backend(q: torch.Tensor, n_win: int, topk: int) -> str:
    """What ``backend="auto"`` runs for CUDA tensors: ``"dense"`` where :func:`dense_predicted_faster`
    says so, else ``"triton"`` (the module doc gives the rule and the timings behind it)."""
    B, H, W = q.shape[:3]
    return "dense" if dense_predicted_faster(B, H, W, n_win, topk, q.element_size()) else "triton"


def dense_predicted_faster(B: int, H: int, W: int, n_win: int, topk: int, element_size: int) -> bool:
    """The dense rule (module doc): ``B * N² * element_size <= DENSE_MAX_BIAS_BYTES`` and
    ``N <= DENSE_KEY_RATIO * topk * T * (SMALL_REGION_PENALTY if T < SMALL_REGION_TOKENS else 1)``."""
    N, T = H * W, (H // n_win) * (W // n_win)
    routed_cost = topk * T * (SMALL_REGION_PENALTY if T < SMALL_REGION_TOKENS else 1)
    return B * N * N * element_size <= DENSE_MAX_BIAS_BYTES and N <= DENSE_KEY_RATIO * routed_cost


def choose_deterministic(deterministic: bool | None, region_tokens: int) -> bool:
    """Triton backward mode (module doc): the user's choice, else the inverted index for large regions;
    ``torch.use_deterministic_algorithms(True)`` always wins."""
    if torch.are_deterministic_algorithms_enabled():
        return True
    if deterministic is None:
        return region_tokens >= DETERMINISTIC_MIN_REGION_TOKENS
    return bool(deterministic)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, region_index: torch.Tensor, n_win: int,
            scale: float, backend: str, deterministic: bool | None, op: str) -> torch.Tensor:
    """Dispatch checked inputs to the chosen backend."""
    route = _op.resolve_backend(op, backend, q.device, lambda: auto_backend(q, n_win, region_index.shape[-1]))
    if route == "reference":
        return routed_attention_reference(q, k, v, region_index, n_win, scale)
    if route == "dense":
        return routed_attention_dense(q, k, v, region_index, n_win, scale)
    _op.check_triton(op, q, {"q/k": q.shape[-1], "v": v.shape[-1]})
    if _op.interpreter_upcast(q):
        out = _attend(q.float(), k.float(), v.float(), region_index, n_win, scale, "triton", deterministic, op)
        return out.to(q.dtype)
    region_tokens = (q.shape[1] // n_win) * (q.shape[2] // n_win)
    return _bra_triton(q, k, v, region_index, n_win, scale, choose_deterministic(deterministic, region_tokens))


def bra(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_win: int, topk: int, scale: float | None = None,
        routing_scale: float | None = None, backend: str = "auto",
        deterministic: bool | None = None) -> torch.Tensor:
    """Bi-level routing attention: route regions, then attend to the routed regions' tokens.

    Region queries/keys are the means of q/k over each region across all heads together; region affinity
    is ``(q_r * routing_scale) @ k_r^T``; each query region keeps its ``topk`` best key regions (shared by
    all heads, no gradient through routing) and every query token attends, per head, to all their tokens.

    Args:
        q, k: ``[B, H, W, heads, D]``; v: ``[B, H, W, heads, Dv]``.
        n_win: regions per side (H and W divisible by it); topk: routed regions, ``1..n_win**2``.
        scale: softmax scale, default ``D**-0.5``. BiFormer passes ``(heads * D)**-0.5``.
        routing_scale: affinity scale, default ``scale`` (it changes only ties of the top-k order).
        backend, deterministic: as for :func:`routed_attention`.

    Returns:
        ``[B, H, W, heads, Dv]`` in q's dtype.
    """
    op = "bra"
    _check_inputs(q, k, v, n_win, op)
    _check_scale(scale, "scale", op)
    _check_scale(routing_scale, "routing_scale", op)
    R = n_win * n_win
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= R:
        raise ValueError(f"{op}: topk must be an int in [1, n_win**2] = [1, {R}], got {topk!r}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    routing_scale = scale if routing_scale is None else float(routing_scale)
    region_index = route_regions(q, k, n_win, topk, routing_scale)
    return _attend(q, k, v, region_index, n_win, scale, backend, deterministic, op)
