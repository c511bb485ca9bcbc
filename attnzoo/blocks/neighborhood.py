"""2D neighborhood attention module (NAT / DiNAT), on ``attnzoo.kernels.na2d``.

The module keeps NATTEN ≤0.17's ``NeighborhoodAttention2D`` parameter names (``qkv``, ``rpb``, ``proj``)
so official NAT/DiNAT checkpoints load without renaming, and its small-map rule: a map smaller than
the attention window (``kernel_size * dilation``) on either axis is zero-padded at the bottom/right
*before* the qkv projection and cropped after attention. The padded tokens therefore take part as keys
and values (they carry the qkv bias), exactly as in the official models; this decides the outputs of
dense-prediction heads at small resolutions. Maps at least one window large are never padded: windows
shift inward at the borders, so every query sees ``kernel_size**2`` real neighbours.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module, trunc_normal_
from torch import nn

from attnzoo.kernels.na2d import na2d


@register_notrace_module  # an FX leaf: shape-dependent padding and kernel dispatch do not trace
class NeighborhoodAttention2d(nn.Module):
    """Multi-head 2D neighborhood attention with relative position bias on NHWC maps.

    Args:
        dim: Channels of the input and output.
        num_heads: Attention heads; ``dim`` must be divisible by it.
        kernel_size: Odd neighbourhood size (per axis), at least 3.
        dilation: Spacing between neighbours (DiNAT); 1 is plain NA.
        qkv_bias: Bias in the qkv projection.
        rel_pos_bias: Learn a ``[num_heads, 2k-1, 2k-1]`` bias table (``rpb``) added to the logits.
        qk_scale: Logit scale; ``head_dim ** -0.5`` when None.
        proj_drop: Dropout after the output projection.

    ``attn_backend`` ("auto" by default) is passed to the kernel as ``backend=``; switch it on a built
    model with ``attnzoo.blocks.set_attention_backend``.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            kernel_size: int = 7,
            dilation: int = 1,
            qkv_bias: bool = True,
            rel_pos_bias: bool = True,
            qk_scale: float | None = None,
            proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads, got dim={dim}, num_heads={num_heads}")
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd integer >= 3, got {kernel_size}")
        if dilation < 1:
            raise ValueError(f"dilation must be >= 1, got {dilation}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale if qk_scale is not None else self.head_dim ** -0.5
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.window_size = kernel_size * dilation
        self.attn_backend = "auto"

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
            trunc_normal_(self.rpb, std=0.02)
        else:
            self.register_parameter("rpb", None)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, H, W, C]`` -> ``[B, H, W, C]``."""
        B, H, W, C = x.shape
        pad_h = max(0, self.window_size - H)
        pad_w = max(0, self.window_size - W)
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        Hp, Wp = H + pad_h, W + pad_w
        q, k, v = self.qkv(x).reshape(B, Hp, Wp, 3, self.num_heads, self.head_dim).unbind(3)
        x = na2d(q, k, v, self.kernel_size, self.dilation, rpb=self.rpb, scale=self.scale,
                 backend=self.attn_backend)
        x = x.reshape(B, Hp, Wp, C)
        if pad_h or pad_w:
            x = x[:, :H, :W].contiguous()
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, kernel_size={self.kernel_size}, "
                f"dilation={self.dilation}, rel_pos_bias={self.rpb is not None}")
