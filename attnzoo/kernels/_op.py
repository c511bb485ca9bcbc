"""The one mechanism every attnzoo kernel op is built on.

* Backend names (:data:`BACKENDS`) and their resolution (:func:`resolve_backend`): ``"auto"`` asks the
  op's own documented rule on CUDA and takes the exact pure-PyTorch ``"reference"`` everywhere else,
  including while a model is exported (``torch.onnx`` / ``torch.export``), so exported graphs hold
  standard operators only.
* Input checks with one error contract: the op, the argument, what was expected, what was given.
* The Triton support check (dtype, head dim) and the policy for bfloat16 under Triton's CPU interpreter,
  which has no real bfloat16 arithmetic: the op computes in float32 there and casts the result back.
* The dot-precision policy for float32 inputs (PyTorch's TF32 switch for matmuls).
* :class:`FusedOp`: a Triton forward/backward pair as a plain ``torch.autograd.Function`` for eager
  calls (no custom-op dispatch on the host path) and, for ``torch.compile``, as ``torch.library`` ops:
  triton ops (``torch.library.triton_op``) that Inductor traces and launches itself, or custom ops
  with fake kernels (single opaque graph nodes).
"""
from __future__ import annotations

import importlib.util
import inspect
import os
from typing import Callable, Optional, Sequence

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.autograd.function import once_differentiable

