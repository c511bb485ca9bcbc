"""The shared op mechanism (attnzoo/kernels/_op.py) as every kernel op uses it: one backend vocabulary,
one error contract, one bfloat16 policy under Triton's interpreter, eager calls without custom-op
dispatch, the export rule, and the launch count of na2d's fused path."""
from __future__ import annotations

import pytest
import torch

from attnzoo.blocks import set_attention_backend
from attnzoo.kernels import _op, bra, na2d, partitioned_attention
from attnzoo.kernels.bra_reference import route_regions
from tests.helpers import RecordOps, assert_rel_l2


def _qkv(shape, dtype=torch.float32, requires_grad=False):
    return [torch.randn(shape, dtype=dtype, requires_grad=requires_grad) for _ in range(3)]


OPS = {  # op name -> call(q, k, v, backend) on a [1, 8, 8, 2, 16] map
    "na2d": lambda q, k, v, backend: na2d(q, k, v, 3, 2, backend=backend),
    "bra": lambda q, k, v, backend: bra(q, k, v, 4, 2, backend=backend),
    "partitioned_attention": lambda q, k, v, backend: partitioned_attention(q, k, v, 4, backend=backend),
}


@pytest.mark.triton_interpret
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", _op.BACKENDS)
def test_every_op_takes_every_backend_name(op, backend):
    """One vocabulary: each op runs each name and computes the same function."""
    q, k, v = _qkv((1, 8, 8, 2, 16))
    ref = OPS[op](*(t.double() for t in (q, k, v)), "reference")
    assert_rel_l2(OPS[op](q, k, v, backend), ref, 1e-5, name=f"{op} {backend}")


@pytest.mark.parametrize("op", OPS)
def test_unknown_backend_names_the_choices(op):
    q, k, v = _qkv((1, 8, 8, 2, 16))
    with pytest.raises(ValueError, match=rf"{op}: backend must be one of \('auto', 'triton', 'dense', 'reference'\), "
                                         r"got 'flex'"):
        OPS[op](q, k, v, "flex")


def test_set_attention_backend_checks_the_name():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert set_attention_backend(model, "dense") is model
    with pytest.raises(ValueError, match=r"set_attention_backend: backend must be one of .* got 'sdpa'"):
        set_attention_backend(model, "sdpa")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("mutate,exc,match", [
    (lambda q, k, v: (q, k[:, :4], v), ValueError, r"k must have q's shape \(1, 8, 8, 2, 16\), got \(1, 4, 8, 2, 16\)"),
    (lambda q, k, v: (q, k, v.double()), TypeError, r"v must have q's dtype torch.float32, got torch.float64"),
    (lambda q, k, v: (q[0], k, v), ValueError, r"q must be \[B, H, W, heads, head_dim\] \(5-D\), got shape"),
    (lambda q, k, v: (q.long(), k, v), TypeError, r"q must be a floating-point tensor, got torch.int64"),
    (lambda q, k, v: ([1.0], k, v), TypeError, r"q must be a torch.Tensor, got list"),
])
def test_one_error_contract(op, mutate, exc, match):
    """Every op names itself, the argument and what was expected."""
    with pytest.raises(exc, match=rf"{op}: {match}"):
        OPS[op](*mutate(*_qkv((1, 8, 8, 2, 16))), "auto")


@pytest.mark.triton_interpret
@pytest.mark.parametrize("op", OPS)
def test_bfloat16_under_the_interpreter_computes_in_float32(op):
    """The interpreter has no bfloat16 arithmetic: na2d returned garbage (relative error ~1e9) and bra
    raised. Every op now computes in float32 there and returns bfloat16, gradients included."""
    q, k, v = (t.bfloat16().requires_grad_() for t in _qkv((1, 8, 8, 2, 16)))
    out = OPS[op](q, k, v, "triton")
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = OPS[op](*ref_in, "reference")
    assert out.dtype == torch.bfloat16
    assert_rel_l2(out, ref, 1e-2)
    dout = torch.randn_like(ref)
    for g, rg in zip(torch.autograd.grad(out, (q, k, v), dout.bfloat16()), torch.autograd.grad(ref, ref_in, dout)):
        assert g.dtype == torch.bfloat16
        assert_rel_l2(g, rg, 2e-2)


