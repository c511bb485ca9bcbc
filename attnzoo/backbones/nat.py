"""Neighborhood Attention Transformer (NAT) and its isotropic variant, for timm.

Paper: "Neighborhood Attention Transformer", Hassani et al., CVPR 2023 (https://arxiv.org/abs/2204.07143).
Official code and checkpoints: https://github.com/SHI-Labs/Neighborhood-Attention-Transformer (MIT).

``NAT`` is the one hierarchical model class of the family: NAT (conv tokenizer, conv downsamplers),
DiNAT (the same with per-block dilations) and DiNAT-s (Swin layout: patchify stem, patch merging) are
configurations of it; ``NATIsotropic`` is the ViT-like single-resolution variant. Both compute in NHWC
and keep the official module names, so ``checkpoint_filter_fn`` only unwraps the file, renames the
classifier (``head.*`` -> ``head.fc.*``) and, for DiNAT-s files, ``layers.*`` -> ``levels.*``.

Any input size works: stems and downsamplers round up (``ceil(H / stride)``), and a map smaller than a
block's attention window is zero-padded bottom/right before attention and cropped after, as in the
official models (see ``attnzoo.blocks.neighborhood``).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from timm.layers import ClassifierHead, DropPath, Mlp, PatchEmbed, calculate_drop_path_rates
from timm.models import generate_default_cfgs, register_model
from timm.models.swin_transformer import PatchMerging
from torch import nn

from attnzoo.backbones._base import StagedBackbone, build_backbone, linear_head_to_timm, unwrap_checkpoint
from attnzoo.backbones._pretrained import imagenet_cfg
from attnzoo.blocks.neighborhood import NeighborhoodAttention2d
from attnzoo.blocks.stems import ConvDownsampler, ConvTokenizer

__all__ = ["NAT", "NATIsotropic", "NATLayer", "checkpoint_filter_fn"]

_STEMS = ("conv", "patch")
_DOWNSAMPLES = ("conv", "merge")


class NATLayer(nn.Module):
    """Pre-norm transformer block with neighborhood attention; NHWC in and out.

    ``layer_scale`` (a float) adds the official per-channel gains ``gamma1``/``gamma2``.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            kernel_size: int = 7,
            dilation: int = 1,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            qk_scale: float | None = None,
            proj_drop: float = 0.0,
            drop_path: float = 0.0,
            layer_scale: float | None = None,
            act_layer: Callable[..., nn.Module] = nn.GELU,
            norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = NeighborhoodAttention2d(
            dim, num_heads, kernel_size=kernel_size, dilation=dilation, qkv_bias=qkv_bias,
            qk_scale=qk_scale, proj_drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        if layer_scale is not None:
            self.gamma1 = nn.Parameter(layer_scale * torch.ones(dim))
            self.gamma2 = nn.Parameter(layer_scale * torch.ones(dim))
        else:
            self.gamma1 = self.gamma2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = x.flatten(1, 2)  # the residual stream as tokens (attnzoo.blocks.tokens)
        a = self.attn(self.norm1(x).view(B, H, W, C)).flatten(1, 2)
        if self.gamma1 is None:
            x = x + self.drop_path(a)
            return (x + self.drop_path(self.mlp(self.norm2(x)))).view(B, H, W, C)
        x = x + self.drop_path(self.gamma1 * a)
        return (x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x)))).view(B, H, W, C)


