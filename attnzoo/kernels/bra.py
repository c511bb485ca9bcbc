"""Bi-level routing attention (BiFormer), NATTEN-style functional API.

``bra`` routes and attends; ``routed_attention`` is the attention half for a given region index, exposed
for other routed/sparse attentions. Tensors are heads-last ``[B, H, W, heads, D]``; ``v`` may have a
different head dim than ``q``/``k`` (BiFormer's ``qk_dim`` and ``dim`` can differ). The map is split into
an ``n_win x n_win`` grid of regions numbered in raster order; H and W must be divisible by ``n_win``
(padding is the backbone's job, as BiFormer's ``auto_pad``).

Backends: ``"reference"`` (the gather formulation), ``"triton"`` (fused kernels reading routed regions
by index; a pair of ``torch.library`` custom ops, so it runs under ``torch.compile(fullgraph=True)``),
``"dense"`` (exact masked SDPA over all tokens, :mod:`attnzoo.kernels.bra_dense`) and ``"auto"``:

* **Dense rule** (:func:`dense_predicted_faster`). On CUDA, ``auto`` runs ``dense`` when the ``B * N²``
  bias fits ``DENSE_MAX_BIAS_BYTES`` and each query's ``N = H * W`` dense keys are at most
  ``DENSE_KEY_RATIO`` times its routed keys ``topk * T``, weighted by ``SMALL_REGION_PENALTY`` for
  regions of ``T < SMALL_REGION_TOKENS`` tokens (the Triton kernel pads their rows and loses that much per
  key); otherwise Triton. Fitted to H200 bf16 forward+backward timings (ms, dense = cuDNN SDPA with the
  bias): 14² 2x2 regions top-16: 0.36 dense vs 1.15 Triton; 20² 2x2 top-16: 1.06 vs 2.34; 28² 2x2
  top-16: 3.05 vs 4.67; 21² 3x3 top-16: 1.08 vs 2.40; but BiFormer-S stage 2 (28², 4x4 top-4): 1.63
  vs 0.95. Elsewhere ``auto`` is the reference.
* **Backward rule.** The Triton dK/dV backward has two modes: fp32 atomics (run-to-run rounding noise)
  or an inverted region index with a fixed summation order (bit-reproducible). ``deterministic=None``
  picks the inverted index for regions of ``T >= DETERMINISTIC_MIN_REGION_TOKENS`` tokens, where
  atomics into long key rows lose (H200: 16x16 regions, 7.1 vs 12.3 ms) and atomics otherwise (8x8
  regions: 0.66 vs 1.21 ms). ``True``/``False`` force a mode; ``torch.use_deterministic_algorithms(True)``
  always forces the inverted index. The dense and reference backends are deterministic as far as
  torch's own kernels are.
"""
from __future__ import annotations

import torch

from attnzoo.kernels._dispatch import resolve_backend
from attnzoo.kernels.bra_dense import routed_attention_dense
from attnzoo.kernels.bra_reference import route_regions, routed_attention_reference

__all__ = ["bra", "routed_attention"]

