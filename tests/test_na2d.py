"""na2d: reference vs a brute-force NATTEN definition, Triton (interpreter or GPU) vs the reference,
gradients, poisoned outputs, deterministic d_rpb, custom-op registration, and every input error."""
from __future__ import annotations

import itertools
import random

import pytest
import torch

from attnzoo.kernels import na2d
from attnzoo.kernels.na2d_reference import na2d_reference
from tests.helpers import (REL_L2_TOL, TF32_REL_L2_TOL, assert_rel_l2, check_compiled_launches_kernels,
                           check_cuda_graph_replay)


# ------------------------------------------------------------------------------------------------
# Brute-force definition: NATTEN <=0.17's own index functions (get_window_start / get_pb_start),
# transcribed literally, applied as an explicit mask + bias over all H*W tokens in float64.
# ------------------------------------------------------------------------------------------------
def _natten_window_start(i: int, length: int, ks: int, d: int) -> int:
    n = ks // 2
    if d <= 1:
        return max(i - n, 0) + (i + n >= length) * (length - i - n - 1)
    if i - n * d < 0:
        return i % d
    if i + n * d >= length:
        imodd, a = i % d, (length // d) * d
        b = length - a
        return length - b + imodd - 2 * n * d if imodd < b else a + imodd - ks * d
    return i - n * d


def _natten_pb_start(i: int, length: int, ks: int, d: int) -> int:
    n = ks // 2
    if d <= 1:
        return n + (i < n) * (n - i) + (i + n >= length) * (length - i - 1 - n)
    if i - n * d < 0:
        return ks - 1 - i // d
    if i + n * d >= length:
        return (length - i - 1) // d
    return n


def brute_force(q, k, v, kernel_size, dilation, rpb, scale):
    B, H, W, N, D = q.shape
    (kh, kw), (dh, dw) = kernel_size, dilation
    L = H * W
    logits = torch.einsum("bind,bjnd->bnij", q.double().reshape(B, L, N, D) * scale, k.double().reshape(B, L, N, D))
    bias = torch.full((N, L, L), float("-inf"), dtype=torch.float64)
    for y in range(H):
        sy, py = _natten_window_start(y, H, kh, dh), _natten_pb_start(y, H, kh, dh)
        for x in range(W):
            sx, px = _natten_window_start(x, W, kw, dw), _natten_pb_start(x, W, kw, dw)
            for a in range(kh):
                for c in range(kw):
                    j = (sy + a * dh) * W + sx + c * dw
                    bias[:, y * W + x, j] = 0.0 if rpb is None else rpb[:, py + a, px + c].double()
    attn = (logits + bias).softmax(-1)
    return torch.einsum("bnij,bjnd->bind", attn, v.double().reshape(B, L, N, D)).reshape(B, H, W, N, D)


def _inputs(B, H, W, N, D, kernel_size, dtype=torch.float32, device="cpu", with_rpb=True, requires_grad=False):
    q, k, v = (torch.randn(B, H, W, N, D, dtype=dtype, device=device, requires_grad=requires_grad) for _ in range(3))
    rpb = None
    if with_rpb:
        rpb = torch.randn(N, 2 * kernel_size[0] - 1, 2 * kernel_size[1] - 1, dtype=dtype, device=device,
                          requires_grad=requires_grad)
    return q, k, v, rpb


BRUTE_CASES = [  # (H, W, kernel_size, dilation, rpb)
    (7, 7, (7, 7), (1, 1), True),
    (9, 11, (3, 5), (2, 1), True),
    (13, 7, (5, 3), (2, 2), True),
    (10, 12, (3, 3), (3, 4), True),
    (11, 9, (3, 3), (3, 2), False),
    (8, 15, (5, 5), (1, 3), True),
    (12, 21, (3, 5), (4, 3), False),  # sides divisible by the dilation: the reference runs dense sub-grids
    (26, 24, (3, 3), (2, 2), True),  # ... or gathered ones (13 x 12 sub-grids)
]


@pytest.mark.parametrize("H,W,kernel_size,dilation,with_rpb", BRUTE_CASES)
def test_reference_matches_brute_force(H, W, kernel_size, dilation, with_rpb):
    q, k, v, rpb = _inputs(2, H, W, 3, 8, kernel_size, dtype=torch.float64, with_rpb=with_rpb)
    out = na2d(q, k, v, kernel_size, dilation, rpb, backend="reference")
    assert_rel_l2(out, brute_force(q, k, v, kernel_size, dilation, rpb, 8 ** -0.5), name="reference")


def test_reference_chunking_and_scale():
    q, k, v, rpb = _inputs(2, 12, 9, 2, 8, (5, 3), dtype=torch.float64)
    whole = na2d_reference(q, k, v, (5, 3), (2, 3), rpb, 0.3)
    chunked = na2d_reference(q, k, v, (5, 3), (2, 3), rpb, 0.3, chunk_elements=1)  # one query row per chunk
    assert_rel_l2(chunked, whole, name="row-chunked reference")
    assert_rel_l2(whole, brute_force(q, k, v, (5, 3), (2, 3), rpb, 0.3), name="reference with scale=0.3")


def test_reference_gradcheck():
    """Row-chunked and checkpointed (3 chunks), in float64; fast mode checks random Jacobian projections."""
    q, k, v, rpb = _inputs(1, 7, 6, 2, 4, (3, 3), dtype=torch.float64, requires_grad=True)
    fn = lambda q, k, v, rpb: na2d_reference(q, k, v, (3, 3), (2, 1), rpb, 0.5, chunk_elements=900)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, rpb), fast_mode=True)


