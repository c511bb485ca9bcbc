"""Agent-PVT: the Pyramid Vision Transformer with agent attention in every block.

Paper: "Agent Attention: On the Integration of Softmax and Linear Attention" (Han et al., ECCV 2024).
Official code: LeapLabTHU/Agent-Attention, ``agent_transformer/models/agent_pvt.py`` with the
``agent_pvt_*.yaml`` configs (agents 9-16-49-49, attention type AAAA, agent spatial reduction 1111).

Structure as released: four stages, each a non-overlapping conv patch embedding (4x4 then 2x2,
LayerNorm eps 1e-5), a learned position embedding for the training map, and blocks of agent attention
(``q`` + ``kv`` projections) and an MLP (LayerNorm eps 1e-6). There is no final norm: the head reads the
mean of the last block's tokens.

Any input size: the input (and every odd stage map) is zero-padded to the patch size at the bottom/right,
the position embeddings are resized bilinearly (align_corners=False, as the official ``_get_pos_embed``
does) to the actual map, and the agent biases follow the rule in :mod:`attnzoo.blocks.agent`.
"""
from __future__ import annotations

import re
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from timm.layers import ClassifierHead, DropPath, Mlp, PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from torch import nn

from attnzoo.backbones._base import StagedBackbone, build_backbone, linear_head_to_timm, unwrap_checkpoint
from attnzoo.backbones.agent_swin import _cfg as _agent_cfg
from attnzoo.blocks.agent import AGENT_BIAS_NAMES, AgentAttention, convert_agent_tables

__all__ = ["AgentPvt"]


class AgentPvtBlock(nn.Module):
    """Pre-norm block: agent attention (PVT projections, optional spatial reduction) then an MLP."""

    def __init__(self, dim: int, num_heads: int, agent_num: int, bias_size: tuple[int, int], mlp_ratio: float,
                 sr_ratio: int = 1, agent_shape: tuple[int, int] | None = None, proj_drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, norm_layer: Callable = nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = AgentAttention(dim, num_heads, agent_num, bias_size, qkv_bias=True, fused_qkv=False,
                                   sr_ratio=sr_ratio, agent_shape=agent_shape, attn_drop=attn_drop,
                                   proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), size))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class AgentPvtStage(nn.Module):
    """Patch embedding + position embedding + blocks: ``[B, C_in, H, W] -> [B, C, H/s, W/s]``."""

    def __init__(self, in_chs: int, dim: int, patch_size: int, grid_size: tuple[int, int], depth: int,
                 num_heads: int, agent_num: int, mlp_ratio: float, sr_ratio: int = 1,
                 agent_shape: tuple[int, int] | None = None, drop_rate: float = 0.0, attn_drop: float = 0.0,
                 drop_path: list[float] | None = None, norm_layer: Callable = nn.LayerNorm):
        super().__init__()
        self.grid_size = tuple(grid_size)
        self.patch_embed = PatchEmbed(None, patch_size, in_chs, dim, norm_layer=nn.LayerNorm, output_fmt="NHWC",
                                      strict_img_size=False, dynamic_img_pad=True)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid_size[0] * grid_size[1], dim))
        self.pos_drop = nn.Dropout(drop_rate)
        drop_path = drop_path or [0.0] * depth
        self.blocks = nn.ModuleList([
            AgentPvtBlock(dim, num_heads, agent_num, self.grid_size, mlp_ratio, sr_ratio, agent_shape,
                          drop_rate, attn_drop, drop_path[j], norm_layer)
            for j in range(depth)])
        trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # [B, H, W, C]
        B, H, W, C = x.shape
        pos = resample_abs_pos_embed(self.pos_embed, [H, W], list(self.grid_size), num_prefix_tokens=0,
                                     interpolation="bilinear", antialias=False)  # the official _get_pos_embed
        x = self.pos_drop(x.reshape(B, H * W, C) + pos)
        for blk in self.blocks:
            x = blk(x, (H, W))
        return x.transpose(1, 2).reshape(B, C, H, W)


