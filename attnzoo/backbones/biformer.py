"""BiFormer: Vision Transformer with Bi-Level Routing Attention.

Paper: "BiFormer: Vision Transformer with Bi-Level Routing Attention", Zhu et al., CVPR 2023
(https://arxiv.org/abs/2303.08810). Official code: https://github.com/rayleizhu/BiFormer (MIT).

A four-stage pyramid (strides 4/8/16/32): overlapping conv stem and conv downsamplers with BatchNorm;
blocks of a 3x3 depthwise-conv position embedding, bi-level routing attention (stages 1-3, top-k
1/4/16 of ``n_win x n_win`` regions) or global attention with LePE (stage 4), and an MLP; a BatchNorm
before the pooled linear head. Module and parameter names follow the official ``models/biformer.py``,
so official checkpoints (``{"model": state_dict}``) load key for key but the classifier (timm's ``head.fc``).

``biformer_stl`` is the official Swin-Tiny-layout ablation model (``models/biformer_stl.py``: patchify
stem, BatchNorm patch merging, no position-embedding conv, legacy BRA). ``biformer_stl_nchw`` is its
refactored twin (``models/biformer_stl_nchw.py``, own checkpoint): the same layout with BiFormer's
refactored BRA, whose region size is ``H // n_win x W // n_win`` so the region count follows the input
(:class:`attnzoo.blocks.routing.AdaptiveRegionRoutingAttention`), and a last stage whose LePE runs on V.

Dense prediction: any input size works (each routing attention pads its map to multiples of ``n_win`` and
crops, as the official ``auto_pad``; ``biformer_stl_nchw`` takes any size whose stride-16 map has ``n_win``
tokens per side, 112x112 at ``n_win=7``, its regions following the map); pass ``n_win=16`` (COCO) or
``n_win=8`` (ADE20K 512x512) and, if wanted, ``topks`` at creation, like the official mmdet/mmseg configs.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import torch
from timm.layers import ClassifierHead, DropPath
from timm.models import generate_default_cfgs, register_model
from torch import nn

from attnzoo.backbones._base import StagedBackbone, build_backbone, linear_head_to_timm, unwrap_checkpoint
from attnzoo.backbones._pretrained import imagenet_cfg, named_url_cfg
from attnzoo.blocks.routing import AdaptiveRegionRoutingAttention, AttentionLePE, BiLevelRoutingAttention

__all__ = ["BiFormer", "BiFormerBlock"]

FULL_ATTENTION = -2  # the official code's topk value for global attention with LePE (stage 4)
LAYOUTS = ("biformer", "stl", "stl_nchw")


class BiFormerBlock(nn.Module):
    """``x + dwconv3x3(x)`` (BiFormer layout only), then pre-norm attention and MLP residuals (LayerNorm
    eps 1e-6).

    NCHW in and out, as the official block; attention and MLP run in NHWC. ``topk > 0`` selects
    bi-level routing attention with ``num_heads`` heads, ``topk == -2`` global attention with LePE
    (8 heads, the official default). ``layout="stl"`` is the Swin-Tiny-layout block of the official
    ablation model: no position-embedding conv and an MLP without the empty slot (keys mlp.0 / mlp.2);
    ``layout="stl_nchw"`` is that block of its refactored twin: routing attention with a region grid that
    follows the input, and LePE on V in global attention.
    """

    def __init__(self, dim: int, num_heads: int, n_win: int, topk: int, mlp_ratio: float = 3.0,
                 side_dwconv: int = 5, drop_path: float = 0.0, layout: str = "biformer") -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"BiFormerBlock: layout must be one of {LAYOUTS}, got {layout!r}")
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim) if layout == "biformer" else None
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if topk == FULL_ATTENTION:
            self.attn = AttentionLePE(dim, side_dwconv=side_dwconv, lepe_input="v" if layout == "stl_nchw" else "x")
        elif isinstance(topk, int) and not isinstance(topk, bool) and topk > 0:
            bra = AdaptiveRegionRoutingAttention if layout == "stl_nchw" else BiLevelRoutingAttention
            self.attn = bra(dim, num_heads, n_win=n_win, topk=topk, side_dwconv=side_dwconv)
        else:
            raise ValueError(f"BiFormerBlock: topk must be a positive int (routing attention) or "
                             f"{FULL_ATTENTION} (global attention with LePE), got {topk!r}")
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(mlp_ratio * dim)
        # BiFormer's MLP keeps an identity slot (for an optional dwconv) between fc1 and GELU.
        slot = [nn.Identity()] if layout == "biformer" else []
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), *slot, nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:
            x = x + self.pos_embed(x)
        B, C, H, W = x.shape
        x = x.permute(0, 2, 3, 1).flatten(1, 2)  # the residual stream as tokens (attnzoo.blocks.tokens)
        x = x + self.drop_path(self.attn(self.norm1(x).view(B, H, W, C)).flatten(1, 2))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x.view(B, H, W, C).permute(0, 3, 1, 2)


def _per_stage(value: Any, name: str) -> tuple:
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * 4
    if len(values) != 4:
        raise ValueError(f"BiFormer: {name} must be one value or 4 (one per stage), got {value!r}")
    return values


class BiFormer(StagedBackbone):
    """BiFormer classifier/backbone.

    Computes in NCHW: ``forward_features`` returns the final BatchNorm'ed map ``[B, embed_dims[-1], H/32,
    W/32]``; ``forward_intermediates`` and ``features_only`` return the stage outputs at strides 4/8/16/32
    (stage ``i`` is ``downsample_layers[i]`` then ``stages[i]``, the official names).
    """

    stage_lists = ("stages", "downsample_layers")
    stem_pattern = r"^downsample_layers\.0\."

    def __init__(
            self,
            depths: Sequence[int] = (2, 2, 8, 2),
            embed_dims: Sequence[int] = (64, 128, 256, 512),
            head_dim: int = 32,
            mlp_ratios: float | Sequence[float] = 3.0,
            n_win: int | Sequence[int] = 7,
            topks: Sequence[int] = (1, 4, 16, FULL_ATTENTION),
            side_dwconv: int = 5,
            layout: str = "biformer",
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
    ) -> None:
        """
        Args:
            depths, embed_dims: blocks and channels per stage.
            head_dim: routing-attention head width (heads = embed_dim // head_dim per stage).
            mlp_ratios: MLP expansion, one value or one per stage.
            n_win: regions per side for routing attention, one value or one per stage.
            topks: routed regions per stage; ``-2`` = global attention with LePE (official encoding).
            side_dwconv: LePE depthwise kernel size.
            layout: "biformer" (conv stem, conv3x3-s2 downsamplers, position-embedding conv in each block)
                or "stl" (the official Swin-Tiny-layout ablation model: 4x4 patchify + BatchNorm stem,
                BatchNorm + conv2x2-s2 patch merging, blocks under ``stages.i.blocks``) or "stl_nchw"
                (its refactored twin: the "stl" layout with the blocks of ``BiFormerBlock(layout="stl_nchw")``).
            in_chans, num_classes, global_pool, drop_rate, drop_path_rate: as in timm.
        """
        super().__init__()
        depths, embed_dims = _per_stage(depths, "depths"), _per_stage(embed_dims, "embed_dims")
        mlp_ratios, n_wins, topks = (_per_stage(v, n) for v, n in
                                     ((mlp_ratios, "mlp_ratios"), (n_win, "n_win"), (topks, "topks")))
        for dim in embed_dims:
            if dim % head_dim:
                raise ValueError(f"BiFormer: embed_dims {embed_dims} must be multiples of head_dim={head_dim}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = embed_dims[-1]

        if layout == "biformer":
            stem = nn.Sequential(
                nn.Conv2d(in_chans, embed_dims[0] // 2, 3, stride=2, padding=1),
                nn.BatchNorm2d(embed_dims[0] // 2),
                nn.GELU(),
                nn.Conv2d(embed_dims[0] // 2, embed_dims[0], 3, stride=2, padding=1),
                nn.BatchNorm2d(embed_dims[0]),
            )
            downsamplers = [nn.Sequential(nn.Conv2d(embed_dims[i], embed_dims[i + 1], 3, stride=2, padding=1),
                                          nn.BatchNorm2d(embed_dims[i + 1])) for i in range(3)]
        elif layout in ("stl", "stl_nchw"):
            stem = nn.Sequential(nn.Conv2d(in_chans, embed_dims[0], 4, stride=4), nn.BatchNorm2d(embed_dims[0]))
            downsamplers = [nn.Sequential(nn.BatchNorm2d(embed_dims[i]),
                                          nn.Conv2d(embed_dims[i], embed_dims[i + 1], 2, stride=2)) for i in range(3)]
        else:
            raise ValueError(f"BiFormer: layout must be one of {LAYOUTS}, got {layout!r}")
        self.downsample_layers = nn.ModuleList([stem] + downsamplers)

        dpr = [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(depths)]
        self.stages = nn.ModuleList()
        self.feature_info = []
        for i in range(4):
            blocks = nn.Sequential(*[
                BiFormerBlock(embed_dims[i], embed_dims[i] // head_dim, n_wins[i], topks[i], mlp_ratio=mlp_ratios[i],
                              side_dwconv=side_dwconv, drop_path=dpr[i][j], layout=layout)
                for j in range(depths[i])])
            self.stages.append(blocks if layout == "biformer" else nn.Sequential(OrderedDict(blocks=blocks)))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2 ** i, module=f"stages.{i}"))

        self.norm = nn.BatchNorm2d(embed_dims[-1])
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self.init_weights()

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return x  # the stem is downsample_layers[0], run as part of stage 0 as officially

    def forward_stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return super().forward_stage(index, self.downsample_layers[index](x))


def checkpoint_filter_fn(state_dict: dict[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """Official checkpoint (``{"model": state_dict}``) or attnzoo's own state dict -> attnzoo state dict.

    Key names are the official ones except the classifier: the official ``head.weight`` / ``head.bias``
    become timm's ``head.fc.*`` (attnzoo's own ``head.fc.*`` pass unchanged); the 1x1 convs of
    ``biformer_stl_nchw`` files become Linear weights (:func:`_flatten_stl_nchw_convs`). Nothing is
    dropped, so a wrong file fails strict loading with its missing/unexpected keys listed."""
    return linear_head_to_timm(_flatten_stl_nchw_convs(unwrap_checkpoint(state_dict)))


# ---------------------------------------------------------------- biformer_stl_nchw (official refactored STL)

def _flatten_stl_nchw_convs(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official ``nchwBiFormerSTL`` runs its block projections (``attn.qkv_linear``,
    ``attn.output_linear``, last-stage ``attn.qkv``/``attn.proj``, ``mlp.0``/``mlp.2``) as 1x1 convs;
    here they are Linear layers with the same keys. Only ``[out, in, 1, 1]`` weights inside ``stages``
    change (no other BiFormer file has any), so attnzoo's own state dicts pass unchanged."""
    return {k: v.flatten(1) if k.startswith("stages.") and v.dim() == 4 and v.shape[2:] == (1, 1) else v
            for k, v in state_dict.items()}