# ------------------------------------------------------------------------------------------------
# Triton vs reference: 40 random shapes under the interpreter (or on the GPU), fp32 and fp16.
# ------------------------------------------------------------------------------------------------
def _random_cases(n: int, seed: int):
    rng = random.Random(seed)
    cases = []
    while len(cases) < n:
        kh, kw = rng.choice([3, 5, 7]), rng.choice([3, 5])
        dh, dw = rng.choice([1, 1, 2, 3]), rng.choice([1, 2])
        H, W = kh * dh + rng.randint(0, 4), kw * dw + rng.randint(0, 4)
        if H * W > 160:
            continue
        cases.append(dict(B=rng.choice([1, 2]), H=H, W=W, N=rng.choice([1, 2]), D=rng.choice([8, 16, 24, 32]),
                          kernel_size=(kh, kw), dilation=(dh, dw), with_rpb=rng.random() < 0.5,
                          rpb_grad=rng.random() < 0.75, dtype=rng.choice([torch.float32, torch.float16])))
    return cases


def _check_triton_vs_reference(case: dict, device: str, check_grads: bool = True) -> None:
    c = dict(case)
    dtype, ks, dil = c.pop("dtype"), c["kernel_size"], c["dilation"]
    q, k, v, rpb = _inputs(c["B"], c["H"], c["W"], c["N"], c["D"], ks, dtype=dtype, device=device,
                           with_rpb=c["with_rpb"], requires_grad=True)
    if rpb is not None and not c.get("rpb_grad", True):  # a frozen table: the kernels skip d_rpb
        rpb.requires_grad_(False)
    leaves = [q, k, v] + ([rpb] if rpb is not None and rpb.requires_grad else [])
    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in leaves]
    ref_rpb = None if rpb is None else (ref_leaves[3] if rpb.requires_grad else rpb.double())
    ref = na2d(*ref_leaves[:3], ks, dil, ref_rpb, backend="reference")
    out = na2d(q, k, v, ks, dil, rpb, backend="triton")
    tol = TF32_REL_L2_TOL if (dtype == torch.float32 and device == "cuda") else REL_L2_TOL[dtype]
    assert out.dtype == dtype
    assert_rel_l2(out, ref, tol, name=f"out {case}")
    if not check_grads:
        return
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.cpu().double())
    for name, g, rg in zip(("dq", "dk", "dv", "drpb"), grads, ref_grads):
        # rpb's gradient sums B*H*W terms of both signs: allow the reduction's extra fp16 rounding.
        assert_rel_l2(g, rg, tol * (4 if name == "drpb" else 2), name=f"{name} {case}")


RANDOM_CASES = _random_cases(40, seed=2024)


