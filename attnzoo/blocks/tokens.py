"""NHWC maps as tokens: how blocks hold their residual stream so that ``torch.compile`` lays it out well.

attnzoo's blocks compute on NHWC maps ``[B, H, W, C]``. In graphs with convolutions, Inductor's layout
optimisation gives each 4-D intermediate that it stores (one read by several ops) and that feeds a
convolution, however indirectly, channels-last strides computed as though the tensor were NCHW. On an NHWC
map that puts H innermost and C strided, so every LayerNorm reading it becomes a looped reduction over a
strided axis and every GEMM reading it needs a copy first. Three-dimensional tensors are left alone.

So blocks flatten their NHWC input to tokens ``[B, H*W, C]`` once, keep every tensor that several ops read
(the residual stream, gated sums) as tokens, and hand 4-D views only to ops that read them once (a
convolution, an attention op). In eager mode all of this is views: no copies, no extra kernels.
"""
from __future__ import annotations

import torch

__all__ = ["nchw_to_tokens"]


def nchw_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """A convolution's ``[B, C, H, W]`` output (channels-last memory) as tokens ``[B, H*W, C]``; a view for
    channels-last memory, a copy otherwise."""
    return x.permute(0, 2, 3, 1).flatten(1, 2)
