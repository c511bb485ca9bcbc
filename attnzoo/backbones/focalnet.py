"""FocalNet: Focal Modulation Networks (Yang et al., NeurIPS 2022, arXiv:2203.11926).

The same networks as the official ``microsoft/FocalNet`` classification models and timm's
``focalnet_*``, computed in NHWC: every token-wise projection is a Linear on the channel axis and the
depthwise focal convolutions read channels-last views, so no layout copies sit between the blocks.
Strided patch convolutions zero-pad maps whose size is not a multiple of the stride (the official and
timm models drop those rows/columns); at sizes that are multiples of 32 the outputs are identical.

``checkpoint_filter_fn`` accepts the official checkpoints (``{"model": state_dict}``), timm's
``focalnet_*`` weights and attnzoo's own state dicts.
"""
from __future__ import annotations

import re
from functools import partial
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from timm.layers import ClassifierHead, DropPath, LayerScale, Mlp, calculate_drop_path_rates, register_notrace_module
from timm.models import generate_default_cfgs, register_model
from torch import nn

from attnzoo.backbones._base import StagedBackbone, build_backbone, unwrap_checkpoint
from attnzoo.backbones._pretrained import imagenet_cfg
from attnzoo.blocks.focal_modulation import FocalModulation

__all__ = ["FocalNet", "checkpoint_filter_fn"]


