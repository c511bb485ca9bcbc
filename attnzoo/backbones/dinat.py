"""Dilated Neighborhood Attention Transformer (DiNAT, DiNAT-s, isotropic DiNAT), for timm.

Paper: "Dilated Neighborhood Attention Transformer", Hassani & Shi, 2022 (https://arxiv.org/abs/2209.15001).
Official code and checkpoints: https://github.com/SHI-Labs/Neighborhood-Attention-Transformer (MIT).

DiNAT is NAT with every other block dilated, so the models are configurations of ``attnzoo.backbones.nat``'s
``NAT`` (conv stem and downsamplers, official ``levels.*`` names), DiNAT-s its Swin-layout configuration
(4x4 patchify stem, patch merging; official ``layers.*`` names mapped to ``levels.*``) and the isotropic
models of ``NATIsotropic``. ``dinat_large_384`` and ``dinat_s_large_384`` use larger dilations sized for
384x384 inputs; ``dinat_large_384_11x11`` uses 11x11 neighbourhoods.
"""
from __future__ import annotations

from typing import Any

from timm.models import generate_default_cfgs, register_model

from attnzoo.backbones.nat import NAT, NATIsotropic, _cfg, _create_nat, _create_nat_isotropic

_IN1K_URL = "https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/"
_IN22K_URL = "https://shi-labs.com/projects/dinat/checkpoints/imagenet22k/"
_ISO_URL = "https://shi-labs.com/projects/dinat/checkpoints/isotropic/"


def _dilations(depths: tuple[int, ...], image: int = 224) -> list[list[int]]:
    """The official schedule: blocks alternate dilation 1 and a level's dilation, which is the
    largest that still fits a 7x7 window into that level's map (8, 4, 2, 1 at 224; 13, 6, 3, 1 at 384)."""
    per_level = {224: (8, 4, 2, 1), 384: (13, 6, 3, 1)}[image]
    return [[1 if j % 2 == 0 else d for j in range(depth)] for depth, d in zip(depths, per_level)]


def _dcfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    return _cfg(url, paper_ids="arXiv:2209.15001", paper_name="Dilated Neighborhood Attention Transformer",
                **kwargs)


def _scfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    return _dcfg(url, first_conv="patch_embed.proj", **kwargs)


_384 = dict(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0)
_ISO = dict(first_conv="patch_embed.proj", pool_size=(14, 14), min_input_size=(3, 16, 16))

default_cfgs = generate_default_cfgs({
    "dinat_mini.in1k": _dcfg(_IN1K_URL + "dinat_mini_in1k_224.pth", notes=("paper top-1 81.8",)),
    "dinat_tiny.in1k": _dcfg(_IN1K_URL + "dinat_tiny_in1k_224.pth", notes=("paper top-1 82.7",)),
    "dinat_small.in1k": _dcfg(_IN1K_URL + "dinat_small_in1k_224.pth", notes=("paper top-1 83.8",)),
    "dinat_base.in1k": _dcfg(_IN1K_URL + "dinat_base_in1k_224.pth", notes=("paper top-1 84.4",)),
    "dinat_large.in22k_ft_in1k": _dcfg(
        _IN1K_URL + "dinat_large_in22k_in1k_224.pth", notes=("paper top-1 86.6",)),
    "dinat_large.in22k": _dcfg(_IN22K_URL + "dinat_large_in22k_224.pth", num_classes=21841),
    "dinat_large_384.in22k_ft_in1k": _dcfg(
        _IN1K_URL + "dinat_large_in22k_in1k_384.pth", notes=("paper top-1 87.4",), **_384),
    "dinat_large_384_11x11.in22k_ft_in1k": _dcfg(
        _IN1K_URL + "dinat_large_in22k_in1k_384_11x11.pth", notes=("paper top-1 87.5",), **_384),
    "dinat_s_tiny.in1k": _scfg(_IN1K_URL + "dinat_s_tiny_in1k_224.pth", notes=("paper top-1 81.8",)),
    "dinat_s_small.in1k": _scfg(_IN1K_URL + "dinat_s_small_in1k_224.pth", notes=("paper top-1 83.5",)),
    "dinat_s_base.in1k": _scfg(_IN1K_URL + "dinat_s_base_in1k_224.pth", notes=("paper top-1 83.8",)),
    "dinat_s_large.in22k_ft_in1k": _scfg(_IN1K_URL + "dinat_s_large_in1k_224.pth", notes=("paper top-1 86.5",)),
    "dinat_s_large.in22k": _scfg(_IN22K_URL + "dinat_s_large_in22k_224.pth", num_classes=21841),
    "dinat_s_large_384.in22k_ft_in1k": _scfg(
        _IN1K_URL + "dinat_s_large_in1k_384.pth", notes=("paper top-1 87.4",), **_384),
    "dinat_isotropic_small.in1k": _dcfg(
        _ISO_URL + "dinat_isotropic_small_in1k_224.pth", notes=("paper top-1 80.8",), **_ISO),
    "dinat_isotropic_base.in1k": _dcfg(
        _ISO_URL + "dinat_isotropic_base_in1k_224.pth", notes=("paper top-1 82.1",), **_ISO),
})

