"""Attention kernels: a fused Triton implementation and a pure-PyTorch reference for each op.

``backend="auto"`` sends CUDA tensors to Triton and everything else to the reference.
"""
from attnzoo.kernels.bra import bra, routed_attention
from attnzoo.kernels.na2d import na2d
from attnzoo.kernels.partitioned_attention import partitioned_attention

__all__ = ["bra", "na2d", "partitioned_attention", "routed_attention"]
