"""Numerical comparison helpers shared by the kernel and model tests.

Tolerances follow the device METHOD: relative L2 error against a float64 reference.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Relative L2 tolerances per dtype of the computation under test.
REL_L2_TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,  # plain fp32 arithmetic (CPU, Triton interpreter)
    torch.float16: 3e-3,
    torch.bfloat16: 1e-2,
}
TF32_REL_L2_TOL = 5e-4  # fp32 tl.dot on a GPU runs tf32 unless told otherwise


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ computed in float64; NaN anywhere gives NaN."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    denom = ref64.norm()
    err = (out64 - ref64).norm()
    return float(err / denom) if denom > 0 else float(err)


def assert_rel_l2(out: torch.Tensor, ref: torch.Tensor, tol: float | None = None, name: str = "output") -> None:
    """Fail unless ``out`` matches ``ref`` in shape, is finite, and is within ``tol`` relative L2 error."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten or overflowed elements)"
    tol = REL_L2_TOL[out.dtype] if tol is None else tol
    err = rel_l2(out, ref)
    assert err <= tol, f"{name}: relative L2 error {err:.3e} > {tol:.1e}"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with NaN (or the integer minimum) so an element the kernel never writes shows up."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(torch.iinfo(t.dtype).min)


class RecordOps(TorchDispatchMode):
    """Records the ATen (and custom) ops that run under it, by name, in ``ops``."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def dense_stack_missing() -> str:
    """Why mmdet/mmseg cannot be imported ('' when they can): the dense tests skip visibly with it."""
    try:  # the whole stack, as the 'dense' extra installs it
        import mmdet.registry  # noqa: F401
        import mmseg.registry  # noqa: F401
    except ImportError as e:  # mmcv without compiled ops also lands here
        return f"mmdet/mmseg not importable ({e}); `make test` installs the 'dense' extra"
    return ""


def check_compiled_launches_kernels(op, make_inputs, batches, kernels: tuple[str, ...], op_name: str,
                                    tols: tuple[float, ...]) -> None:
    """``op(*tensors)`` under ``torch.compile(fullgraph=True)`` against eager, forward and backward, for each
    batch size in ``batches`` (``make_inputs(batch)`` gives the inputs that get gradients): Inductor's
    generated code launches ``kernels`` itself and holds no ``attnzoo.<op_name>`` op, the last batch size
    does not recompile (the batch stays symbolic), and output and gradients match eager to ``tols`` (rel L2,
    one per output then per input)."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    fn = torch.compile(op, fullgraph=True)

    def step(f, inputs, dout):
        out = f(*inputs)
        out.backward(dout)
        return (out, *(t.grad for t in inputs))

    for i, batch in enumerate(batches):
        eager_in = make_inputs(batch)
        comp_in = [t.detach().clone().requires_grad_() for t in eager_in]
        dout = torch.randn_like(op(*eager_in))
        with torch._dynamo.config.patch(error_on_recompile=i == len(batches) - 1):
            got, code = run_and_get_code(step, fn, comp_in, dout)
        want = step(op, eager_in, dout)
        for j, (g, w, tol) in enumerate(zip(got, want, tols, strict=True)):
            assert_rel_l2(g.float(), w.float(), tol, name=f"batch {batch}, output {j}")
        if i == 0:
            code = "\n".join(code)
            for kernel in kernels:
                assert kernel in code, kernel
            assert f"attnzoo.{op_name}" not in code


def check_cuda_graph_replay(op, inputs: list[torch.Tensor], tols: tuple[float, ...] | None = None) -> None:
    """``op(*inputs)``'s forward and backward captured once as a CUDA graph (as ``torch.compile(mode=
    "reduce-overhead")`` or ``torch.cuda.make_graphed_callables`` would), then replayed on fresh values copied
    into ``inputs``: output and gradients equal an eager call on those values, bit for bit (``tols``: rel L2 per
    output, then per input, for ops whose backward sums with atomics). Fails if the op synchronises with the
    host, allocates outside the graph's pool, or keeps per-call state the replay would reuse."""
    from benchmarks.harness import capture_cuda_graph

    dout = torch.randn_like(op(*inputs))

    def step():
        out = op(*inputs)
        return (out, *torch.autograd.grad(out, inputs, dout))

    graph, captured = capture_cuda_graph(step, warmup=2)
    with torch.no_grad():
        for t in inputs:
            t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    for j, (g, w) in enumerate(zip(captured, eager, strict=True)):
        if tols is None:
            assert torch.equal(g, w), f"output {j} of the replay differs from eager"
        else:
            assert_rel_l2(g.float(), w.float(), tols[j], name=f"output {j}")
