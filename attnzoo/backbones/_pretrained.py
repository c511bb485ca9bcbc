"""Official checkpoints behind links that carry no file name (OneDrive ``.../root/content``, Tsinghua
cloud ``.../f/<id>/?dl=1``).

timm's default download names the cached file after the URL's last path segment, so every such link
would land on the same name. A ``pretrained_cfg`` built by :func:`named_url_cfg` gives timm a
``(url, file_name)`` pair and ``custom_load``: timm downloads to ``file_name`` and calls the model's
``load_pretrained(path)``, which :func:`load_official_file` implements once for every family.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import load_pretrained
from torch import nn


def imagenet_cfg(family: dict[str, Any], **variant: Any) -> dict[str, Any]:
    """``pretrained_cfg`` fields shared by attnzoo's ImageNet classifiers (224² evaluation, a 7×7 final map,
    any input from 32² up, timm's head), updated with a family's fields and then a variant's."""
    return {"num_classes": 1000, "input_size": (3, 224, 224), "min_input_size": (3, 32, 32), "pool_size": (7, 7),
            "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": False, "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "classifier": "head.fc", **family, **variant}


def named_url_cfg(url: str, file_name: str) -> dict[str, Any]:
    """``pretrained_cfg`` entries that download ``url`` to ``file_name`` and load it via ``load_pretrained``."""
    return {"url": (url, file_name) if url else "", "custom_load": bool(url)}


def load_official_file(model: nn.Module, checkpoint_path: str,
                       filter_fn: Callable[[dict, nn.Module], dict]) -> None:
    """Load an official checkpoint file into ``model`` through timm's standard path: ``filter_fn``,
    classifier/stem adaptation for ``num_classes``/``in_chans``, strict keys (missing or unexpected keys
    raise with their names)."""
    cfg = dict(model.pretrained_cfg, file=str(checkpoint_path), url="", custom_load=False)
    load_pretrained(model, cfg, num_classes=model.num_classes, in_chans=getattr(model, "in_chans", 3),
                    filter_fn=filter_fn, strict=True)


def download(url: str) -> Path:
    """Fetch ``url`` once into torch's hub cache under a name unique to the URL (for callers that only
    have a link, such as mmengine's ``init_cfg.checkpoint``); atomic, so concurrent ranks each end with
    a complete file."""
    name = Path(urlparse(url).path).name or "checkpoint"
    dst = Path(torch.hub.get_dir()) / "checkpoints" / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}_{name}"
    if not dst.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f"{dst.name}.{os.getpid()}.part")
        torch.hub.download_url_to_file(url, str(tmp), progress=False)
        tmp.replace(dst)
    return dst
