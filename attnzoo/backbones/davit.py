"""DaViT: Dual Attention Vision Transformers (Ding et al., ECCV 2022, arXiv:2204.03645).

The same networks as the official ``dingmyu/davit`` models and timm's ``davit_*``, computed in NHWC.
Each stage repeats a dual block: a spatial block (window attention through attnzoo's partitioned
attention kernel, 7×7 windows, no bias, no shift) then a channel block (channel attention through SDPA);
both start each residual branch with a depthwise 3×3 positional convolution (ConvPosEnc).

DaViT-T/S/B have (1, 1, 3, 1) / (1, 1, 9, 1) / (1, 1, 9, 1) dual blocks per stage in the paper, the
official code and timm alike, i.e. 2/2/6/2 and 2/2/18/2 attention blocks.

Maps that are not multiples of the window: by default the normed map is zero-padded before the window
attention, so padded tokens take part as keys exactly as in the official and timm models (identical
outputs at any input size). ``masked_window_padding=True`` masks them instead (the kernel's padding).

``checkpoint_filter_fn`` accepts the official checkpoints (plain, ``{"state_dict": ...}`` or
``{"state_dict_ema": ...}``), timm's ``davit_*`` weights and attnzoo's own state dicts.
"""
from __future__ import annotations

import re
from functools import partial
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from timm.layers import (
    DropPath,
    LayerNorm2d,
    Mlp,
    NormMlpClassifierHead,
    register_notrace_function,
    register_notrace_module,
    to_2tuple,
)
from timm.models import generate_default_cfgs, register_model
from torch import nn

from attnzoo.backbones._base import StagedBackbone, build_backbone, unwrap_checkpoint
from attnzoo.backbones._pretrained import imagenet_cfg
from attnzoo.blocks.channel import ChannelAttention
from attnzoo.blocks.tokens import nchw_to_tokens
from attnzoo.blocks.window import PartitionAttention2d

__all__ = ["DaVit", "checkpoint_filter_fn"]


@register_notrace_function  # shape-dependent padding: an FX leaf
def pad_to_multiple(x: torch.Tensor, multiple: tuple[int, int]) -> torch.Tensor:
    """Zero-pad an NHWC map at the bottom/right to multiples of ``multiple`` (no copy when it fits)."""
    pad_h, pad_w = -x.shape[1] % multiple[0], -x.shape[2] % multiple[1]
    return F.pad(x, (0, 0, 0, pad_w, 0, pad_h)) if pad_h or pad_w else x


class ConvPosEnc(nn.Module):
    """``x + depthwise_conv(x)`` on an NHWC map held as tokens ``[B, H*W, C]`` (attnzoo.blocks.tokens)."""

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        B, _, C = x.shape
        return x + nchw_to_tokens(self.proj(x.view(B, *size, C).permute(0, 3, 1, 2)))


