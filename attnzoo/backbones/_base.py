"""timm's model API, written once for every attnzoo backbone.

A family subclasses :class:`StagedBackbone`, builds its stem, stages, final ``norm`` and a timm head
(``ClassifierHead`` / ``NormMlpClassifierHead``), and declares where they live and how maps are laid out:

* ``stage_lists``: the attributes indexed by stage, the stages first (official module names are kept,
  so they vary); ``feature_info`` has one entry per stage, and ``forward_intermediates`` /
  ``features_only`` return the stage outputs.
* ``map_fmt``: the layout the stages compute in; ``output_fmt``: the layout ``forward_features`` returns
  (the layout of timm's twin where timm ships the family).
* ``forward_stem`` / ``forward_stage`` when a family's stem or stage call is not ``self.stem`` /
  ``stages[i]``; ``norm_all_intermediates`` for isotropic models, whose final norm fits every level.

Everything else (``forward_*``, ``prune_intermediate_layers`` with ConvNeXt's semantics,
``reset_classifier``, gradient checkpointing, ``group_matcher``, ``no_weight_decay`` with full parameter
names, weight init, input checks, ``load_pretrained``) lives here.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

import torch
from timm.layers import SelectAdaptivePool2d, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint
from timm.models._features import feature_take_indices
from torch import nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from attnzoo.backbones._pretrained import load_official_file

__all__ = ["StagedBackbone", "build_backbone", "convert_layout", "linear_head_to_timm", "unwrap_checkpoint"]

_FORMATS = ("NCHW", "NHWC")


def convert_layout(x: torch.Tensor, src: str, dst: str) -> torch.Tensor:
    """``x`` from layout ``src`` to ``dst`` ("NCHW" / "NHWC"); no copy when they agree."""
    if src == dst:
        return x
    return x.permute(0, 3, 1, 2).contiguous() if dst == "NCHW" else x.permute(0, 2, 3, 1).contiguous()


def unwrap_checkpoint(state_dict: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict inside an official checkpoint file: unwraps ``model`` / ``state_dict`` /
    ``state_dict_ema`` (in that order of preference, nested wrappers too) and strips DistributedDataParallel's
    ``module.`` prefix. A plain state dict passes unchanged."""
    while True:
        wrapper = next((k for k in ("model", "state_dict", "state_dict_ema") if isinstance(state_dict.get(k), dict)),
                       None)
        if wrapper is None:
            break
        state_dict = state_dict[wrapper]
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def linear_head_to_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official bare-Linear classifier (``head.weight`` / ``head.bias``) as timm's head (``head.fc.*``);
    every other key, attnzoo's own ``head.fc.*`` included, passes unchanged."""
    return {("head.fc." + k[len("head."):] if k in ("head.weight", "head.bias") else k): v
            for k, v in state_dict.items()}


