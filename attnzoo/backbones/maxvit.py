"""MaxViT: Multi-Axis Vision Transformer.

Paper: "MaxViT: Multi-Axis Vision Transformer", Tu et al., ECCV 2022 (https://arxiv.org/abs/2204.01697).
Official code: https://github.com/google-research/maxvit (Apache-2.0, TensorFlow); the PyTorch weights
are timm's ports (``maxvit_{tiny,small,base,large}_tf_224``), which these models load and reproduce.

A stride-2 conv stem (two 3x3 convs, TF "same" padding) and four stages (strides 4/8/16/32) of MaxViT
blocks: an MBConv (timm's ``MbConvBlock``, stride 2 in the first block of a stage), then block
(window) attention and grid attention, each a pre-norm transformer sub-block with a relative-position
bias over its 7x7 partition. Attention runs on the NHWC map through
:class:`attnzoo.blocks.window.PartitionAttention2d` (fused partitioned-attention kernel on CUDA).

Unlike timm's model, any input size works: maps that are not multiples of the 7x7 partition are
padded inside the attention kernel and the padding is masked, so e.g. 200x300 and 513x513 inputs run
with the ImageNet weights (the stem and MBConv downsamplers already use dynamic "same" padding).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import torch
from timm.layers import DropPath, LayerNorm, LayerNorm2d, Mlp, NormMlpClassifierHead
from timm.models import generate_default_cfgs, register_model
from timm.models.maxxvit import MaxxVitConvCfg, MbConvBlock, Stem
from torch import nn

from attnzoo.backbones._base import StagedBackbone, build_backbone, unwrap_checkpoint
from attnzoo.backbones._pretrained import imagenet_cfg
from attnzoo.blocks.window import PartitionAttention2d

__all__ = ["MaxViT", "MaxViTBlock", "PartitionTransformer"]

# TF MaxViT's conv settings: BatchNorm eps 1e-3, tanh-approximated GELU, TF "same" padding.
TF_CONV_CFG = MaxxVitConvCfg(norm_eps=1e-3, act_layer="gelu_tanh", padding="same")


class PartitionTransformer(nn.Module):
    """Pre-norm transformer sub-block on NHWC maps: ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``.

    ``mode="window"`` is MaxViT's block attention, ``mode="grid"`` its grid attention.
    """

    def __init__(self, dim: int, mode: str, partition_size: int = 7, head_dim: int = 32,
                 mlp_ratio: float = 4.0, proj_drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=1e-5)
        self.attn = PartitionAttention2d(dim, head_dim=head_dim, partition_size=partition_size, mode=mode,
                                         rel_pos_bias=True, proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=partial(nn.GELU, approximate="tanh"), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def init_weights(self) -> None:
        """ViT-style init, as timm's ``vit_eff`` scheme: xavier-uniform weights, (near-)zero biases."""
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.normal_(m.bias, std=1e-6) if "mlp" in name else nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class MaxViTBlock(nn.Module):
    """MBConv, then block attention and grid attention. NCHW in and out; attention runs in NHWC."""

    def __init__(self, dim: int, dim_out: int, stride: int = 1, partition_size: int = 7, head_dim: int = 32,
                 proj_drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.conv = MbConvBlock(dim, dim_out, stride=stride, cfg=TF_CONV_CFG, drop_path=drop_path)
        kw = dict(partition_size=partition_size, head_dim=head_dim, proj_drop=proj_drop, drop_path=drop_path)
        self.attn_block = PartitionTransformer(dim_out, "window", **kw)
        self.attn_grid = PartitionTransformer(dim_out, "grid", **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x).permute(0, 2, 3, 1)
        return self.attn_grid(self.attn_block(x)).permute(0, 3, 1, 2)


class MaxViTStage(nn.Module):
    """``depth`` MaxViT blocks, the first one with stride 2."""

    def __init__(self, dim: int, dim_out: int, depth: int, drop_path: Sequence[float], **kwargs: Any) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[
            MaxViTBlock(dim if i == 0 else dim_out, dim_out, stride=2 if i == 0 else 1, drop_path=drop_path[i],
                        **kwargs)
            for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class MaxViT(StagedBackbone):
    """MaxViT backbone and classifier.

    ``forward_features`` returns the last stage's NCHW map ``[B, embed_dims[-1], H/32, W/32]`` (the final
    LayerNorm2d lives in the head, as in TF MaxViT and timm). ``features_only`` / ``forward_intermediates``
    give the four stage outputs (NCHW, strides 4/8/16/32); the stride-2 stem is not a feature level.
    """

    no_weight_decay_names = ("relative_position_bias_table",)

    def __init__(
        self,
        embed_dims: Sequence[int] = (64, 128, 256, 512),
        depths: Sequence[int] = (2, 2, 5, 2),
        stem_width: int = 64,
        head_hidden_size: int | None = None,
        partition_size: int = 7,
        head_dim: int = 32,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        """
        Args:
            embed_dims, depths: per-stage widths and block counts.
            stem_width: channels of the stride-2 conv stem.
            head_hidden_size: width of the pre-logits layer (``embed_dims[-1]`` if None).
            partition_size: window size of block attention and grid size of grid attention (7 in all
                released models; 224 / 32).
            head_dim: attention head width (heads = width // head_dim).
            in_chans, num_classes, global_pool, drop_rate, drop_path_rate: as in timm.
            proj_drop_rate: dropout after the attention projection and inside the MLPs.
        """
        super().__init__()
        if len(embed_dims) != len(depths):
            raise ValueError(f"MaxViT: embed_dims {tuple(embed_dims)} and depths {tuple(depths)} need one entry per "
                             "stage")
        for dim in embed_dims:
            if dim % head_dim:
                raise ValueError(f"MaxViT: embed_dims {tuple(embed_dims)} must be multiples of head_dim={head_dim}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = embed_dims[-1]

        self.stem = Stem(in_chans, stem_width, padding="same", bias=True, act_layer="gelu_tanh",
                         norm_layer="batchnorm2d", norm_eps=1e-3)
        dpr = [x.tolist() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))]
        stages, self.feature_info = [], []
        dim = stem_width
        for i, (dim_out, depth) in enumerate(zip(embed_dims, depths)):
            stages.append(MaxViTStage(dim, dim_out, depth, dpr[i], partition_size=partition_size,
                                      head_dim=head_dim, proj_drop=proj_drop_rate))
            self.feature_info.append(dict(num_chs=dim_out, reduction=4 * 2 ** i, module=f"stages.{i}"))
            dim = dim_out
        self.stages = nn.Sequential(*stages)
        self.norm = nn.Identity()  # the final norm is the head's (pre-pooling stays un-normed, as in timm)
        self.head = NormMlpClassifierHead(self.num_features, num_classes, hidden_size=head_hidden_size or dim,
                                          pool_type=global_pool, drop_rate=drop_rate,
                                          norm_layer=partial(LayerNorm2d, eps=1e-5))
        self.head_hidden_size = self.head.num_features
        self.init_weights()

    def init_weights(self) -> None:
        """timm's MaxViT init: each MBConv, stem and transformer sub-block initialises itself."""
        for module in self.modules():
            if isinstance(module, (MbConvBlock, Stem, PartitionTransformer)):
                module.init_weights()


def checkpoint_filter_fn(state_dict: dict[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm ``maxvit_*_tf_*`` state dict (plain or wrapped, see :func:`unwrap_checkpoint`) or attnzoo's own
    -> attnzoo.

    The only rename is timm's ``attn.rel_pos.relative_position_bias_table`` -> ``attn.relative_position_bias_table``
    (same ``[heads, 13, 13]`` key − query layout). Nothing is resized or dropped: a checkpoint for another
    partition size or width fails strict loading with the offending keys listed.
    """
    return {k.replace(".attn.rel_pos.relative_position_bias_table", ".attn.relative_position_bias_table"): v
            for k, v in unwrap_checkpoint(state_dict).items()}


def _create_maxvit(variant: str, pretrained: bool = False, **kwargs: Any) -> MaxViT:
    return build_backbone(MaxViT, variant, pretrained, checkpoint_filter_fn, (0, 1, 2, 3), **kwargs)


def _cfg(hub_id: str, **kwargs: Any) -> dict[str, Any]:
    return imagenet_cfg(dict(
        hf_hub_id=hub_id, crop_pct=0.95, first_conv="stem.conv1", license="apache-2.0", paper_ids="arXiv:2204.01697",
        paper_name="MaxViT: Multi-Axis Vision Transformer", origin_url="https://github.com/google-research/maxvit",
    ), **kwargs)


default_cfgs = generate_default_cfgs({
    "maxvit_t.in1k": _cfg("timm/maxvit_tiny_tf_224.in1k", notes=("ImageNet-1k top-1 83.62 (paper)",)),
    "maxvit_s.in1k": _cfg("timm/maxvit_small_tf_224.in1k", notes=("ImageNet-1k top-1 84.45 (paper)",)),
    "maxvit_b.in1k": _cfg("timm/maxvit_base_tf_224.in1k", notes=("ImageNet-1k top-1 84.95 (paper)",)),
    "maxvit_l.in1k": _cfg("timm/maxvit_large_tf_224.in1k", notes=("ImageNet-1k top-1 85.17 (paper)",)),
})


@register_model
def maxvit_t(pretrained: bool = False, **kwargs: Any) -> MaxViT:
    """MaxViT-T: depths 2-2-5-2, widths 64-512 (= timm maxvit_tiny_tf_224)."""
    model_args = dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 5, 2), stem_width=64, head_hidden_size=512)
    return _create_maxvit("maxvit_t", pretrained, **dict(model_args, **kwargs))


@register_model
def maxvit_s(pretrained: bool = False, **kwargs: Any) -> MaxViT:
    """MaxViT-S: depths 2-2-5-2, widths 96-768 (= timm maxvit_small_tf_224)."""
    model_args = dict(embed_dims=(96, 192, 384, 768), depths=(2, 2, 5, 2), stem_width=64, head_hidden_size=768)
    return _create_maxvit("maxvit_s", pretrained, **dict(model_args, **kwargs))


@register_model
def maxvit_b(pretrained: bool = False, **kwargs: Any) -> MaxViT:
    """MaxViT-B: depths 2-6-14-2, widths 96-768 (= timm maxvit_base_tf_224)."""
    model_args = dict(embed_dims=(96, 192, 384, 768), depths=(2, 6, 14, 2), stem_width=64, head_hidden_size=768)
    return _create_maxvit("maxvit_b", pretrained, **dict(model_args, **kwargs))


@register_model
def maxvit_l(pretrained: bool = False, **kwargs: Any) -> MaxViT:
    """MaxViT-L: depths 2-6-14-2, widths 128-1024 (= timm maxvit_large_tf_224)."""
    model_args = dict(embed_dims=(128, 256, 512, 1024), depths=(2, 6, 14, 2), stem_width=128,
                      head_hidden_size=1024)
    return _create_maxvit("maxvit_l", pretrained, **dict(model_args, **kwargs))
