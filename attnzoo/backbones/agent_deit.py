"""Agent-DeiT: DeiT (ViT with a cls token) whose first blocks use agent attention.

Paper: "Agent Attention: On the Integration of Softmax and Linear Attention" (Han et al., ECCV 2024).
Official code: LeapLabTHU/Agent-Attention, ``agent_transformer/models/agent_deit.py`` with the
``agent_deit_{t,s,b}.yaml`` configs. Facts carried over:

* Agents per block come from the 4-entry yaml list by block pairs: blocks 0-1 use entry 0, 2-3 entry 1,
  4-9 entry 2, 10-11 entry 3 (49 everywhere for T/S, 81 for B).
* T and S use agent attention in all 12 blocks; B only in blocks 0-3 (``agent_layer=4``), the rest are
  plain DeiT attention.
* The cls token takes part in both attentions through its own biases (``ac_bias`` agent→cls,
  ``ca_bias`` cls→agents); agents are pooled from the patch queries only, and the depthwise conv on V
  adds to the patch tokens only.

Any input size: the input is zero-padded to a multiple of 16, the position embedding is resized
bilinearly (align_corners=False, as the official ``resize_pos_embed``) and the agent biases follow
:mod:`attnzoo.blocks.agent`.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from timm.layers import Attention, ClassifierHead, DropPath, Mlp, PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from torch import nn

from attnzoo.backbones._base import (
    StagedBackbone,
    build_backbone,
    convert_layout,
    linear_head_to_timm,
    unwrap_checkpoint,
)
from attnzoo.backbones.agent_swin import _cfg as _agent_cfg
from attnzoo.blocks.agent import AgentAttention, convert_agent_tables

__all__ = ["AgentDeit"]

_POOLS = ("token", "avg", "")
torch.fx.wrap("resample_abs_pos_embed")  # an FX leaf where the model's own methods call it
_AGENT_GROUP = (0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3)  # official stage_num[i // 2] for 12 blocks


class AgentDeitBlock(nn.Module):
    """Pre-norm ViT block with agent attention (``agent_num > 0``) or plain multi-head attention."""

    def __init__(self, dim: int, num_heads: int, agent_num: int, bias_size: tuple[int, int], mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, agent_shape: tuple[int, int] | None = None, proj_drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, norm_layer: Callable = nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        if agent_num:
            self.attn = AgentAttention(dim, num_heads, agent_num, bias_size, qkv_bias=qkv_bias, num_prefix_tokens=1,
                                       agent_shape=agent_shape, attn_drop=attn_drop, proj_drop=proj_drop)
        else:
            self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        y = self.norm1(x)
        y = self.attn(y, size) if isinstance(self.attn, AgentAttention) else self.attn(y)
        x = x + self.drop_path1(y)
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class AgentDeit(StagedBackbone):
    """Agent-DeiT classifier. ``forward_features`` returns the normed tokens ``[B, 1 + H*W, C]`` (cls first);
    ``forward_head`` classifies the cls token; ``forward_intermediates`` / ``features_only`` give block
    outputs as maps of the patch tokens (stride 16; by default the last three blocks). Between blocks the
    model carries ``(tokens, (H, W))``, as the agent attention needs the patch grid."""

    stage_lists = ("blocks",)
    output_fmt = "NLC"
    norm_all_intermediates = True
    no_weight_decay_names = ("pos_embed", "cls_token")

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "token", embed_dim: int = 192, depth: int = 12,
                 num_heads: int = 3, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 agent_num: tuple[int | str, ...] = (49, 49, 49, 49), agent_layer: int = -1,
                 agent_shape: tuple[int, int] | None = None, drop_rate: float = 0.0, pos_drop_rate: float = 0.0,
                 proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        """``agent_num``: the official 4-entry yaml list (strings allowed); ``agent_layer``: number of leading
        agent blocks (-1 = all); ``agent_shape``: run-time agent grid (default the trained one)."""
        super().__init__()
        if depth != len(_AGENT_GROUP):
            raise ValueError(f"AgentDeit: depth must be {len(_AGENT_GROUP)} (the official agent-number schedule "
                             f"is defined for 12 blocks), got {depth}")
        if len(agent_num) != 4:
            raise ValueError(f"AgentDeit: agent_num must have 4 entries, got {agent_num!r}")
        self.check_global_pool(global_pool)
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        agent_layer = depth if agent_layer <= 0 else agent_layer
        self.num_classes, self.global_pool = num_classes, global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.patch_size = patch_size
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.patch_embed = PatchEmbed(None, patch_size, in_chans, embed_dim, output_fmt="NHWC",
                                      strict_img_size=False, dynamic_img_pad=True)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid_size[0] * self.grid_size[1], embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(*[
            AgentDeitBlock(embed_dim, num_heads, int(agent_num[_AGENT_GROUP[i]]) if i < agent_layer else 0,
                           self.grid_size, mlp_ratio, qkv_bias, agent_shape, proj_drop_rate, attn_drop_rate, dpr[i],
                           norm_layer)
            for i in range(depth)])
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks.{i}") for i in range(depth)]
        self.norm = norm_layer(embed_dim)
        self.head = ClassifierHead(embed_dim, num_classes, pool_type="", drop_rate=drop_rate)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.init_weights()

    @classmethod
    def check_global_pool(cls, global_pool: str) -> None:
        if global_pool not in _POOLS:
            raise ValueError(f"AgentDeit: global_pool must be one of {_POOLS}, got {global_pool!r}")

    def reset_classifier(self, num_classes: int, global_pool: str | None = None, reset_other: bool = False) -> None:
        """As timm's ViT: ``global_pool`` 'token' (cls token), 'avg' (mean patch token) or '' (all tokens)."""
        if global_pool is not None:
            self.check_global_pool(global_pool)
            self.global_pool = global_pool
        super().reset_classifier(num_classes, None, reset_other)

    def forward_stem(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.patch_embed(x)  # [B, H, W, C]
        B, H, W, C = x.shape
        pos = resample_abs_pos_embed(self.pos_embed, [H, W], list(self.grid_size), num_prefix_tokens=1,
                                     interpolation="bilinear", antialias=False)  # unchanged at the trained grid
        x = torch.cat([self.cls_token.expand(B, -1, -1), x.reshape(B, H * W, C)], dim=1)
        return self.pos_drop(x + pos), (H, W)

    def forward_stage(self, index: int, x: tuple[torch.Tensor, tuple[int, int]]
                      ) -> tuple[torch.Tensor, tuple[int, int]]:
        tokens, size = x
        return self.run_checkpointed(self.blocks[index], tokens, size), size

    def map_to_image(self, x: tuple[torch.Tensor, tuple[int, int]], fmt: str, norm: bool = False) -> torch.Tensor:
        tokens, (H, W) = x
        tokens = self.norm(tokens) if norm else tokens
        return convert_layout(tokens[:, 1:].reshape(tokens.shape[0], H, W, -1), "NHWC", fmt)

    def forward_norm(self, x: tuple[torch.Tensor, tuple[int, int]]) -> torch.Tensor:
        return self.norm(x[0])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool == "avg":
            x = x[:, 1:].mean(dim=1)
        return self.head(x, pre_logits=pre_logits)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: AgentDeit) -> dict[str, torch.Tensor]:
    """Official Agent-DeiT state dicts (plain or ``{"model": ...}``) use this model's names but for the
    classifier (``head.*``, timm's ``head.fc.*``; attnzoo's own state dicts pass unchanged); the agent tables
    (5-D ``ah/aw/ha/wa``, 4-D ``ac/ca``) lose their singleton dims (exact reshape). Weights stored for
    another grid are resized to the model's: the position embedding bilinearly and the agent tables
    linearly, as the official code does when fine-tuning at another resolution."""
    state_dict = linear_head_to_timm(unwrap_checkpoint(state_dict))
    pe = state_dict.get("pos_embed")
    if pe is not None and pe.shape != model.pos_embed.shape and pe.dim() == 3:
        old = int(round((pe.shape[1] - 1) ** 0.5))
        state_dict["pos_embed"] = resample_abs_pos_embed(pe, list(model.grid_size), [old, old], num_prefix_tokens=1,
                                                         interpolation="bilinear", antialias=False)
    return convert_agent_tables(state_dict, model)


