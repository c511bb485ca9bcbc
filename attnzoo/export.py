"""Deployment export: ONNX (checked in ONNX Runtime against PyTorch) and ``torch.export`` programs.

Every model is traced by ``torch.export`` in *export mode* (``attnzoo.kernels._op.exporting``):
``backend="auto"`` attention then runs the exact pure-PyTorch references, so the graph holds standard
ATen ops, no Triton custom op. ONNX goes through PyTorch's dynamo-based exporter from that
``ExportedProgram``, after ``run_decompositions()`` (core ATen ops: SDPA becomes MatMul/Softmax, whose
layouts the exporter's own re-tracing reproduces; the fused op's CPU layout differed and broke a view).

Shapes: the batch is always dynamic. ``dynamic_size=True`` also makes H and W symbolic; ``torch.export``
then narrows them to the range where the model's Python shape logic takes the traced branches (e.g.
maps no smaller than an attention window). A model whose branches depend on more than a range (parity
or divisibility of a stage's map, which decides padding) is refused for dynamic H/W: ONNX keeps no
runtime shape checks, so such a graph would silently compute wrong results at other sizes. Export it at
each input size instead.

Inputs are the model's normalised ``[B, C, H, W]`` tensors (preprocessing is not part of the graph).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

FORMATS = ("onnx", "export")
OPSET = 18
REL_L2_TOL = 1e-5  # ONNX Runtime vs PyTorch, fp32 on CPU
EXAMPLE_BATCH = 2  # a batch of 1 would be specialised (torch.export treats sizes 0/1 as constants)
SCAN_FACTOR = 4  # dynamic H/W: guards are checked on sizes up to this multiple of the export size


class ExportError(Exception):
    """Bad input or a model that cannot be exported as asked; the message says what to change."""


@dataclass
class ExportResult:
    """What was written and how it was checked."""

    path: Path
    format: str
    input_size: tuple[int, int, int]
    dynamic_size: bool
    # input H/W range the graph is valid for (inclusive; None = unbounded) when dynamic_size
    size_range: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)
    rel_l2: float = float("nan")  # worst output of the check run


def build_model(name: str, checkpoint: str | None = None, pretrained_path: str | None = None,
                features_only: bool = False, **kwargs: Any) -> nn.Module:
    """An eval-mode timm/attnzoo model: random init, a training ``checkpoint`` (attnzoo's ``.pth.tar``, its
    architecture and head size read from it) or an official ``pretrained_path`` weights file (timm's
    pretrained path with the model's checkpoint filter). ``features_only`` gives the backbone's feature maps
    (the ones the mmdet/mmseg adapter consumes), weights included."""
    import timm

    import attnzoo  # noqa: F401  (registers the models)

    if checkpoint and pretrained_path:
        raise ExportError("pass --checkpoint (a training checkpoint) or --pretrained-path (official weights), not both")
    if name not in timm.list_models():
        raise ExportError(f"--model {name!r} is not a registered model; "
                          "see attnzoo.list_models() or timm.list_models()")
    for flag, path in (("--checkpoint", checkpoint), ("--pretrained-path", pretrained_path)):
        if path and not Path(path).is_file():
            raise ExportError(f"{flag} {path}: no such file")
    if pretrained_path:
        try:
            return timm.create_model(name, pretrained=True, features_only=features_only,
                                     pretrained_cfg_overlay=dict(file=str(pretrained_path)), **kwargs).eval()
        except RuntimeError as e:
            raise ExportError(f"--pretrained-path {pretrained_path} does not fit {name}: "
                              f"{str(e).splitlines()[0]}") from None
    if not checkpoint:
        return timm.create_model(name, features_only=features_only, **kwargs).eval()

    from attnzoo.training import checkpoint as ckpt
    from attnzoo.training.errors import UsageError

    try:
        state = ckpt.load_file(checkpoint)
    except UsageError as e:
        raise ExportError(str(e)) from None
    if not ckpt.is_training_checkpoint(state):
        raise ExportError(f"--checkpoint {checkpoint} is not an attnzoo training checkpoint; pass an official "
                          "weights file as --pretrained-path")
    if state["arch"] != name:
        raise ExportError(f"--model {name} but --checkpoint {checkpoint} was trained as {state['arch']}")
    targs = state.get("args", {})
    kwargs = dict(num_classes=state["num_classes"], **(targs.get("model_kwargs") or {}), **kwargs)
    if targs.get("in_chans") is not None or targs.get("input_size") is not None:
        kwargs["in_chans"] = targs.get("in_chans") or targs["input_size"][0]
    model = timm.create_model(name, **kwargs)
    try:
        ckpt.check_state_dict(model, state["state_dict"], checkpoint)
    except UsageError as e:
        raise ExportError(str(e)) from None
    model.load_state_dict(state["state_dict"])
    if not features_only:
        return model.eval()
    features = timm.create_model(name, features_only=True, **kwargs)
    missing, _ = features.model.load_state_dict(model.state_dict(), strict=False)
    if missing:  # the feature net is the classifier minus its head: every key it has must come from the file
        raise ExportError(f"--checkpoint {checkpoint}: feature model keys not in the checkpoint: {missing[:3]}")
    return features.eval()


def _check_input_size(input_size: Sequence[int], model: nn.Module) -> tuple[int, int, int]:
    if len(input_size) != 3 or not all(isinstance(s, int) and s > 0 for s in input_size):
        raise ExportError(f"--input-size must be three positive ints C H W, got {list(input_size)}")
    in_chans = next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if in_chans is not None and input_size[0] != in_chans:
        raise ExportError(f"--input-size C must be the model's input channels {in_chans}, got {input_size[0]}")
    return tuple(input_size)  # type: ignore[return-value]


def _outputs(out: Any) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else list(out)


def rel_l2(out: Any, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (``out`` a tensor or a NumPy array)."""
    out64 = torch.as_tensor(out).double()
    ref64 = ref.detach().double()
    if out64.shape != ref64.shape:
        raise ExportError(f"exported output shape {tuple(out64.shape)} != PyTorch's {tuple(ref64.shape)}")
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30))