@register_notrace_module  # shape-dependent padding: an FX leaf
class Downsample(nn.Module):
    """Strided patch convolution + LayerNorm, NCHW image or NHWC map in, NHWC map out.

    Non-overlapping patches (kernel = stride) zero-pad the right/bottom edge up to a multiple of the
    stride instead of dropping it; ``overlap`` uses the official conv-embed kernels (7/pad 2 for the
    stem, 3/pad 1 for stride 2).
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            stride: int,
            overlap: bool = False,
            channels_last_input: bool = True,
            norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        self.stride = stride
        self.overlap = overlap
        self.channels_last_input = channels_last_input
        if overlap:
            kernel_size, padding = {4: (7, 2), 2: (3, 1)}[stride]
        else:
            kernel_size, padding = stride, 0
        self.proj = nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, padding=padding)
        self.norm = norm_layer(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last_input:
            x = x.permute(0, 3, 1, 2)
        pad_h, pad_w = -x.shape[-2] % self.stride, -x.shape[-1] % self.stride
        if not self.overlap and (pad_h or pad_w):
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.proj(x).permute(0, 2, 3, 1)
        return self.norm(x)


class FocalNetBlock(nn.Module):
    """Pre-norm (or post-norm) residual block: focal modulation, then an MLP, on an NHWC map."""

    def __init__(
            self,
            dim: int,
            mlp_ratio: float = 4.0,
            focal_level: int = 2,
            focal_window: int = 3,
            use_post_norm: bool = False,
            use_post_norm_in_modulation: bool = False,
            normalize_modulator: bool = False,
            layerscale_value: float | None = None,
            proj_drop: float = 0.0,
            drop_path: float = 0.0,
            norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        self.norm1 = nn.Identity() if use_post_norm else norm_layer(dim)
        self.modulation = FocalModulation(
            dim, focal_window=focal_window, focal_level=focal_level, use_post_norm=use_post_norm_in_modulation,
            normalize_modulator=normalize_modulator, proj_drop=proj_drop, norm_layer=norm_layer)
        self.norm1_post = norm_layer(dim) if use_post_norm else nn.Identity()
        self.ls1 = LayerScale(dim, layerscale_value) if layerscale_value is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

        self.norm2 = nn.Identity() if use_post_norm else norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)
        self.norm2_post = norm_layer(dim) if use_post_norm else nn.Identity()
        self.ls2 = LayerScale(dim, layerscale_value) if layerscale_value is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = x.flatten(1, 2)  # the residual stream as tokens: see attnzoo.blocks.tokens
        x = x + self.drop_path1(self.ls1(self.norm1_post(
            self.modulation(self.norm1(x).view(B, H, W, C)).flatten(1, 2))))
        x = x + self.drop_path2(self.ls2(self.norm2_post(self.mlp(self.norm2(x)))))
        return x.view(B, H, W, C)


class FocalNetStage(nn.Module):
    """Optional stride-2 downsample, then ``depth`` FocalNet blocks; NHWC in and out."""

    def __init__(
            self,
            dim: int,
            out_dim: int,
            depth: int,
            downsample: bool,
            drop_path: Sequence[float],
            use_overlap_down: bool = False,
            norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
            **block_kwargs,
    ):
        super().__init__()
        self.downsample = (
            Downsample(dim, out_dim, stride=2, overlap=use_overlap_down, norm_layer=norm_layer)
            if downsample else nn.Identity())
        self.blocks = nn.Sequential(*[
            FocalNetBlock(out_dim, drop_path=drop_path[i], norm_layer=norm_layer, **block_kwargs)
            for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class FocalNet(StagedBackbone):
    """FocalNet backbone and classifier.

    Computes in NHWC; ``forward_features`` returns the normed last-stage map as NCHW ``[B, C, H/32, W/32]``
    (ceil division), as timm's ``focalnet_*``; ``forward_intermediates`` and ``features_only`` return maps at
    strides 4, 8, 16, 32.
    """

    stage_lists = ("layers",)
    map_fmt = "NHWC"
    trunc_normal_types = (nn.Linear, nn.Conv2d)

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            embed_dim: int = 96,
            depths: Sequence[int] = (2, 2, 6, 2),
            mlp_ratio: float = 4.0,
            focal_levels: Sequence[int] = (2, 2, 2, 2),
            focal_windows: Sequence[int] = (3, 3, 3, 3),
            use_overlap_down: bool = False,
            use_post_norm: bool = False,
            use_post_norm_in_modulation: bool = False,
            normalize_modulator: bool = False,
            layerscale_value: float | None = None,
            drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            drop_path_rate: float = 0.1,
            norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        num_stages = len(depths)
        for name, value in (("focal_levels", focal_levels), ("focal_windows", focal_windows)):
            if len(value) != num_stages:
                raise ValueError(f"FocalNet: {name} must have one entry per stage ({num_stages}), got {value}")
        dims = [embed_dim * 2 ** i for i in range(num_stages)]
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = dims[-1]

        self.stem = Downsample(
            in_chans, dims[0], stride=4, overlap=use_overlap_down, channels_last_input=False, norm_layer=norm_layer)
        dpr = calculate_drop_path_rates(drop_path_rate, sum(depths))
        stages, self.feature_info = [], []
        for i in range(num_stages):
            stages.append(FocalNetStage(
                dims[max(i - 1, 0)], dims[i], depths[i], downsample=i > 0,
                drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])], use_overlap_down=use_overlap_down,
                norm_layer=norm_layer, mlp_ratio=mlp_ratio, focal_level=focal_levels[i],
                focal_window=focal_windows[i], use_post_norm=use_post_norm,
                use_post_norm_in_modulation=use_post_norm_in_modulation, normalize_modulator=normalize_modulator,
                layerscale_value=layerscale_value, proj_drop=proj_drop_rate))
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f"layers.{i}"))
        self.layers = nn.Sequential(*stages)
        self.norm = norm_layer(self.num_features)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self.init_weights()


def _official_key(key: str, post_norm: bool) -> str:
    """Rename one official ``microsoft/FocalNet`` key to attnzoo's layout."""
    key = key.replace("patch_embed.", "stem.")
    key = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", key)
    key = re.sub(r"\.gamma_([12])$", r".ls\1.gamma", key)
    if post_norm:  # official post-norm blocks reuse the pre-norm names norm1/norm2
        key = re.sub(r"\.norm([12])\.", r".norm\1_post.", key)
    return re.sub(r"^head\.", "head.fc.", key)


def _timm_key(key: str) -> str:
    """Rename one timm ``focalnet_*`` key to attnzoo's layout (timm calls the modulation norm ``norm``)."""
    return key.replace(".modulation.norm.", ".modulation.ln.")


