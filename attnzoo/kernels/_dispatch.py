"""Backend selection shared by every kernel's functional API."""
from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "reference")
HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_interpret_enabled() -> bool:
    """Whether Triton kernels were decorated for the CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def exporting() -> bool:
    """Whether the model is being exported (``torch.onnx.export`` or ``torch.export``): export mode.

    In export mode ``backend="auto"`` resolves to ``"reference"``, the exact pure-PyTorch path, so the
    exported graph holds standard ATen/ONNX ops instead of Triton custom ops that ONNX Runtime, TensorRT
    or a CPU-only ``ExportedProgram`` could not run. An explicitly named backend is still honoured.
    """
    return torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


def resolve_backend(backend: str, device: torch.device, op: str, extra: tuple[str, ...] = ()) -> str:
    """Map ``backend`` to ``"triton"`` or ``"reference"`` for tensors on ``device``.

    ``"auto"`` sends CUDA tensors to Triton and everything else to the reference; in export mode
    (:func:`exporting`) it is always the reference. ``"triton"`` on CPU
    tensors runs Triton's interpreter, which must have been enabled before attnzoo was imported.
    ``extra`` names an op's own further paths: accepted here (and returned as given), handled by the op.
    """
    if backend not in BACKENDS + extra:
        raise ValueError(f"{op}: backend must be one of {BACKENDS + extra}, got {backend!r}")
    if backend == "auto":
        if exporting():
            return "reference"
        return "triton" if device.type == "cuda" and HAS_TRITON else "reference"
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError(f"{op}: backend='triton' needs the triton package; use backend='reference'")
        if device.type != "cuda" and not triton_interpret_enabled():
            raise RuntimeError(
                f"{op}: backend='triton' on {device.type} tensors needs Triton's interpreter: set "
                "TRITON_INTERPRET=1 before importing attnzoo, or use backend='reference'")
    return backend
