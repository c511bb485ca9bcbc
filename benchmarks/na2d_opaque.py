"""Baseline for the compiled-model benchmarks: ``na2d`` registered as an opaque ``torch.library.custom_op``
(as up to round 7), so ``torch.compile`` calls its host code on every step instead of tracing it and
launching the kernels from Inductor's code (the shipped ``triton_op`` registration).

``python -m benchmarks.models ... --compile --na2d-opaque`` measures models with it.
"""
from __future__ import annotations

import importlib

from attnzoo.kernels import _op

_na2d = importlib.import_module("attnzoo.kernels.na2d")  # the package exports the function under the same name

OPAQUE = _op.FusedOp("na2d_opaque", 4, _na2d._forward, _na2d._backward, _na2d._fake_forward, _na2d._fake_backward)


def install() -> None:
    """Route every later ``na2d`` call with the Triton backend through the opaque custom op."""
    _na2d._na2d_triton = OPAQUE