def export_program(model: nn.Module, input_size: Sequence[int], dynamic_size: bool = False
                   ) -> tuple[torch.export.ExportedProgram, dict[str, tuple[int | None, int | None]]]:
    """``torch.export`` of ``model`` on a ``[2, C, H, W]`` example with a dynamic batch (and H/W with
    ``dynamic_size``); returns the program and, for dynamic H/W, the input range it is valid for.

    Raises :class:`ExportError` when ``dynamic_size`` is asked of a model whose shape logic needs more than a
    range of sizes (module doc).
    """
    C, H, W = input_size
    x = torch.randn(EXAMPLE_BATCH, C, H, W)
    dims = {0: torch.export.Dim.DYNAMIC}
    if dynamic_size:
        dims.update({2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC})
    try:
        ep = torch.export.export(model, (x,), dynamic_shapes=(dims,))
    except Exception as e:  # torch.export raises many types; keep the first line, it names the problem
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = " (try without --dynamic-size)" if dynamic_size else ""
        raise ExportError(f"torch.export failed{hint}: {first}") from e
    sizes: dict[str, tuple[int | None, int | None]] = {}
    if dynamic_size:
        sizes = _size_range(ep, tuple(input_size))
    return ep, sizes


class _Input:
    """Stands in for the input tensor when evaluating ``torch.export``'s guard expressions on a shape."""

    def __init__(self, shape: tuple[int, ...]):
        self._shape = shape

    def size(self) -> tuple[int, ...]:
        return self._shape


def _guard_check(ep: torch.export.ExportedProgram):
    """A function ``shape -> bool``: whether ``ep``'s guards hold for an input of that shape (None when this
    torch keeps no evaluable guards)."""
    codes = getattr(ep, "_guards_code", None)
    if codes is None:
        return None
    try:
        compiled = [compile(code, "<guard>", "eval") for code in codes]
    except SyntaxError:
        return None
    names = {"__builtins__": {}, "max": max, "min": min, "abs": abs}

    def holds(shape: tuple[int, ...]) -> bool:
        frame = {"L": _AnyKey(_Input(shape))}
        return all(eval(code, names, frame) for code in compiled)  # noqa: S307  (torch.export's own guards)

    return holds


class _AnyKey(dict):
    def __init__(self, value: Any):
        super().__init__()
        self._value = value

    def __getitem__(self, key: str) -> Any:
        return self._value


