"""One mmdetection 3.x / mmsegmentation 1.x backbone for every attnzoo model.

``AttnZooBackbone`` builds the timm model, keeps only the levels the neck asks for
(``prune_intermediate_layers``), returns NCHW maps from ``forward_intermediates`` and adds the per-level
output norms every official detection/segmentation wrapper adds. Classification checkpoints (official files, timm
weights or a ``tools/train.py`` run's) load strictly through the family's converter:
``init_cfg=dict(type="Pretrained", checkpoint=PATH)``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import timm
import torch
from mmengine.logging import MMLogger
from mmengine.model import BaseModule
from timm.layers import LayerNorm2d
from timm.models import group_parameters
from torch import nn

import attnzoo
from attnzoo.backbones._pretrained import check_weights_file, download
from attnzoo.training.checkpoint import is_training_checkpoint
from attnzoo.training.data import model_in_chans


class AttnZooBackbone(BaseModule):
    """An attnzoo (or any timm ``forward_intermediates``) model as a dense-prediction backbone.

    Args:
        model_name: a name from ``attnzoo.list_models()`` (``"nat_tiny"``, ``"biformer_small"``, ...).
        out_indices: which levels to return (0 = stride 4 ... 3 = stride 32).
        drop_path_rate: stochastic depth of the backbone.
        frozen_stages: freeze the stem and the first ``frozen_stages`` levels (-1: none).
        norm_eval: keep BatchNorm layers in eval mode while training (BiFormer's stem).
        out_norms: add a LayerNorm per returned level, as the official detection/segmentation backbones do.
        model_kwargs: family knobs for dense use, passed to ``timm.create_model`` (e.g. BiFormer
            ``n_win=16``, DiNAT ``dilations``, Agent ``agent_shapes``).
        init_cfg: ``dict(type="Pretrained", checkpoint=PATH)`` loads a classification checkpoint (the
            official file as released, a timm/attnzoo state dict or a ``tools/train.py`` checkpoint; its EMA
            weights with ``use_ema=True``) through the family's converter.
    """

    def __init__(
            self,
            model_name: str,
            out_indices: Sequence[int] = (0, 1, 2, 3),
            drop_path_rate: float = 0.2,
            frozen_stages: int = -1,
            norm_eval: bool = False,
            out_norms: bool = True,
            model_kwargs: dict[str, Any] | None = None,
            init_cfg: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        if model_name not in timm.list_models():
            raise ValueError(f"model_name: unknown model {model_name!r}; attnzoo has {attnzoo.list_models()}")
        self.model_name = model_name
        self.model_kwargs = dict(model_kwargs or {})
        self.model_kwargs.setdefault("drop_path_rate", drop_path_rate)
        self.model = timm.create_model(model_name, num_classes=0, **self.model_kwargs)
        n_levels = len(self.model.feature_info)
        bad = [i for i in out_indices if not 0 <= i < n_levels]
        if bad:
            raise ValueError(f"out_indices: {model_name} has levels 0..{n_levels - 1}, got {tuple(out_indices)}")
        self.out_indices = tuple(out_indices)
        self.model.prune_intermediate_layers(list(self.out_indices), prune_norm=True, prune_head=True)
        self.channels = [self.model.feature_info[i]["num_chs"] for i in self.out_indices]
        self.norms = nn.ModuleList(LayerNorm2d(c) if out_norms else nn.Identity() for c in self.channels)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self._freeze()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = self.model.forward_intermediates(x, indices=list(self.out_indices), intermediates_only=True)
        return tuple(norm(f) for norm, f in zip(self.norms, feats))

    def init_weights(self) -> None:
        """Load a classification checkpoint through the family's converter, or use the model's own init."""
        cfg = self.init_cfg or {}
        if cfg.get("type") != "Pretrained":
            super().init_weights()
            return
        self.load_classification_checkpoint(cfg["checkpoint"], use_ema=cfg.get("use_ema", False))

    def load_classification_checkpoint(self, checkpoint: str, use_ema: bool = False) -> dict[str, list[str]]:
        """Load a classification checkpoint through timm's pretrained path (strict, with the family's
        ``checkpoint_filter_fn``).

        ``checkpoint`` is a local file, an ``http(s)://`` URL (downloaded to torch's hub cache) or
        ``hf-hub:ORG/NAME``. A ``tools/train.py`` checkpoint gives its ``state_dict`` (its EMA weights with
        ``use_ema``, as ``tools/validate.py --use-ema``) with its head size; it must be of this backbone's
        model and input channels. Knobs in ``KERNEL_PADDED_KWARGS`` change conv kernel sizes, so the classifier
        is built without them and its kernels are centred in the larger dense kernels with zeros around
        (the official FocalNet detection loader's rule). Returns the checkpoint keys left unused (the
        classifier and whatever the pruning removed) and the backbone keys the checkpoint cannot provide
        (the dense output norms); any other mismatch, a missing or unexpected key included, is an error
        that names the keys.
        """
        cls_kwargs = {k: v for k, v in self.model_kwargs.items() if k not in KERNEL_PADDED_KWARGS}
        source = _source(checkpoint)
        run = _training_run(source["file"]) if source.get("file") else None
        if run is not None:
            source = self._training_source(run, checkpoint, use_ema)
            cls_kwargs["num_classes"] = source["num_classes"]  # the run's head loads as it is
        elif use_ema:
            raise ValueError(f"init_cfg.use_ema: {checkpoint} is not a tools/train.py checkpoint; official files "
                             "load the weights they hold (drop use_ema)")
        try:
            full = timm.create_model(self.model_name, pretrained=True, pretrained_cfg_overlay=source, **cls_kwargs)
        except RuntimeError as e:
            if "Error(s) in loading state_dict" not in str(e):
                raise
            details = " ".join(str(e).split("\n", 1)[-1].split())
            raise RuntimeError(f"init_cfg.checkpoint {checkpoint} does not fit {self.model_name} "
                               f"(model_kwargs {cls_kwargs}): {details}") from None
        src = full.state_dict()
        dst = self.model.state_dict()
        for key, value in src.items():
            if key in dst and value.shape != dst[key].shape:
                src[key] = _center_kernel(key, value, dst[key].shape)
        result = self.model.load_state_dict(src, strict=False)
        if result.missing_keys:
            raise RuntimeError(f"checkpoint {checkpoint} lacks backbone keys: {result.missing_keys}")
        report = dict(unused=list(result.unexpected_keys),
                      not_in_checkpoint=[f"norms.{k}" for k in self.norms.state_dict()])
        MMLogger.get_current_instance().info(
            f"{self.model_name}: loaded {checkpoint}; unused (pruned head/norm): {report['unused']}; "
            f"initialised here: {report['not_in_checkpoint']}")
        return report

    def _training_source(self, run: dict[str, Any], checkpoint: str, use_ema: bool) -> dict[str, Any]:
        """``pretrained_cfg_overlay`` that hands timm the weights of a ``tools/train.py`` run, after checking
        that the run trained this model with this backbone's input channels."""
        if run.get("arch") != self.model_name:
            raise ValueError(f"init_cfg.checkpoint {checkpoint} was trained as {run.get('arch')!r}, the backbone "
                             f"is {self.model_name!r}: set model_name={run.get('arch')!r} or pass that model's "
                             "checkpoint")
        input_size = tuple(run["data_config"]["input_size"])
        in_chans = model_in_chans(self.model)
        if input_size[0] != in_chans:
            raise ValueError(
                f"init_cfg.checkpoint {checkpoint} was trained on {input_size[0]}-channel input, the backbone takes "
                f"{in_chans}: pretrain with --input-size {in_chans} H W (grayscale repeated to {in_chans} channels "
                f"is fine), or set model_kwargs=dict(in_chans={input_size[0]}) and load images with as many "
                "channels")
        key = "state_dict_ema" if use_ema else "state_dict"
        if run.get(key) is None:
            raise ValueError(f"init_cfg.use_ema: {checkpoint} has no EMA weights (trained without --model-ema)")
        state_dict = {k.removeprefix("module."): v for k, v in run[key].items()}  # ModelEmaV3 keeps "module."
        return dict(state_dict=state_dict, file=None, hf_hub_id=None, url=None, num_classes=run["num_classes"],
                    input_size=input_size)

    def _freeze(self) -> None:
        """Freeze the stem and the first ``frozen_stages`` levels.

        Levels come from the model's coarse ``group_matcher`` (the grouping timm's layer-wise decay
        uses: group 0 = stem, group i + 1 = level i), so each family's downsamplers go with the level
        its official code puts them in. Fully frozen modules also stay in eval mode while training.
        """
        self._frozen_modules: list[nn.Module] = []
        if self.frozen_stages < 0:
            return
        groups = group_parameters(self.model, self.model.group_matcher(coarse=True))
        frozen = {n for gid, names in groups.items() if gid <= self.frozen_stages for n in names}
        for name, p in self.model.named_parameters():
            p.requires_grad_(name not in frozen)

        def collect(module: nn.Module, prefix: str) -> None:
            for name, child in module.named_children():
                params = [f"{prefix}{name}.{n}" for n, _ in child.named_parameters()]
                if params and all(n in frozen for n in params):
                    self._frozen_modules.append(child)
                elif params:
                    collect(child, f"{prefix}{name}.")

        collect(self.model, "")

    def train(self, mode: bool = True) -> "AttnZooBackbone":
        super().train(mode)
        for m in self._frozen_modules if mode else ():
            m.eval()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