class StagedBackbone(nn.Module):
    """Base of attnzoo's models: stem -> stages -> ``norm`` -> ``head``; see the module docstring."""

    stage_lists: tuple[str, ...] = ("stages",)
    stem_pattern: str = r"^(?:stem|patch_embed|cls_token|pos_embed)"  # the parameters before stage 0
    map_fmt: str = "NCHW"
    output_fmt: str = "NCHW"
    norm_all_intermediates: bool = False
    no_weight_decay_names: tuple[str, ...] = ()  # parameter names (last component) exempt from weight decay
    trunc_normal_types: tuple[type[nn.Module], ...] = (nn.Linear,)
    grad_checkpointing: bool = False

    num_classes: int
    num_features: int
    head_hidden_size: int
    feature_info: list[dict[str, Any]]
    norm: nn.Module
    head: nn.Module

    # ---- family hooks -------------------------------------------------------------------------------
    def stage_modules(self) -> nn.Module:
        return getattr(self, self.stage_lists[0])

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)

    def forward_stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return self.run_checkpointed(self.stage_modules()[index], x)

    def truncate_stages(self, num_stages: int) -> None:
        """Keep the first ``num_stages`` entries of every per-stage list."""
        for name in self.stage_lists:
            setattr(self, name, getattr(self, name)[:num_stages])

    def init_weights(self) -> None:
        """The official init: truncated-normal (std 0.02) weights and zero biases for ``trunc_normal_types``."""
        for module in self.modules():
            if isinstance(module, self.trunc_normal_types):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # ---- timm's model API ---------------------------------------------------------------------------
    def run_checkpointed(self, module: nn.Module, *args: Any) -> torch.Tensor:
        """Call ``module``; with gradient checkpointing on, recompute it in the backward pass instead of
        storing its activations (the one place checkpointing happens)."""
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(module, *args)
        return module(*args)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise decay and frozen stages: the stem (``stem_pattern``), then one group
        per stage (coarse) or per block with the final norm last; the head is timm's 'remainder'."""
        stages = rf"^(?:{'|'.join(self.stage_lists)})\.(\d+)"
        return dict(stem=self.stem_pattern,
                    blocks=stages if coarse else [(stages + r"\.(?:\w+\.)?(\d+)", None), (stages, (0,)),
                                                  (r"^(?:norm|head\.norm)", (99999,))])

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Full names of the parameters exempt from weight decay (timm matches full names)."""
        return {name for name, _ in self.named_parameters() if name.rsplit(".", 1)[-1] in self.no_weight_decay_names}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    @classmethod
    def check_global_pool(cls, global_pool: str) -> None:
        """One clear error for a pooling that timm's heads do not have."""
        try:
            SelectAdaptivePool2d(pool_type=global_pool)
        except AssertionError:
            raise ValueError(f"{cls.__name__}: global_pool must be a timm pooling type ('avg', 'max', 'avgmax', ..., "
                             f"'' for none), got {global_pool!r}") from None

    def reset_classifier(self, num_classes: int, global_pool: str | None = None, reset_other: bool = False) -> None:
        """New classifier for ``num_classes`` (0: none), pooling ``global_pool`` ('' = none, None = unchanged);
        ``reset_other`` also drops the head's norm / pre-logits layer."""
        if global_pool is not None:
            self.check_global_pool(global_pool)
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, reset_other=reset_other, in_features=self.num_features)
        self.head_hidden_size = self.head.num_features

    def check_input(self, x: torch.Tensor) -> None:
        """One clear error for input that is not an image batch (skipped while tracing/scripting)."""
        if torch.jit.is_scripting() or is_fx_symbolic_tracing():
            return
        if x.ndim != 4:
            raise ValueError(f"{type(self).__name__}: x must be a 4-D image batch [B, C, H, W], got shape "
                             f"{tuple(x.shape)}{' (add a batch dimension: x[None])' if x.ndim == 3 else ''}")

    def _empty_batch(self, x: torch.Tensor) -> bool:
        return not torch.jit.is_scripting() and not is_fx_symbolic_tracing() and x.shape[0] == 0

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | list[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs at ``indices`` (last n if int, all if None) as ``output_fmt`` maps, and the
        ``forward_features`` output. ``norm`` applies the final norm to the intermediates it is sized for (the
        last stage's, or all of an isotropic model's); ``stop_early`` skips stages after the last one asked."""
        if output_fmt not in _FORMATS:
            raise ValueError(f"{type(self).__name__}: output_fmt must be one of {_FORMATS}, got {output_fmt!r}")
        self.check_input(x)
        if self._empty_batch(x):
            feats, inter = self.forward_intermediates(x.new_zeros((1, *x.shape[1:])), indices, norm, stop_early,
                                                      output_fmt)
            inter = [t[:0] for t in inter]
            return inter if intermediates_only else (feats[:0], inter)
        num_stages = len(self.feature_info)
        take_indices, max_index = feature_take_indices(num_stages, indices)
        num_run = max_index + 1 if stop_early else num_stages
        intermediates = []
        x = self.forward_stem(x)
        for i in range(num_run):
            x = self.forward_stage(i, x)
            if i in take_indices:
                normed = norm and (self.norm_all_intermediates or i == num_stages - 1)
                intermediates.append(self.map_to_image(x, output_fmt, normed))
        if intermediates_only:
            return intermediates
        return self.forward_norm(x) if num_run == num_stages or self.norm_all_intermediates else x, intermediates

    def map_to_image(self, x: torch.Tensor, fmt: str, norm: bool = False) -> torch.Tensor:
        """A stage output (with the final norm if ``norm``) as an image-like map in layout ``fmt``."""
        return convert_layout(self.norm(x) if norm else x, self.map_fmt, fmt)

    def forward_norm(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm on the last stage's output, returned in ``output_fmt``."""
        return convert_layout(self.norm(x), self.map_fmt, self.output_fmt)

    def prune_intermediate_layers(
            self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True,
    ) -> list[int]:
        """Drop what the intermediates at ``indices`` do not need, as timm's ConvNeXt does: the stages after the
        last one asked; the final norm (sized for the last stage) if asked or if stages were dropped; and then
        the head, whose input width becomes the new last stage's (``num_features``, ``head_hidden_size``)."""
        num_stages = len(self.feature_info)
        take_indices, max_index = feature_take_indices(num_stages, indices)
        prune_end = max_index < num_stages - 1
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        self.truncate_stages(max_index + 1)
        self.feature_info = self.feature_info[:max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "", reset_other=True)
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if self._empty_batch(x):
            return self.forward_features(x.new_zeros((1, *x.shape[1:])))[:0]
        x = self.forward_stem(x)
        for i in range(len(self.feature_info)):
            x = self.forward_stage(i, x)
        return self.forward_norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def load_pretrained(self, checkpoint_path: str) -> None:
        """timm's ``custom_load`` hook: an official file, downloaded under its variant's name, through the
        family module's ``checkpoint_filter_fn``."""
        load_official_file(self, checkpoint_path, sys.modules[type(self).__module__].checkpoint_filter_fn)

    def __prepare_scriptable__(self) -> nn.Module:
        """TorchScript is refused up front with one clear error instead of a compiler trace from deep inside."""
        raise RuntimeError(
            f"{type(self).__name__}: attnzoo models do not support torch.jit.script (their blocks choose and call "
            "attention kernels in Python); use torch.compile, torch.export or torch.jit.trace")


def build_backbone(
        model_cls: type[StagedBackbone],
        variant: str,
        pretrained: bool,
        filter_fn: Callable[[dict, nn.Module], dict],
        default_out_indices: int | Sequence[int],
        **kwargs: Any,
) -> StagedBackbone:
    """``build_model_with_cfg`` with the family's converter and timm's ``features_only`` through
    ``forward_intermediates`` (levels ``default_out_indices`` unless the caller gives ``out_indices``)."""
    out_indices = kwargs.pop("out_indices", default_out_indices)
    if "global_pool" in kwargs:
        model_cls.check_global_pool(kwargs["global_pool"])
    return build_model_with_cfg(
        model_cls, variant, pretrained,
        pretrained_filter_fn=filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs)
