"""DaViT's channel (group) attention (Ding et al., ECCV 2022) on NHWC maps.

Channels are the tokens: inside each head every channel attends to every other channel, with the whole
spatial map as its feature vector, so the cost is linear in the number of pixels and the context global.
"""
from __future__ import annotations

import torch
from timm.layers import register_notrace_module
from torch import nn


@register_notrace_module  # an FX leaf: its input validation does not trace
class ChannelAttention(nn.Module):
    """Multi-head channel attention ``[B, H, W, C] -> [B, H, W, C]``, as the official DaViT computes it.

    The official code (and timm's ``davit_*``) does not use q as the query: per head, with ``N = H*W``
    and q, k, v of shape ``[N, head_dim]``, it computes ``softmax(scale * kᵀ v) @ qᵀ`` (a
    ``head_dim x head_dim`` attention map over channels) with ``scale = head_dim ** -0.5``.

    It runs as two batched matmuls in the input dtype on one head-major copy of the projection (timm makes
    the same copy as three) and scales the small ``head_dim²`` logits in fp32 before the softmax (timm
    scales the whole k map; one rounding of the logits either way). Not through
    ``F.scaled_dot_product_attention``: no fused SDPA kernel takes ``head_dim`` tokens of dimension N (3136
    at stride 4) from strided views, and SDPA's math fallback upcasts bf16/fp16 to fp32, which doubled what
    the block saves for backward (DaViT-T trained with 0.5 GB more than timm's). Parameter names (``qkv``,
    ``proj``) and the ``(3, heads, head_dim)`` qkv channel order are the official ones.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"ChannelAttention: dim {dim} must be a multiple of num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"ChannelAttention: x must be [B, H, W, {self.dim}] (NHWC), got {tuple(x.shape)}")
        B, H, W, C = x.shape
        d = self.head_dim
        # [3, B * heads, head_dim, N]: one row per channel token, one copy for q, k and v
        q, k, v = self.qkv(x).reshape(B, H * W, 3, self.num_heads, d).permute(2, 0, 3, 4, 1).reshape(3, -1, d, H * W)
        logits = torch.bmm(k, v.transpose(1, 2))  # [B * heads, head_dim, head_dim]
        attn = (logits.to(torch.promote_types(logits.dtype, torch.float32)) * self.scale).softmax(-1)
        out = torch.bmm(attn.to(q.dtype), q)  # [B * heads, head_dim, N]
        out = out.view(B, self.num_heads, d, H, W).permute(0, 3, 4, 1, 2).reshape(B, H, W, C)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"


__all__ = ["ChannelAttention"]