def checkpoint_filter_fn(state_dict: dict, model: FocalNet) -> dict[str, torch.Tensor]:
    """Map an official, timm or attnzoo FocalNet state dict onto ``model``'s keys and shapes.

    The format is detected from the keys: official files hold ``{"model": sd}`` with ``patch_embed.*``
    keys, timm's use ``stem.*`` with 1×1-conv projections. 1×1 convolution weights become Linear weights;
    nothing else is reshaped, and unknown keys are passed on so strict loading reports them.
    """
    state_dict = unwrap_checkpoint(state_dict)
    if "patch_embed.proj.weight" in state_dict:
        post_norm = isinstance(model.layers[0].blocks[0].norm1, nn.Identity)
        rename = partial(_official_key, post_norm=post_norm)
    elif "stem.proj.weight" in state_dict:
        rename = _timm_key
    else:
        raise ValueError(
            "FocalNet checkpoint_filter_fn: state_dict is neither an official FocalNet checkpoint "
            "('patch_embed.proj.weight') nor a timm/attnzoo one ('stem.proj.weight'); first keys: "
            f"{list(state_dict)[:5]}")
    target = model.state_dict()
    out = {}
    for key, value in state_dict.items():
        key = rename(key)
        if key in target and value.shape != target[key].shape and value.shape[2:] == (1, 1):
            value = value.reshape(target[key].shape)  # 1×1 conv -> Linear
        out[key] = value
    return out


def _create_focalnet(variant: str, pretrained: bool = False, **kwargs) -> FocalNet:
    out_indices = tuple(range(len(kwargs.get("depths", (2, 2, 6, 2)))))
    return build_backbone(FocalNet, variant, pretrained, checkpoint_filter_fn, out_indices, **kwargs)


_RELEASE = "https://github.com/microsoft/FocalNet/releases/download/v1.0.0/"


def _cfg(timm_name: str, top1: float, **kwargs) -> dict:
    return imagenet_cfg(dict(
        url=f"{_RELEASE}{timm_name}.pth",
        hf_hub_id=f"timm/{timm_name}.ms_in1k",  # timm's conversion of the same official weights
        first_conv="stem.proj", license="mit", origin_url="https://github.com/microsoft/FocalNet",
        paper_ids="arXiv:2203.11926", paper_name="Focal Modulation Networks",
        notes=(f"paper ImageNet-1k top-1 {top1} at 224",)), **kwargs)


default_cfgs = generate_default_cfgs({
    "focalnet_t_srf.ms_in1k": _cfg("focalnet_tiny_srf", 82.1),
    "focalnet_t_lrf.ms_in1k": _cfg("focalnet_tiny_lrf", 82.3),
    "focalnet_s_srf.ms_in1k": _cfg("focalnet_small_srf", 83.4),
    "focalnet_s_lrf.ms_in1k": _cfg("focalnet_small_lrf", 83.5),
    "focalnet_b_srf.ms_in1k": _cfg("focalnet_base_srf", 83.7),
    "focalnet_b_lrf.ms_in1k": _cfg("focalnet_base_lrf", 83.9),
})

# Paper configurations (official configs/focalnet_*_{srf,lrf}.yaml): srf = 2 focal levels, lrf = 3, focal
# window 3 everywhere; drop_path_rate is the official training value.
_T = dict(embed_dim=96, depths=(2, 2, 6, 2), drop_path_rate=0.2)
_S = dict(embed_dim=96, depths=(2, 2, 18, 2), drop_path_rate=0.3)
_B = dict(embed_dim=128, depths=(2, 2, 18, 2), drop_path_rate=0.5)
_SRF = dict(focal_levels=(2, 2, 2, 2), focal_windows=(3, 3, 3, 3))
_LRF = dict(focal_levels=(3, 3, 3, 3), focal_windows=(3, 3, 3, 3))


@register_model
def focalnet_t_srf(pretrained: bool = False, **kwargs) -> FocalNet:
    return _create_focalnet("focalnet_t_srf", pretrained, **{**_T, **_SRF, **kwargs})


@register_model
def focalnet_t_lrf(pretrained: bool = False, **kwargs) -> FocalNet:
    return _create_focalnet("focalnet_t_lrf", pretrained, **{**_T, **_LRF, **kwargs})


@register_model
def focalnet_s_srf(pretrained: bool = False, **kwargs) -> FocalNet:
    return _create_focalnet("focalnet_s_srf", pretrained, **{**_S, **_SRF, **kwargs})


@register_model
def focalnet_s_lrf(pretrained: bool = False, **kwargs) -> FocalNet:
    return _create_focalnet("focalnet_s_lrf", pretrained, **{**_S, **_LRF, **kwargs})


@register_model
def focalnet_b_srf(pretrained: bool = False, **kwargs) -> FocalNet:
    return _create_focalnet("focalnet_b_srf", pretrained, **{**_B, **_SRF, **kwargs})


@register_model
def focalnet_b_lrf(pretrained: bool = False, **kwargs) -> FocalNet:
    return _create_focalnet("focalnet_b_lrf", pretrained, **{**_B, **_LRF, **kwargs})
