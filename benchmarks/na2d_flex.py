"""2-D neighborhood attention through FlexAttention: the baseline ``na2d(..., backend="flex")``.

Tokens are flattened row-major to ``H*W``; a ``mask_mod`` keeps each query's NATTEN <=0.17 window and a
``score_mod`` adds the relative position bias. This exists as a comparison point for the benchmarks
(kernel and NAT model) and as a second, independent implementation of the semantics; the Triton kernel
is the fast path. On CUDA the compiled ``flex_attention`` is used; elsewhere it runs eagerly (slow).
"""
from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention


def _sub_grid(pos: torch.Tensor, length: int, kernel_size: int, dilation: int):
    """(residue, window start on the sub-grid) of flattened-axis positions ``pos``."""
    r, p = pos % dilation, pos // dilation
    sub_len = (length - r + dilation - 1) // dilation
    start = torch.minimum(torch.clamp(p - kernel_size // 2, min=0), sub_len - kernel_size)
    return r, start


def _neighbour_mask(H: int, W: int, kernel_size: tuple[int, int], dilation: tuple[int, int]):
    (kh, kw), (dh, dw) = kernel_size, dilation

    def mask_mod(b, h, q_idx, kv_idx):
        qy, qx, ky, kx = q_idx // W, q_idx % W, kv_idx // W, kv_idx % W
        ry, sy = _sub_grid(qy, H, kh, dh)
        rx, sx = _sub_grid(qx, W, kw, dw)
        py, px = ky // dh, kx // dw
        return ((ky % dh == ry) & (kx % dw == rx) & (py >= sy) & (py < sy + kh) & (px >= sx) & (px < sx + kw))

    return mask_mod


@functools.lru_cache(maxsize=32)
def _block_mask(H: int, W: int, kernel_size: tuple[int, int], dilation: tuple[int, int], device: str) -> BlockMask:
    """Cached per shape; built outside inference mode so a mask first made during an ``inference_mode``
    forward stays usable in a later training step."""
    L = H * W
    with torch.inference_mode(False):
        return create_block_mask(_neighbour_mask(H, W, kernel_size, dilation), B=None, H=None, Q_LEN=L, KV_LEN=L,
                                 device=device)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def na2d_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: tuple[int, int],
              dilation: tuple[int, int], rpb: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Neighborhood attention on validated ``[B, H, W, heads, D]`` inputs via FlexAttention."""
    B, H, W, N, D = q.shape
    (kh, kw), (dh, dw) = kernel_size, dilation
    block_mask = _block_mask(H, W, kernel_size, dilation, str(q.device))
    score_mod = None
    if rpb is not None:
        def score_mod(score, b, h, q_idx, kv_idx):
            # Out-of-window pairs are masked; clamping keeps their (unused) bias index in range.
            by = ((kv_idx // W - q_idx // W) // dh + kh - 1).clamp(0, 2 * kh - 2)
            bx = ((kv_idx % W - q_idx % W) // dw + kw - 1).clamp(0, 2 * kw - 2)
            return score + rpb[h, by, bx].to(score.dtype)

    flex = _compiled_flex() if q.is_cuda else flex_attention
    heads_first = [t.reshape(B, H * W, N, D).transpose(1, 2) for t in (q, k, v)]
    out = flex(*heads_first, score_mod=score_mod, block_mask=block_mask, scale=scale)
    return out.transpose(1, 2).reshape(B, H, W, N, D)
