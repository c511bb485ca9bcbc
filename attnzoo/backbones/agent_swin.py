"""Agent-Swin: the Swin Transformer with agent attention ("A") blocks and Swin window ("B") blocks.

Paper: "Agent Attention: On the Integration of Softmax and Linear Attention" (Han et al., ECCV 2024).
Official code: LeapLabTHU/Agent-Attention, ``agent_transformer/models/agent_swin.py`` with the
``agent_swin_{t,s,b}.yaml`` configs: agents 9-16-49-49, window size 56, attention types
``AAAB`` (T), ``AABB`` (S) and ``AAMB2`` (B: stage 3 has two agent blocks, then Swin blocks).

How the official model runs, and this port with it:

* "A" blocks: ``window_size=56`` is at least the stage map at 224², so the official code uses one window
  covering the whole map and no shift: global agent attention. Here A blocks are always global, at any
  input size; their position tables are stored for ``min(stage map, window_size)`` and resized to the
  actual map (rule in :mod:`attnzoo.blocks.agent`).
* "B" blocks: Swin window attention with window ``max(7, window_size // 8) = 7``, relative-position-bias
  table, and a cyclic shift of 3 on odd blocks when the stage map at ``img_size`` is larger than the
  window (Swin's rule; otherwise one window and no shift). They run on the shared
  :class:`attnzoo.blocks.window.PartitionAttention2d`, which pads maps of any size and masks the padding.
* Patch merging at the end of each official stage is the ``downsample`` at the start of the next stage
  here (timm's layout), so the stage outputs are the stride 4/8/16/32 maps.
"""
from __future__ import annotations

import re
from typing import Any

import torch
from timm.layers import ClassifierHead, DropPath, Mlp, PatchEmbed
from timm.models import generate_default_cfgs, register_model
from timm.models.swin_transformer import PatchMerging
from torch import nn

from attnzoo.backbones._base import StagedBackbone, build_backbone, linear_head_to_timm, unwrap_checkpoint
from attnzoo.backbones._pretrained import imagenet_cfg, named_url_cfg
from attnzoo.blocks.agent import AGENT_BIAS_NAMES, AgentAttention, convert_agent_tables
from attnzoo.blocks.window import PartitionAttention2d

__all__ = ["AgentSwinTransformer"]


def block_types(attn_type: str, depths: tuple[int, ...]) -> list[str]:
    """Per-stage block letters from the official string: one letter per stage, ``M`` = the first ``n``
    blocks agent and the rest window, with ``n`` the digits after the per-stage letters (``AAMB2``)."""
    n = len(depths)
    letters, suffix = attn_type[:n], attn_type[n:]
    bad_suffix = ("M" in letters) != bool(suffix) or not (suffix or "0").isdigit()
    if len(letters) != n or set(letters) - set("ABM") or bad_suffix:
        raise ValueError(f"AgentSwinTransformer: attn_type must be {n} letters from A/B/M (M followed by the number "
                         f"of leading agent blocks, e.g. 'AAMB2'), got {attn_type!r}")
    return ["".join(("A" if j < int(suffix) else "B") if c == "M" else c for j in range(d))
            for c, d in zip(letters, depths)]