class NATStage(nn.Module):
    """NAT blocks at one resolution and the downsampler into the next level (official names and order: the
    model applies ``downsample`` on the way into the next level, so a level's output is its blocks')."""

    def __init__(self, blocks: Sequence[nn.Module], downsample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.downsample = downsample if downsample is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def _per_level(value: int | Sequence[int], num_levels: int, name: str) -> list[int]:
    values = [value] * num_levels if isinstance(value, int) else list(value)
    if len(values) != num_levels:
        raise ValueError(f"{name} must be an int or have one entry per level ({num_levels}), got {value!r}")
    return values


class NAT(StagedBackbone):
    """Hierarchical neighborhood-attention backbone (NAT, DiNAT, DiNAT-s).

    Computes in NHWC: ``forward_features`` returns the final-norm NHWC map ``[B, ceil(H/32), ceil(W/32),
    num_features]``; ``forward_intermediates`` / ``features_only`` return the levels' outputs (before each
    downsampler, un-normalised) at strides 4, 8, 16, 32.

    Args:
        in_chans: Input image channels.
        num_classes: Classifier outputs (0 for no classifier).
        global_pool: 'avg', 'max', ... or '' (no pooling) as in timm's ClassifierHead.
        embed_dim: Channels of the first level; doubled at each level.
        depths: Blocks per level.
        num_heads: Heads per level.
        kernel_size: Neighbourhood size, one for all levels or one per level.
        dilations: Per level, per block dilation (DiNAT); None means 1 everywhere (NAT).
        mlp_ratio: MLP hidden width over dim.
        layer_scale: Initial value of per-channel residual gains (None: no layer scale).
        stem: 'conv' (NAT's two 3x3 stride-2 convs) or 'patch' (4x4 patchify, DiNAT-s).
        downsample: 'conv' (3x3 stride-2 conv + norm, NAT) or 'merge' (Swin patch merging, DiNAT-s).
        drop_rate: Dropout before the classifier.
        proj_drop_rate: Dropout after attention / MLP projections (the official ``drop_rate``).
        drop_path_rate: Stochastic depth, rising linearly over all blocks.
    """

    stage_lists = ("levels",)
    map_fmt = output_fmt = "NHWC"
    no_weight_decay_names = ("rpb",)

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            embed_dim: int = 64,
            depths: Sequence[int] = (3, 4, 6, 5),
            num_heads: Sequence[int] = (2, 4, 8, 16),
            kernel_size: int | Sequence[int] = 7,
            dilations: Sequence[Sequence[int]] | None = None,
            mlp_ratio: float = 3.0,
            qkv_bias: bool = True,
            qk_scale: float | None = None,
            layer_scale: float | None = None,
            stem: str = "conv",
            downsample: str = "conv",
            drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        if stem not in _STEMS:
            raise ValueError(f"stem must be one of {_STEMS}, got {stem!r}")
        if downsample not in _DOWNSAMPLES:
            raise ValueError(f"downsample must be one of {_DOWNSAMPLES}, got {downsample!r}")
        num_levels = len(depths)
        num_heads = _per_level(num_heads, num_levels, "num_heads")
        kernel_sizes = _per_level(kernel_size, num_levels, "kernel_size")
        if dilations is None:
            dilations = [[1] * d for d in depths]
        if len(dilations) != num_levels or any(len(dl) != d for dl, d in zip(dilations, depths)):
            raise ValueError(f"dilations must list one dilation per block of each level (depths={tuple(depths)}), "
                             f"got {dilations!r}")
        self.num_classes = num_classes
        dims = [int(embed_dim * 2 ** i) for i in range(num_levels)]
        self.num_features = self.head_hidden_size = dims[-1]

        if stem == "conv":
            self.patch_embed = ConvTokenizer(in_chans, embed_dim, norm_layer=norm_layer)
        else:
            self.patch_embed = PatchEmbed(
                img_size=None, patch_size=4, in_chans=in_chans, embed_dim=embed_dim, norm_layer=norm_layer,
                output_fmt="NHWC", strict_img_size=False, dynamic_img_pad=True)
        downsampler = ConvDownsampler if downsample == "conv" else PatchMerging

        dpr = calculate_drop_path_rates(drop_path_rate, sum(depths))
        self.levels = nn.ModuleList()
        self.feature_info = []
        for i, depth in enumerate(depths):
            first = sum(depths[:i])
            blocks = [
                NATLayer(
                    dims[i], num_heads[i], kernel_size=kernel_sizes[i], dilation=dilations[i][j],
                    mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, proj_drop=proj_drop_rate,
                    drop_path=dpr[first + j], layer_scale=layer_scale, norm_layer=norm_layer)
                for j in range(depth)
            ]
            down = downsampler(dims[i], norm_layer=norm_layer) if i < num_levels - 1 else None
            self.levels.append(NATStage(blocks, down))
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f"levels.{i}"))

        self.norm = norm_layer(self.num_features)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                   input_fmt=self.output_fmt)
        self.init_weights()

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(x)

    def forward_stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if index > 0:
            x = self.levels[index - 1].downsample(x)
        return super().forward_stage(index, x)

    def truncate_stages(self, num_stages: int) -> None:
        super().truncate_stages(num_stages)
        self.levels[-1].downsample = nn.Identity()  # its output would feed a level that is gone


