"""nn.Modules shared by the backbone families (attention blocks, MLPs, stems, downsamplers).

Import blocks from their modules, e.g. ``from attnzoo.blocks.neighborhood import NeighborhoodAttention2d``.
"""
from torch import nn

from attnzoo.kernels._op import BACKENDS


def set_attention_backend(model: nn.Module, backend: str) -> nn.Module:
    """Route every attnzoo attention block in ``model`` to one kernel backend of
    ``attnzoo.kernels._op.BACKENDS`` ("auto", "triton", "dense", "reference"); every op takes each name.
    Used by benchmarks and tests."""
    if backend not in BACKENDS:
        raise ValueError(f"set_attention_backend: backend must be one of {BACKENDS}, got {backend!r}")
    for module in model.modules():
        if hasattr(module, "attn_backend"):
            module.attn_backend = backend
    return model


__all__ = ["BACKENDS", "set_attention_backend"]
