"""Pure-PyTorch 2-D neighborhood attention (NATTEN <=0.17 semantics).

This is the CPU path, the CI path and the ground truth the Triton kernel is tested against. Two
formulations of the same function:

- ``na2d_dense``: dense attention (``scaled_dot_product_attention``) over all H*W tokens with the
  neighbourhood as an additive mask holding the RPB. A few large matrix products: the fast way on a CPU,
  and on a GPU for small maps, where ``na2d(backend="auto")`` picks it over the Triton kernel
  (``backend="dense"`` forces it). The reference uses it for small maps (at most ``DENSE_WASTE`` times
  more tokens than a window, and a bounded logit tensor).
- ``na2d_gather``: any map size, chunked over query rows: each chunk gathers its kh*kw neighbours, so
  memory stays bounded by ``chunk_elements`` however large the map is; under autograd every chunk is
  checkpointed, so backward recomputes the gathered keys instead of keeping them alive for the whole map.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Elements of one gathered key tensor per chunk (~128 MiB in fp32): bounds peak memory at any map size.
CHUNK_ELEMENTS = 2**25
# The dense masked path computes H*W logits per query instead of kh*kw: allowed up to this factor.
DENSE_WASTE = 16
# Row padding of the dense mask's storage (elements): SDPA's memory-efficient kernel wants the mask's
# row stride aligned to 16 bytes (8 bf16/fp16 elements) and copies the mask otherwise.
MASK_ALIGN = 8


def window_start(length: int, kernel_size: int, dilation: int, device: torch.device) -> torch.Tensor:
    """First neighbour of every position on an axis of ``length`` (NATTEN's ``get_window_start``).

    On the dilation sub-grid of position i (the positions ≡ i mod d), the window is ``kernel_size``
    consecutive sub-grid points centred on i and shifted inward at the borders.
    """
    i = torch.arange(length, device=device)
    r, p = i % dilation, i // dilation
    sub_len = (length - r + dilation - 1) // dilation  # points on i's sub-grid
    start = (p - kernel_size // 2).clamp_min(0).minimum(sub_len - kernel_size)
    return start * dilation + r


def neighbour_index(length: int, kernel_size: int, dilation: int, device: torch.device):
    """``(idx, bias)``: ``idx[i, t]`` is the t-th neighbour of position i, ``bias[i, t]`` its RPB index
    ``(idx - i) / d + kernel_size - 1``; both ``[length, kernel_size]`` int64."""
    start = window_start(length, kernel_size, dilation, device)
    t = torch.arange(kernel_size, device=device)
    idx = start[:, None] + t * dilation
    bias = (idx - torch.arange(length, device=device)[:, None]) // dilation + kernel_size - 1
    return idx, bias


def _rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: torch.Tensor | None, iy: torch.Tensor,
          by: torch.Tensor, ix: torch.Tensor, bx: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention for a chunk of query rows ``q [B, R, W, heads, D]`` whose neighbour rows are ``iy [R, kh]``."""
    B, R, W, N, D = q.shape
    kh, kw = iy.shape[1], ix.shape[1]
    rows, cols = iy[:, :, None, None], ix[None, None, :, :]  # broadcast to [R, kh, W, kw]
    kg = k[:, rows, cols]  # [B, R, kh, W, kw, N, D]
    logits = torch.einsum("brwnd,brawcnd->brwnac", q * scale, kg)  # [B, R, W, N, kh, kw]
    if rpb is not None:
        bias = rpb[:, by[:, :, None, None], bx[None, None, :, :]]  # [N, R, kh, W, kw]
        logits = logits + bias.permute(1, 3, 0, 2, 4).to(logits.dtype)
    attn = logits.flatten(-2).softmax(-1).unflatten(-1, (kh, kw))
    return torch.einsum("brwnac,brawcnd->brwnd", attn, v[:, rows, cols])


@functools.lru_cache(maxsize=64)
def _mask_index(H: int, W: int, kernel_size: tuple[int, int], dilation: tuple[int, int],
                device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keys, bias)``, both ``[H*W, kh*kw]`` int64: each query's neighbour tokens and the flat index of
    their RPB entry in a ``[2*kh-1, 2*kw-1]`` table.

    Cached per shape and device; built outside inference mode (and without autograd history) so that a
    cache first filled during an ``inference_mode`` forward stays usable in a later training step.
    """
    (kh, kw), (dh, dw) = kernel_size, dilation
    with torch.inference_mode(False), torch.no_grad():
        iy, by = neighbour_index(H, kh, dh, torch.device(device))
        ix, bx = neighbour_index(W, kw, dw, torch.device(device))
        keys = iy[:, None, :, None] * W + ix[None, :, None, :]  # [H, W, kh, kw]
        bias = by[:, None, :, None] * (2 * kw - 1) + bx[None, :, None, :]
        return keys.reshape(H * W, kh * kw), bias.reshape(H * W, kh * kw)


def dense_mask(H: int, W: int, kernel_size: tuple[int, int], dilation: tuple[int, int],
               rpb: torch.Tensor | None, heads: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[heads or 1, H*W, H*W]`` additive mask in ``dtype``: the RPB (or 0) at each query's neighbours,
    -inf elsewhere; differentiable in ``rpb`` (gathered on every call).

    The storage rows are padded to a multiple of ``MASK_ALIGN`` elements and the result is a slice, so
    SDPA's memory-efficient kernel sees an aligned row stride and uses the mask in place.
    """
    L = H * W
    # traced (torch.compile / export): built in the graph, so no fake tensor or symbolic size is cached
    index = _mask_index.__wrapped__ if torch.compiler.is_compiling() else _mask_index
    keys, bias = index(H, W, kernel_size, dilation, str(device))
    if rpb is None:
        vals = torch.zeros(1, L, keys.shape[1], dtype=dtype, device=device)
    else:
        vals = rpb.flatten(1)[:, bias].to(dtype)  # [heads, L, kh*kw]
    padded = -(-L // MASK_ALIGN) * MASK_ALIGN
    mask = torch.full((vals.shape[0], L, padded), float("-inf"), dtype=dtype, device=device)
    return mask.scatter(2, keys.expand(vals.shape[0], -1, -1), vals)[..., :L]


def na2d_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: tuple[int, int],
               dilation: tuple[int, int], rpb: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Neighborhood attention as masked dense attention (``scaled_dot_product_attention`` over all H*W
    tokens with ``dense_mask``), on validated ``[B, H, W, heads, D]`` inputs; returns the same layout.

    q, k, v enter SDPA as ``[B, heads, H*W, D]`` views: no copies for heads-last inputs whose (H, W)
    dims merge, slices of a packed qkv tensor included. Exact; cheaper than any tiled kernel on small maps.
    """
    B, H, W, N, D = q.shape
    q_, k_, v_ = (t.permute(0, 3, 1, 2, 4).flatten(2, 3) for t in (q, k, v))
    mask = dense_mask(H, W, kernel_size, dilation, rpb, N, q.dtype, q.device)
    out = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask.unsqueeze(0), scale=scale)
    return out.unflatten(2, (H, W)).permute(0, 2, 3, 1, 4)


def na2d_gather(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: tuple[int, int],
                dilation: tuple[int, int], rpb: torch.Tensor | None, scale: float,
                chunk_elements: int | None = CHUNK_ELEMENTS) -> torch.Tensor:
    """Neighborhood attention by gathering each query's neighbours, chunked over query rows (any map size;
    memory bounded by ``chunk_elements``; chunks checkpointed under autograd). ``chunk_elements=None``
    gathers the whole map at once with plain autograd (the traced path of :func:`na2d_reference`)."""
    B, H, W, N, D = q.shape
    (kh, kw), (dh, dw) = kernel_size, dilation
    iy, by = neighbour_index(H, kh, dh, q.device)
    ix, bx = neighbour_index(W, kw, dw, q.device)
    if chunk_elements is None:
        return _rows(q, k, v, rpb, iy, by, ix, bx, scale)
    rows_per_chunk = max(1, chunk_elements // max(1, B * W * N * D * kh * kw))
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, rpb))
    out = []
    for y0 in range(0, H, rows_per_chunk):
        y1 = min(H, y0 + rows_per_chunk)
        args = (q[:, y0:y1], k, v, rpb, iy[y0:y1], by[y0:y1], ix, bx, scale)
        out.append(checkpoint(_rows, *args, use_reentrant=False) if needs_grad else _rows(*args))
    return out[0] if len(out) == 1 else torch.cat(out, dim=1)


def na2d_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: tuple[int, int],
                   dilation: tuple[int, int], rpb: torch.Tensor | None, scale: float,
                   chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Neighborhood attention on validated ``[B, H, W, heads, D]`` inputs; returns the same layout.

    ``softmax((q * scale) · k + rpb) · v`` over each query's ``kh x kw`` neighbours, differentiable through
    plain PyTorch ops in every input, ``rpb`` included. A dilated map whose sides divide by the dilation runs as
    its undilated sub-grids. Small maps (at most ``DENSE_WASTE`` times the window in tokens, and at most
    ``chunk_elements`` logits) run ``na2d_dense``; larger ones ``na2d_gather``.
    """
    B, H, W, N, D = q.shape
    (kh, kw) = kernel_size
    if torch.compiler.is_compiling():
        # Traced (torch.compile, torch.export, ONNX): no branch on the batch size, which may be symbolic (a
        # dynamic batch would be specialised); a symbolic map size always gathers, so one graph serves
        # every size. The gather runs unchunked: a chunk count would depend on the symbolic sizes too.
        if isinstance(H, int) and isinstance(W, int) and H * W <= DENSE_WASTE * kh * kw:
            return na2d_dense(q, k, v, kernel_size, dilation, rpb, scale)
        return na2d_gather(q, k, v, kernel_size, dilation, rpb, scale, chunk_elements=None)
    (dh, dw) = dilation
    if (dh, dw) != (1, 1) and H % dh == 0 and W % dw == 0:
        return _per_subgrid(q, k, v, kernel_size, dilation, rpb, scale, chunk_elements)
    if H * W <= DENSE_WASTE * kh * kw and B * N * (H * W) ** 2 <= chunk_elements:
        return na2d_dense(q, k, v, kernel_size, dilation, rpb, scale)
    return na2d_gather(q, k, v, kernel_size, dilation, rpb, scale, chunk_elements)


def _per_subgrid(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: tuple[int, int],
                 dilation: tuple[int, int], rpb: torch.Tensor | None, scale: float, chunk_elements: int
                 ) -> torch.Tensor:
    """A dilated map whose sides divide by the dilation as ``dh * dw`` undilated maps of ``H/dh x W/dw`` (its
    sub-grids, which never attend to each other and have the same windows and bias indices in sub-grid units),
    stacked on the batch axis: small sub-grids (DiNAT's dilated layers) then take the dense path."""
    B, H, W, N, D = q.shape
    (dh, dw) = dilation

    def split(t: torch.Tensor) -> torch.Tensor:  # [B, H, W, N, D] -> [B*dh*dw, H/dh, W/dw, N, D]
        return t.unflatten(2, (W // dw, dw)).unflatten(1, (H // dh, dh)).permute(0, 2, 4, 1, 3, 5, 6).flatten(0, 2)

    out = na2d_reference(split(q), split(k), split(v), kernel_size, (1, 1), rpb, scale, chunk_elements)
    return out.unflatten(0, (B, dh, dw)).permute(0, 3, 1, 4, 2, 5, 6).reshape(B, H, W, N, D)


def window_ds_binning(H: int, W: int, kernel_size: tuple[int, int], dilation: tuple[int, int],
                      device: torch.device, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """One-hot matrices ``(my [2kh-1, H*kh], mx [W*(kw+1), 2kw-1])`` that bin the Triton dq kernel's window-layout
    dS ``[B, heads, H, kh, W, kw + 1]`` into the bias table: ``d_rpb[h] = my @ dS[:, h].sum(0).view(H*kh,
    W*(kw+1)) @ mx``. The definition of that layout, for tests and benchmarks.

    Row ``(y, i)`` (query row y, window row i) holds table row ``ws(y) - y/dh + i + kh - 1`` (``ws`` the window
    start on y's dilation sub-grid, in sub-grid units). Columns alike, except that query column x has
    ``kw + 1`` slots, slot s holding the key at sub-grid column ``ws(x) // 2 * 2 + s`` (a slot outside the window
    maps to no table column).
    """
    def one_hot(n: int, ks: int, dil: int, paired: bool) -> torch.Tensor:
        pos = torch.arange(n, device=device)
        p, r = pos // dil, pos % dil
        start = torch.minimum(torch.clamp(p - ks // 2, min=0), (n - r + dil - 1) // dil - ks)
        first, slots = (start // 2 * 2, ks + 1) if paired else (start, ks)
        offset = (first - start)[:, None] + torch.arange(slots, device=device)[None, :]
        index = torch.where((offset >= 0) & (offset < ks), offset + (start - p + ks - 1)[:, None], 2 * ks - 1)
        return F.one_hot(index.reshape(-1), 2 * ks)[:, :-1].to(dtype)  # the extra class: no table entry

    return (one_hot(H, kernel_size[0], dilation[0], False).T.contiguous(),
            one_hot(W, kernel_size[1], dilation[1], True))


def rpb_grad_from_window_ds(dsnb: torch.Tensor, kernel_size: tuple[int, int], dilation: tuple[int, int],
                            dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """d_rpb ``[heads, 2kh-1, 2kw-1]`` in ``dtype`` from window-layout dS (:func:`window_ds_binning`)."""
    B, N, H, kh, W, kw1 = dsnb.shape
    my, mx = window_ds_binning(H, W, kernel_size, dilation, dsnb.device, dtype)
    return my @ dsnb.sum(0, dtype=dtype).reshape(N, H * kh, W * kw1) @ mx