def test_auto_takes_the_reference_while_exporting(monkeypatch):
    """Exported graphs hold standard operators: "auto" resolves to the reference under torch.export/ONNX."""
    cuda = torch.device("cuda")
    if _op.HAS_TRITON:
        assert _op.resolve_backend("na2d", "auto", cuda, lambda: "triton") == "triton"
    monkeypatch.setattr(torch.compiler, "_is_exporting_flag", True)  # what torch.export sets while tracing
    assert _op.resolve_backend("na2d", "auto", cuda, lambda: "triton") == "reference"
    assert _op.resolve_backend("na2d", "auto", torch.device("cpu"), lambda: "triton") == "reference"


@pytest.mark.skipif(not _op.HAS_TRITON, reason="needs the triton package")
def test_auto_keeps_the_fused_kernels_under_torch_compile(monkeypatch):
    """torch.compile is not an export: "auto" resolves to the fused kernels there. torch 2.11's Dynamo folds
    ``torch.compiler.is_exporting()`` to True under every compile, which sent compiled NAT/DiNAT/BiFormer to the
    reference path (5x slower); ``is_exporting`` is patched to answer as that Dynamo did."""
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: torch.compiler.is_dynamo_compiling())

    def route(x):
        return x + (1 if _op.resolve_backend("na2d", "auto", torch.device("cuda"), lambda: "triton") == "triton" else 0)

    assert torch.compile(route, backend="eager", fullgraph=True)(torch.zeros(1)).item() == 1


def test_export_flag_seen_by_strict_and_non_strict_export():
    """Both torch.export modes set the flag ``exporting`` reads (a changed torch would fail here first)."""
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            return x + (1 if _op.exporting() else 0)

    for strict in (False, True):
        ep = torch.export.export(Probe(), (torch.zeros(2),), strict=strict)
        seen.append(ep.module()(torch.zeros(2))[0].item())
    assert seen == [1, 1]


@pytest.mark.triton_interpret
@pytest.mark.parametrize("op", OPS)
def test_eager_calls_skip_custom_op_dispatch(op):
    """Eager forward+backward runs the autograd.Function, not the attnzoo:: custom ops (their Python
    dispatch was the backward's host floor); torch.compile still sees the custom ops."""
    q, k, v = _qkv((1, 8, 8, 2, 16), requires_grad=True)
    with RecordOps() as seen:
        OPS[op](q, k, v, "triton").sum().backward()
    assert not [o for o in seen.ops if o.startswith("attnzoo.")], seen.ops
    assert torch.isfinite(q.grad).all()


def test_bra_routing_has_no_host_sync():
    """routed_attention checks index values on the device; nothing reads a value back to the host."""
    q, k, v = _qkv((2, 8, 8, 2, 16))
    index = route_regions(q, k, 4, 2, 0.25)
    from attnzoo.kernels import routed_attention

    with RecordOps() as seen:
        routed_attention(q, k, v, index, 4)
        bra(q, k, v, 4, 2)
    assert "aten._local_scalar_dense" not in seen.ops and "aten.item" not in seen.ops, seen.ops


class _CountLaunches:
    """Stands in for a Triton kernel object and counts ``kernel[grid](...)`` launches."""

    def __init__(self, kernel, counts: list):
        self.kernel, self.counts = kernel, counts

    def __getitem__(self, grid):
        self.counts.append(grid)
        return self.kernel[grid]


