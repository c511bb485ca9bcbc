"""Bi-level routing attention: reference vs brute force, Triton vs reference, determinism, errors."""
from __future__ import annotations

import random

import pytest
import torch

from attnzoo.kernels import bra, routed_attention
from attnzoo.kernels.bra_reference import route_regions
from tests.helpers import (TF32_REL_L2_TOL, assert_rel_l2, check_compiled_launches_kernels, check_cuda_graph_replay,
                           poison_)


def _qkv(B, H, W, heads, D, Dv, dtype=torch.float64, device="cpu"):
    q, k = torch.randn(2, B, H, W, heads, D, dtype=dtype, device=device)
    return q, k, torch.randn(B, H, W, heads, Dv, dtype=dtype, device=device)


def _region_of_tokens(H: int, W: int, n_win: int) -> torch.Tensor:
    """Raster region id of every token of an [H, W] map, flattened."""
    rows = torch.arange(H) // (H // n_win)
    cols = torch.arange(W) // (W // n_win)
    return (rows[:, None] * n_win + cols[None, :]).flatten()


def _brute_force_bra(q, k, v, n_win, topk, scale, routing_scale):
    """BRA written as masked dense attention over all tokens, with routing from explicit per-region sums."""
    B, H, W, heads, D = q.shape
    region = _region_of_tokens(H, W, n_win)
    R = n_win * n_win
    qf, kf, vf = q.reshape(B, H * W, -1), k.reshape(B, H * W, -1), v.reshape(B, H * W, heads, -1)
    onehot = torch.nn.functional.one_hot(region, R).to(q.dtype)  # [N, R]
    q_r = onehot.T @ qf / onehot.sum(0)[:, None]  # region means over all heads' channels
    k_r = onehot.T @ kf / onehot.sum(0)[:, None]
    routed = torch.topk((q_r * routing_scale) @ k_r.transpose(1, 2), topk, dim=-1).indices  # [B, R, topk]
    allowed = torch.zeros(B, R, R, dtype=torch.bool)
    allowed.scatter_(2, routed, True)
    mask = allowed[:, region][:, :, region]  # [B, N, N]: query token's region routed to key token's region
    logits = torch.einsum("bqhd,bkhd->bhqk", q.reshape(B, H * W, heads, D), k.reshape(B, H * W, heads, D)) * scale
    logits = logits.masked_fill(~mask[:, None], float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), vf)
    return out.reshape(B, H, W, heads, -1), routed


@pytest.mark.parametrize("B,H,W,heads,D,Dv,n_win,topk", [
    (2, 6, 9, 3, 5, 7, 3, 4),  # odd region sizes (2x3), Dv != D
    (1, 4, 4, 2, 8, 8, 4, 16),  # 1x1 regions, topk = n_win**2 (full attention)
    (1, 14, 14, 4, 8, 8, 7, 1),  # BiFormer stage-3 layout (2x2 regions), topk 1
    (2, 10, 5, 1, 6, 6, 5, 7),  # non-square map
])
def test_reference_matches_brute_force(B, H, W, heads, D, Dv, n_win, topk):
    q, k, v = _qkv(B, H, W, heads, D, Dv)
    scale, routing_scale = 0.37, 0.11
    expected, routed = _brute_force_bra(q, k, v, n_win, topk, scale, routing_scale)
    index = route_regions(q, k, n_win, topk, routing_scale)
    assert torch.equal(index.sort(-1).values, routed.sort(-1).values)
    assert_rel_l2(bra(q, k, v, n_win, topk, scale=scale, routing_scale=routing_scale, backend="reference"), expected)
    assert_rel_l2(routed_attention(q, k, v, index, n_win, scale, backend="reference"), expected)


def test_routing_uses_all_heads_together():
    """Routing on the full qk vector differs from per-head routing; the index is shared by all heads."""
    torch.manual_seed(1)
    q, k, v = _qkv(1, 8, 8, 4, 8, 8)
    index = route_regions(q, k, 4, 3, 1.0)
    per_head = [route_regions(q[..., h:h + 1, :], k[..., h:h + 1, :], 4, 3, 1.0) for h in range(4)]
    assert any(not torch.equal(index, p) for p in per_head)
    expected, _ = _brute_force_bra(q, k, v, 4, 3, 8 ** -0.5, 8 ** -0.5)
    assert_rel_l2(bra(q, k, v, 4, 3), expected)  # defaults: scale = routing_scale = D**-0.5