def _create_agent_deit(variant: str, pretrained: bool = False, **kwargs) -> AgentDeit:
    return build_backbone(AgentDeit, variant, pretrained, checkpoint_filter_fn, 3, **kwargs)  # timm ViT: last 3


_cfg = partial(_agent_cfg, pool_size=None, min_input_size=(3, 16, 16))
default_cfgs = generate_default_cfgs({
    "agent_deit_t.in1k": _cfg("https://cloud.tsinghua.edu.cn/f/57e0904221824ee7b7af/?dl=1", "agent_deit_t_in1k.pth"),
    "agent_deit_s.in1k": _cfg("https://cloud.tsinghua.edu.cn/f/fdd43304372541db8ea7/?dl=1", "agent_deit_s_in1k.pth"),
    "agent_deit_b.in1k": _cfg("https://cloud.tsinghua.edu.cn/f/5115f15fdd7e4ab58fbc/?dl=1", "agent_deit_b_in1k.pth"),
})


@register_model
def agent_deit_t(pretrained: bool = False, **kwargs) -> AgentDeit:
    """Agent-DeiT-T (6.0M, 74.9% ImageNet-1k top-1 at 224): 49 agents in all 12 blocks."""
    args = dict(embed_dim=192, num_heads=3, agent_num=(49, 49, 49, 49))
    return _create_agent_deit("agent_deit_t", pretrained, **dict(args, **kwargs))


@register_model
def agent_deit_s(pretrained: bool = False, **kwargs) -> AgentDeit:
    """Agent-DeiT-S (22.7M, 80.5%): 49 agents in all 12 blocks."""
    args = dict(embed_dim=384, num_heads=6, agent_num=(49, 49, 49, 49))
    return _create_agent_deit("agent_deit_s", pretrained, **dict(args, **kwargs))


@register_model
def agent_deit_b(pretrained: bool = False, **kwargs) -> AgentDeit:
    """Agent-DeiT-B (87.2M, 82.0%): 81 agents in blocks 0-3, plain attention in blocks 4-11."""
    args = dict(embed_dim=768, num_heads=12, agent_num=(81, 81, 81, 81), agent_layer=4)
    return _create_agent_deit("agent_deit_b", pretrained, **dict(args, **kwargs))