def _create_biformer(variant: str, pretrained: bool = False, **kwargs) -> BiFormer:
    return build_backbone(BiFormer, variant, pretrained, checkpoint_filter_fn, (0, 1, 2, 3), **kwargs)


def _cfg(url: str = "", file_name: str = "", **kwargs) -> dict[str, Any]:
    return imagenet_cfg(dict(
        **named_url_cfg(url, file_name), first_conv="downsample_layers.0.0", license="mit",
        paper_ids="arXiv:2303.08810", paper_name="BiFormer: Vision Transformer with Bi-Level Routing Attention",
        origin_url="https://github.com/rayleizhu/BiFormer"), **kwargs)


_ONEDRIVE = "https://api.onedrive.com/v1.0/shares/{}/root/content"

default_cfgs = generate_default_cfgs({
    "biformer_tiny.in1k": _cfg(
        url=_ONEDRIVE.format("s!AkBbczdRlZvChHEOoGkgwgQzEDlM"), file_name="biformer_tiny_in1k.pth",
        notes=("ImageNet-1k top-1 81.4 (official)",)),
    "biformer_small.in1k": _cfg(
        url=_ONEDRIVE.format("s!AkBbczdRlZvChHDyM-x9KWRBZ832"), file_name="biformer_small_in1k.pth",
        notes=("ImageNet-1k top-1 83.8 (official)",)),
    "biformer_base.in1k": _cfg(
        url=_ONEDRIVE.format("s!AkBbczdRlZvChHI_XPhoadjaNxtO"), file_name="biformer_base_in1k.pth",
        notes=("ImageNet-1k top-1 84.3 (official)",)),
    "biformer_stl.in1k": _cfg(
        url=_ONEDRIVE.format("s!AkBbczdRlZvChSf-m7ujkvx9lIQ1"), file_name="biformer_stl_in1k.pth",
        notes=("ImageNet-1k top-1 82.7 (official; Swin-Tiny-layout ablation model)",)),
    "biformer_stl_nchw.in1k": _cfg(
        url=_ONEDRIVE.format("s!AkBbczdRlZvChWYrKbWbMgqd2Ai0"), file_name="biformer_stl_nchw_in1k.pth",
        min_input_size=(3, 112, 112),
        notes=("ImageNet-1k top-1 82.7 (official; refactored BRA, region count follows the input)",)),
})