def test_default_scale_is_head_dim():
    q, k, v = _qkv(1, 6, 6, 2, 9, 4)
    index = route_regions(q, k, 3, 2, 1.0)
    assert torch.equal(routed_attention(q, k, v, index, 3), routed_attention(q, k, v, index, 3, scale=9 ** -0.5))


def _random_cases(n: int, seed: int = 2024) -> list[tuple]:
    """Random shapes covering n_win 2-8, topk 1..n_win**2, regions 1x1..8x8, head dims 8-64, fp32/fp16;
    kept small enough (programs x key tiles) for the interpreter."""
    rng = random.Random(seed)
    cases: list[tuple] = [
        (1, 14, 14, 2, 32, 32, 7, 16, torch.float16, False),  # BiFormer stage 3: 2x2 regions, topk 16
        (1, 16, 16, 1, 16, 16, 2, 4, torch.float32, True),  # 8x8 regions, topk = n_win**2
        (1, 8, 8, 2, 8, 24, 8, 5, torch.float32, False),  # 1x1 regions, head dim 8, Dv != D
    ]
    while len(cases) < n:
        n_win = rng.randint(2, 8)
        rh, rw = rng.randint(1, 8), rng.randint(1, 8)
        T, R = rh * rw, n_win * n_win
        topk = rng.randint(1, R)
        B, heads = rng.randint(1, 2), rng.randint(1, 3)
        cost = B * heads * R * -(-T // 16) * -(-topk * T // 64)
        if cost > 100:
            continue
        D = rng.choice([8, 12, 16, 24, 32, 48, 64])
        Dv = D if rng.random() < 0.6 else rng.choice([8, 16, 20, 32])
        dtype = rng.choice([torch.float32, torch.float16])
        cases.append((B, n_win * rh, n_win * rw, heads, D, Dv, n_win, topk, dtype, rng.random() < 0.5))
    return cases


def _check_against_reference(B, H, W, heads, D, Dv, n_win, topk, dtype, deterministic, device="cpu",
                             index=None, tol=None):
    q, k, v = _qkv(B, H, W, heads, D, Dv, dtype=dtype, device=device)
    grad = torch.randn(B, H, W, heads, Dv, dtype=dtype, device=device)
    index = route_regions(q, k, n_win, topk, 1.0) if index is None else index
    scale = D ** -0.5
    inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = routed_attention(*inputs, index, n_win, scale, backend="triton", deterministic=deterministic)
    out.backward(grad)
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = routed_attention(*ref_inputs, index, n_win, scale, backend="reference")
    ref.backward(grad.double())
    assert out.dtype == dtype
    assert_rel_l2(out, ref, tol, name="out")
    for name, x, x_ref in zip("qkv", inputs, ref_inputs):
        assert_rel_l2(x.grad, x_ref.grad, tol, name=f"d{name}")


@pytest.mark.triton_interpret
@pytest.mark.parametrize("case", _random_cases(22), ids=lambda c: "B{}_{}x{}_h{}_d{}-{}_nw{}_k{}_{}_{}".format(
    *c[:8], str(c[8])[6:], "det" if c[9] else "atomic"))
def test_triton_matches_reference(case):
    _check_against_reference(*case)


@pytest.mark.triton_interpret
def test_triton_repeated_regions_in_index():
    """A region listed twice counts twice, in the kernel as in the reference."""
    index = torch.tensor([[[0, 0], [3, 1], [2, 2], [1, 3]]])
    for deterministic in (False, True):
        _check_against_reference(1, 6, 4, 2, 16, 16, 2, 2, torch.float32, deterministic, index=index)


@pytest.mark.triton_interpret
def test_triton_strided_inputs():
    """q, k, v as views into one fused qkv projection (BiFormer's layout), not contiguous."""
    qkv = torch.randn(1, 8, 12, 2, 48)
    q, k, v = (t.requires_grad_() for t in qkv.split([16, 16, 16], dim=-1))
    index = route_regions(q, k, 4, 3, 1.0)
    out = routed_attention(q, k, v, index, 4, backend="triton")
    out.sum().backward()
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = routed_attention(*ref_inputs, index, 4, backend="reference")
    ref.sum().backward()
    assert_rel_l2(out, ref)
    for x, x_ref in zip((q, k, v), ref_inputs):
        assert_rel_l2(x.grad, x_ref.grad)


@pytest.mark.triton_interpret
def test_triton_outputs_fully_written(monkeypatch):
    """Outputs and gradients are allocated NaN-poisoned: every element must be written by the kernels."""
    from attnzoo.kernels import bra_triton

    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(bra_triton.torch, "empty", lambda *a, **kw: poison_(empty(*a, **kw)))
    monkeypatch.setattr(bra_triton.torch, "empty_like",
                        lambda t, **kw: (empty_like(t, **kw) if kw.get("device") == "meta"
                                         else poison_(empty_like(t, **kw))))
    for deterministic in (False, True):
        _check_against_reference(1, 10, 15, 2, 16, 8, 5, 3, torch.float32, deterministic)


@pytest.mark.triton_interpret
def test_deterministic_mode_selected_and_bit_identical(monkeypatch):
    """deterministic=True or torch.use_deterministic_algorithms selects the inverted-index backward,
    whose gradients are bit-identical across runs; deterministic=False the fp32-atomics one."""
    from attnzoo.kernels import bra_triton

    calls = []
    invert = bra_triton.invert_region_index
    monkeypatch.setattr(bra_triton, "invert_region_index", lambda *a: calls.append(1) or invert(*a))
    q, k, v = _qkv(1, 12, 12, 2, 16, 16, dtype=torch.float32)
    index = route_regions(q, k, 3, 4, 1.0)

    def grads(**kw):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        routed_attention(*inputs, index, 3, backend="triton", **kw).square().sum().backward()
        return [t.grad for t in inputs]

    grads(deterministic=False)
    assert not calls, "fast mode must not build the inverted index"
    first = grads(deterministic=True)
    assert calls
    calls.clear()
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        second = grads()
    finally:
        torch.use_deterministic_algorithms(prev)
    assert calls, "torch.use_deterministic_algorithms(True) must select the deterministic backward"
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_invert_region_index():
    from attnzoo.kernels.bra_triton import invert_region_index

    index = torch.tensor([[[2, 0], [2, 1], [0, 2]]])  # 3 query regions, top-2 each
    inv_q, inv_start = invert_region_index(index)
    assert inv_start.tolist() == [[0, 2, 3, 6]]
    assert inv_q.tolist() == [[0, 2, 1, 0, 1, 2]]


@pytest.mark.triton_interpret
def test_triton_custom_op_opcheck():
    """Schema, fake kernel and autograd registration of the custom ops (torch.library.opcheck)."""
    q, k, v = (t.requires_grad_() for t in _qkv(1, 4, 4, 1, 8, 8, dtype=torch.float32))
    index = route_regions(q, k, 2, 2, 1.0).to(torch.int32)
    torch.library.opcheck(torch.ops.attnzoo.routed_attention_fwd.default, (q, k, v, index, 2, 0.5, False),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.triton_interpret
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compile_fullgraph(backend):
    """bra compiles without graph breaks (aot_eager: dynamo + fake kernels + autograd on CPU)."""
    torch._dynamo.reset()
    q, k, v = _qkv(1, 8, 8, 2, 16, 16, dtype=torch.float32)
    fn = torch.compile(lambda q, k, v: bra(q, k, v, 4, 3, backend=backend), fullgraph=True, backend="aot_eager")
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fn(*inputs)
    out.sum().backward()
    ref_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = bra(*ref_inputs, 4, 3, backend="reference")
    ref.sum().backward()
    assert_rel_l2(out, ref)
    for x, x_ref in zip(inputs, ref_inputs):
        assert_rel_l2(x.grad, x_ref.grad)


def _bad(**kw):
    args = dict(q=torch.randn(1, 8, 8, 2, 16), k=torch.randn(1, 8, 8, 2, 16), v=torch.randn(1, 8, 8, 2, 16),
                n_win=4, topk=3)
    args.update(kw)
    return args


@pytest.mark.parametrize("kwargs,exc,match", [
    (_bad(n_win=3), ValueError, r"H and W must be divisible by n_win=3, got H=8, W=8"),
    (_bad(topk=17), ValueError, r"topk must be an int in \[1, n_win\*\*2\] = \[1, 16\], got 17"),
    (_bad(topk=0), ValueError, r"topk must be an int in \[1, n_win\*\*2\]"),
    (_bad(n_win=0), ValueError, r"n_win must be a positive int, got 0"),
    (_bad(k=torch.randn(1, 8, 8, 2, 8)), ValueError, r"k must have q's shape \(1, 8, 8, 2, 16\)"),
    (_bad(v=torch.randn(1, 8, 4, 2, 16)), ValueError, r"v must be \[B, H, W, heads, Dv\]"),
    (_bad(q=torch.randn(8, 8, 2, 16)), ValueError, r"q must be \[B, H, W, heads, head_dim\] \(5-D\)"),
    (_bad(v=torch.randn(1, 8, 8, 2, 16, dtype=torch.float64)), TypeError,
     r"v must have q's dtype torch.float32, got torch.float64"),
    (_bad(q=torch.ones(1, 8, 8, 2, 16, dtype=torch.int32)), TypeError, r"q must be a floating-point tensor"),
    (_bad(scale=-1.0), ValueError, r"scale must be None or a positive float, got -1.0"),
    (_bad(routing_scale=0), ValueError, r"routing_scale must be None or a positive float"),
    (_bad(backend="cuda"), ValueError, r"backend must be one of"),
])
def test_bra_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        bra(**kwargs)


@pytest.mark.parametrize("index,exc,match", [
    (torch.zeros(1, 16, 3, dtype=torch.float32), TypeError, r"region_index must be an int32/int64 tensor"),
    (torch.zeros(1, 9, 3, dtype=torch.long), ValueError,
     r"region_index must be \[B, n_win\*\*2, topk\] = \[1, 16, 1..16\]"),
    (torch.zeros(1, 16, 17, dtype=torch.long), ValueError, r"region_index must be \[B, n_win\*\*2, topk\]"),
    (torch.full((1, 16, 2), 16), RuntimeError, r"region_index values must be in \[0, n_win\*\*2\) = \[0, 16\)"),
    (torch.full((1, 16, 2), -1), RuntimeError, r"region_index values must be in \[0, n_win\*\*2\)"),
])
def test_routed_attention_index_errors(index, exc, match):
    q = torch.randn(1, 8, 8, 2, 16)
    with pytest.raises(exc, match=match):
        routed_attention(q, q, q, index, 4)


@pytest.mark.triton_interpret
def test_triton_backend_errors():
    q = torch.randn(1, 8, 8, 2, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"backend='triton' supports dtypes"):
        bra(q, q, q, 4, 2, backend="triton")
    q = torch.randn(1, 8, 8, 2, 4)
    with pytest.raises(ValueError, match=r"needs q/k head dim in \[8, 128\], got 4"):
        bra(q, q, q, 4, 2, backend="triton")


# --- GPU -------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("case", [
    (2, 56, 56, 2, 32, 32, 7, 1),  # BiFormer-S stage 1
    (2, 28, 28, 4, 32, 32, 7, 4),  # stage 2
    (4, 14, 14, 8, 32, 32, 7, 16),  # stage 3
    (1, 7, 7, 16, 32, 32, 7, 49),  # stage 4: 1x1 regions, full attention
    (1, 128, 128, 4, 64, 64, 8, 8),  # detection-size map, 16x16 regions
    (1, 64, 96, 2, 128, 128, 16, 20),  # head dim 128, 4x6 regions on a 16x16 grid
    (2, 24, 24, 3, 8, 40, 4, 7),  # head dim 8, Dv != D
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_matches_reference(case, dtype, deterministic):
    tol = TF32_REL_L2_TOL if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else None
    _check_against_reference(*case, dtype, deterministic, device="cuda", tol=tol)


@pytest.mark.gpu
def test_gpu_deterministic_bit_identical():
    q, k, v = _qkv(8, 28, 28, 4, 32, 32, dtype=torch.bfloat16, device="cuda")
    grad = torch.randn_like(v)

    def grads(deterministic):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        bra(*inputs, 7, 4, backend="triton", deterministic=deterministic).backward(grad)
        return [t.grad for t in inputs]

    first, second = grads(True), grads(True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    for a, b in zip(first, grads(False)):
        assert_rel_l2(b, a.float(), tol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_cuda_graph_replay_matches_eager(deterministic):
    """Routing, forward and backward (the inverted index's sort included) capture as one CUDA graph and replay
    to eager's numbers on new inputs: no host sync left in ``routed_attention``."""
    q, k, v = (t.requires_grad_() for t in _qkv(2, 28, 28, 4, 32, 32, dtype=torch.bfloat16, device="cuda"))
    check_cuda_graph_replay(lambda q, k, v: bra(q, k, v, 7, 4, backend="triton", deterministic=deterministic),
                            [q, k, v], None if deterministic else (1e-2,) * 4)


@pytest.mark.gpu
def test_gpu_compile_inductor():
    torch._dynamo.reset()
    q, k, v = _qkv(2, 28, 28, 4, 32, 32, dtype=torch.bfloat16, device="cuda")
    fn = torch.compile(lambda q, k, v: bra(q, k, v, 7, 4), fullgraph=True)
    assert_rel_l2(fn(q, k, v), bra(q.double(), k.double(), v.double(), 7, 4, backend="reference"))


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [True, False])
def test_gpu_compiled_model_launches_kernels_itself(deterministic):
    """Under torch.compile the routed-attention ops are triton_ops: Inductor launches the kernels from its own
    code (no opaque ``attnzoo.routed_attention_*`` call), routing included in the graph, a third batch size does
    not recompile, and the numbers are eager's."""
    def make_inputs(batch):
        return [t.requires_grad_() for t in _qkv(batch, 28, 28, 4, 32, 32, dtype=torch.bfloat16, device="cuda")]

    kernels = ("_bra_fwd_kernel", "_bra_bwd_dq_kernel") + (("_bra_bwd_dkdv_kernel",) if deterministic else ())
    # dk/dv with atomics sum in a run-dependent order
    tols = (1e-4, 1e-4) + ((1e-4, 1e-4) if deterministic else (1e-2, 1e-2))
    check_compiled_launches_kernels(
        lambda q, k, v: bra(q, k, v, 7, 4, backend="triton", deterministic=deterministic), make_inputs, (2, 3, 5),
        kernels, "routed_attention", tols)


@pytest.mark.gpu
def test_gpu_memory_independent_of_topk():
    """Forward+backward peak memory of the fused path does not grow with topk."""
    q, k, v = (t.requires_grad_() for t in _qkv(2, 64, 64, 4, 32, 32, dtype=torch.bfloat16, device="cuda"))
    peaks = []
    for topk in (1, 16):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        bra(q, k, v, 8, topk, backend="triton").sum().backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        q.grad = k.grad = v.grad = None
    assert peaks[1] <= peaks[0] * 1.05 + 2**20, peaks


_FP64_SCALE_SCRIPT = r"""
import inspect
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from attnzoo.kernels import bra_triton as bt

ptrs = {"Lse": "*fp32", "Delta": "*fp32", "DKacc": "*fp32", "DVacc": "*fp32", "Idx": "*i64", "InvQ": "*i64",
        "InvStart": "*i32", **dict.fromkeys(("Q", "K", "V", "O", "Out", "DO", "DQ", "DK", "DV_"), "*bf16")}
for fn, extra in ((bt._bra_fwd_kernel, {}), (bt._bra_bwd_dq_kernel, {"ATOMIC_DKDV": False}),
                  (bt._bra_bwd_dkdv_kernel, {})):
    consts = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=32, BLOCK_DV=32, PRECISION="tf32", **extra)
    names = list(inspect.signature(fn.fn).parameters)
    sig = {n: "constexpr" if n in consts else "fp64" if "scale" in n else
           ptrs.get(n, "i32") for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=2))
print("compiled")
"""


def test_kernels_compile_with_fp64_scales():
    """A compiled model (the triton op under torch.compile) hands the kernels unspecialised Python floats as
    fp64 scalars; the kernels must still compile for sm_90 (no GPU needed, but not under the interpreter)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, "-c", _FP64_SCALE_SCRIPT], cwd=Path(__file__).parents[1], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip() == "compiled", res.stderr[-3000:]