@pytest.mark.triton_interpret
@pytest.mark.parametrize("rpb_grad", [False, True])
def test_na2d_launches_one_forward_and_two_backward_kernels(monkeypatch, rpb_grad):
    from attnzoo.kernels import na2d_triton

    launches = {name: [] for name in ("_FWD", "_DQ", "_DKDV")}  # each kernel's Launcher
    for name, counts in launches.items():
        launcher = getattr(na2d_triton, name)
        monkeypatch.setattr(launcher, "fn", _CountLaunches(launcher.fn, counts))
    q, k, v = _qkv((1, 9, 10, 2, 16), requires_grad=True)
    rpb = torch.randn(2, 5, 5, requires_grad=rpb_grad)
    na2d(q, k, v, 3, 2, rpb, backend="triton").sum().backward()
    assert {n: len(c) for n, c in launches.items()} == dict.fromkeys(launches, 1)
    assert (rpb.grad is not None) == rpb_grad


@pytest.mark.triton_interpret
@pytest.mark.parametrize("op", ["na2d", "bra", "partitioned_attention"])
def test_backward_ops_match_their_fake_kernels(op):
    """Under torch.compile inductor asserts each custom op's output sizes and strides against its fake
    kernel; the backward ops' outputs must match them (na2d's d_rpb was a strided slice)."""
    from attnzoo.kernels.bra import _bra_triton
    from attnzoo.kernels.na2d import _na2d_triton
    from attnzoo.kernels.partitioned_attention import _pa_triton

    q, k, v = _qkv((1, 8, 8, 2, 16))
    fused, tensors, config = {
        "na2d": (_na2d_triton, (q, k, v, torch.randn(2, 5, 5)), ([3, 3], [2, 1], 0.25)),
        "bra": (_bra_triton, (q, k, v, route_regions(q, k, 4, 2, 0.25)), (4, 0.25, True)),
        "partitioned_attention": (_pa_triton, (q, k, v, torch.randn(2, 7, 7)), (4, 4, False, 1, 2, 0.25)),
    }[op]
    out, *aux = fused.fwd_op(*tensors, *config)
    args = (torch.randn_like(out), *tensors, out, *aux, *config, [True, True, True, op != "bra"])
    torch.library.opcheck(fused.bwd_op, args, test_utils=("test_schema", "test_faketensor"))


class _FakeCompiledKernel:
    """Stands in for Triton's CompiledKernel: ``kernel[grid](*every_parameter)`` launches directly."""

    function = None

    def __init__(self, calls: list):
        self.calls = calls

    def __getitem__(self, grid):
        grid = (grid[0], grid[1], grid[2])  # as Triton's CompiledKernel reads it: no 1-D or 2-D grids
        return lambda *args: self.calls.append(("direct", grid, args))


class _FakeJitFunction:
    """Stands in for a JITFunction: every ``fn[grid](*args, **meta)`` binds, 'compiles' and launches."""

    def __init__(self):
        def kernel(X, n, scale, BLOCK, FLAG=True):  # the last two stand for constexprs
            pass

        self.fn, self.calls = kernel, []

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.calls.append(("jit", grid, args, meta))
            return _FakeCompiledKernel(self.calls)
        return run