@pytest.mark.triton_interpret
@pytest.mark.parametrize("case", RANDOM_CASES, ids=[f"c{i}" for i in range(len(RANDOM_CASES))])
def test_triton_matches_reference_random(case):
    _check_triton_vs_reference(case, "cpu")


@pytest.mark.triton_interpret
def test_triton_strided_inputs_and_fp32_rpb_with_fp16():
    """q/k/v as views of a packed qkv tensor (no copies) and an fp32 rpb beside fp16 activations."""
    B, H, W, N, D, ks = 1, 9, 10, 2, 16, (3, 5)
    qkv = torch.randn(B, H, W, 3, N, D, dtype=torch.float16)
    q, k, v = qkv.unbind(3)
    rpb = torch.randn(N, 5, 9)
    out = na2d(q, k, v, ks, (2, 1), rpb, backend="triton")
    ref = na2d(q.double(), k.double(), v.double(), ks, (2, 1), rpb.double(), backend="reference")
    assert_rel_l2(out, ref, REL_L2_TOL[torch.float16])


def _poisoned_empty(real_empty):
    """``torch.empty`` whose floating-point tensors start as NaN."""
    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    return empty


@pytest.mark.triton_interpret
def test_triton_writes_every_output_element(monkeypatch):
    """Every buffer the op allocates with torch.empty starts as NaN; nothing may survive in the results."""
    q, k, v, rpb = _inputs(2, 11, 9, 2, 24, (5, 3), with_rpb=True, requires_grad=True)
    monkeypatch.setattr(torch, "empty", _poisoned_empty(torch.empty))
    out = na2d(q, k, v, (5, 3), (2, 3), rpb, backend="triton")
    grads = torch.autograd.grad(out, (q, k, v, rpb), torch.randn_like(out))
    monkeypatch.undo()
    for t in (out, *grads):
        assert torch.isfinite(t).all()
    ref = na2d(q.double(), k.double(), v.double(), (5, 3), (2, 3), rpb.double(), backend="reference")
    assert_rel_l2(out, ref)


@pytest.mark.triton_interpret
def test_triton_deterministic_rpb_grad():
    """d_rpb is a batch sum and one-hot products of the window-layout dS (no atomics): bit-identical run to run,
    whatever the flag."""
    q, k, v, rpb = _inputs(2, 9, 8, 2, 16, (3, 3), with_rpb=True, requires_grad=True)
    dout = torch.randn(2, 9, 8, 2, 16)

    def drpb(**kw):
        out = na2d(q, k, v, 3, (2, 1), rpb, backend="triton", **kw)
        return torch.autograd.grad(out, rpb, dout)[0]

    first = drpb(deterministic=True)
    assert torch.equal(first, drpb(deterministic=True)) and torch.equal(first, drpb(deterministic=False))
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v, rpb)]
    ref = na2d(*ref_leaves[:3], 3, (2, 1), ref_leaves[3], backend="reference")
    assert_rel_l2(first, torch.autograd.grad(ref, ref_leaves[3], dout.double())[0])


@pytest.mark.triton_interpret
def test_triton_backward_tiles_of_mid_size_maps():
    """Sub-grids of 17-32 points per side take 4 x 8 walked blocks in both backward kernels, and 2 x 8 blocks of two
    images in dq with a bias gradient (the random cases' maps are smaller): every gradient against the float64
    reference, bias included."""
    from attnzoo.kernels import na2d_triton as T

    assert (T.choose_tiles("dq", 20, 22, (5, 3), 16).KBX, T.choose_tiles("dkdv", 20, 22, (5, 3), 16).KBX) == (8, 8)
    assert T.choose_tiles("dq", 20, 22, (5, 3), 16, rpb_grad=True) == T.Tiles(8, 8, 2, 8, 4, 3, imgs=2)
    _check_triton_vs_reference(dict(B=1, H=20, W=22, N=1, D=16, kernel_size=(5, 3), dilation=(1, 1), with_rpb=True,
                                    rpb_grad=True, dtype=torch.float32), "cpu")