# Dense-mode knobs that enlarge conv kernels (FocalNet's detection focal windows 9 vs 3 in ImageNet training).
KERNEL_PADDED_KWARGS = frozenset({"focal_windows"})


def _source(checkpoint: str) -> dict[str, Any]:
    """``pretrained_cfg_overlay`` that makes timm read ``checkpoint`` (file, URL or ``hf-hub:``) and nothing else."""
    checkpoint = str(checkpoint)
    if checkpoint.startswith("hf-hub:"):
        return dict(hf_hub_id=checkpoint[len("hf-hub:"):], file=None, url=None)
    if checkpoint.startswith(("http://", "https://")):
        checkpoint = str(download(checkpoint))
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"init_cfg.checkpoint: no such file {checkpoint!r} (expected a path, an http(s) URL "
                                "or hf-hub:ORG/NAME)")
    check_weights_file(checkpoint, "init_cfg.checkpoint")
    return dict(file=checkpoint, hf_hub_id=None, url=None)


def _training_run(path: str) -> dict[str, Any] | None:
    """The content of a ``tools/train.py`` checkpoint file, None for any other file (timm's loader reads those)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # tensors read when used
    except Exception:  # legacy-format, safetensors or foreign files
        return None
    return state if is_training_checkpoint(state) else None


def _center_kernel(key: str, value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Place a smaller odd conv kernel in the centre of a zero kernel of ``shape``; any other mismatch raises."""
    grows = (value.ndim == 4 and len(shape) == 4 and value.shape[:2] == shape[:2]
             and all(s >= v and (s - v) % 2 == 0 for v, s in zip(value.shape[2:], shape[2:])))
    if not grows:
        raise RuntimeError(f"checkpoint key {key}: shape {tuple(value.shape)} does not fit the backbone's "
                           f"{tuple(shape)}")
    out = value.new_zeros(shape)
    ph, pw = (shape[2] - value.shape[2]) // 2, (shape[3] - value.shape[3]) // 2
    out[:, :, ph:ph + value.shape[2], pw:pw + value.shape[3]] = value
    return out
