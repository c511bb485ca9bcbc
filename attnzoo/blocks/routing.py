"""BiFormer attention blocks: bi-level routing attention (BRA) and the full attention of its last stage.

Both take and return NHWC maps ``[B, H, W, C]``. Submodule names follow the official BiFormer code
(``qkv.qkv``, ``lepe``, ``wo``; ``qkv``, ``proj``, ``lepe``) so official checkpoints load unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import nn

from attnzoo.kernels.bra import bra


def _positive_int(value: int, name: str, owner: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


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
        owner = type(self).__name__
        qk_dim = qk_dim or dim
        for name, value in (("dim", dim), ("num_heads", num_heads), ("n_win", n_win), ("topk", topk),
                            ("qk_dim", qk_dim), ("side_dwconv", side_dwconv)):
            _positive_int(value, name, owner)
        if dim % num_heads or qk_dim % num_heads:
            raise ValueError(f"{owner}: dim={dim} and qk_dim={qk_dim} must be divisible by num_heads={num_heads}")
        if topk > n_win * n_win:
            raise ValueError(f"{owner}: topk must be in [1, n_win**2] = [1, {n_win * n_win}], got {topk}")
        if side_dwconv % 2 == 0:
            raise ValueError(f"{owner}: side_dwconv (LePE kernel size) must be odd, got {side_dwconv}")
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
class AttentionLePE(nn.Module):
    """Global multi-head self-attention plus a LePE depthwise conv, BiFormer's last-stage attention.

    Official quirks kept: ``num_heads`` defaults to 8 whatever the width, the qkv projection has no bias,
    the scale is ``head_dim ** -0.5``, and the LePE conv runs on the attention *input* x (not on V).
    Attention goes through ``F.scaled_dot_product_attention`` (fused on every device), so this block
    has no kernel backend to switch.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: float | None = None,
                 side_dwconv: int = 5) -> None:
        super().__init__()
        owner = type(self).__name__
        for name, value in (("dim", dim), ("num_heads", num_heads), ("side_dwconv", side_dwconv)):
            _positive_int(value, name, owner)
        if dim % num_heads:
            raise ValueError(f"{owner}: dim={dim} must be divisible by num_heads={num_heads}")
        if side_dwconv % 2 == 0:
            raise ValueError(f"{owner}: side_dwconv (LePE kernel size) must be odd, got {side_dwconv}")
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        q, k, v = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # [B, heads, HW, D]
        out = out.transpose(1, 2).reshape(B, H, W, C)
        out = out + self.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj(out)