def test_launcher_reuses_a_compiled_kernel_only_for_the_same_specialization(monkeypatch):
    """The second call of a specialization skips the JIT and hands the compiled kernel every parameter in
    order (constexprs from the call, then defaults); a different alignment, integer, constexpr or launch
    option goes through the JIT again; under the interpreter every call does."""
    monkeypatch.setattr(_op, "triton_interpret_enabled", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    jit = _FakeJitFunction()
    launch = _op.Launcher(jit)
    x = torch.zeros(64)
    calls = [((4,), (x, 3, 0.5), dict(BLOCK=16, num_warps=4)),
             ((4,), (x, 3, 0.5), dict(BLOCK=16, num_warps=4)),  # same key: direct
             ((4,), (x[1:], 3, 0.5), dict(BLOCK=16, num_warps=4)),  # 4-byte offset: not 16-byte aligned
             ((4,), (x, 5, 0.5), dict(BLOCK=16, num_warps=4)),  # another integer
             ((4,), (x, 3, 0.5), dict(BLOCK=32, num_warps=4)),  # another constexpr
             ((4,), (x, 3, 0.5), dict(BLOCK=16, num_warps=8)),  # another launch option
             ((2,), (x[16:], 3, 0.5), dict(BLOCK=16, num_warps=4))]  # aligned view, new grid: direct
    for grid, args, meta in calls:
        launch(grid, *args, **meta)
    assert [c[0] for c in jit.calls] == ["jit", "direct", "jit", "jit", "jit", "jit", "direct"]
    assert jit.calls[1][1:] == ((4, 1, 1), (x, 3, 0.5, 16, True))
    assert jit.calls[6][1] == (2, 1, 1) and jit.calls[6][2][0].data_ptr() == x[16:].data_ptr()

    monkeypatch.setattr(_op, "triton_interpret_enabled", lambda: True)
    interpreted = _op.Launcher(_FakeJitFunction())
    for _ in range(2):
        interpreted((4,), x, 3, 0.5, BLOCK=16)
    assert [c[0] for c in interpreted.fn.calls] == ["jit", "jit"]


_TRACE_SCRIPT = """
import importlib
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from attnzoo.kernels import partitioned_attention_triton as PT
from attnzoo.kernels.partitioned_attention_reference import relative_index
bra = importlib.import_module("attnzoo.kernels.bra")
pa = importlib.import_module("attnzoo.kernels.partitioned_attention")

def bra_step(q, k, v, idx, dout):
    out, lse = bra._forward(q, k, v, idx, 4, 0.2, True)
    return bra._backward(dout, q, k, v, idx, out, lse, 4, 0.2, True, [True] * 4)

def pa_step(q, k, v, rpb, dout):
    out, lse, bias = pa._forward(q, k, v, rpb, 7, 7, False, 3, 3, 0.2)
    return pa._backward(dout, q, k, v, rpb, out, lse, bias, 7, 7, False, 3, 3, 0.2, [True] * 4)

def report(name, fused, step, q, extra):
    gm = make_fx(step, tracing_mode="symbolic")(q, q.clone(), q.clone(), extra, q.clone())
    launches = [n for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    val = next(n for n in gm.graph.nodes if n.op == "placeholder").meta["val"]
    batch = val.shape[0].node.expr
    guards = [g.expr for g in val.fake_mode.shape_env.guards]
    print(name, fused.inductor_launches, len(launches),
          sum(isinstance(n.kwargs["grid"][0][0], torch.fx.Node) for n in launches),
          sum(batch in g.free_symbols for g in guards))

q = torch.empty(3, 8, 12, 2, 32, dtype=torch.bfloat16, device="meta")
report("bra", bra._bra_triton, bra_step, q, torch.empty(3, 16, 5, dtype=torch.int64, device="meta"))
q = torch.empty(3, 14, 21, 2, 32, dtype=torch.bfloat16, device="meta")
report("partitioned_attention", pa._pa_triton, pa_step, q, torch.empty(2, 13, 13, device="meta"))
print("caches", PT._tile_index.cache_info().currsize + relative_index.cache_info().currsize)
"""


def test_compiled_bra_and_partitioned_attention_trace_to_kernel_launches():
    """What Inductor sees of the compiled bra and partitioned-attention ops (triton_op), traced on CPU with
    symbolic shapes: forward + deterministic backward become their kernel launches (bra: forward, dq, dk/dv;
    partitioned attention: forward, one fused backward) with grids symbolic in the batch size and no guard on
    it (partitioned attention picks its partitions per backward program from the traced batch size without
    guarding on it), and the
    bias-tile index is built in the graph, not cached. Needs compiled kernels: a process without the
    interpreter, as na2d's test in test_na2d.py."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, "-c", _TRACE_SCRIPT], cwd=Path(__file__).parents[1], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = dict(line.split(" ", 1) for line in res.stdout.strip().splitlines())
    # name: inductor_launches, launches, symbolic grids, guards on the batch size
    assert got == {"bra": "True 3 3 0", "partitioned_attention": "True 2 2 0", "caches": "0"}, got
