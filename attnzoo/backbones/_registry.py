"""The set of model names attnzoo registers with timm."""
from __future__ import annotations

import fnmatch

import timm
from timm.models import get_pretrained_cfg, model_entrypoint


def list_models(filter: str = "", pretrained: bool = False) -> list[str]:
    """Names of the models attnzoo registered with timm, sorted.

    ``filter`` is a shell-style wildcard (``"nat_*"``); ``pretrained`` keeps only names whose
    pretrained config names an official checkpoint.
    """
    names = [
        name for name in timm.list_models()
        if model_entrypoint(name).__module__.startswith("attnzoo.")
    ]
    if filter:
        names = fnmatch.filter(names, filter)
    if pretrained:
        names = [n for n in names if _has_checkpoint(n)]
    return sorted(names)


def _has_checkpoint(name: str) -> bool:
    cfg = get_pretrained_cfg(name, allow_unregistered=True)
    return cfg is not None and bool(cfg.url or cfg.hf_hub_id or cfg.file)
