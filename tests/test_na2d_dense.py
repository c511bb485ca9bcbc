"""na2d's dense masked path (``backend="dense"``): vs the chunked gather reference (forward and every
gradient), mask layout, the index cache across inference mode, and what ``backend="auto"`` picks."""
from __future__ import annotations

import importlib
import random

import pytest
import torch

from attnzoo.kernels import na2d
from attnzoo.kernels.na2d_reference import _mask_index, dense_mask, na2d_gather
from tests.helpers import REL_L2_TOL, assert_rel_l2

# The module, not the function of the same name that attnzoo.kernels exports.
na2d_mod = importlib.import_module("attnzoo.kernels.na2d")


def _random_cases(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    cases = []
    while len(cases) < n:
        kh, kw = rng.choice([3, 5, 7]), rng.choice([3, 5])
        dh, dw = rng.choice([1, 1, 2, 3]), rng.choice([1, 2])
        H, W = kh * dh + rng.randint(0, 5), kw * dw + rng.randint(0, 5)
        if H * W > 220:
            continue
        cases.append(dict(B=rng.choice([1, 2]), H=H, W=W, N=rng.choice([1, 2, 3]), D=rng.choice([4, 8, 12, 32]),
                          kernel_size=(kh, kw), dilation=(dh, dw), with_rpb=rng.random() < 0.6,
                          dtype=rng.choice([torch.float32, torch.float32, torch.float16]),
                          scale=rng.choice([None, 0.3])))
    return cases


def _leaves(c: dict, dtype: torch.dtype, device: str = "cpu"):
    q, k, v = (torch.randn(c["B"], c["H"], c["W"], c["N"], c["D"], dtype=dtype, device=device, requires_grad=True)
               for _ in range(3))
    kh, kw = c["kernel_size"]
    rpb = (torch.randn(c["N"], 2 * kh - 1, 2 * kw - 1, dtype=torch.float32, device=device, requires_grad=True)
           if c["with_rpb"] else None)
    return q, k, v, rpb


def _check_dense_vs_gather(c: dict, device: str = "cpu", tol: float | None = None) -> None:
    """Dense path in ``c['dtype']`` against the gather reference in float64: output and all gradients."""
    dtype, ks, dil = c["dtype"], c["kernel_size"], c["dilation"]
    q, k, v, rpb = _leaves(c, dtype, device)
    leaves = [t for t in (q, k, v, rpb) if t is not None]
    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in leaves]
    ref_rpb = ref_leaves[3] if rpb is not None else None
    scale = c.get("scale") or c["D"] ** -0.5
    out = na2d(q, k, v, ks, dil, rpb, scale=c.get("scale"), backend="dense")
    ref = na2d_gather(*ref_leaves[:3], ks, dil, ref_rpb, scale)
    tol = REL_L2_TOL[dtype] if tol is None else tol
    assert out.dtype == dtype and out.shape == q.shape
    assert_rel_l2(out, ref, tol, name=f"out {c}")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.cpu().double())
    for name, g, rg in zip(("dq", "dk", "dv", "drpb"), grads, ref_grads):
        # rpb's gradient sums B*H*W terms of both signs through a mask in q's dtype.
        assert_rel_l2(g, rg, tol * (4 if name == "drpb" else 2), name=f"{name} {c}")


RANDOM_CASES = _random_cases(40, seed=7)


@pytest.mark.parametrize("case", RANDOM_CASES, ids=[f"c{i}" for i in range(len(RANDOM_CASES))])
def test_dense_matches_gather_random(case):
    _check_dense_vs_gather(case)


def test_dense_bf16_cpu():
    _check_dense_vs_gather(dict(B=2, H=9, W=13, N=2, D=16, kernel_size=(3, 5), dilation=(2, 2), with_rpb=True,
                                dtype=torch.bfloat16))


def test_dense_packed_qkv_views_need_no_copy():
    """q/k/v sliced from a packed ``[B, H, W, 3, heads, D]`` tensor reach SDPA as views of it."""
    seen = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q, k, v, kw["attn_mask"]))
        return real_sdpa(q, k, v, **kw)

    qkv = torch.randn(2, 9, 10, 3, 2, 8)
    q, k, v = qkv.unbind(3)
    rpb = torch.randn(2, 5, 9)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        out = na2d(q, k, v, (3, 5), (2, 1), rpb, backend="dense")
    (sq, sk, sv, mask), = seen
    for t in (sq, sk, sv):
        assert t.data_ptr() >= qkv.data_ptr() and t.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
        assert t.shape == (2, 2, 90, 8)
    assert mask.stride(-2) % 8 == 0 and mask.stride(-1) == 1  # padded rows: aligned for the efficient kernel
    ref = na2d_gather(q.double(), k.double(), v.double(), (3, 5), (2, 1), rpb.double(), 8 ** -0.5)
    assert_rel_l2(out, ref)