@pytest.mark.triton_interpret
def test_triton_dq_tiles_of_wide_heads_with_a_bias_gradient():
    """Head dims 33-64 with a bias gradient take dq on 4 x 8 walked blocks of two images (one image of 8 x 8 blocks
    without one); on a batch of 3 the last program has one image: every gradient against the float64 reference."""
    from attnzoo.kernels import na2d_triton as T

    assert T.choose_tiles("dq", 12, 11, (5, 5), 48, 4, rpb_grad=True) == T.Tiles(8, 8, 4, 8, 4, 3, imgs=2)
    assert T.choose_tiles("dq", 12, 11, (5, 5), 48, 4) == T.Tiles(8, 8, 8, 8, 4, 3, imgs=1)
    _check_triton_vs_reference(dict(B=3, H=12, W=11, N=1, D=48, kernel_size=(5, 5), dilation=(1, 1), with_rpb=True,
                                    rpb_grad=True, dtype=torch.float32), "cpu")


@pytest.mark.triton_interpret
@pytest.mark.parametrize("imgs", [1, 2])
def test_triton_images_per_program_with_an_odd_batch(imgs, monkeypatch):
    """All three kernels with one or two images per program on a batch of 3 (with two, the last program has one
    image; dq's summed window-layout dS then has 2 groups): outputs and every gradient against the float64
    reference, with every buffer the op allocates poisoned with NaN."""
    import dataclasses

    from attnzoo.kernels import na2d_triton as T

    default = T.choose_tiles
    monkeypatch.setattr(T, "choose_tiles", lambda *a: dataclasses.replace(default(*a), imgs=imgs))
    monkeypatch.setattr(torch, "empty", _poisoned_empty(torch.empty))
    T._plan.cache_clear()
    try:
        _check_triton_vs_reference(dict(B=3, H=13, W=10, N=2, D=16, kernel_size=(5, 3), dilation=(2, 1),
                                        with_rpb=True, rpb_grad=True, dtype=torch.float32), "cpu")
    finally:
        monkeypatch.undo()
        T._plan.cache_clear()


@pytest.mark.triton_interpret
@pytest.mark.parametrize("programs,grid,dtype", [(8, (4, 1, 2), torch.float16), (48, (6, 4, 2), torch.float32)])
def test_triton_rpb_grad_reduction_blocks_and_batch_splits(programs, grid, dtype, monkeypatch):
    """The d_rpb reduction kernel on 6 blocks per head (partial ones at the right and bottom edges) and two heads:
    few programs walking 1-2 blocks each over the whole batch, or one program per block and the batch of 5 in
    4 slices of 2 (the last one empty); against the layout's definition in float64, bit-identical on a second
    run."""
    from attnzoo.kernels import na2d_triton as T
    from attnzoo.kernels.na2d_reference import rpb_grad_from_window_ds

    monkeypatch.setattr(T, "DRPB_BC", 16)  # C = 9 * 4: two full column blocks and a partial one; R = 7 * 3
    monkeypatch.setattr(T, "DRPB_PROGRAMS", programs)
    B, N, H, W, ks, dil = 5, 2, 7, 9, (3, 3), (2, 1)  # odd window starts on both axes
    assert T._drpb_grid(B, N, H * ks[0], W * (ks[1] + 1)) == grid
    dsnb = torch.randn(B, N, H, ks[0], W, ks[1] + 1).to(dtype)
    got = T.rpb_grad_from_window_ds(dsnb, ks, dil)
    assert got.shape == (N, 2 * ks[0] - 1, 2 * ks[1] - 1) and got.dtype == torch.float32
    assert_rel_l2(got, rpb_grad_from_window_ds(dsnb, ks, dil), 1e-6)
    assert torch.equal(got, T.rpb_grad_from_window_ds(dsnb, ks, dil))


@pytest.mark.parametrize("kernel", ["fwd", "dq", "dkdv"])
@pytest.mark.parametrize("itemsize", [2, 4])
@pytest.mark.parametrize("head_dim", [8, 32, 64, 96, 128])
def test_tiles_pipeline_fits_shared_memory(kernel, itemsize, head_dim):
    """num_stages copies of each image's walked k/v (or q/dO) blocks fit the pipeline's shared-memory budget:
    float32 heads of 96-128 with 3 stages of 8 x 8 dq blocks asked an H200 for 240 KiB (OutOfResources)."""
    from attnzoo.kernels import na2d_triton as T

    for sub, ks, grad in itertools.product(((40, 40), (56, 56), (7, 7), (45, 31)), ((11, 7), (7, 7), (13, 13)),
                                           (False, True)):
        t = T.choose_tiles(kernel, *sub, ks, head_dim, itemsize, grad)
        walked = 2 * t.imgs * t.KBY * t.KBX * max(16, T._p2(head_dim)) * itemsize
        assert 1 <= t.num_stages and t.num_stages * walked <= T.PIPELINE_SMEM, (sub, ks, t)