class AgentSwinBlock(nn.Module):
    """Pre-norm block on NHWC maps: global agent attention ("A") or shifted-window attention ("B"), then MLP."""

    def __init__(self, dim: int, num_heads: int, attn_type: str, agent_num: int, bias_size: tuple[int, int],
                 window_size: int, shift_size: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 agent_shape: tuple[int, int] | None = None, proj_drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0):
        super().__init__()
        self.attn_type = attn_type
        self.norm1 = nn.LayerNorm(dim)
        if attn_type == "A":
            self.attn = AgentAttention(dim, num_heads, agent_num, bias_size, qkv_bias=qkv_bias,
                                       agent_shape=agent_shape, attn_drop=attn_drop, proj_drop=proj_drop)
        else:
            self.attn = PartitionAttention2d(dim, num_heads=num_heads, partition_size=window_size, mode="window",
                                             shift_size=shift_size, qkv_bias=qkv_bias, rel_pos_bias=True,
                                             attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _attn(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Tokens ``[B, H*W, C]`` in and out; window attention reads them as a map."""
        if self.attn_type == "B":
            return self.attn(x.unflatten(1, size)).flatten(1, 2)
        return self.attn(x, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = x.flatten(1, 2)  # the residual stream as tokens (attnzoo.blocks.tokens)
        x = x + self.drop_path1(self._attn(self.norm1(x), (H, W)))
        return (x + self.drop_path2(self.mlp(self.norm2(x)))).view(B, H, W, C)


class AgentSwinStage(nn.Module):
    """Optional patch merging, then the stage's blocks: ``[B, H, W, C_in] -> [B, H', W', C]``."""

    def __init__(self, in_dim: int, dim: int, resolution: tuple[int, int], downsample: bool, types: str,
                 num_heads: int, agent_num: int, window_size: int, mlp_ratio: float, qkv_bias: bool,
                 agent_shape: tuple[int, int] | None, proj_drop: float, attn_drop: float, drop_path: list[float]):
        super().__init__()
        self.downsample = PatchMerging(in_dim, dim) if downsample else nn.Identity()
        bias_size = (min(resolution[0], window_size), min(resolution[1], window_size))
        win = max(7, window_size // 8)
        blocks = []
        for j, t in enumerate(types):
            w, shift = win, (win // 2 if j % 2 else 0)
            if min(resolution) <= win:  # Swin: a map no larger than the window is one window, unshifted
                w, shift = min(resolution), 0
            blocks.append(AgentSwinBlock(dim, num_heads, t, agent_num, bias_size, w, shift, mlp_ratio, qkv_bias,
                                         agent_shape, proj_drop, attn_drop, drop_path[j]))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class AgentSwinTransformer(StagedBackbone):
    """Agent-Swin classifier/backbone. Computes in NHWC; ``forward_features`` returns the normed last stage
    map ``[B, H/32, W/32, C]`` (NHWC, as timm's Swin); ``forward_intermediates`` / ``features_only`` give
    the four stage maps at strides 4, 8, 16, 32."""

    stage_lists = ("layers",)
    map_fmt = output_fmt = "NHWC"
    no_weight_decay_names = ("relative_position_bias_table", *AGENT_BIAS_NAMES)

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "avg", embed_dim: int = 96,
                 depths: tuple[int, ...] = (2, 2, 6, 2), num_heads: tuple[int, ...] = (3, 6, 12, 24),
                 window_size: int = 56, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 agent_num: tuple[int | str, ...] = (9, 16, 49, 49), attn_type: str = "AAAB",
                 agent_shapes: tuple[tuple[int, int], ...] | None = None, drop_rate: float = 0.0,
                 proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        """``agent_num`` accepts the official yaml strings; ``agent_shapes`` sets a per-stage run-time agent
        grid (the official dense backbones' ``downstream_agent_shapes``, e.g. 9x9/12x12/14x14/7x7)."""
        super().__init__()
        n = len(depths)
        types = block_types(attn_type, depths)
        agent_num = [int(a) for a in agent_num]
        agent_shapes = agent_shapes or [None] * n
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.num_classes = num_classes
        dims = [int(embed_dim * 2 ** i) for i in range(n)]
        self.num_features = self.head_hidden_size = dims[-1]
        self.patch_embed = PatchEmbed(None, patch_size, in_chans, embed_dim, norm_layer=nn.LayerNorm,
                                      output_fmt="NHWC", strict_img_size=False, dynamic_img_pad=True)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))]
        grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        stages, self.feature_info = [], []
        for i in range(n):
            res = (-(-grid[0] // 2 ** i), -(-grid[1] // 2 ** i))
            stages.append(AgentSwinStage(dims[i - 1] if i else embed_dim, dims[i], res, i > 0, types[i], num_heads[i],
                                         agent_num[i], window_size, mlp_ratio, qkv_bias, agent_shapes[i],
                                         proj_drop_rate, attn_drop_rate, dpr[i]))
            self.feature_info.append(dict(num_chs=dims[i], reduction=patch_size * 2 ** i, module=f"layers.{i}"))
        self.layers = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                   input_fmt="NHWC")
        self.init_weights()

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.pos_drop(self.patch_embed(x))


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: AgentSwinTransformer) -> dict[str, torch.Tensor]:
    """Map an official Agent-Swin state dict (plain or ``{"model": ...}``), or attnzoo's own, onto this model.

    The official classifier ``head.*`` becomes timm's ``head.fc.*``; ``layers.{i}.downsample`` moves to
    ``layers.{i+1}.downsample``; Swin bias tables ``[(2w-1)², heads]``
    (query − key) become ``[heads, 2w-1, 2w-1]`` (key − query); the index tables and shift masks the
    official blocks store are dropped (recomputed). Other keys keep their official names, and unknown keys
    pass through so strict loading reports them. The 5-D agent tables lose their singleton dims (exact
    reshape, :func:`attnzoo.blocks.agent.convert_agent_tables`) and, when stored for another map size,
    are resized linearly, as the official code does when fine-tuning at another resolution.
    """
    state_dict = linear_head_to_timm(unwrap_checkpoint(state_dict))
    if not any(k.startswith("layers.0.downsample.") for k in state_dict):
        return convert_agent_tables(state_dict, model)  # this model's names already (no stage-0 downsample)
    out = {}
    for k, v in state_dict.items():
        if k.endswith("relative_position_index") or re.match(r"^layers\.\d+\.blocks\.\d+\.attn_mask$", k):
            continue
        k = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", k)
        if k.endswith("relative_position_bias_table") and v.dim() == 2:
            heads, side = v.shape[1], int(round(v.shape[0] ** 0.5))
            v = v.T.reshape(heads, side, side).flip(1, 2)
        out[k] = v
    return convert_agent_tables(out, model)


def _create_agent_swin(variant: str, pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    return build_backbone(AgentSwinTransformer, variant, pretrained, checkpoint_filter_fn, (0, 1, 2, 3), **kwargs)


def _cfg(url: str, file_name: str, **kwargs) -> dict[str, Any]:
    """An Agent-Attention model's cfg (Agent-Swin, -PVT and -DeiT share the paper, repository and licence)."""
    return imagenet_cfg(dict(
        **named_url_cfg(url, file_name), first_conv="patch_embed.proj",
        license="unspecified",  # the official repository states no license
        origin_url="https://github.com/LeapLabTHU/Agent-Attention", paper_ids="arXiv:2312.08874",
    ), **kwargs)


default_cfgs = generate_default_cfgs({
    "agent_swin_t.in1k": _cfg("https://cloud.tsinghua.edu.cn/f/a2ddc1190c224f768a41/?dl=1", "agent_swin_t_in1k.pth"),
    "agent_swin_s.in1k": _cfg("https://cloud.tsinghua.edu.cn/f/f607172c9fea4d6e99bb/?dl=1", "agent_swin_s_in1k.pth"),
    "agent_swin_b.in1k": _cfg("https://cloud.tsinghua.edu.cn/f/4fcd2d0114bb490483c3/?dl=1", "agent_swin_b_in1k.pth"),
})


@register_model
def agent_swin_t(pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    """Agent-Swin-T (29M, 82.6% ImageNet-1k top-1 at 224): agent attention in stages 1-3, Swin in stage 4."""
    args = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), attn_type="AAAB")
    return _create_agent_swin("agent_swin_t", pretrained, **dict(args, **kwargs))


@register_model
def agent_swin_s(pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    """Agent-Swin-S (50M, 83.7%): agent attention in stages 1-2, Swin in stages 3-4."""
    args = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), attn_type="AABB")
    return _create_agent_swin("agent_swin_s", pretrained, **dict(args, **kwargs))


@register_model
def agent_swin_b(pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    """Agent-Swin-B (88M, 84.0%): agent attention in stages 1-2 and the first two blocks of stage 3."""
    args = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), attn_type="AAMB2")
    return _create_agent_swin("agent_swin_b", pretrained, **dict(args, **kwargs))
