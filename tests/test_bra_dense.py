"""BRA's dense backend (masked SDPA over all tokens), the auto rules and the routing cost."""
from __future__ import annotations

import importlib
import random

import pytest
import torch

from attnzoo.kernels import bra, routed_attention
from attnzoo.kernels.bra import auto_backend, choose_deterministic, dense_predicted_faster
from attnzoo.kernels.bra_dense import routing_bias
from attnzoo.kernels.bra_reference import route_regions
from tests.helpers import RecordOps, assert_rel_l2
from tests.test_bra import _brute_force_bra, _qkv, _region_of_tokens

bra_module = importlib.import_module("attnzoo.kernels.bra")  # the module; attnzoo.kernels.bra is the function


def _random_dense_cases(n: int, seed: int = 7) -> list[tuple]:
    """n_win 1-6, regions 1x1..5x5 (odd, non-square), topk 1..n_win**2 with n_win**2 at least once."""
    rng = random.Random(seed)
    cases = [(2, 6, 9, 3, 5, 7, 3, 9), (1, 14, 14, 2, 8, 8, 7, 49), (1, 5, 5, 1, 4, 4, 1, 1)]
    while len(cases) < n:
        n_win, rh, rw = rng.randint(1, 6), rng.randint(1, 5), rng.randint(1, 5)
        topk = rng.randint(1, n_win * n_win)
        D = rng.choice([3, 8, 16])
        Dv = D if rng.random() < 0.5 else rng.choice([5, 8])
        cases.append((rng.randint(1, 3), n_win * rh, n_win * rw, rng.randint(1, 3), D, Dv, n_win, topk))
    return cases


@pytest.mark.parametrize("case", _random_dense_cases(12), ids=lambda c: "B{}_{}x{}_h{}_d{}-{}_nw{}_k{}".format(*c))
def test_dense_matches_brute_force_fwd_and_grads(case):
    """fp32 dense path vs float64 masked brute force: output and dq, dk, dv."""
    B, H, W, heads, D, Dv, n_win, topk = case
    q, k, v = (t.float() for t in _qkv(B, H, W, heads, D, Dv))
    grad = torch.randn(B, H, W, heads, Dv)
    scale, routing_scale = 0.41, 0.2
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = bra(*inputs, n_win, topk, scale=scale, routing_scale=routing_scale, backend="dense")
    out.backward(grad)
    ref_inputs = [t.double().requires_grad_() for t in (q, k, v)]
    ref, _ = _brute_force_bra(*ref_inputs, n_win, topk, scale, routing_scale)
    ref.backward(grad.double())
    assert out.dtype == torch.float32
    assert_rel_l2(out, ref, name="out")
    for name, x, x_ref in zip("qkv", inputs, ref_inputs):
        assert_rel_l2(x.grad, x_ref.grad, name=f"d{name}")


def test_dense_repeated_regions_count_twice():
    """A region listed twice in a user index counts its keys twice, as in the gather reference."""
    q, k, v = _qkv(2, 6, 4, 2, 8, 8)
    index = torch.tensor([[[0, 0], [3, 1], [2, 2], [1, 3]], [[1, 1], [1, 1], [0, 3], [2, 0]]])
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = routed_attention(*inputs, index, 2, backend="dense")
    out.square().sum().backward()
    ref_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = routed_attention(*ref_inputs, index, 2, backend="reference")
    ref.square().sum().backward()
    assert_rel_l2(out, ref)
    for x, x_ref in zip(inputs, ref_inputs):
        assert_rel_l2(x.grad, x_ref.grad)


def test_routing_bias_entries():
    """bias[b, 0, n, m] = log(times region(m) is listed for region(n)), -inf if never; padded rows."""
    B, H, W, n_win, topk = 2, 6, 9, 3, 4
    index = torch.randint(0, n_win * n_win, (B, n_win * n_win, topk))
    bias = routing_bias(index, n_win, H, W, torch.float32)
    assert bias.shape == (B, 1, H * W, H * W) and bias.stride(-2) % 16 == 0 and bias.stride(-1) == 1
    region = _region_of_tokens(H, W, n_win)
    counts = (index[:, region][:, :, None, :] == region[None, None, :, None]).sum(-1)  # [B, N, N]
    assert torch.equal(bias[:, 0], counts.float().log())