def test_auto_rule_is_triton_on_every_map():
    """The fused kernels beat the masked dense path on every NAT/DiNAT stage shape (benchmarks/NOTES_na2d.md),
    small maps included, so auto's CUDA rule is Triton wherever it is called."""
    import importlib

    na2d_mod = importlib.import_module("attnzoo.kernels.na2d")
    for H, ks in ((7, (7, 7)), (14, (7, 7)), (56, (7, 7)), (9, (3, 5))):
        assert na2d_mod.auto_backend(torch.empty(2, H, H, 8, 32, device="meta"), ks) == "triton"


@pytest.mark.triton_interpret
def test_custom_op_registration():
    """Schema, fake kernel and autograd registration agree with the real kernel."""
    q, k, v, rpb = _inputs(1, 7, 9, 2, 8, (3, 3), with_rpb=True, requires_grad=True)
    torch.library.opcheck(torch.ops.attnzoo.na2d_fwd.default, (q, k, v, rpb, [3, 3], [2, 1], 0.3),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    # the backward op's outputs match its fake kernel, strides included (inductor asserts them: a strided
    # d_rpb slice failed `assert_size_stride` in a compiled training step before it was made contiguous)
    out, lse = torch.ops.attnzoo.na2d_fwd.default(q, k, v, rpb, [3, 3], [2, 1], 0.3)
    args = (torch.randn_like(out), q, k, v, rpb, out, lse, [3, 3], [2, 1], 0.3, [True] * 4)
    torch.library.opcheck(torch.ops.attnzoo.na2d_bwd.default, args, test_utils=("test_schema", "test_faketensor"))
    grads = torch.ops.attnzoo.na2d_bwd.default(*args)
    assert all(g.is_contiguous() for g in grads)


@pytest.mark.triton_interpret
def test_compile_fullgraph_triton_interpreter():
    """No graph break around the custom op: fullgraph tracing through aot_eager, forward and backward."""
    q, k, v, rpb = _inputs(1, 7, 9, 2, 8, (3, 3), with_rpb=True, requires_grad=True)
    fn = torch.compile(lambda q, k, v, rpb: na2d(q, k, v, 3, (2, 1), rpb, backend="triton"), fullgraph=True,
                       backend="aot_eager")
    out = fn(q, k, v, rpb)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v, rpb))
    ref_out = na2d(q, k, v, 3, (2, 1), rpb, backend="triton")
    ref_grads = torch.autograd.grad(ref_out.square().sum(), (q, k, v, rpb))
    assert_rel_l2(out, ref_out)
    for g, rg in zip(grads, ref_grads):
        assert_rel_l2(g, rg)


def test_compile_fullgraph_reference():
    q, k, v, rpb = _inputs(2, 9, 8, 2, 8, (3, 3), with_rpb=True, requires_grad=True)
    fn = torch.compile(lambda q, k, v, rpb: na2d(q, k, v, 3, (2, 1), rpb, backend="reference"), fullgraph=True,
                       backend="aot_eager")
    out = fn(q, k, v, rpb)
    assert_rel_l2(out, na2d(q, k, v, 3, (2, 1), rpb, backend="reference"))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v, rpb))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_baseline_matches_reference_forward():
    """The benchmarks' FlexAttention baseline computes na2d. FlexAttention on CPU has no backward, so only
    the forward is compared here (the GPU test does both)."""
    from benchmarks.na2d_flex import na2d_flex

    q, k, v, rpb = _inputs(2, 9, 11, 2, 8, (3, 5), with_rpb=True)
    out = na2d_flex(q, k, v, (3, 5), (2, 1), rpb, 8 ** -0.5)
    ref = na2d(q.double(), k.double(), v.double(), (3, 5), (2, 1), rpb.double(), backend="reference")
    assert_rel_l2(out, ref)


