"""Official checkpoints behind links that carry no file name (OneDrive ``.../root/content``, Tsinghua
cloud ``.../f/<id>/?dl=1``).

timm's default download names the cached file after the URL's last path segment, so every such link
would land on the same name. A ``pretrained_cfg`` built by :func:`named_url_cfg` gives timm a
``(url, file_name)`` pair and ``custom_load``: timm downloads to ``file_name`` and calls the model's
``load_pretrained(path)``, which :func:`load_official_file` implements once for every family.

:func:`create_pretrained` is ``timm.create_model(pretrained=True)`` with one clear error when the weights
cannot be fetched (offline machine), and :func:`check_weights_file` names what is wrong with a local file.
"""
from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import get_pretrained_cfg, load_pretrained
from torch import nn

# First bytes of the files torch.load/safetensors read: zip (torch >= 1.6), legacy pickle, safetensors' header.
_ZIP_MAGIC, _PICKLE_MAGIC = b"PK\x03\x04", b"\x80"


class WeightsUnavailableError(RuntimeError):
    """``pretrained=True`` could not fetch the weights; the message names the link and the local-file route."""


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


def check_weights_file(path: str | os.PathLike, what: str = "checkpoint") -> Path:
    """``path`` as a Path when it is a non-empty PyTorch (or safetensors) file; otherwise FileNotFoundError or
    ValueError with one line naming ``what`` (the argument it came from) and the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such file; pass the path of a .pth/.pth.tar/.pt/.safetensors file")
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise ValueError(f"{what} {path}: the file is empty (an interrupted download or copy?); fetch it again")
    safetensors = path.suffix == ".safetensors" and len(head) > 8 and head[8:9] == b"{"
    if not (head.startswith((_ZIP_MAGIC, _PICKLE_MAGIC)) or safetensors):
        raise ValueError(f"{what} {path}: not a PyTorch checkpoint (starts with {head[:8]!r}); pass a file written "
                         "by torch.save or safetensors")
    return path


def download_link(model_name: str) -> str:
    """Where ``pretrained=True`` fetches ``model_name``'s weights from ('' when it has none)."""
    cfg = get_pretrained_cfg(model_name)
    if cfg is None:
        return ""
    if cfg.hf_hub_id:
        from huggingface_hub.constants import ENDPOINT

        return f"{ENDPOINT}/{cfg.hf_hub_id}"
    url = cfg.url[0] if isinstance(cfg.url, (tuple, list)) else cfg.url
    return url or ""


def create_pretrained(model_name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(model_name, pretrained=True, **kwargs)``; a failed download raises one
    :class:`WeightsUnavailableError` naming the link and how to pass a local copy instead.

    Hugging Face hub weights that are not cached are checked against a name lookup of the hub first:
    without network the hub client would retry each candidate file for tens of seconds before failing.
    """
    link = download_link(model_name)
    try:
        cfg = get_pretrained_cfg(model_name)
        if cfg is not None and cfg.hf_hub_id and not _hub_cached(cfg.hf_hub_id):
            from huggingface_hub.constants import ENDPOINT

            host = urlparse(ENDPOINT).hostname or ""
            try:
                socket.getaddrinfo(host, 443)
            except OSError as e:
                raise ConnectionError(f"cannot resolve {host}: {e}") from None
        return timm.create_model(model_name, pretrained=True, **kwargs)
    except OSError as e:  # URLError, hub errors (HfHubHTTPError, LocalEntryNotFoundError), socket errors
        reason = (str(e).splitlines() or [""])[0][:200]
        raise WeightsUnavailableError(
            f"{model_name}: cannot download the pretrained weights from {link or 'its pretrained_cfg'} "
            f"({e.__class__.__name__}: {reason}). Without network, fetch that file on another machine and load it "
            f"with timm.create_model({model_name!r}, pretrained=True, pretrained_cfg_overlay=dict(file='PATH'))"
        ) from None


def _hub_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in ("model.safetensors", "pytorch_model.bin"))