class NATIsotropic(StagedBackbone):
    """Isotropic (ViT-like) NAT / DiNAT: 16x16 patchify, one resolution, blocks alternating dilation 1
    and ``dilation``.

    ``forward_features`` returns the final-norm NHWC map ``[B, ceil(H/16), ceil(W/16), embed_dim]``;
    ``forward_intermediates`` / ``features_only`` return per-block maps at stride 16.
    """

    stage_lists = ("layers",)
    map_fmt = output_fmt = "NHWC"
    norm_all_intermediates = True
    no_weight_decay_names = ("rpb",)

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            patch_size: int = 16,
            embed_dim: int = 384,
            depth: int = 12,
            num_heads: int = 12,
            kernel_size: int = 7,
            dilation: int = 1,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            qk_scale: float | None = None,
            drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(
            img_size=None, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, norm_layer=norm_layer,
            output_fmt="NHWC", strict_img_size=False, dynamic_img_pad=True)
        dpr = calculate_drop_path_rates(drop_path_rate, depth)
        self.layers = nn.Sequential(*[
            NATLayer(
                embed_dim, num_heads, kernel_size=kernel_size, dilation=1 if i % 2 == 0 else dilation,
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, proj_drop=proj_drop_rate,
                drop_path=dpr[i], norm_layer=norm_layer)
            for i in range(depth)
        ])
        self.feature_info = [
            dict(num_chs=embed_dim, reduction=patch_size, module=f"layers.{i}") for i in range(depth)]
        self.norm = norm_layer(embed_dim)
        self.head = ClassifierHead(embed_dim, num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                   input_fmt=self.output_fmt)
        self.init_weights()

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(x)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map an official NAT / DiNAT / DiNAT-s / isotropic checkpoint, or attnzoo's own state dict, onto
    attnzoo's module names.

    Official files (plain or wrapped, see :func:`unwrap_checkpoint`) name the classifier ``head.weight`` /
    ``head.bias``, which become timm's ``head.fc.*``, and DiNAT-s's levels ``layers.*``, which become
    ``levels.*`` in hierarchical models. attnzoo's own keys (``head.fc.*``, ``levels.*``) pass unchanged,
    as does every other key, so strict loading reports any missing or unexpected key of a wrong file.
    """
    state_dict = linear_head_to_timm(unwrap_checkpoint(state_dict))
    if not isinstance(model, NAT):
        return state_dict
    return {("levels." + k[len("layers."):] if k.startswith("layers.") else k): v for k, v in state_dict.items()}


def _create_nat(variant: str, pretrained: bool = False, **kwargs: Any) -> NAT:
    out_indices = tuple(range(len(kwargs.get("depths", (3, 4, 6, 5)))))
    return build_backbone(NAT, variant, pretrained, checkpoint_filter_fn, out_indices, **kwargs)


def _create_nat_isotropic(variant: str, pretrained: bool = False, **kwargs: Any) -> NATIsotropic:
    return build_backbone(NATIsotropic, variant, pretrained, checkpoint_filter_fn, 3, **kwargs)


def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    return imagenet_cfg(dict(
        url=url, first_conv="patch_embed.proj.0", license="mit", paper_ids="arXiv:2204.07143",
        paper_name="Neighborhood Attention Transformer",
        origin_url="https://github.com/SHI-Labs/Neighborhood-Attention-Transformer"), **kwargs)


_NAT_URL = "https://shi-labs.com/projects/nat/checkpoints/CLS/"
_ISO_URL = "https://shi-labs.com/projects/dinat/checkpoints/isotropic/"

default_cfgs = generate_default_cfgs({
    "nat_mini.in1k": _cfg(_NAT_URL + "nat_mini.pth", notes=("paper top-1 81.8",)),
    "nat_tiny.in1k": _cfg(_NAT_URL + "nat_tiny.pth", notes=("paper top-1 83.2",)),
    "nat_small.in1k": _cfg(_NAT_URL + "nat_small.pth", notes=("paper top-1 83.7",)),
    "nat_base.in1k": _cfg(_NAT_URL + "nat_base.pth", notes=("paper top-1 84.3",)),
    "nat_isotropic_small.in1k": _cfg(
        _ISO_URL + "nat_isotropic_small_in1k_224.pth", first_conv="patch_embed.proj", pool_size=(14, 14),
        min_input_size=(3, 16, 16),
        paper_ids="arXiv:2209.15001", notes=("paper top-1 80.0",)),
    "nat_isotropic_base.in1k": _cfg(
        _ISO_URL + "nat_isotropic_base_in1k_224.pth", first_conv="patch_embed.proj", pool_size=(14, 14),
        min_input_size=(3, 16, 16),
        paper_ids="arXiv:2209.15001", notes=("paper top-1 81.6",)),
    # No official weights: a small NAT for 28x28 grayscale (Fashion-MNIST) demos and CPU training.
    "nat_nano.untrained": _cfg(
        num_classes=10, input_size=(1, 28, 28), min_input_size=(1, 16, 16), pool_size=(1, 1), crop_pct=1.0,
        mean=(0.2860,), std=(0.3530,),
        license="apache-2.0", origin_url=None, paper_ids=None),  # attnzoo's own configuration, no weights
})


@register_model
def nat_mini(pretrained: bool = False, **kwargs: Any) -> NAT:
    model_args = dict(embed_dim=64, depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3.0, drop_path_rate=0.2)
    return _create_nat("nat_mini", pretrained, **dict(model_args, **kwargs))


@register_model
def nat_tiny(pretrained: bool = False, **kwargs: Any) -> NAT:
    model_args = dict(embed_dim=64, depths=(3, 4, 18, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3.0, drop_path_rate=0.2)
    return _create_nat("nat_tiny", pretrained, **dict(model_args, **kwargs))


@register_model
def nat_small(pretrained: bool = False, **kwargs: Any) -> NAT:
    model_args = dict(embed_dim=96, depths=(3, 4, 18, 5), num_heads=(3, 6, 12, 24), mlp_ratio=2.0,
                      layer_scale=1e-5, drop_path_rate=0.3)
    return _create_nat("nat_small", pretrained, **dict(model_args, **kwargs))


@register_model
def nat_base(pretrained: bool = False, **kwargs: Any) -> NAT:
    model_args = dict(embed_dim=128, depths=(3, 4, 18, 5), num_heads=(4, 8, 16, 32), mlp_ratio=2.0,
                      layer_scale=1e-5, drop_path_rate=0.5)
    return _create_nat("nat_base", pretrained, **dict(model_args, **kwargs))


@register_model
def nat_nano(pretrained: bool = False, **kwargs: Any) -> NAT:
    """~2.5 M-parameter NAT for 28-64 px grayscale inputs: 5x5 then 3x3 neighbourhoods on 7..1 px maps."""
    model_args = dict(embed_dim=32, depths=(2, 2, 4, 2), num_heads=(1, 2, 4, 8), kernel_size=(5, 5, 3, 3),
                      mlp_ratio=3.0, drop_path_rate=0.1)
    return _create_nat("nat_nano", pretrained, **dict(model_args, **kwargs))


@register_model
def nat_isotropic_small(pretrained: bool = False, **kwargs: Any) -> NATIsotropic:
    model_args = dict(embed_dim=384, depth=12, num_heads=12, kernel_size=7, dilation=1, drop_path_rate=0.1)
    return _create_nat_isotropic("nat_isotropic_small", pretrained, **dict(model_args, **kwargs))


@register_model
def nat_isotropic_base(pretrained: bool = False, **kwargs: Any) -> NATIsotropic:
    model_args = dict(embed_dim=768, depth=12, num_heads=24, kernel_size=7, dilation=1, drop_path_rate=0.4)
    return _create_nat_isotropic("nat_isotropic_base", pretrained, **dict(model_args, **kwargs))
