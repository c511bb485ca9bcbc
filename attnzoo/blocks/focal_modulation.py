"""FocalNet's focal modulation (Yang et al., 2022), computed on NHWC maps.

Focal modulation replaces self-attention by a gated sum of depthwise-convolution contexts of growing
receptive field plus one global context; the sum, passed through a 1×1 projection, multiplies the query
elementwise. Every op is a dense GEMM, a depthwise convolution or an elementwise op, so the block runs on
cuDNN/PyTorch kernels: the depthwise convolutions read the NHWC map through a channels-last NCHW view.
"""
from __future__ import annotations

from typing import Callable

import torch
from timm.layers import register_notrace_module
from torch import nn

from attnzoo.blocks.tokens import nchw_to_tokens


def _nchw(x: torch.Tensor) -> torch.Tensor:
    """View an NHWC tensor as NCHW (channels-last memory, no copy) for ``nn.Conv2d``."""
    return x.permute(0, 3, 1, 2)


@register_notrace_module  # an FX leaf: its input validation does not trace
class FocalModulation(nn.Module):
    """Focal modulation over an NHWC map ``[B, H, W, dim]``; returns the same shape.

    ``f`` projects each token to a query, a context and ``focal_level + 1`` gates. Level ``l`` applies a
    depthwise ``focal_window + focal_factor * l`` convolution and GELU to the previous level's context;
    the last level's spatial mean (GELU) is the global context. The gated sum goes through ``h`` and
    multiplies the query; ``proj`` maps the product back. Parameter names follow the official code
    (``f``, ``h``, ``proj``, ``focal_layers.{l}.0``, ``ln``), with ``h`` stored as a Linear.
    """

    def __init__(
            self,
            dim: int,
            focal_window: int = 3,
            focal_level: int = 2,
            focal_factor: int = 2,
            bias: bool = True,
            use_post_norm: bool = False,
            normalize_modulator: bool = False,
            proj_drop: float = 0.0,
            norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        if focal_level < 1:
            raise ValueError(f"FocalModulation: focal_level must be >= 1, got {focal_level}")
        if focal_window < 1 or focal_window % 2 == 0:
            raise ValueError(f"FocalModulation: focal_window must be an odd positive int, got {focal_window}")
        if focal_factor < 0 or focal_factor % 2:
            raise ValueError(f"FocalModulation: focal_factor must be an even int >= 0, got {focal_factor}")
        self.dim = dim
        self.focal_level = focal_level
        self.normalize_modulator = normalize_modulator
        self.kernel_sizes = [focal_window + focal_factor * k for k in range(focal_level)]

        self.f = nn.Linear(dim, 2 * dim + focal_level + 1, bias=bias)
        self.h = nn.Linear(dim, dim, bias=bias)
        self.act = nn.GELU()
        self.focal_layers = nn.ModuleList([
            nn.Sequential(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim, bias=False), nn.GELU())
            for k in self.kernel_sizes
        ])
        self.ln = norm_layer(dim) if use_post_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"FocalModulation: x must be [B, H, W, {self.dim}] (NHWC), got {tuple(x.shape)}")
        B, H, W, C = x.shape
        q, ctx, gates = self.f(x).split([self.dim, self.dim, self.focal_level + 1], dim=-1)
        gates = gates.flatten(1, 2)
        ctx = _nchw(ctx)  # a strided view of f(x): the first conv saves it without another copy
        # the gated sum starts from its first term (``0 + term`` would be one more full-map pass); not
        # addcmul: its backward spends two more multiplies than mul + add's. It is summed as tokens
        # [B, H*W, C] (attnzoo.blocks.tokens).
        ctx = self.focal_layers[0](ctx)
        ctx_all = nchw_to_tokens(ctx) * gates[..., :1]
        for level in range(1, self.focal_level):
            ctx = self.focal_layers[level](ctx)
            ctx_all = ctx_all + nchw_to_tokens(ctx) * gates[..., level:level + 1]
        ctx_global = self.act(ctx.mean((2, 3), keepdim=True))  # [B, dim, 1, 1]
        ctx_all = ctx_all + nchw_to_tokens(ctx_global) * gates[..., self.focal_level:]
        if self.normalize_modulator:
            ctx_all = ctx_all / (self.focal_level + 1)
        x = q.flatten(1, 2) * self.h(ctx_all)
        x = self.ln(x)
        return self.proj_drop(self.proj(x)).view(B, H, W, C)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, focal_level={self.focal_level}, kernel_sizes={self.kernel_sizes}"