def test_auto_on_cpu_is_reference():
    q, k, v, rpb = _inputs(1, 7, 7, 1, 8, (3, 3))
    assert torch.equal(na2d(q, k, v, 3, 1, rpb), na2d(q, k, v, 3, 1, rpb, backend="reference"))


# ------------------------------------------------------------------------------------------------
# Errors name the argument and the expected value.
# ------------------------------------------------------------------------------------------------
def _qkv(shape=(1, 9, 9, 2, 8), dtype=torch.float32):
    return [torch.randn(shape, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("call,exc,match", [
    (lambda q, k, v: na2d(q, k, v, 4), ValueError, r"kernel_size must be odd and >= 3.*\(4, 4\)"),
    (lambda q, k, v: na2d(q, k, v, 1), ValueError, r"kernel_size must be odd and >= 3"),
    (lambda q, k, v: na2d(q, k, v, (3, 3, 3)), TypeError, r"kernel_size must be an int or a \(height, width\)"),
    (lambda q, k, v: na2d(q, k, v, 3, 0), ValueError, r"dilation must be >= 1"),
    (lambda q, k, v: na2d(q, k, v, 5, 2), ValueError,
     r"height 9 is smaller than kernel_size \* dilation = 5 \* 2 = 10"),
    (lambda q, k, v: na2d(q, k, v, (3, 5), (1, 2)), ValueError, r"width 9 .* expected width >= 10"),
    (lambda q, k, v: na2d(q[0], k, v, 3), ValueError, r"q must be \[B, H, W, heads, head_dim\]"),
    (lambda q, k, v: na2d(q, k[:, :8], v, 3), ValueError, r"k must have q's shape"),
    (lambda q, k, v: na2d(q, k, v.half(), 3), TypeError, r"v must have q's dtype torch.float32, got torch.float16"),
    (lambda q, k, v: na2d(q, k, v, 3, rpb=torch.zeros(2, 3, 3)), ValueError,
     r"rpb must have shape \[heads, 2\*kh-1, 2\*kw-1\] = \[2, 5, 5\], got \(2, 3, 3\)"),
    (lambda q, k, v: na2d(q, k, v, 3, rpb=torch.zeros(2, 5, 5, dtype=torch.float16)), TypeError,
     r"rpb must have q's dtype"),
    (lambda q, k, v: na2d(q, k, v, 3, backend="cuda"), ValueError, r"backend must be one of"),
    (lambda q, k, v: na2d(q.long(), k, v, 3), TypeError, r"q must be a floating-point tensor"),
])
def test_input_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call(*_qkv())


@pytest.mark.triton_interpret
@pytest.mark.parametrize("shape,dtype,match", [
    ((1, 9, 9, 2, 4), torch.float32, r"needs q/k/v head dim in \[8, 128\], got 4; use backend='reference'"),
    ((1, 9, 9, 2, 136), torch.float32, r"needs q/k/v head dim in \[8, 128\], got 136"),
    ((1, 9, 9, 2, 8), torch.float64, r"dtypes float16, bfloat16 and float32, got torch.float64; use backend='ref"),
])
def test_triton_input_errors(shape, dtype, match):
    with pytest.raises((ValueError, TypeError), match=match):
        na2d(*_qkv(shape, dtype), 3, backend="triton")


_TRACE_SCRIPT = """
import importlib
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from attnzoo.kernels import na2d_triton as T
op = importlib.import_module("attnzoo.kernels.na2d")

def step(q, k, v, rpb, dout):
    out, lse = T.na2d_forward(q, k, v, rpb, (7, 5), (2, 3), 0.2)
    return T.na2d_backward(dout, q, k, v, rpb, out, lse, (7, 5), (2, 3), 0.2, True)

qkv = [torch.empty(3, 30, 31, 2, 32, dtype=torch.bfloat16, device="meta") for _ in range(4)]
gm = make_fx(step, tracing_mode="symbolic")(*qkv[:3], torch.empty(2, 13, 9, device="meta"), qkv[3])
launches = [n for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
print("inductor_launches", op._na2d_triton.inductor_launches)
print("launches", len(launches))
print("symbolic_grids", sum(any(isinstance(g, torch.fx.Node) for g in n.kwargs["grid"][0]) for n in launches))
"""


def test_compiled_registration_traces_to_kernel_launches(tmp_path):
    """What Inductor sees of the compiled na2d ops (triton_op), traced on CPU with symbolic shapes: the forward and
    the backward (dq, dk/dv, the d_rpb reduction) become four kernel launches whose grids stay symbolic in the
    batch size. Needs compiled kernels, so a process without Triton's interpreter."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, "-c", _TRACE_SCRIPT], cwd=Path(__file__).parents[1], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = dict(line.split(" ", 1) for line in res.stdout.strip().splitlines())
    assert got == {"inductor_launches": "True", "launches": "4", "symbolic_grids": "4"}, got


_FP64_SCALE_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from benchmarks import na2d_sass as S

for kernel in ("fwd", "dq", "dkdv"):
    meta = dict(S._plan(S.CASES[3], kernel, True, kernel == "dq").meta)
    options = dict(num_warps=meta.pop("num_warps"), num_stages=meta.pop("num_stages"))
    sig, consts, attrs = S._signature(S.KERNELS[kernel], meta, S.CASES[3])
    sig = {n: "fp64" if n.endswith("scale") else t for n, t in sig.items()}
    triton.compile(ASTSource(fn=S.KERNELS[kernel], signature=sig, constexprs=consts, attrs=attrs),
                   target=GPUTarget("cuda", 90, 32), options=options)
print("compiled")
"""


def test_kernels_compile_with_fp64_scales():
    """A compiled model hands the kernels unspecialised Python floats (the scales) as fp64 scalars; the kernels
    must still compile (the online-softmax state once turned fp64 inside the key loop and Triton refused it). Compiled
    for sm_90 by Triton's own toolchain, so no GPU is needed, but not under the interpreter."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, "-c", _FP64_SCALE_SCRIPT], cwd=Path(__file__).parents[1], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip() == "compiled", res.stderr[-3000:]


# ------------------------------------------------------------------------------------------------
# GPU: bf16/fp16/fp32 on real shapes, against a float64 reference (`make test-gpu`).
# ------------------------------------------------------------------------------------------------
GPU_CASES = [
    dict(B=2, H=56, W=56, N=2, D=32, kernel_size=(7, 7), dilation=(1, 1), with_rpb=True),
    dict(B=2, H=56, W=56, N=2, D=32, kernel_size=(7, 7), dilation=(8, 8), with_rpb=True),
    dict(B=2, H=28, W=28, N=4, D=32, kernel_size=(7, 7), dilation=(4, 4), with_rpb=True),
    dict(B=4, H=7, W=7, N=16, D=32, kernel_size=(7, 7), dilation=(1, 1), with_rpb=True),
    dict(B=1, H=45, W=61, N=3, D=64, kernel_size=(13, 13), dilation=(1, 2), with_rpb=True),
    dict(B=1, H=33, W=35, N=2, D=128, kernel_size=(5, 9), dilation=(3, 2), with_rpb=False),
    dict(B=2, H=30, W=19, N=2, D=8, kernel_size=(3, 5), dilation=(5, 2), with_rpb=True),
    dict(B=1, H=40, W=40, N=2, D=96, kernel_size=(11, 7), dilation=(1, 1), with_rpb=True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", GPU_CASES, ids=[f"g{i}" for i in range(len(GPU_CASES))])
def test_gpu_triton_matches_reference(case, dtype):
    _check_triton_vs_reference(dict(case, dtype=dtype), "cuda")


@pytest.mark.gpu
def test_gpu_deterministic_and_compile():
    q, k, v, rpb = _inputs(8, 56, 56, 2, 32, (7, 7), dtype=torch.bfloat16, device="cuda", requires_grad=True)
    dout = torch.randn_like(q)

    def drpb():
        return torch.autograd.grad(na2d(q, k, v, 7, 2, rpb, deterministic=True), rpb, dout)[0]

    assert torch.equal(drpb(), drpb())
    fn = torch.compile(lambda q, k, v, rpb: na2d(q, k, v, 7, 2, rpb), fullgraph=True)
    assert_rel_l2(fn(q, k, v, rpb), na2d(q, k, v, 7, 2, rpb), 1e-6)


@pytest.mark.gpu
def test_gpu_flex_matches_reference():
    case = dict(B=1, H=20, W=24, N=2, D=32, kernel_size=(5, 7), dilation=(2, 3))
    q, k, v, rpb = _inputs(case["B"], case["H"], case["W"], case["N"], case["D"], case["kernel_size"],
                           device="cuda", requires_grad=True)
    from benchmarks.na2d_flex import na2d_flex

    out = na2d_flex(q, k, v, case["kernel_size"], case["dilation"], rpb, case["D"] ** -0.5)
    ref = na2d(q, k, v, case["kernel_size"], case["dilation"], rpb, backend="reference")
    assert_rel_l2(out, ref, TF32_REL_L2_TOL)
    dout = torch.randn_like(out)
    for g, rg in zip(torch.autograd.grad(out, (q, k, v, rpb), dout), torch.autograd.grad(ref, (q, k, v, rpb), dout)):
        assert_rel_l2(g, rg, TF32_REL_L2_TOL)


@pytest.mark.gpu
def test_gpu_cached_launches_and_unaligned_views_match():
    """Repeated calls of one shape launch through each kernel's cached compiled kernel (attnzoo.kernels._op.
    Launcher) and give the first call's numbers bit for bit; q/k/v two bytes off 16-byte alignment need their
    own specialization and give the same numbers."""
    q, k, v, rpb = _inputs(2, 28, 28, 4, 32, (7, 7), dtype=torch.bfloat16, device="cuda", requires_grad=True)
    dout = torch.randn_like(q)

    def run(q, k, v):
        out = na2d(q, k, v, 7, 2, rpb, backend="triton")
        return (out, *torch.autograd.grad(out, (q, k, v, rpb), dout))

    def unaligned(t):  # same values, storage starting one bf16 element after an aligned address
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        view = buf[1:].view(t.shape)
        view.copy_(t.detach())
        return view.requires_grad_()

    first, second = run(q, k, v), run(q, k, v)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    qu, ku, vu = (unaligned(t) for t in (q, k, v))
    assert qu.data_ptr() % 16 != 0
    third, fourth = run(qu, ku, vu), run(qu, ku, vu)
    assert all(torch.equal(a, b) for a, b in zip(third, fourth))
    for a, b in zip(first, third):
        assert_rel_l2(b.float(), a.float(), 1e-2)  # a wrong specialization would read garbage


@pytest.mark.gpu
@pytest.mark.parametrize("dilation", [1, 4])
def test_gpu_cuda_graph_replay_matches_eager(dilation):
    """Forward and backward (d_rpb's reduction included) capture as one CUDA graph and replay to eager's numbers
    on new inputs: no host sync and no per-call state, so CUDA-graphed steps can hold the fused kernels."""
    check_cuda_graph_replay(lambda q, k, v, rpb: na2d(q, k, v, 7, dilation, rpb, backend="triton"),
                            list(_inputs(3, 28, 28, 4, 32, (7, 7), dtype=torch.bfloat16, device="cuda",
                                         requires_grad=True)))


@pytest.mark.gpu
def test_gpu_compiled_model_launches_kernels_itself():
    """Under torch.compile the na2d ops are triton_ops: Inductor traces them and launches the three kernels from
    its own code (no opaque ``attnzoo.na2d_*`` call left), with the batch size symbolic (a third batch size does
    not recompile), and gives eager's numbers."""
    check_compiled_launches_kernels(
        lambda q, k, v, rpb: na2d(q, k, v, 7, 2, rpb),
        lambda batch: _inputs(batch, 28, 28, 2, 32, (7, 7), dtype=torch.bfloat16, device="cuda", requires_grad=True),
        (2, 3, 5), ("_na2d_fwd_kernel", "_na2d_bwd_dq_kernel", "_na2d_bwd_dkdv_kernel"), "na2d",
        (1e-4, 1e-4, 1e-4, 1e-4, 1e-2))  # the scale is rounded via fp64; d_rpb sums many bf16 terms
