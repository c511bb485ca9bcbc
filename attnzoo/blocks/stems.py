"""Stems and downsamplers that timm.layers lacks. Each family appends its own; all map NCHW images or
NHWC maps as documented per class."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class ConvTokenizer(nn.Module):
    """NAT's overlapping stem: two 3x3 stride-2 convs (stride 4 in all), then a norm.

    ``[B, C, H, W]`` image -> ``[B, ceil(H/4), ceil(W/4), embed_dim]`` (NHWC). Keys ``proj.0``,
    ``proj.1``, ``norm`` match the official NAT checkpoints.
    """

    def __init__(self, in_chans: int = 3, embed_dim: int = 64,
                 norm_layer: Callable[[int], nn.Module] | None = nn.LayerNorm) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, kernel_size=3, stride=2, padding=1),
            nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, stride=2, padding=1),
        )
        self.norm = norm_layer(embed_dim) if norm_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ConvDownsampler(nn.Module):
    """NAT's overlapping downsampler: 3x3 stride-2 conv (no bias) doubling the channels, then a norm.

    ``[B, H, W, C]`` -> ``[B, ceil(H/2), ceil(W/2), out_dim]`` (NHWC in and out).
    """

    def __init__(self, dim: int, out_dim: int | None = None,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        out_dim = out_dim or 2 * dim
        self.reduction = nn.Conv2d(dim, out_dim, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = norm_layer(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
