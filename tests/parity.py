"""Official-checkpoint parity: rebuild an official state dict from a fixture and compare logits.

A fixture folder (``tests/fixtures/parity/<family>/<variant>/``) records what the official model code
computed for deterministic weights: ``manifest.json`` (every official state-dict key with shape, dtype
and init rule), ``stored_buffers.pt`` (index tables and masks the official model stores),
``expected.pt`` (``x1_logits`` for the fixed input below) and ``meta.json``. SOURCE.md gives the rule.
"""
from __future__ import annotations

import json
import math
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import timm
import torch

from tests.helpers import rel_l2

FIXTURES = Path(__file__).parent / "fixtures" / "parity"


@dataclass
class ParityFixture:
    family: str
    variant: str
    manifest: list[dict[str, Any]]
    meta: dict[str, Any]
    stored: dict[str, torch.Tensor]
    expected_logits: torch.Tensor


def load_fixture(family: str, variant: str) -> ParityFixture:
    root = FIXTURES / family / variant
    manifest = json.loads((root / "manifest.json").read_text())["entries"]
    meta = json.loads((root / "meta.json").read_text())
    stored = torch.load(root / "stored_buffers.pt", map_location="cpu", weights_only=True)
    expected = torch.load(root / "expected.pt", map_location="cpu", weights_only=True)["x1_logits"]
    return ParityFixture(family, variant, manifest, meta, stored, expected)


def _draw(key: str, shape: list[int], init: str) -> torch.Tensor:
    g = torch.Generator()
    g.manual_seed(zlib.crc32(key.encode()))
    if init == "zero":
        return torch.zeros(shape)
    if init == "bn_var":
        return torch.rand(shape, generator=g) * 0.5 + 0.75
    x = torch.randn(shape, generator=g)
    if init == "bn_mean":
        return x * 0.1
    if init == "norm_weight":
        return 1 + 0.1 * x
    if init == "vec":
        return 0.05 * x
    if init == "fan_in":
        return x / math.sqrt(x.numel() / shape[0])
    if init == "table":
        return 0.5 * x
    raise ValueError(f"unknown init rule {init!r} for key {key!r}")


def official_state_dict(fx: ParityFixture) -> "OrderedDict[str, torch.Tensor]":
    """The official model's state dict, in official key order, filled by the fixture's weight rule."""
    sd = OrderedDict()
    for e in fx.manifest:
        dtype = getattr(torch, e["dtype"])
        if e["kind"] == "stored":
            sd[e["key"]] = fx.stored[e["key"]].to(dtype)
        else:
            sd[e["key"]] = _draw(e["key"], e["shape"], e["init"]).to(dtype)
    return sd


def parity_input() -> torch.Tensor:
    """The fixed input the fixtures were computed on: ``x1`` of SOURCE.md."""
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def save_official_checkpoint(fx: ParityFixture, path: Path, wrap: Callable[[dict], Any] = lambda sd: sd) -> Path:
    """Write the fixture's state dict as the official file is written (``wrap`` adds e.g. {"model": sd})."""
    torch.save(wrap(official_state_dict(fx)), path)
    return path


def create_from_official(model_name: str, checkpoint: Path, **kwargs) -> torch.nn.Module:
    """Load an official checkpoint file through timm's own pretrained path (checkpoint_filter_fn)."""
    return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(checkpoint)), **kwargs)


def parity_error(model: torch.nn.Module, fx: ParityFixture) -> float:
    """Relative L2 error of the model's fp32 CPU logits on ``x1`` against the official logits."""
    model = model.eval().float()
    with torch.no_grad():
        out = model(parity_input())
    expected = tuple(fx.expected_logits.shape)
    assert out.shape == fx.expected_logits.shape, f"logits shape {tuple(out.shape)} != {expected}"
    return rel_l2(out, fx.expected_logits)
