"""BiFormer attention blocks: bi-level routing attention (BRA) and the full attention of its last stage.

All take and return NHWC maps ``[B, H, W, C]``. Submodule names follow the official BiFormer code
(``qkv.qkv``, ``lepe``, ``wo``; ``qkv_linear``, ``output_linear``, ``lepe``; ``qkv``, ``proj``, ``lepe``) so
official checkpoints load key for key.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import nn

from attnzoo.kernels.bra import bra, routed_attention


def _positive_int(value: int, name: str, owner: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


def _check_routing_args(owner: str, dim: int, qk_dim: int, num_heads: int, n_win: int, topk: int,
                        side_dwconv: int) -> None:
    for name, value in (("dim", dim), ("num_heads", num_heads), ("n_win", n_win), ("topk", topk),
                        ("qk_dim", qk_dim), ("side_dwconv", side_dwconv)):
        _positive_int(value, name, owner)
    if dim % num_heads or qk_dim % num_heads:
        raise ValueError(f"{owner}: dim={dim} and qk_dim={qk_dim} must be divisible by num_heads={num_heads}")
    if topk > n_win * n_win:
        raise ValueError(f"{owner}: topk must be in [1, n_win**2] = [1, {n_win * n_win}], got {topk}")
    if side_dwconv % 2 == 0:
        raise ValueError(f"{owner}: side_dwconv (LePE kernel size) must be odd, got {side_dwconv}")


class QKVLinear(nn.Module):
    """One projection to ``[q (qk_dim) | k (qk_dim) | v (dim)]``; its own module so the official key
    ``attn.qkv.qkv.*`` maps one-to-one."""

    def __init__(self, dim: int, qk_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.qkv(x)


@register_notrace_module  # an FX leaf: shape-dependent padding and kernel dispatch do not trace
class BiLevelRoutingAttention(nn.Module):
    """Bi-level routing attention with a LePE depthwise conv on V (BiFormer's legacy BRA).

    The map is cut into ``n_win x n_win`` regions; each query region routes to its ``topk`` most related
    regions (region-mean q·k over all heads, no gradient) and its tokens attend, per head, to all tokens
    of those regions through :func:`attnzoo.kernels.bra.bra`. As in the official code, attention and
    routing are scaled by ``qk_dim ** -0.5`` (the full qk width, not the head dim) unless ``qk_scale``
    is given.

    Any H, W: the normalised input is zero-padded at the bottom/right to multiples of ``n_win`` and the
    output cropped back (the official ``auto_pad``), so padded tokens take part as keys with the
    projection's bias values, exactly as in the official dense models. A map that needs no padding is
    untouched.

    ``attn_backend`` ("auto", "triton", "reference") is passed to the kernel as ``backend``.
    """

    def __init__(self, dim: int, num_heads: int, n_win: int = 7, topk: int = 4, qk_dim: int | None = None,
                 qk_scale: float | None = None, side_dwconv: int = 5, qkv_bias: bool = True) -> None:
        super().__init__()
        qk_dim = qk_dim or dim
        _check_routing_args(type(self).__name__, dim, qk_dim, num_heads, n_win, topk, side_dwconv)
        self.dim, self.qk_dim, self.num_heads = dim, qk_dim, num_heads
        self.n_win, self.topk = n_win, topk
        self.scale = qk_scale or qk_dim ** -0.5
        self.attn_backend = "auto"

        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
        self.qkv = QKVLinear(dim, qk_dim, bias=qkv_bias)
        self.wo = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        pad_b, pad_r = (-H) % self.n_win, (-W) % self.n_win
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        Hp, Wp = H + pad_b, W + pad_r

        q, k, v = self.qkv(x).split([self.qk_dim, self.qk_dim, self.dim], dim=-1)
        lepe = self.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        heads = (B, Hp, Wp, self.num_heads, -1)
        out = bra(q.reshape(heads), k.reshape(heads), v.reshape(heads), self.n_win, self.topk,
                  scale=self.scale, routing_scale=self.scale, backend=self.attn_backend)
        out = out.reshape(B, Hp, Wp, C) + lepe
        if pad_b or pad_r:
            out = out[:, :H, :W]
        return self.wo(out)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, qk_dim={self.qk_dim}, num_heads={self.num_heads}, n_win={self.n_win}, topk={self.topk}"


@register_notrace_module  # an FX leaf: shape-dependent padding and kernel dispatch do not trace
class AdaptiveRegionRoutingAttention(nn.Module):
    """Bi-level routing attention whose region grid follows the input (BiFormer's refactored ``nchwBRA``).

    A map of ``H x W`` tokens is cut into regions of ``H // n_win x W // n_win`` tokens, so a map not
    divisible by ``n_win`` gets ``ceil(H / (H // n_win)) x ceil(W / (W // n_win))`` regions (possibly
    more than ``n_win`` per side, and a different number per side) instead of padded ``n_win x n_win``
    ones as in :class:`BiLevelRoutingAttention`. q, k and v are zero-padded *after* the projection to
    whole regions; routing ranks the unscaled affinity of region means taken over each region's real
    tokens (the official ``avg_pool2d(ceil_mode=True, count_include_pad=False)``); the zero keys and
    values of the padding take part in the attention, as in the official code. Attention is scaled by
    ``dim ** -0.5`` unless ``qk_scale`` is given. On maps divisible by ``n_win`` this equals the legacy
    BRA with the same weights.

    The kernel takes a square grid, so a ``gh x gw`` grid with ``gh != gw`` runs as the top-left part of
    a ``max(gh, gw)``-square grid whose extra regions are zero padding that no query routes to.

    Parameter names follow the official module (``qkv_linear`` -> ``[q | k | v]``, ``output_linear``,
    ``lepe``); the official 1x1 convs are Linear layers here (the family converter flattens them).
    ``attn_backend`` is passed to :func:`attnzoo.kernels.bra.routed_attention` as ``backend``.
    """

    def __init__(self, dim: int, num_heads: int, n_win: int = 7, topk: int = 4, qk_scale: float | None = None,
                 side_dwconv: int = 5) -> None:
        super().__init__()
        _check_routing_args(type(self).__name__, dim, dim, num_heads, n_win, topk, side_dwconv)
        self.dim, self.num_heads, self.n_win, self.topk = dim, num_heads, n_win, topk
        self.scale = qk_scale or dim ** -0.5
        self.attn_backend = "auto"
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
        self.qkv_linear = nn.Linear(dim, 3 * dim)
        self.output_linear = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        rh, rw = H // self.n_win, W // self.n_win
        if rh == 0 or rw == 0:
            raise ValueError(f"{type(self).__name__}: the map must have at least n_win={self.n_win} tokens per "
                             f"side, got H={H}, W={W}")
        gh, gw = -(-H // rh), -(-W // rw)
        n = max(gh, gw)
        q, k, v = self.qkv_linear(x).chunk(3, dim=-1)
        lepe = self.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        region_index = self._route(q, k, (rh, rw), gh, gw, n)
        heads = (B, n * rh, n * rw, self.num_heads, -1)
        q, k, v = (F.pad(t, (0, 0, 0, n * rw - W, 0, n * rh - H)).reshape(heads) for t in (q, k, v))
        out = routed_attention(q, k, v, region_index, n, scale=self.scale, backend=self.attn_backend)
        out = out.reshape(B, n * rh, n * rw, C)[:, :H, :W] + lepe
        return self.output_linear(out)

    @torch.no_grad()
    def _route(self, q: torch.Tensor, k: torch.Tensor, region: tuple[int, int], gh: int, gw: int,
               n: int) -> torch.Tensor:
        """``[B, n*n, topk]`` routed regions, numbered on the square ``n x n`` grid (padding rows: 0)."""
        q_r, k_r = (F.avg_pool2d(t.permute(0, 3, 1, 2), region, ceil_mode=True, count_include_pad=False)
                    for t in (q, k))  # [B, C, gh, gw]
        affinity = q_r.flatten(2).transpose(1, 2) @ k_r.flatten(2)  # [B, gh*gw, gh*gw]
        index = affinity.topk(self.topk, dim=-1).indices
        if gh == gw:
            return index
        rows = torch.arange(gh * gw, device=index.device)
        square = index.new_zeros(index.shape[0], n * n, self.topk)
        square[:, rows // gw * n + rows % gw] = index // gw * n + index % gw
        return square

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, n_win={self.n_win}, topk={self.topk}"


@register_notrace_module  # an FX leaf: shape-dependent padding and kernel dispatch do not trace
class AttentionLePE(nn.Module):
    """Global multi-head self-attention plus a LePE depthwise conv, BiFormer's last-stage attention.

    Official quirks kept: ``num_heads`` defaults to 8 whatever the width, the qkv projection has no bias,
    the scale is ``head_dim ** -0.5``, and the LePE conv runs on the attention *input* x (``lepe_input="x"``,
    the official ``AttentionLePE``) or on V (``lepe_input="v"``, the official ``nchwAttentionLePE``).
    Attention goes through ``F.scaled_dot_product_attention`` (fused on every device), so this block
    has no kernel backend to switch.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: float | None = None,
                 side_dwconv: int = 5, lepe_input: str = "x") -> None:
        super().__init__()
        owner = type(self).__name__
        for name, value in (("dim", dim), ("num_heads", num_heads), ("side_dwconv", side_dwconv)):
            _positive_int(value, name, owner)
        if lepe_input not in ("x", "v"):
            raise ValueError(f"{owner}: lepe_input must be 'x' (attention input) or 'v', got {lepe_input!r}")
        if dim % num_heads:
            raise ValueError(f"{owner}: dim={dim} must be divisible by num_heads={num_heads}")
        if side_dwconv % 2 == 0:
            raise ValueError(f"{owner}: side_dwconv (LePE kernel size) must be odd, got {side_dwconv}")
        self.num_heads, self.lepe_input = num_heads, lepe_input
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        q, k, v = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # [B, heads, HW, D]
        out = out.transpose(1, 2).reshape(B, H, W, C)
        lepe_in = x if self.lepe_input == "x" else v.transpose(1, 2).reshape(B, H, W, C)
        out = out + self.lepe(lepe_in.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj(out)
