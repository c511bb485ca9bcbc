"""Attention kernels: a fused Triton implementation and a pure-PyTorch reference for each op.

``backend="auto"`` sends CUDA tensors to Triton and everything else to the reference.
"""