def _size_range(ep: torch.export.ExportedProgram, input_size: tuple[int, int, int]
                ) -> dict[str, tuple[int | None, int | None]]:
    """The input H/W range of a dynamic-size program; raises when the program assumed more than a range.

    ``torch.export`` records its shape assumptions as guards that ``ep.module()`` checks on every call but
    ONNX drops. Each axis is scanned from 1 to ``SCAN_FACTOR`` times the export size (the other at its
    export size): the range starts above the largest failing size and must contain the export size, and
    random pairs inside the box (batch 1-3) must hold too; otherwise some other condition (a stage map's
    parity deciding a padding branch) was assumed. The upper end is ``ep.range_constraints``' (checked up
    to ``SCAN_FACTOR`` times the export size).
    """
    placeholder = next(n for n in ep.graph.nodes if n.op == "placeholder"
                       and n.name in ep.graph_signature.user_inputs)
    shape = placeholder.meta["val"].shape
    upper = {}
    for axis, label in ((2, "H"), (3, "W")):
        s = shape[axis]
        if isinstance(s, int) or not s.node.expr.is_Symbol:
            raise ExportError(f"the model does not export with a dynamic {label}: torch.export fixed it to {s}; "
                              "export without --dynamic-size at each input size")
        vr = ep.range_constraints[s.node.expr]
        upper[label] = int(vr.upper) if vr.upper.is_Integer and int(vr.upper) < 2**20 else None
    C, H, W = input_size
    holds = _guard_check(ep)
    refuse = ("the model does not export with a dynamic H/W: the traced graph is not valid at {}x{}, a "
              "condition ONNX would not check; export without --dynamic-size at each input size")
    if holds is None:  # no evaluable guards: run the program at sizes around the export size
        module = ep.module()
        for h, w in ((H + 1, W + 3), (H + 17, W + 45)):
            try:
                with torch.no_grad():
                    module(torch.zeros(EXAMPLE_BATCH, C, h, w))
            except Exception:  # a failed guard
                raise ExportError(refuse.format(h, w)) from None
        return {"H": (H, upper["H"]), "W": (W, upper["W"])}
    lows = {}
    for label, size, make in (("H", H, lambda v: (EXAMPLE_BATCH, C, v, W)),
                              ("W", W, lambda v: (EXAMPLE_BATCH, C, H, v))):
        bad = [v for v in range(1, SCAN_FACTOR * size + 1) if not holds(make(v))]
        lows[label] = max(bad) + 1 if bad else 1
        if lows[label] > size:
            raise ExportError(refuse.format(*make(max(bad))[2:]))
    gen = torch.Generator().manual_seed(0)
    for _ in range(256):
        b = int(torch.randint(1, 4, (), generator=gen))
        h = int(torch.randint(lows["H"], SCAN_FACTOR * H + 1, (), generator=gen))
        w = int(torch.randint(lows["W"], SCAN_FACTOR * W + 1, (), generator=gen))
        if not holds((b, C, h, w)):
            raise ExportError(refuse.format(h, w))
    return {"H": (lows["H"], upper["H"]), "W": (lows["W"], upper["W"])}


def check_onnx(path: str | os.PathLike, model: nn.Module, inputs: Sequence[torch.Tensor]) -> float:
    """``onnx.checker`` on the file, then ONNX Runtime (CPU) on each input against PyTorch: the worst
    relative L2 over all inputs and outputs."""
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for x in inputs:
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            want = _outputs(model(x))
        if len(got) != len(want):
            raise ExportError(f"the ONNX graph has {len(got)} outputs, PyTorch {len(want)}")
        worst = max([worst] + [rel_l2(g, w) for g, w in zip(got, want)])
    return worst


def export(model: nn.Module, fmt: str, input_size: Sequence[int], output: str | os.PathLike,
           dynamic_size: bool = False, overwrite: bool = False, optimize: bool = True) -> ExportResult:
    """Export ``model`` (eval mode) to ``output``: ``fmt="onnx"`` (opset ``OPSET``, checked with
    ``onnx.checker`` and against PyTorch in ONNX Runtime; raises above ``REL_L2_TOL``) or ``fmt="export"``
    (a ``torch.export`` ``.pt2``, reloaded and checked against PyTorch the same way).

    An existing ``output`` is only replaced with ``overwrite=True``; the file is written next to it first
    and moved over it once checked, so a failed export leaves nothing behind.
    """
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {FORMATS}, got {fmt!r}")
    output = Path(output)
    if output.exists() and not overwrite:
        raise ExportError(f"--output {output} exists; pass --overwrite to replace it")
    if not output.parent.is_dir():
        raise ExportError(f"--output {output}: folder {output.parent} does not exist")
    suffix = ".onnx" if fmt == "onnx" else ".pt2"
    if output.suffix != suffix:
        raise ExportError(f"--output for --format {fmt} must end in {suffix}, got {output.name}")
    model = model.eval()
    input_size = _check_input_size(input_size, model)
    ep, sizes = export_program(model, input_size, dynamic_size)
    C, H, W = input_size
    inputs = [torch.randn(EXAMPLE_BATCH, C, H, W)]
    if dynamic_size:  # the same graph at a second size
        inputs.append(torch.randn(1, C, H + 17, W + 45))
    # the final suffix kept: torch.export.load warns about (and falls back on) a file not ending in .pt2
    tmp = output.with_name(f".{output.stem}.partial{output.suffix}")
    try:
        if fmt == "onnx":
            program = torch.onnx.export(ep.run_decompositions(), dynamo=True, opset_version=OPSET, optimize=optimize,
                                        input_names=["x"])
            program.save(str(tmp), external_data=False)
            err = check_onnx(tmp, model, inputs)
        else:
            torch.export.save(ep, str(tmp))
            loaded = torch.export.load(str(tmp)).module()
            with torch.no_grad():
                err = max(rel_l2(g, w) for x in inputs for g, w in zip(_outputs(loaded(x)), _outputs(model(x))))
        if not err <= REL_L2_TOL:
            raise ExportError(f"the exported model differs from PyTorch: relative L2 {err:.2e} > {REL_L2_TOL:.0e}")
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(output, fmt, input_size, dynamic_size, sizes, err)


__all__ = ["FORMATS", "OPSET", "REL_L2_TOL", "ExportError", "ExportResult", "build_model", "check_onnx", "export",
           "export_program"]