_OWN_BACKENDS = ("dense",)  # beside _dispatch.BACKENDS
DENSE_KEY_RATIO = 6
SMALL_REGION_TOKENS, SMALL_REGION_PENALTY = 8, 2.5
DENSE_MAX_BIAS_BYTES = 2**28
DETERMINISTIC_MIN_REGION_TOKENS = 256

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MIN_HEAD_DIM, _MAX_HEAD_DIM = 8, 128


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_win: int, op: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 5:
            raise ValueError(f"{op}: {name} must be [B, H, W, heads, D] (5 dims), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if k.shape != q.shape:
        raise ValueError(f"{op}: k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"{op}: v must be [B, H, W, heads, Dv] with [B, H, W, heads] = {tuple(q.shape[:-1])}, "
                         f"got {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{op}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"{op}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if isinstance(n_win, bool) or not isinstance(n_win, int) or n_win < 1:
        raise ValueError(f"{op}: n_win must be a positive int, got {n_win!r}")
    H, W = q.shape[1:3]
    if H % n_win or W % n_win:
        raise ValueError(f"{op}: H and W must be divisible by n_win={n_win}, got H={H}, W={W}; pad the map "
                         f"to multiples of n_win first")


def _check_scale(scale: float | None, name: str, op: str) -> None:
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0):
        raise ValueError(f"{op}: {name} must be None or a positive float, got {scale!r}")


def _check_triton_inputs(q: torch.Tensor, v: torch.Tensor, op: str) -> None:
    if q.dtype not in _TRITON_DTYPES:
        raise TypeError(f"{op}: backend='triton' supports dtypes {_TRITON_DTYPES}, got {q.dtype}; "
                        "use backend='reference'")
    if q.dtype == torch.bfloat16 and q.device.type != "cuda":
        raise TypeError(f"{op}: backend='triton' on {q.device.type} runs Triton's interpreter, whose tl.dot does not "
                        "support bfloat16 (triton-lang/triton#11584); use float16/float32 or backend='reference'")
    for name, d in (("q/k", q.shape[-1]), ("v", v.shape[-1])):
        if not _MIN_HEAD_DIM <= d <= _MAX_HEAD_DIM:
            raise ValueError(f"{op}: backend='triton' needs {name} head dim in [{_MIN_HEAD_DIM}, {_MAX_HEAD_DIM}], "
                             f"got {d}; use backend='reference'")


@torch.library.custom_op("attnzoo::routed_attention_fwd", mutates_args=())
def _routed_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, region_index: torch.Tensor,
                          n_win: int, scale: float, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward: output and the fp32 log-sum-exp ``[B, H, W, heads]`` (``deterministic`` is for backward)."""
    from attnzoo.kernels import bra_triton

    return bra_triton.routed_attention_fwd(q, k, v, region_index, n_win, scale)


@_routed_attention_fwd.register_fake
def _(q, k, v, region_index, n_win, scale, deterministic):
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("attnzoo::routed_attention_bwd", mutates_args=())
def _routed_attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          out: torch.Tensor, lse: torch.Tensor, region_index: torch.Tensor, n_win: int,
                          scale: float, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward: dq, dk, dv."""
    from attnzoo.kernels import bra_triton

    return bra_triton.routed_attention_bwd(grad_out, q, k, v, out, lse, region_index, n_win, scale, deterministic)


@_routed_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, region_index, n_win, scale, deterministic):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, region_index, n_win, scale, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, region_index, out, lse)
    ctx.n_win, ctx.scale, ctx.deterministic = n_win, scale, deterministic
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out: torch.Tensor, _grad_lse: torch.Tensor | None):
    q, k, v, region_index, out, lse = ctx.saved_tensors
    dq, dk, dv = _routed_attention_bwd(grad_out, q, k, v, out, lse, region_index, ctx.n_win, ctx.scale,
                                       ctx.deterministic)
    return dq, dk, dv, None, None, None, None


_routed_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


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
        backend: ``"auto"`` (module doc: dense on small CUDA maps, else Triton on CUDA, reference
            elsewhere), ``"triton"``, ``"dense"`` (masked SDPA over all tokens) or ``"reference"``.
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
    if not torch.compiler.is_compiling():  # one host sync; bra() routes itself and skips it
        lo, hi = (int(x) for x in torch.aminmax(region_index))
        if lo < 0 or hi >= R:
            raise ValueError(f"{op}: region_index values must be in [0, n_win**2) = [0, {R}), got range [{lo}, {hi}]")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _attend(q, k, v, region_index, n_win, scale, backend, deterministic, op)


def choose_backend(backend: str, q: torch.Tensor, n_win: int, topk: int, op: str = "bra") -> str:
    """The backend that runs for ``backend`` on q ``[B, H, W, heads, D]``: the dense rule of the module
    doc for ``"auto"`` on CUDA, then :func:`attnzoo.kernels._dispatch.resolve_backend`."""
    route = resolve_backend(backend, q.device, op, _OWN_BACKENDS)
    if backend == "auto" and q.device.type == "cuda" and dense_predicted_faster(
            q.shape[0], q.shape[1], q.shape[2], n_win, topk, q.element_size()):
        return "dense"
    return route


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
    backend = choose_backend(backend, q, n_win, region_index.shape[-1], op)
    if backend == "reference":
        return routed_attention_reference(q, k, v, region_index, n_win, scale)
    if backend == "dense":
        return routed_attention_dense(q, k, v, region_index, n_win, scale)
    _check_triton_inputs(q, v, op)
    region_tokens = (q.shape[1] // n_win) * (q.shape[2] // n_win)
    return _routed_attention_fwd(q, k, v, region_index, n_win, scale,
                                 choose_deterministic(deterministic, region_tokens))[0]


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
