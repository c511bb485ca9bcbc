"""Window / grid (partitioned) multi-head self-attention on NHWC maps.

The attention layer of MaxViT (block and grid attention), DaViT (spatial windows) and Swin-style
models (shifted windows), computed by :func:`attnzoo.kernels.partitioned_attention` straight on the
feature map: no window partition or reverse copies, and maps of any size (padded, masked).

Where the op would take its dense route (partition copies + SDPA) on a map that needs no padding and no
shift, the layer runs timm's order instead: partition the input tokens once, both projections and SDPA on
partition-major tokens, one reverse copy at the end. That copies C channels each way instead of q, k, v
(3C) and the output, and keeps nothing for backward beyond SDPA's own q, k, v and output.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module, to_2tuple, trunc_normal_
from torch import nn

from attnzoo.kernels.partitioned_attention import MODES, partitioned_attention, route
from attnzoo.kernels.partitioned_attention_reference import partition, rpb_bias, unpartition


@register_notrace_module  # an FX leaf: shape-dependent padding and kernel dispatch do not trace
class PartitionAttention2d(nn.Module):
    """Multi-head self-attention inside windows or grid groups: ``[B, H, W, C] -> [B, H, W, C]``.

    Parameters (state-dict names), as converters map official keys onto them:

    * ``qkv``: ``nn.Linear(dim, 3 * num_heads * head_dim, bias=qkv_bias)``; output channels ordered
      ``(3, heads, head_dim)`` (q of all heads, then k, then v), the order of timm's Swin, DaViT and
      TF MaxViT ``qkv`` layers.
    * ``relative_position_bias_table`` (only with ``rel_pos_bias=True``): ``[num_heads, 2*ph-1, 2*pw-1]``;
      entry ``[h, dy + ph-1, dx + pw-1]`` is added to the logit of a query and a key ``(dy, dx) = key −
      query`` apart inside the partition (group coordinates in grid mode). TF MaxViT's table (timm
      ``RelPosBiasTf``) loads as is; a Swin table ``[(2ph-1)*(2pw-1), heads]`` (query − key, row-major)
      loads as ``t.T.reshape(heads, 2ph-1, 2pw-1).flip(1, 2)``.
    * ``proj``: ``nn.Linear(num_heads * head_dim, dim, bias=proj_bias)``.

    DaViT: ``qkv_bias=True``, no bias table, no shift. Swin / Agent-Swin: bias table, ``shift_size`` =
    window // 2 on odd blocks. MaxViT: bias table, ``mode="window"`` then ``mode="grid"``.

    ``attn_backend`` (one of ``attnzoo.kernels._op.BACKENDS``) is passed to the kernel as ``backend=``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        partition_size: int | Sequence[int] = 7,
        mode: str = "window",
        shift_size: int | Sequence[int] = 0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        rel_pos_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if (num_heads is None) == (head_dim is None):
            raise ValueError(f"PartitionAttention2d: give exactly one of num_heads, head_dim "
                             f"(got num_heads={num_heads}, head_dim={head_dim})")
        if num_heads is None:
            if dim % head_dim:
                raise ValueError(f"PartitionAttention2d: dim {dim} must be a multiple of head_dim {head_dim}")
            num_heads = dim // head_dim
        elif head_dim is None:
            if dim % num_heads:
                raise ValueError(f"PartitionAttention2d: dim {dim} must be a multiple of num_heads {num_heads}")
            head_dim = dim // num_heads
        if mode not in MODES:
            raise ValueError(f"PartitionAttention2d: mode must be one of {MODES}, got {mode!r}")
        if attn_drop != 0.0:
            raise ValueError(f"PartitionAttention2d: attn_drop must be 0.0 (the fused kernel has no attention "
                             f"dropout; use drop_path / proj_drop), got {attn_drop}")
        self.num_heads, self.head_dim = num_heads, head_dim
        self.partition_size = to_2tuple(partition_size)
        self.mode = mode
        self.shift_size = to_2tuple(shift_size)
        self.scale = head_dim ** -0.5
        self.attn_backend = "auto"

        attn_dim = num_heads * head_dim
        self.qkv = nn.Linear(dim, 3 * attn_dim, bias=qkv_bias)
        if rel_pos_bias:
            ph, pw = self.partition_size
            self.relative_position_bias_table = nn.Parameter(torch.zeros(num_heads, 2 * ph - 1, 2 * pw - 1))
            trunc_normal_(self.relative_position_bias_table, std=0.02)
        else:
            self.relative_position_bias_table = None
        self.proj = nn.Linear(attn_dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        rpb = self.relative_position_bias_table
        if (not any(self.shift_size) and H % self.partition_size[0] == 0 and W % self.partition_size[1] == 0
                and route(self.attn_backend, x, self.partition_size, self.shift_size, rpb) == "dense"):
            return self._forward_partitions(x)
        q, k, v = self.qkv(x).view(B, H, W, 3, self.num_heads, self.head_dim).unbind(3)
        out = partitioned_attention(
            q, k, v, self.partition_size, mode=self.mode, shift=self.shift_size,
            rpb=rpb, scale=self.scale, backend=self.attn_backend)
        return self.proj_drop(self.proj(out.reshape(B, H, W, -1)))

    def _forward_partitions(self, x: torch.Tensor) -> torch.Tensor:
        """The dense route in timm's order (see the module docstring); maps are partition multiples."""
        B, H, W, _ = x.shape
        n = self.partition_size[0] * self.partition_size[1]
        tokens = partition(x, self.partition_size, self.mode).flatten(0, 1)  # [B * partitions, n, C]
        qkv = self.qkv(tokens).view(tokens.shape[0], n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B * partitions, heads, n, head_dim]
        rpb = self.relative_position_bias_table
        bias = None if rpb is None else rpb_bias(rpb, self.partition_size).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(tokens.shape[0], n, -1)))
        return unpartition(out.view(B, -1, n, out.shape[-1]), self.partition_size, self.mode, H, W)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, partition_size={self.partition_size}, "
                f"mode={self.mode!r}, shift_size={self.shift_size}")


__all__ = ["PartitionAttention2d"]