_NAT_DEPTHS = (3, 4, 18, 5)
_S_DEPTHS = (2, 2, 18, 2)
_S_ARGS = dict(stem="patch", downsample="merge", mlp_ratio=4.0)


@register_model
def dinat_mini(pretrained: bool = False, **kwargs: Any) -> NAT:
    model_args = dict(embed_dim=64, depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3.0,
                      dilations=_dilations((3, 4, 6, 5)), drop_path_rate=0.2)
    return _create_nat("dinat_mini", pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_tiny(pretrained: bool = False, **kwargs: Any) -> NAT:
    model_args = dict(embed_dim=64, depths=_NAT_DEPTHS, num_heads=(2, 4, 8, 16), mlp_ratio=3.0,
                      dilations=_dilations(_NAT_DEPTHS), drop_path_rate=0.2)
    return _create_nat("dinat_tiny", pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_small(pretrained: bool = False, **kwargs: Any) -> NAT:
    model_args = dict(embed_dim=96, depths=_NAT_DEPTHS, num_heads=(3, 6, 12, 24), mlp_ratio=2.0,
                      dilations=_dilations(_NAT_DEPTHS), drop_path_rate=0.3)
    return _create_nat("dinat_small", pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_base(pretrained: bool = False, **kwargs: Any) -> NAT:
    model_args = dict(embed_dim=128, depths=_NAT_DEPTHS, num_heads=(4, 8, 16, 32), mlp_ratio=2.0,
                      layer_scale=1e-5, dilations=_dilations(_NAT_DEPTHS), drop_path_rate=0.5)
    return _create_nat("dinat_base", pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_large(pretrained: bool = False, **kwargs: Any) -> NAT:
    model_args = dict(embed_dim=192, depths=_NAT_DEPTHS, num_heads=(6, 12, 24, 48), mlp_ratio=2.0,
                      dilations=_dilations(_NAT_DEPTHS), drop_path_rate=0.35)
    return _create_nat("dinat_large", pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_large_384(pretrained: bool = False, **kwargs: Any) -> NAT:
    model_args = dict(embed_dim=192, depths=_NAT_DEPTHS, num_heads=(6, 12, 24, 48), mlp_ratio=2.0,
                      dilations=_dilations(_NAT_DEPTHS, 384), drop_path_rate=0.35)
    return _create_nat("dinat_large_384", pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_large_384_11x11(pretrained: bool = False, **kwargs: Any) -> NAT:
    model_args = dict(embed_dim=192, depths=_NAT_DEPTHS, num_heads=(6, 12, 24, 48), mlp_ratio=2.0, kernel_size=11,
                      dilations=_dilations(_NAT_DEPTHS), drop_path_rate=0.35)
    return _create_nat("dinat_large_384_11x11", pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_s_tiny(pretrained: bool = False, **kwargs: Any) -> NAT:
    model_args = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                      dilations=_dilations((2, 2, 6, 2)), drop_path_rate=0.2, **_S_ARGS)
    return _create_nat("dinat_s_tiny", pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_s_small(pretrained: bool = False, **kwargs: Any) -> NAT:
    model_args = dict(embed_dim=96, depths=_S_DEPTHS, num_heads=(3, 6, 12, 24),
                      dilations=_dilations(_S_DEPTHS), drop_path_rate=0.3, **_S_ARGS)
    return _create_nat("dinat_s_small", pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_s_base(pretrained: bool = False, **kwargs: Any) -> NAT:
    model_args = dict(embed_dim=128, depths=_S_DEPTHS, num_heads=(4, 8, 16, 32),
                      dilations=_dilations(_S_DEPTHS), drop_path_rate=0.5, **_S_ARGS)
    return _create_nat("dinat_s_base", pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_s_large(pretrained: bool = False, **kwargs: Any) -> NAT:
    model_args = dict(embed_dim=192, depths=_S_DEPTHS, num_heads=(6, 12, 24, 48),
                      dilations=_dilations(_S_DEPTHS), drop_path_rate=0.35, **_S_ARGS)
    return _create_nat("dinat_s_large", pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_s_large_384(pretrained: bool = False, **kwargs: Any) -> NAT:
    model_args = dict(embed_dim=192, depths=_S_DEPTHS, num_heads=(6, 12, 24, 48),
                      dilations=_dilations(_S_DEPTHS, 384), drop_path_rate=0.35, **_S_ARGS)
    return _create_nat("dinat_s_large_384", pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_isotropic_small(pretrained: bool = False, **kwargs: Any) -> NATIsotropic:
    model_args = dict(embed_dim=384, depth=12, num_heads=12, kernel_size=7, dilation=2, drop_path_rate=0.1)
    return _create_nat_isotropic("dinat_isotropic_small", pretrained, **dict(model_args, **kwargs))


@register_model
def dinat_isotropic_base(pretrained: bool = False, **kwargs: Any) -> NATIsotropic:
    model_args = dict(embed_dim=768, depth=12, num_heads=24, kernel_size=7, dilation=2, drop_path_rate=0.4)
    return _create_nat_isotropic("dinat_isotropic_base", pretrained, **dict(model_args, **kwargs))
