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
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, DropPath, Mlp, PatchEmbed, calculate_drop_path_rates, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.swin_transformer import PatchMerging
from torch import nn

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
        if self.gamma1 is None:
            x = x + self.drop_path(self.attn(self.norm1(x)))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        x = x + self.drop_path(self.gamma1 * self.attn(self.norm1(x)))
        return x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x)))


class NATStage(nn.Module):
    """NAT blocks at one resolution followed by the downsampler into the next (official order)."""

    def __init__(self, blocks: Sequence[nn.Module], downsample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.grad_checkpointing = False

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.forward_blocks(x))


def _per_level(value: int | Sequence[int], num_levels: int, name: str) -> list[int]:
    values = [value] * num_levels if isinstance(value, int) else list(value)
    if len(values) != num_levels:
        raise ValueError(f"{name} must be an int or have one entry per level ({num_levels}), got {value!r}")
    return values


def _init_weights(module: nn.Module) -> None:
    """Official init: truncated-normal Linear weights (std 0.02), zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class NAT(nn.Module):
    """Hierarchical neighborhood-attention backbone (NAT, DiNAT, DiNAT-s).

    ``forward_features`` returns the final-norm NHWC map ``[B, ceil(H/32), ceil(W/32), num_features]``;
    ``forward_intermediates`` / ``features_only`` return NCHW maps at strides 4, 8, 16, 32 (each level's
    output before its downsampler, un-normalised).

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
        self.output_fmt = "NHWC"
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
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f"levels.{i}.blocks"))

        self.norm = norm_layer(self.num_features)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                   input_fmt=self.output_fmt)
        self.apply(_init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Relative position bias tables are exempt from weight decay, as officially."""
        return {name for name, _ in self.named_parameters() if name.endswith(".rpb")}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^patch_embed",
            blocks=r"^levels\.(\d+)" if coarse else [
                (r"^levels\.(\d+)\.blocks\.(\d+)", None),
                (r"^levels\.(\d+)\.downsample", (99998,)),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for level in self.levels:
            level.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | list[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Level outputs (before each downsampler) as NCHW maps; ``indices`` as in timm (last n if int).

        ``norm`` applies the final norm to the last level's map, the only one it is sized for.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.levels), indices)
        levels = self.levels[:max_index + 1] if stop_early else self.levels
        last = len(self.levels) - 1
        intermediates = []
        x = self.patch_embed(x)
        for i, level in enumerate(levels):
            x = level.forward_blocks(x)
            if i in take_indices:
                x_inter = self.norm(x) if norm and i == last else x
                intermediates.append(x_inter.permute(0, 3, 1, 2).contiguous())
            x = level.downsample(x)
        if intermediates_only:
            return intermediates
        if len(levels) - 1 == last:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True,
    ) -> list[int]:
        """Drop the levels (and final downsampler, norm, head) that the requested features do not need."""
        take_indices, max_index = feature_take_indices(len(self.levels), indices)
        prune_end = max_index < len(self.levels) - 1
        self.levels = self.levels[:max_index + 1]
        self.levels[-1].downsample = nn.Identity()
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for level in self.levels:
            x = level(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class NATIsotropic(nn.Module):
    """Isotropic (ViT-like) NAT / DiNAT: 16x16 patchify, one resolution, blocks alternating dilation 1
    and ``dilation``.

    ``forward_features`` returns the final-norm NHWC map ``[B, ceil(H/16), ceil(W/16), embed_dim]``;
    ``forward_intermediates`` / ``features_only`` return per-block NCHW maps at stride 16.
    """

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
        self.output_fmt = "NHWC"
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.grad_checkpointing = False
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
        self.apply(_init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {name for name, _ in self.named_parameters() if name.endswith(".rpb")}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^patch_embed", blocks=[(r"^layers\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | list[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Block outputs as NCHW maps; ``norm`` applies the final norm to every one (all share its width)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        blocks = self.layers[:max_index + 1] if stop_early else self.layers
        intermediates = []
        x = self.patch_embed(x)
        for i, block in enumerate(blocks):
            x = block(x)
            if i in take_indices:
                intermediates.append((self.norm(x) if norm else x).permute(0, 3, 1, 2).contiguous())
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
            self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True,
    ) -> list[int]:
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.layers, x)
        else:
            x = self.layers(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map an official NAT / DiNAT / DiNAT-s / isotropic checkpoint onto attnzoo's module names.

    Accepts the file as released (a plain state dict) or wrapped under ``model`` / ``state_dict``.
    Renames ``head.*`` -> ``head.fc.*`` (timm's ClassifierHead) and, for hierarchical models, DiNAT-s's
    ``layers.*`` -> ``levels.*``; every other key passes unchanged, so strict loading reports any
    missing or unexpected key of a wrong or truncated file.
    """
    for wrapper in ("model", "state_dict"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            state_dict = state_dict[wrapper]
            break
    rename_layers = isinstance(model, NAT)
    out = {}
    for key, value in state_dict.items():
        if key.startswith("head."):
            key = "head.fc." + key[len("head."):]
        elif rename_layers and key.startswith("layers."):
            key = "levels." + key[len("layers."):]
        out[key] = value
    return out


def _create_nat(variant: str, pretrained: bool = False, **kwargs: Any) -> NAT:
    out_indices = kwargs.pop("out_indices", tuple(range(len(kwargs.get("depths", (3, 4, 6, 5))))))
    return build_model_with_cfg(
        NAT, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **kwargs)


def _create_nat_isotropic(variant: str, pretrained: bool = False, **kwargs: Any) -> NATIsotropic:
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        NATIsotropic, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **kwargs)


def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    return {
        "url": url, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj.0", "classifier": "head.fc", "license": "mit",
        "paper_ids": "arXiv:2204.07143", "paper_name": "Neighborhood Attention Transformer",
        "origin_url": "https://github.com/SHI-Labs/Neighborhood-Attention-Transformer", **kwargs,
    }


_NAT_URL = "https://shi-labs.com/projects/nat/checkpoints/CLS/"
_ISO_URL = "https://shi-labs.com/projects/dinat/checkpoints/isotropic/"

default_cfgs = generate_default_cfgs({
    "nat_mini.in1k": _cfg(_NAT_URL + "nat_mini.pth", notes=("paper top-1 81.8",)),
    "nat_tiny.in1k": _cfg(_NAT_URL + "nat_tiny.pth", notes=("paper top-1 83.2",)),
    "nat_small.in1k": _cfg(_NAT_URL + "nat_small.pth", notes=("paper top-1 83.7",)),
    "nat_base.in1k": _cfg(_NAT_URL + "nat_base.pth", notes=("paper top-1 84.3",)),
    "nat_isotropic_small.in1k": _cfg(
        _ISO_URL + "nat_isotropic_small_in1k_224.pth", first_conv="patch_embed.proj", pool_size=(14, 14),
        paper_ids="arXiv:2209.15001", notes=("paper top-1 80.0",)),
    "nat_isotropic_base.in1k": _cfg(
        _ISO_URL + "nat_isotropic_base_in1k_224.pth", first_conv="patch_embed.proj", pool_size=(14, 14),
        paper_ids="arXiv:2209.15001", notes=("paper top-1 81.6",)),
    # No official weights: a small NAT for 28x28 grayscale (Fashion-MNIST) demos and CPU training.
    "nat_nano.untrained": _cfg(
        num_classes=10, input_size=(1, 28, 28), pool_size=(1, 1), crop_pct=1.0, mean=(0.2860,), std=(0.3530,),
        license=None, origin_url=None, paper_ids=None),
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
