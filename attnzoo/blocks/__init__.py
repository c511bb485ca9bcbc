"""nn.Modules shared by the backbone families (attention blocks, MLPs, stems, downsamplers).

Import blocks from their modules, e.g. ``from attnzoo.blocks.neighborhood import NeighborhoodAttention2d``.
"""
from torch import nn

from attnzoo.kernels._dispatch import BACKENDS


def set_attention_backend(model: nn.Module, backend: str) -> nn.Module:
    """Route every attnzoo attention block in ``model`` to one kernel backend: "auto", "triton",
    "reference", or a path only some ops offer ("dense" for na2d/bra, "sdpa" for partitioned attention,
    the "flex" baseline for na2d); an op given a name it lacks raises. Used by benchmarks and tests."""
    for module in model.modules():
        if hasattr(module, "attn_backend"):
            module.attn_backend = backend
    return model


__all__ = ["BACKENDS", "set_attention_backend"]