@register_model
def biformer_tiny(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-T: depths 2-2-8-2, widths 64-512 (13.1 M params)."""
    model_args = dict(depths=(2, 2, 8, 2), embed_dims=(64, 128, 256, 512))
    return _create_biformer("biformer_tiny", pretrained, **dict(model_args, **kwargs))


@register_model
def biformer_small(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-S: depths 4-4-18-4, widths 64-512 (25.5 M params)."""
    model_args = dict(depths=(4, 4, 18, 4), embed_dims=(64, 128, 256, 512))
    return _create_biformer("biformer_small", pretrained, **dict(model_args, **kwargs))


@register_model
def biformer_base(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-B: depths 4-4-18-4, widths 96-768 (56.8 M params)."""
    model_args = dict(depths=(4, 4, 18, 4), embed_dims=(96, 192, 384, 768))
    return _create_biformer("biformer_base", pretrained, **dict(model_args, **kwargs))


@register_model
def biformer_stl(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-STL: Swin-T layout (depths 2-2-6-2, widths 96-768, MLP ratio 4) with BRA (28.4 M params)."""
    model_args = dict(depths=(2, 2, 6, 2), embed_dims=(96, 192, 384, 768), mlp_ratios=4.0, layout="stl")
    return _create_biformer("biformer_stl", pretrained, **dict(model_args, **kwargs))


@register_model
def biformer_stl_nchw(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-STL-nchw: BiFormer-STL with the refactored BRA (regions of H // 7 x W // 7 tokens; 28.4 M
    params). Inputs of at least 112x112, where the stage-3 map still has 7 tokens per side."""
    model_args = dict(depths=(2, 2, 6, 2), embed_dims=(96, 192, 384, 768), mlp_ratios=4.0, layout="stl_nchw")
    return _create_biformer("biformer_stl_nchw", pretrained, **dict(model_args, **kwargs))