def test_dense_strided_qkv_views():
    """q, k, v as slices of one fused qkv tensor (BiFormer's layout) go to SDPA without copies."""
    qkv = torch.randn(2, 8, 12, 2, 40, dtype=torch.float64)
    q, k, v = (t.requires_grad_() for t in qkv.split([16, 16, 8], dim=-1))
    out = bra(q, k, v, 4, 5, backend="dense")
    out.sum().backward()
    ref_inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = bra(*ref_inputs, 4, 5, backend="reference")
    ref.sum().backward()
    assert_rel_l2(out, ref)
    for x, x_ref in zip((q, k, v), ref_inputs):
        assert_rel_l2(x.grad, x_ref.grad)


def test_dense_compile_fullgraph():
    torch._dynamo.reset()
    q, k, v = _qkv(1, 8, 8, 2, 16, 16, dtype=torch.float32)
    fn = torch.compile(lambda q, k, v: bra(q, k, v, 4, 3, backend="dense"), fullgraph=True, backend="aot_eager")
    assert_rel_l2(fn(q, k, v), bra(q.double(), k.double(), v.double(), 4, 3, backend="reference"))


@pytest.mark.parametrize("backend", ["reference", "dense"])
def test_inference_mode_then_training(backend):
    """A forward under inference_mode leaves nothing behind that breaks a later training step."""
    q, k, v = _qkv(1, 8, 8, 2, 8, 8, dtype=torch.float32)
    with torch.inference_mode():
        bra(q, k, v, 4, 2, backend=backend)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    bra(*inputs, 4, 2, backend=backend).sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in inputs)


# Metadata-only ops and allocations: no device kernel.
_NO_KERNEL = {"aten.empty", "aten.new_empty", "aten.view", "aten.unflatten", "aten.transpose", "aten.reshape",
              "aten._unsafe_view", "aten.expand", "aten.promote_types"}


def test_routing_and_bias_are_few_ops_without_host_sync():
    """Routing is two region sums, one product and the top-k; the dense path adds the bias (fill,
    scatter-add, log, broadcast copy) and SDPA; no .item()-style host sync anywhere."""
    qkv = torch.randn(2, 14, 14, 4, 24)
    q, k, v = qkv.split(8, dim=-1)
    with RecordOps() as routing:
        route_regions(q, k, 7, 4, 0.3)
    compute = [op for op in routing.ops if op not in _NO_KERNEL]
    assert compute == ["aten.sum", "aten.sum", "aten.baddbmm", "aten.topk"], routing.ops
    with RecordOps() as whole:
        bra(q, k, v, 7, 4, backend="dense")
    assert "aten._local_scalar_dense" not in whole.ops and "aten.item" not in whole.ops, whole.ops


def test_dense_rule():
    """Dense iff the B*N^2 bias fits and N <= ratio * routed keys (tiny regions weighted), on the measured
    H200 shapes of the module doc."""
    m = bra_module
    assert dense_predicted_faster(128, 14, 14, 7, 16, 2)  # BiFormer-S stage 3: 2x2 regions, 196 vs 64 keys
    assert dense_predicted_faster(128, 20, 20, 10, 16, 2)  # 2x2 regions, 400 vs 64 keys
    assert not dense_predicted_faster(128, 28, 28, 7, 4, 2)  # stage 2: 4x4 regions, 784 vs 64 keys
    assert not dense_predicted_faster(128, 56, 56, 7, 1, 2)  # stage 1
    assert not dense_predicted_faster(8, 128, 128, 8, 8, 2)  # detection-size map
    # Boundary of the ratio, regions of T >= SMALL_REGION_TOKENS (here 3x3 on a 7x7 grid at 21², T = 9).
    N, T = 21 * 21, 9
    topk_min = -(-N // (m.DENSE_KEY_RATIO * T))
    assert dense_predicted_faster(1, 21, 21, 7, topk_min, 2)
    assert not dense_predicted_faster(1, 21, 21, 7, topk_min - 1, 2)
    # Bias cap: the largest batch whose B*N^2 bias fits, and one more.
    big_b = m.DENSE_MAX_BIAS_BYTES // (2 * 196 * 196)
    assert dense_predicted_faster(big_b, 14, 14, 7, 16, 2) and not dense_predicted_faster(big_b + 1, 14, 14, 7, 16, 2)


def test_auto_backend_off_cuda_and_errors():
    q, k, v = _qkv(1, 14, 14, 2, 8, 8, dtype=torch.float32)
    assert torch.equal(bra(q, k, v, 7, 4), bra(q, k, v, 7, 4, backend="reference"))  # the rule is CUDA-only
    assert auto_backend(torch.empty(128, 14, 14, 8, 32, dtype=torch.bfloat16, device="meta"), 7, 16) == "dense"
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'dense', 'reference'\)"):
        bra(q, k, v, 7, 4, backend="flex")