class AgentPvt(StagedBackbone):
    """Agent-PVT classifier/backbone. ``forward_features`` returns the last stage map ``[B, C, H/32, W/32]``
    (NCHW, no final norm, as in the official model); ``forward_intermediates`` / ``features_only`` give the
    four stage maps at strides 4, 8, 16, 32."""

    stem_pattern = r"^stages\.0\.(?:patch_embed|pos_embed)"
    no_weight_decay_names = ("pos_embed", *AGENT_BIAS_NAMES)

    def __init__(self, img_size: int | tuple[int, int] = 224, in_chans: int = 3, num_classes: int = 1000,
                 global_pool: str = "avg", embed_dims: tuple[int, ...] = (64, 128, 320, 512),
                 depths: tuple[int, ...] = (2, 2, 2, 2), num_heads: tuple[int, ...] = (1, 2, 5, 8),
                 mlp_ratios: tuple[float, ...] = (8, 8, 4, 4), agent_num: tuple[int | str, ...] = (9, 16, 49, 49),
                 agent_sr_ratios: tuple[int, ...] | str = (1, 1, 1, 1),
                 agent_shapes: tuple[tuple[int, int], ...] | None = None, patch_size: int = 4,
                 drop_rate: float = 0.0, proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, attn_type: str = "AAAA"):
        """``agent_num`` accepts the official yaml strings; ``agent_shapes`` sets a per-stage run-time agent grid
        (the official dense backbones' ``downstream_agent_shapes``); ``attn_type`` must be all ``A`` (no
        released Agent-PVT uses plain PVT attention)."""
        super().__init__()
        n = len(depths)
        if set(attn_type) != {"A"} or len(attn_type) != n:
            raise ValueError(f"AgentPvt: attn_type must be {'A' * n!r} (agent attention in every stage), "
                             f"got {attn_type!r}")
        agent_num = [int(a) for a in agent_num]
        sr = [int(s) for s in agent_sr_ratios]
        agent_shapes = agent_shapes or [None] * n
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.embed_dims = embed_dims
        dpr = [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))]
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        stages, self.feature_info = [], []
        grid, in_chs = (img_size[0] // patch_size, img_size[1] // patch_size), in_chans
        for i in range(n):
            stages.append(AgentPvtStage(
                in_chs, embed_dims[i], patch_size if i == 0 else 2, grid, depths[i], num_heads[i], agent_num[i],
                mlp_ratios[i], sr[i], agent_shapes[i], drop_rate, attn_drop_rate, dpr[i], norm_layer))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=patch_size * 2 ** i, module=f"stages.{i}"))
            grid, in_chs = (grid[0] // 2, grid[1] // 2), embed_dims[i]
        self.stages = nn.Sequential(*stages)
        self.norm = nn.Identity()
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self.init_weights()

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return x  # each stage starts with its own patch embedding, as officially


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: AgentPvt) -> dict[str, torch.Tensor]:
    """Map an official Agent-PVT state dict (plain or ``{"model": ...}``) onto :class:`AgentPvt` names.

    ``pos_embed{i}``, ``patch_embed{i}.*`` and ``block{i}.{j}.*`` move to ``stages.{i-1}``, ``head.*`` to
    timm's ``head.fc.*`` (attnzoo's own keys pass unchanged); the attention and MLP names are the official
    ones; the 5-D agent tables lose their singleton dims (exact reshape). Unknown keys pass through so strict
    loading reports them.
    Weights stored for another input size are resized to the model's (position embeddings bilinearly,
    agent tables linearly, as the official code does when fine-tuning at another resolution).
    """
    out = {}
    for k, v in linear_head_to_timm(unwrap_checkpoint(state_dict)).items():
        k = re.sub(r"^pos_embed(\d)$", lambda m: f"stages.{int(m.group(1)) - 1}.pos_embed", k)
        k = re.sub(r"^patch_embed(\d)\.", lambda m: f"stages.{int(m.group(1)) - 1}.patch_embed.", k)
        k = re.sub(r"^block(\d)\.(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}.", k)
        out[k] = v
    for i, stage in enumerate(model.stages):
        pe = out.get(f"stages.{i}.pos_embed")
        if pe is not None and pe.dim() == 3 and pe.shape != stage.pos_embed.shape:
            old = int(round(pe.shape[1] ** 0.5))
            pe = F.interpolate(pe.reshape(1, old, old, -1).permute(0, 3, 1, 2), size=stage.grid_size,
                               mode="bilinear", align_corners=False)
            out[f"stages.{i}.pos_embed"] = pe.flatten(2).transpose(1, 2)
    return convert_agent_tables(out, model)


def _create_agent_pvt(variant: str, pretrained: bool = False, **kwargs) -> AgentPvt:
    return build_backbone(AgentPvt, variant, pretrained, checkpoint_filter_fn, (0, 1, 2, 3), **kwargs)


_cfg = partial(_agent_cfg, first_conv="stages.0.patch_embed.proj")
default_cfgs = generate_default_cfgs({
    "agent_pvt_t.in1k": _cfg("https://cloud.tsinghua.edu.cn/f/13fdf0e0a7c5498c934f/?dl=1", "agent_pvt_t_in1k.pth"),
    "agent_pvt_s.in1k": _cfg("https://cloud.tsinghua.edu.cn/f/36b8be9a8863456685a3/?dl=1", "agent_pvt_s_in1k.pth"),
    "agent_pvt_m.in1k": _cfg("https://cloud.tsinghua.edu.cn/f/4d00ecacf18b45f9b88c/?dl=1", "agent_pvt_m_in1k.pth"),
    "agent_pvt_l.in1k": _cfg("https://cloud.tsinghua.edu.cn/f/040cfe0cfbbe4762ad09/?dl=1", "agent_pvt_l_in1k.pth"),
})

_BASE = dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4),
             agent_num=(9, 16, 49, 49), agent_sr_ratios=(1, 1, 1, 1))


@register_model
def agent_pvt_t(pretrained: bool = False, **kwargs) -> AgentPvt:
    """Agent-PVT-T (11.6M, 78.4% ImageNet-1k top-1 at 224)."""
    return _create_agent_pvt("agent_pvt_t", pretrained, **dict(dict(_BASE, depths=(2, 2, 2, 2)), **kwargs))


@register_model
def agent_pvt_s(pretrained: bool = False, **kwargs) -> AgentPvt:
    """Agent-PVT-S (20.6M, 82.2%)."""
    return _create_agent_pvt("agent_pvt_s", pretrained, **dict(dict(_BASE, depths=(3, 4, 6, 3)), **kwargs))


@register_model
def agent_pvt_m(pretrained: bool = False, **kwargs) -> AgentPvt:
    """Agent-PVT-M (35.9M, 83.4%)."""
    return _create_agent_pvt("agent_pvt_m", pretrained, **dict(dict(_BASE, depths=(3, 4, 18, 3)), **kwargs))


@register_model
def agent_pvt_l(pretrained: bool = False, **kwargs) -> AgentPvt:
    """Agent-PVT-L (48.7M, 83.7%; the official config file is ``agent_pvt_b.yaml``)."""
    return _create_agent_pvt("agent_pvt_l", pretrained, **dict(dict(_BASE, depths=(3, 8, 27, 3)), **kwargs))
