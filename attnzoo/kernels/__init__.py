"""Attention kernels: a fused Triton implementation and a pure-PyTorch reference for each op.

Every op takes ``backend`` = ``"auto"`` (its ``auto_backend`` rule on CUDA, the reference elsewhere and
while exporting), ``"triton"``, ``"dense"`` or ``"reference"``; the mechanism is in ``_op.py``.
"""
from attnzoo.kernels.bra import bra, routed_attention
from attnzoo.kernels.na2d import na2d
from attnzoo.kernels.partitioned_attention import partitioned_attention

__all__ = ["bra", "na2d", "partitioned_attention", "routed_attention"]
