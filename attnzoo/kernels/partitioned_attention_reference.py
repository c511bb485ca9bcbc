"""Pure-PyTorch partitioned attention: the reference every other backend is tested against, and the
``backend="dense"`` path (timm's route: partition copies + PyTorch's fused SDPA).

It materialises what the Triton kernel only indexes: the map is zero-padded to a multiple of the
partition, cyclically shifted (window mode), cut into partitions, and PyTorch's SDPA runs per partition
with the relative-position bias and a -inf mask (padding and Swin's shift regions) added to the logits.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def padded_size(size: int, part: int) -> int:
    """Smallest multiple of ``part`` that holds ``size``."""
    return -(-size // part) * part


def _row_labels(length: int, padded: int, part: int, shift: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position of the shifted, padded axis: whether it is a real token and its Swin region (0, 1 or 2)."""
    r = torch.arange(padded, device=device)
    valid = ((r + shift) % padded) < length
    region = torch.zeros(padded, dtype=torch.long, device=device)
    if shift > 0:
        region = (r >= padded - part).long() + (r >= padded - shift).long()
    return valid, region


def partition(x: torch.Tensor, part: tuple[int, int], mode: str) -> torch.Tensor:
    """[B, Hp, Wp, ...] -> [B, nP, ph*pw, ...]: window mode takes contiguous blocks, grid mode strided groups."""
    B, Hp, Wp = x.shape[:3]
    ph, pw = part
    rest = x.shape[3:]
    if mode == "window":
        x = x.reshape(B, Hp // ph, ph, Wp // pw, pw, *rest).transpose(2, 3)
    else:  # member (i, j) of group (r, c) sits at (i * Hp/ph + r, j * Wp/pw + c)
        x = x.reshape(B, ph, Hp // ph, pw, Wp // pw, *rest).permute(0, 2, 4, 1, 3, *range(5, 5 + len(rest)))
    return x.reshape(B, -1, ph * pw, *rest)


def unpartition(x: torch.Tensor, part: tuple[int, int], mode: str, Hp: int, Wp: int) -> torch.Tensor:
    """Inverse of :func:`partition`."""
    B = x.shape[0]
    ph, pw = part
    rest = x.shape[3:]
    if mode == "window":
        x = x.reshape(B, Hp // ph, Wp // pw, ph, pw, *rest).transpose(2, 3)
    else:
        x = x.reshape(B, Hp // ph, Wp // pw, ph, pw, *rest).permute(0, 3, 1, 4, 2, *range(5, 5 + len(rest)))
    return x.reshape(B, Hp, Wp, *rest)


def partition_mask(H: int, W: int, part: tuple[int, int], mode: str, shift: tuple[int, int],
                   device: torch.device) -> torch.Tensor:
    """Boolean ``[nP, N, N]``: query ``n`` of partition ``p`` may attend to key ``m``.

    A key is allowed when it is a real (not padded) token and, with a shift, lies in the query's Swin
    region. Rows with no allowed key belong to padded queries, whose outputs are discarded.
    """
    ph, pw = part
    Hp, Wp = padded_size(H, ph), padded_size(W, pw)
    vr, rr = _row_labels(H, Hp, ph, shift[0], device)
    vc, rc = _row_labels(W, Wp, pw, shift[1], device)
    valid = (vr[:, None] & vc[None, :])[None, :, :, None]
    region = (rr[:, None] * 3 + rc[None, :])[None, :, :, None]
    valid = partition(valid, part, mode)[0, ..., 0]  # [nP, N]
    region = partition(region, part, mode)[0, ..., 0]
    return valid[:, None, :] & (region[:, :, None] == region[:, None, :])


@functools.lru_cache(maxsize=64)
def relative_index(ph: int, pw: int, device: torch.device) -> torch.Tensor:
    """``[N*N]`` index into a flattened ``[2ph-1, 2pw-1]`` table for every (query, key) pair of a partition:
    ``(ky - qy + ph - 1) * (2pw - 1) + (kx - qx + pw - 1)`` (cached per size and device; built outside inference
    mode so that a cache filled during an
    ``inference_mode`` forward can still be saved for backward by a later training step)."""
    with torch.inference_mode(False):
        n = torch.arange(ph * pw, device=device)
        i, j = n // pw, n % pw
        return ((i[None, :] - i[:, None] + ph - 1) * (2 * pw - 1) + (j[None, :] - j[:, None] + pw - 1)).flatten()


def rpb_bias(rpb: torch.Tensor, part: tuple[int, int]) -> torch.Tensor:
    """Expand a table ``[heads, 2ph-1, 2pw-1]`` to ``[heads, N, N]``: bias[h, q, k] = rpb[h, dk_y + ph-1, dk_x + pw-1]
    with ``dk = key position - query position`` inside the partition."""
    ph, pw = part
    # traced (torch.compile / export): built in the graph, so no fake tensor is cached
    index = relative_index.__wrapped__ if torch.compiler.is_compiling() else relative_index
    return rpb.flatten(1)[:, index(ph, pw, rpb.device)].view(-1, ph * pw, ph * pw)


def partitioned_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    partition_size: tuple[int, int],
    mode: str,
    shift: tuple[int, int],
    rpb: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Partitioned attention on ``[B, H, W, heads, D]`` tensors (arguments already checked), output alike."""
    B, H, W, nh, D = q.shape
    ph, pw = partition_size
    Hp, Wp = padded_size(H, ph), padded_size(W, pw)

    def prep(t: torch.Tensor) -> torch.Tensor:
        if Hp != H or Wp != W:
            t = F.pad(t, (0, 0, 0, 0, 0, Wp - W, 0, Hp - H))
        if any(shift):
            t = torch.roll(t, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        return partition(t, partition_size, mode).transpose(2, 3)  # [B, nP, heads, N, D]

    qp, kp, vp = prep(q), prep(k), prep(v)
    bias = None if rpb is None else rpb_bias(rpb, partition_size).to(q.dtype)  # [heads, N, N]
    if Hp != H or Wp != W or any(shift):
        allowed = partition_mask(H, W, partition_size, mode, shift, q.device)
        allowed = allowed | ~allowed.any(-1, keepdim=True)  # padded queries: any finite row, discarded below
        mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
        bias = mask[:, None] if bias is None else bias + mask[:, None]  # [nP, heads or 1, N, N]
    if bias is None or bias.dim() == 3:  # one batch dim: SDPA's fused (flash / memory-efficient) kernels take 4-D
        out = F.scaled_dot_product_attention(qp.flatten(0, 1), kp.flatten(0, 1), vp.flatten(0, 1), attn_mask=bias,
                                             scale=scale).view(qp.shape)
    else:
        out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=bias, scale=scale)  # [B, nP, heads, N, D]
    out = unpartition(out.transpose(2, 3), partition_size, mode, Hp, Wp)
    if any(shift):
        out = torch.roll(out, shifts=shift, dims=(1, 2))
    return out[:, :H, :W]