def test_dense_mask_contents():
    """Each query row holds exactly kh*kw finite entries: the RPB values at its neighbours."""
    H, W, ks, dil = 11, 7, (5, 3), (2, 2)
    rpb = torch.randn(3, 9, 5)
    mask = dense_mask(H, W, ks, dil, rpb, 3, torch.float32, torch.device("cpu"))
    assert mask.shape == (3, 77, 77)
    finite = torch.isfinite(mask)
    assert (finite.sum(-1) == 15).all()
    q = 4 * W + 2  # query (4, 2): rows 0,2,4,6,8 (window shifted inward from 0,2,4,6,8) and cols 0,2,4
    cols = finite[0, q].nonzero().flatten().tolist()
    assert cols == [y * W + x for y in (0, 2, 4, 6, 8) for x in (0, 2, 4)]
    # (jy - iy) / dy + kh - 1 = (0 - 4) / 2 + 4 = 2 for the first row; (0 - 2) / 2 + 2 = 1 for the first column
    assert mask[1, q, 0] == rpb[1, 2, 1]
    zero = dense_mask(H, W, ks, dil, None, 3, torch.float16, torch.device("cpu"))
    assert zero.shape == (1, 77, 77) and zero.dtype == torch.float16
    assert torch.equal(torch.isfinite(zero[0]), finite[0]) and (zero[torch.isfinite(zero)] == 0).all()


def test_cache_filled_in_inference_mode_then_train():
    """Validate-then-train: the cached index tensors made under inference_mode must serve a backward."""
    _mask_index.cache_clear()
    q, k, v, rpb = _leaves(dict(B=2, H=9, W=9, N=2, D=8, kernel_size=(3, 3), with_rpb=True), torch.float32)
    with torch.inference_mode():
        na2d(q, k, v, 3, 2, rpb, backend="dense")
    keys, bias = _mask_index(9, 9, (3, 3), (2, 2), "cpu")
    assert not keys.is_inference() and not bias.is_inference()
    out = na2d(q, k, v, 3, 2, rpb, backend="dense")
    grads = torch.autograd.grad(out.square().sum(), (q, k, v, rpb))
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v, rpb)]
    ref = na2d_gather(*ref_leaves[:3], (3, 3), (2, 2), ref_leaves[3], 8 ** -0.5)
    for g, rg in zip(grads, torch.autograd.grad(ref.square().sum(), ref_leaves)):
        assert_rel_l2(g, rg, 2e-5)


def test_auto_on_cpu_is_reference_and_reference_small_maps_are_dense():
    """On CPU, auto is the reference; the reference's small-map mode is this dense path (one implementation)."""
    q, k, v, rpb = _leaves(dict(B=1, H=9, W=9, N=2, D=8, kernel_size=(3, 3), with_rpb=True), torch.float32)
    dense = na2d(q, k, v, 3, 2, rpb, backend="dense")
    assert torch.equal(na2d(q, k, v, 3, 2, rpb), dense)
    assert torch.equal(na2d(q, k, v, 3, 2, rpb, backend="reference"), dense)


@pytest.mark.parametrize("backend", ["cuda", "Dense", None])
def test_backend_error_lists_choices(backend):
    q = torch.randn(1, 9, 9, 1, 8)
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'dense', 'reference'\)"):
        na2d(q, q, q, 3, backend=backend)


# ------------------------------------------------------------------------------------------------
# GPU: bf16/fp16 dense path against float64, auto's choice on CUDA, inference-mode-then-train.
# ------------------------------------------------------------------------------------------------
GPU_CASES = [
    dict(B=4, H=14, W=14, N=8, D=32, kernel_size=(7, 7), dilation=(1, 1), with_rpb=True),
    dict(B=4, H=14, W=14, N=8, D=32, kernel_size=(7, 7), dilation=(2, 2), with_rpb=True),
    dict(B=8, H=7, W=7, N=16, D=32, kernel_size=(7, 7), dilation=(1, 1), with_rpb=True),
    dict(B=2, H=28, W=28, N=4, D=32, kernel_size=(7, 7), dilation=(4, 4), with_rpb=False),
    dict(B=2, H=17, W=23, N=3, D=64, kernel_size=(5, 7), dilation=(3, 2), with_rpb=True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", GPU_CASES, ids=[f"g{i}" for i in range(len(GPU_CASES))])
def test_gpu_dense_matches_reference(case, dtype):
    _check_dense_vs_gather(dict(case, dtype=dtype), "cuda")


@pytest.mark.gpu
def test_gpu_dense_trains_after_inference_mode_forward():
    _mask_index.cache_clear()
    q, k, v, rpb = _leaves(dict(B=2, H=14, W=14, N=4, D=32, kernel_size=(7, 7), with_rpb=True), torch.bfloat16,
                           "cuda")
    with torch.inference_mode():
        na2d(q, k, v, 7, 2, rpb, backend="auto")
    out = na2d(q, k, v, 7, 2, rpb, backend="auto")
    out.float().square().sum().backward()
    assert torch.isfinite(q.grad).all() and rpb.grad.abs().sum() > 0