def test_deterministic_rule():
    assert bra_module.DETERMINISTIC_MIN_REGION_TOKENS == 0  # the inverted index measured faster everywhere
    assert choose_deterministic(None, 1) and choose_deterministic(None, 4096)
    assert choose_deterministic(True, 4) and not choose_deterministic(False, 4096)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert choose_deterministic(False, 4) and choose_deterministic(None, 4)
    finally:
        torch.use_deterministic_algorithms(prev)


@pytest.mark.triton_interpret
def test_triton_auto_mode_picks_inverted_index_for_large_regions(monkeypatch):
    """deterministic=None: the inverted-index backward runs for regions of >= the threshold's tokens only."""
    from attnzoo.kernels import bra_triton

    calls = []
    invert = bra_triton.invert_region_index
    monkeypatch.setattr(bra_triton, "invert_region_index", lambda *a: calls.append(1) or invert(*a))
    monkeypatch.setattr(bra_module, "DETERMINISTIC_MIN_REGION_TOKENS", 16)
    for H, inverted in ((8, False), (16, True)):  # 2x2 grid on [H, 4]: regions of 8 or 16 tokens
        calls.clear()
        q, k, v = (t.requires_grad_() for t in _qkv(1, H, 4, 1, 8, 8, dtype=torch.float32))
        bra(q, k, v, 2, 2, backend="triton").sum().backward()
        assert bool(calls) == inverted


# --- GPU -------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("case", [
    (8, 14, 14, 8, 32, 32, 7, 16),  # BiFormer-S stage 3
    (4, 28, 28, 4, 32, 32, 7, 4),  # stage 2
    (2, 15, 21, 3, 24, 40, 3, 5),  # odd sizes, Dv != D
])
def test_gpu_dense_bf16(case):
    B, H, W, heads, D, Dv, n_win, topk = case
    q, k, v = _qkv(B, H, W, heads, D, Dv, dtype=torch.bfloat16, device="cuda")
    grad = torch.randn(B, H, W, heads, Dv, dtype=torch.bfloat16, device="cuda")
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = bra(*inputs, n_win, topk, backend="dense")
    out.backward(grad)
    index = route_regions(q, k, n_win, topk, D ** -0.5)
    ref_inputs = [t.double().requires_grad_() for t in (q, k, v)]
    ref = routed_attention(*ref_inputs, index, n_win, backend="reference")
    ref.backward(grad.double())
    assert out.dtype == torch.bfloat16
    assert_rel_l2(out, ref, name="out")
    for name, x, x_ref in zip("qkv", inputs, ref_inputs):
        assert_rel_l2(x.grad, x_ref.grad, name=f"d{name}")


@pytest.mark.gpu
def test_gpu_auto_rule_on_cuda():
    small = torch.empty(128, 14, 14, 8, 32, dtype=torch.bfloat16, device="cuda")
    large = torch.empty(128, 56, 56, 2, 32, dtype=torch.bfloat16, device="cuda")
    assert auto_backend(small, 7, 16) == "dense"
    assert auto_backend(large, 7, 1) == "triton"