@register_notrace_module  # shape-dependent padding: an FX leaf
class Stem(nn.Module):
    """Conv 7×7 stride 4 (input zero-padded to a multiple of 4, as officially) + LayerNorm; NCHW -> NHWC."""

    def __init__(self, in_chs: int, out_chs: int, norm_layer: Callable[[int], nn.Module]):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size=7, stride=4, padding=3)
        self.norm = norm_layer(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_h, pad_w = -x.shape[-2] % 4, -x.shape[-1] % 4
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.norm(self.conv(x).permute(0, 2, 3, 1))


class Downsample(nn.Module):
    """LayerNorm, zero-pad to even size, conv 2×2 stride 2; NHWC in and out."""

    def __init__(self, in_chs: int, out_chs: int, norm_layer: Callable[[int], nn.Module]):
        super().__init__()
        self.norm = norm_layer(in_chs)
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_to_multiple(self.norm(x), (2, 2))
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class DualAttentionBlock(nn.Module):
    """ConvPosEnc, pre-norm attention (window or channel), ConvPosEnc, pre-norm MLP; NHWC in and out."""

    def __init__(
            self,
            dim: int,
            attn: nn.Module,
            mlp_ratio: float = 4.0,
            drop_path: float = 0.0,
            proj_drop: float = 0.0,
            pad_to_window: tuple[int, int] | None = None,
            norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        self.pad_to_window = pad_to_window
        self.cpe1 = ConvPosEnc(dim)
        self.norm1 = norm_layer(dim)
        self.attn = attn
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.cpe2 = ConvPosEnc(dim)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad_to_window is None:
            return self.attn(x)
        H, W = x.shape[1:3]
        return self.attn(pad_to_multiple(x, self.pad_to_window))[:, :H, :W]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = self.cpe1(x.flatten(1, 2), (H, W))  # the residual stream as tokens (attnzoo.blocks.tokens)
        x = (x.view(B, H, W, C) + self.drop_path1(self._attend(self.norm1(x).view(B, H, W, C)))).flatten(1, 2)
        x = self.cpe2(x, (H, W))
        return (x + self.drop_path2(self.mlp(self.norm2(x)))).view(B, H, W, C)


class DaVitStage(nn.Module):
    """Optional downsample, then ``depth`` dual blocks (``blocks.{i}.0`` spatial, ``blocks.{i}.1`` channel)."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            depth: int,
            num_heads: int,
            downsample: bool,
            drop_path: Sequence[float],
            window_size: tuple[int, int] = (7, 7),
            masked_window_padding: bool = False,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            proj_drop: float = 0.0,
            norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        self.downsample = Downsample(in_chs, out_chs, norm_layer) if downsample else nn.Identity()
        common = dict(mlp_ratio=mlp_ratio, proj_drop=proj_drop, norm_layer=norm_layer)
        self.blocks = nn.Sequential(*[
            nn.Sequential(
                DualAttentionBlock(
                    out_chs,
                    PartitionAttention2d(
                        out_chs, num_heads=num_heads, partition_size=window_size, mode="window",
                        qkv_bias=qkv_bias, proj_drop=proj_drop),
                    drop_path=drop_path[2 * i], pad_to_window=None if masked_window_padding else window_size,
                    **common),
                DualAttentionBlock(
                    out_chs, ChannelAttention(out_chs, num_heads, qkv_bias=qkv_bias, proj_drop=proj_drop),
                    drop_path=drop_path[2 * i + 1], **common),
            )
            for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class DaVit(StagedBackbone):
    """DaViT backbone and classifier (head: average pool, LayerNorm, Linear, as officially).

    Computes in NHWC; ``forward_features`` returns the last stage's map as NCHW ``[B, C, H/32, W/32]`` (ceil
    division, before the head's norm), as timm's ``davit_*``; ``forward_intermediates`` and ``features_only``
    return maps at strides 4, 8, 16, 32.
    """

    map_fmt = "NHWC"

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            depths: Sequence[int] = (1, 1, 3, 1),
            embed_dims: Sequence[int] = (96, 192, 384, 768),
            num_heads: Sequence[int] = (3, 6, 12, 24),
            window_size: int | Sequence[int] = 7,
            masked_window_padding: bool = False,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            drop_path_rate: float = 0.1,
            norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        num_stages = len(depths)
        if not len(embed_dims) == len(num_heads) == num_stages:
            raise ValueError(f"DaVit: depths, embed_dims and num_heads must have one entry per stage, got "
                             f"{tuple(depths)}, {tuple(embed_dims)}, {tuple(num_heads)}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = embed_dims[-1]

        self.stem = Stem(in_chans, embed_dims[0], norm_layer)
        # official schedule: linear over all attention blocks (two per dual block)
        dpr = torch.linspace(0, drop_path_rate, 2 * sum(depths), device="cpu").tolist()
        stages, self.feature_info = [], []
        for i in range(num_stages):
            first = 2 * sum(depths[:i])
            stages.append(DaVitStage(
                embed_dims[max(i - 1, 0)], embed_dims[i], depths[i], num_heads[i], downsample=i > 0,
                drop_path=dpr[first:first + 2 * depths[i]], window_size=to_2tuple(window_size),
                masked_window_padding=masked_window_padding, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate, norm_layer=norm_layer))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=2 ** (i + 2), module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.Identity()  # the final norm is the head's, after pooling
        self.head = NormMlpClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                          norm_layer=partial(LayerNorm2d, eps=1e-5))
        self.init_weights()


_OFFICIAL_RENAMES = (
    (r"^patch_embeds\.0\.proj\.", "stem.conv."),
    (r"^patch_embeds\.0\.norm\.", "stem.norm."),
    (r"^patch_embeds\.(\d+)\.proj\.", r"stages.\1.downsample.conv."),
    (r"^patch_embeds\.(\d+)\.norm\.", r"stages.\1.downsample.norm."),
    (r"^main_blocks\.(\d+)\.", r"stages.\1.blocks."),
    (r"\.cpe\.([01])\.", lambda m: f".cpe{int(m.group(1)) + 1}."),
    (r"^norms\.", "head.norm."),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
)


def checkpoint_filter_fn(state_dict: dict, model: DaVit) -> dict[str, torch.Tensor]:
    """Map an official, timm or attnzoo DaViT state dict onto ``model``'s keys.

    Official files are loaded as the official code loads them: a plain state dict, or one wrapped in
    ``"state_dict"`` (preferred) or ``"state_dict_ema"``, DistributedDataParallel's ``module.`` prefix
    stripped (:func:`unwrap_checkpoint`). timm's ``davit_*`` weights already use attnzoo's names. Unknown
    keys are passed on so strict loading reports them.
    """
    state_dict = unwrap_checkpoint(state_dict)
    if "stem.conv.weight" in state_dict:
        return state_dict
    if "patch_embeds.0.proj.weight" not in state_dict:
        raise ValueError(
            "DaVit checkpoint_filter_fn: state_dict is neither an official DaViT checkpoint "
            "('patch_embeds.0.proj.weight') nor a timm/attnzoo one ('stem.conv.weight'); first keys: "
            f"{list(state_dict)[:5]}")
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in _OFFICIAL_RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def _create_davit(variant: str, pretrained: bool = False, **kwargs) -> DaVit:
    out_indices = tuple(range(len(kwargs.get("depths", (1, 1, 3, 1)))))
    return build_backbone(DaVit, variant, pretrained, checkpoint_filter_fn, out_indices, **kwargs)


def _cfg(timm_name: str, top1: float, official_url: str, **kwargs) -> dict:
    return imagenet_cfg(dict(
        url="",  # the official files sit behind share links; timm hosts the same weights
        hf_hub_id=f"timm/{timm_name}.msft_in1k", crop_pct=0.9,  # the official model's eval crop
        first_conv="stem.conv", license="mit", origin_url=official_url, paper_ids="arXiv:2204.03645",
        paper_name="DaViT: Dual Attention Vision Transformers", notes=(f"paper ImageNet-1k top-1 {top1} at 224",),
    ), **kwargs)


_SHARE = "https://connecthkuhk-my.sharepoint.com/:u:/g/personal/u3007305_connect_hku_hk/"
default_cfgs = generate_default_cfgs({
    "davit_t.msft_in1k": _cfg("davit_tiny", 82.8, _SHARE + "EcJYlVYP9y5FsDbMP-nwjtABgLmdrNGZBxgR5--Kg3MZ7Q?e=v9OrXB"),
    "davit_s.msft_in1k": _cfg("davit_small", 84.2, _SHARE + "ERN_Gzm8oKdIvO01r0X2cscB_owuRAnnQPNGJEVGP23xHQ?e=MVW3ZO"),
    "davit_b.msft_in1k": _cfg("davit_base", 84.6, _SHARE + "Ea8kCpdM949CvTM0w7DWbGwBxxiACMSik4zx-emrNY0uKQ?e=aEjC7u"),
})


@register_model
def davit_t(pretrained: bool = False, **kwargs) -> DaVit:
    args = dict(depths=(1, 1, 3, 1), embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24))
    return _create_davit("davit_t", pretrained, **{**args, **kwargs})


@register_model
def davit_s(pretrained: bool = False, **kwargs) -> DaVit:
    args = dict(depths=(1, 1, 9, 1), embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24))
    return _create_davit("davit_s", pretrained, **{**args, **kwargs})


@register_model
def davit_b(pretrained: bool = False, **kwargs) -> DaVit:
    args = dict(depths=(1, 1, 9, 1), embed_dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32))
    return _create_davit("davit_b", pretrained, **{**args, **kwargs})