BACKENDS = ("auto", "triton", "dense", "reference")
"""``triton``: the fused kernels. ``dense``: the same function through PyTorch's fused SDPA over whole
maps or partitions with an exact mask/bias. ``reference``: pure PyTorch. ``auto``: the op's rule."""
HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_interpret_enabled() -> bool:
    """Whether Triton kernels were decorated for the CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def exporting() -> bool:
    """True while ``torch.onnx.export`` or ``torch.export`` (strict or not) traces a model; False under
    ``torch.compile``.

    Reads torch.export's own flag: Dynamo folds ``torch.compiler.is_exporting()`` (and ONNX's flag) to
    constants, and some releases (torch 2.11) fold it to True under every compile, which sent compiled
    models to the reference path.
    """
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    if flag is None:
        flag = torch.compiler.is_exporting()
    return bool(flag) or (not torch.compiler.is_compiling() and torch.onnx.is_in_onnx_export())


def resolve_backend(op: str, backend: str, device: torch.device, auto_rule: Callable[[], str]) -> str:
    """The path that runs for ``backend``: one of ``"triton"``, ``"dense"``, ``"reference"``.

    ``"auto"`` returns ``auto_rule()`` for CUDA tensors (the op's public rule) and ``"reference"`` on
    other devices or while exporting. ``"triton"`` on CPU tensors needs Triton's interpreter, enabled
    before attnzoo was imported.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type != "cuda" or not HAS_TRITON or exporting() or torch.jit.is_scripting():
            return "reference"
        return auto_rule()
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError(f"{op}: backend='triton' needs the triton package; use backend='reference'")
        if device.type != "cuda" and not triton_interpret_enabled():
            raise RuntimeError(
                f"{op}: backend='triton' on {device.type} tensors needs Triton's interpreter: set "
                "TRITON_INTERPRET=1 before importing attnzoo, or use backend='reference'")
    return backend


# ------------------------------------------------------------------------------------------------
# Input checks
# ------------------------------------------------------------------------------------------------
def check_qkv(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, v_dim_may_differ: bool = False) -> None:
    """q, k, v: floating-point ``[B, H, W, heads, D]`` tensors of one dtype and device; k has q's shape,
    v too (or only q's ``[B, H, W, heads]`` where ``v_dim_may_differ``)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 5:
            raise ValueError(f"{op}: {name} must be [B, H, W, heads, head_dim] (5-D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if k.shape != q.shape:
        raise ValueError(f"{op}: k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v_dim_may_differ:
        if v.shape[:-1] != q.shape[:-1]:
            raise ValueError(f"{op}: v must be [B, H, W, heads, Dv] with [B, H, W, heads] = {tuple(q.shape[:-1])}, "
                             f"got {tuple(v.shape)}")
    elif v.shape != q.shape:
        raise ValueError(f"{op}: v must have q's shape {tuple(q.shape)}, got {tuple(v.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} must be on q's device {q.device}, got {t.device}")


def check_bias(op: str, name: str, t: Optional[torch.Tensor], q: torch.Tensor, shape: Sequence[int],
               layout: str) -> None:
    """An optional bias table: ``shape`` (described as ``layout``), q's dtype or float32, q's device."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape):
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{op}: {name} must have shape {layout} = {list(shape)}, got {got}")
    if t.dtype not in (q.dtype, torch.float32):
        raise TypeError(f"{op}: {name} must have q's dtype {q.dtype} or torch.float32, got {t.dtype}")
    if t.device != q.device:
        raise ValueError(f"{op}: {name} must be on q's device {q.device}, got {t.device}")


def check_triton(op: str, q: torch.Tensor, head_dims: dict[str, int], lo: int = 8, hi: int = 128) -> None:
    """What the Triton kernels take: float16/bfloat16/float32 and head dims in ``[lo, hi]``."""
    if q.dtype not in TRITON_DTYPES:
        raise TypeError(f"{op}: backend='triton' supports dtypes float16, bfloat16 and float32, got {q.dtype}; "
                        "use backend='reference'")
    for name, d in head_dims.items():
        if not lo <= d <= hi:
            raise ValueError(f"{op}: backend='triton' needs {name} head dim in [{lo}, {hi}], got {d}; "
                             "use backend='reference'")


def interpreter_upcast(q: torch.Tensor) -> bool:
    """Whether a Triton call computes in float32 and casts back: bfloat16 on Triton's CPU interpreter,
    which has no bfloat16 arithmetic (its results would be garbage)."""
    return q.dtype == torch.bfloat16 and q.device.type != "cuda"


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision: float32 follows PyTorch's TF32 switch for matmuls (off by default: exact)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


# ------------------------------------------------------------------------------------------------
# Kernel launches
# ------------------------------------------------------------------------------------------------
class Launcher:
    """``Launcher(jit_fn)(grid, *args, **constexprs)``: ``jit_fn[grid](*args, **constexprs)`` without the
    JIT's per-call argument binding once a call of the same specialization has compiled.

    Called on traced tensors (torch.compile tracing a :class:`FusedOp` built with ``inductor_launches``) it
    records the launch through ``torch.library.wrap_triton``, so that Inductor launches the kernel itself.

    ``JITFunction.run`` binds and specializes every argument on every call, host time that bounds small
    maps (these kernels take ~40 arguments). A later call whose key matches an earlier one's launches that
    call's compiled kernel directly, as Inductor's static launcher does. The key is a superset of what
    Triton specializes on: the device, each tensor's dtype and 16-byte alignment, every other argument's
    value, and the constexprs and launch options. Under Triton's CPU interpreter every call goes through
    the JIT.
    """

    MAX_ENTRIES = 1024  # specializations kept per kernel (shapes seen); the cache restarts past that

    def __init__(self, fn) -> None:
        self.fn = fn
        params = inspect.signature(fn.fn).parameters.values()
        self.names = [p.name for p in params]
        self.defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        self.compiled: dict[tuple, object] = {}

    @staticmethod
    def _spec(a: object) -> object:
        if isinstance(a, torch.Tensor):
            return a.dtype, a.data_ptr() % 16 == 0
        return a  # int, float, bool, None: by value (positional constexprs too)

    def __call__(self, grid: tuple[int, ...], *args: object, **meta: object) -> None:
        if is_fake(args[0]):  # every kernel's first argument is a tensor
            torch.library.wrap_triton(self.fn)[grid](*args, **meta)
            return
        key = (torch.cuda.current_device() if not triton_interpret_enabled() else -1,
               *map(self._spec, args), *meta.items())
        compiled = self.compiled.get(key)
        if compiled is None:
            compiled = self.fn[grid](*args, **meta)
            if not triton_interpret_enabled() and hasattr(compiled, "function"):  # a CompiledKernel
                if len(self.compiled) >= self.MAX_ENTRIES:
                    self.compiled.clear()
                self.compiled[key] = compiled
            return
        # a 3-D grid (CompiledKernel reads grid[0..2]) and every parameter in order, constexprs included, as
        # JITFunction.run hands them to the launcher
        rest = (meta[n] if n in meta else self.defaults[n] for n in self.names[len(args):])
        compiled[(*grid, 1, 1)[:3]](*args, *rest)


# ------------------------------------------------------------------------------------------------
# Fused forward/backward registration
# ------------------------------------------------------------------------------------------------
class FusedOp:
    """A fused Triton op: ``forward(*tensors, *config) -> (out, *aux)`` and
    ``backward(dout, *tensors, out, *aux, *config, needs_grad) -> one gradient per tensor input``.

    ``forward`` and ``backward`` carry ``torch.library`` type annotations (``Optional[Tensor]``,
    ``list[int]``, ...); ``backward`` returns an empty tensor for an input whose gradient is not needed.
    The first ``n_tensors`` arguments are tensor inputs (``None`` allowed), the rest configuration.
    Calling the op runs the eager ``autograd.Function`` (or the bare forward when nothing needs a
    gradient) and, under ``torch.compile``, the ``attnzoo::<name>_fwd`` / ``_bwd`` ops.

    With ``inductor_launches`` (and compiled kernels, not Triton's interpreter) those are
    ``torch.library.triton_op`` ops: Inductor traces ``forward``/``backward`` (which must then be traceable
    with fake tensors: no data-dependent host code, no caches of tensors), launches the kernels from its
    own generated code and compiles the torch ops around them, instead of calling an opaque custom op
    whose host code runs on every step. Otherwise they are ``torch.library.custom_op`` ops with the fake
    kernels given.
    """

    def __init__(self, name: str, n_tensors: int, forward: Callable, backward: Callable,
                 fake_forward: Callable, fake_backward: Callable, *, inductor_launches: bool = False):
        self.name, self.n_tensors, self.forward, self.backward = name, n_tensors, forward, backward
        self.inductor_launches = inductor_launches and HAS_TRITON and not triton_interpret_enabled()
        if self.inductor_launches:
            self.fwd_op = torch.library.triton_op(f"attnzoo::{name}_fwd", forward, mutates_args=())
            self.bwd_op = torch.library.triton_op(f"attnzoo::{name}_bwd", backward, mutates_args=())
        else:
            self.fwd_op = torch.library.custom_op(f"attnzoo::{name}_fwd", forward, mutates_args=())
            self.fwd_op.register_fake(fake_forward)
            self.bwd_op = torch.library.custom_op(f"attnzoo::{name}_bwd", backward, mutates_args=())
            self.bwd_op.register_fake(fake_backward)
        self.fwd_op.register_autograd(self._compiled_backward, setup_context=self._setup_context)
        self.function = type(f"{name}_function", (torch.autograd.Function,), dict(
            forward=staticmethod(self._eager_forward),
            backward=staticmethod(once_differentiable(self._eager_backward))))

    def __call__(self, *args) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self.fwd_op(*args)[0]
        if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                           for t in args[:self.n_tensors]):
            return self.function.apply(*args)
        return self.forward(*args)[0]

    def _grads(self, grads: Sequence[torch.Tensor], needs: Sequence[bool], n_config: int) -> tuple:
        return (*(g if need else None for g, need in zip(grads, needs)), *(None,) * n_config)

    # eager: a plain autograd.Function
    def _eager_forward(self, ctx, *args):
        out, *aux = self.forward(*args)
        ctx.save_for_backward(*args[:self.n_tensors], out, *aux)
        ctx.config = args[self.n_tensors:]
        return out

    def _eager_backward(self, ctx, dout):
        needs = list(ctx.needs_input_grad[:self.n_tensors])
        grads = self.backward(dout, *ctx.saved_tensors, *ctx.config, needs)
        return self._grads(grads, needs, len(ctx.config))

    # compiled: the custom ops' autograd
    def _setup_context(self, ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs[:self.n_tensors], *output)
        ctx.config = inputs[self.n_tensors:]
        ctx.mark_non_differentiable(*output[1:])

    def _compiled_backward(self, ctx, dout, *_aux_grads):
        needs = list(ctx.needs_input_grad[:self.n_tensors])
        grads = self.bwd_op(dout, *ctx.saved_tensors, *ctx.config, needs)
        return self._grads(grads, needs, len(ctx.config))
