"""What one training step keeps and launches, module by module: attnzoo models beside their timm twins.

Two counts that explain peak training memory and launch-bound step time without a GPU trace:

* saved-for-backward bytes: every tensor autograd saves in the forward pass (``saved_tensors_hooks``),
  counted once per storage (views of one buffer are one buffer), parameters left out, and attributed to
  the innermost module whose forward was running when it was saved;
* aten ops of one forward + backward (a ``TorchDispatchMode`` counter): all calls, the calls that run a
  kernel (write memory: not views, not allocations), the copies among them (``clone``, ``_to_copy``,
  ``copy_``, ``constant_pad_nd``, ...) and the bytes the copies write; kernels in the forward pass are
  also attributed to modules. Triton launches are not aten ops: the fused attention kernels are not counted.

Runs on any device and dtype (``--device cuda --autocast bf16``). Window attention follows the models'
``attn_backend``: on CUDA the fused partitioned-attention kernel saves only q, k, v (views of the qkv
projection), the output and an fp32 log-sum-exp; on CPU ``auto`` means the reference (partition copies +
SDPA), which saves and copies more. ``--backend cuda-auto`` picks, per layer, what ``auto`` picks on CUDA
(so with ``TRITON_INTERPRET=1`` a CPU run counts the CUDA path's torch-side work; fp32 only, the interpreter
computes bf16 in fp32).

    python -m benchmarks.saved_memory                          # the T twins, batch 2, 224², CPU, fp32
    python -m benchmarks.saved_memory davit_t:davit_tiny --autocast bf16 --device cuda --batch 128
"""
from __future__ import annotations

import argparse
import contextlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterator

import timm
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import attnzoo  # noqa: F401  (registers the models)
from attnzoo.blocks import set_attention_backend
from attnzoo.blocks.window import PartitionAttention2d
from attnzoo.kernels.partitioned_attention import auto_backend
from benchmarks.harness import Report

TWINS = ("davit_t:davit_tiny", "maxvit_t:maxvit_tiny_tf_224", "focalnet_t_srf:focalnet_tiny_srf",
         "focalnet_t_lrf:focalnet_tiny_lrf")
COPY_OPS = frozenset({"copy_", "clone", "_to_copy", "constant_pad_nd", "cat", "stack", "roll", "index",
                      "gather", "index_select", "new_zeros", "zeros_like", "zero_", "fill_"})
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StepCounts:
    """Saved-for-backward bytes and aten op counts of one training forward + backward."""

    saved: dict[str, int] = field(default_factory=dict)  # module name -> bytes
    # (module name, dtype, shape) -> bytes
    saved_tensors: dict[tuple[str, torch.dtype, tuple[int, ...]], int] = field(default_factory=dict)
    ops: Counter = field(default_factory=Counter)  # aten op -> calls, forward and backward
    kernels: Counter = field(default_factory=Counter)  # aten op -> calls that write memory
    written: Counter = field(default_factory=Counter)  # aten op -> bytes of the new tensors it returned
    forward_kernels: Counter = field(default_factory=Counter)  # module name -> kernel calls in its forward

    @property
    def saved_total(self) -> int:
        return sum(self.saved.values())

    @property
    def forward_kernel_total(self) -> int:
        return sum(n for module, n in self.forward_kernels.items() if module != "<backward>")

    @property
    def copies(self) -> int:
        return sum(n for op, n in self.kernels.items() if op in COPY_OPS)

    @property
    def copy_bytes(self) -> int:
        return sum(n for op, n in self.written.items() if op in COPY_OPS)


class _OpCounter(TorchDispatchMode):
    """Counts every aten op run while active: calls, kernel calls, bytes of new outputs, forward module."""

    def __init__(self, counts: StepCounts, stack: list[str]):
        super().__init__()
        self.counts, self.stack = counts, stack

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        new = sum(t.numel() * t.element_size() for t in tree_leaves(out)
                  if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs)
        c = self.counts
        c.ops[name] += 1
        c.written[name] += new
        if not func.is_view and "empty" not in name and (new or name.endswith("_")):
            c.kernels[name] += 1
            c.forward_kernels[self.stack[-1]] += 1
        return out


@contextlib.contextmanager
def _module_scope(model: nn.Module) -> Iterator[list[str]]:
    """A stack of the module names whose forward is running (innermost last; "<backward>" outside)."""
    stack: list[str] = ["<backward>"]

    def pop(*_) -> None:
        stack.pop()

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda m, a, n=name or "<model>": stack.append(n)))
        handles.append(module.register_forward_hook(pop))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def count_step(model: nn.Module, x: torch.Tensor, autocast: torch.dtype | None = None,
               count_ops: bool = True) -> StepCounts:
    """Saved bytes by module and aten op counts of one training forward + backward of ``model(x)``
    (the loss is the output's sum; gradients are cleared afterwards)."""
    counts = StepCounts()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[tuple[int, int]] = set()
    saved: dict[str, int] = defaultdict(int)
    tensors: dict[tuple[str, torch.dtype, tuple[int, ...]], int] = defaultdict(int)
    keep: list[torch.Tensor] = []  # holds saved storages, so no address is reused within the step

    with _module_scope(model) as stack:
        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key[0] not in params and key not in seen and key[1] > 0:
                seen.add(key)
                keep.append(t)
                saved[stack[-1]] += key[1]
                tensors[stack[-1], t.dtype, tuple(t.shape)] += key[1]
            return t

        model.train()
        amp = torch.autocast(x.device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
        with _OpCounter(counts, stack) if count_ops else contextlib.nullcontext():
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
                out = model(x)
            out.float().sum().backward()
    counts.saved, counts.saved_tensors = dict(saved), dict(tensors)
    model.zero_grad(set_to_none=True)
    return counts


def use_cuda_auto_rule(model: nn.Module) -> nn.Module:
    """Route each window/grid attention layer as ``backend="auto"`` routes it on CUDA (by its input size),
    on any device: the fused kernel needs ``TRITON_INTERPRET=1`` off CUDA."""
    def choose(m: PartitionAttention2d, args: tuple) -> None:
        m.attn_backend = auto_backend(args[0], m.partition_size, m.shift_size, m.relative_position_bias_table)

    for m in model.modules():
        if isinstance(m, PartitionAttention2d):
            m.register_forward_pre_hook(choose)
    return model


def module_kind(name: str) -> str:
    """A module name without its indices, last two components: ``stages.2.blocks.1.0.attn.qkv`` -> ``attn.qkv``."""
    parts = [p for p in name.split(".") if not p.isdigit()]
    return ".".join(parts[-2:])


def _by_kind(per_module: dict[str, int]) -> Counter:
    out: Counter = Counter()
    for name, n in per_module.items():
        out[module_kind(name)] += n
    return out


def build(name: str, device: str, backend: str, drop_path_rate: float | None) -> nn.Module:
    kwargs = {} if drop_path_rate is None else dict(drop_path_rate=drop_path_rate)
    model = timm.create_model(name, **kwargs).to(device).to(memory_format=torch.channels_last)
    if name in attnzoo.list_models():
        if backend == "cuda-auto":
            use_cuda_auto_rule(model)
        else:
            set_attention_backend(model, backend)
    return model


def _mib(b: float) -> str:
    return f"{b / 2**20:9.2f}"


def _diff_table(title: str, a: Counter, b: Counter, fmt, top: int) -> None:
    print(title)
    for k in sorted(set(a) | set(b), key=lambda k: (-abs(a[k] - b[k]), k))[:top]:
        if a[k] != b[k]:
            print(f"  {k:44s} {fmt(a[k])} {fmt(b[k])}")


def compare(ours: str, twin: str, batch: int = 2, img_size: int = 224, device: str = "cpu",
            autocast: torch.dtype | None = None, backend: str = "auto", drop_path_rate: float | None = 0.0,
            top: int = 12) -> dict[str, StepCounts]:
    """Count one training step of ``ours`` and ``twin`` on the same input; print where they differ."""
    torch.manual_seed(0)
    x = torch.randn(batch, 3, img_size, img_size, device=device).to(memory_format=torch.channels_last)
    res = {name: count_step(build(name, device, backend, drop_path_rate), x, autocast) for name in (ours, twin)}
    a, b = res[ours], res[twin]
    for name, c in res.items():
        print(f"{name:22s} saved {_mib(c.saved_total)} MiB | aten ops {sum(c.ops.values()):5d}, kernels "
              f"{sum(c.kernels.values()):5d} (forward {c.forward_kernel_total}), copies {c.copies:4d} writing "
              f"{_mib(c.copy_bytes)} MiB")
    _diff_table(f"saved MiB by module kind, {ours} vs {twin}", _by_kind(a.saved), _by_kind(b.saved), _mib, top)
    _diff_table("kernel calls by aten op (forward + backward)", a.kernels, b.kernels, lambda n: f"{n:6d}", top)
    _diff_table("MiB written by copy ops", Counter({k: v for k, v in a.written.items() if k in COPY_OPS}),
                Counter({k: v for k, v in b.written.items() if k in COPY_OPS}), _mib, top)
    _diff_table("forward kernel calls by module kind", _by_kind(a.forward_kernels), _by_kind(b.forward_kernels),
                lambda n: f"{n:6d}", top)
    return res


def main(argv: list[str] | None = None) -> Report:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pairs", nargs="*", default=list(TWINS), help="OURS:TWIN model pairs (default: the T twins)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--device", default="cpu")
    p.add_argument("--autocast", choices=list(DTYPES), default="fp32", help="autocast dtype (fp32: no autocast)")
    p.add_argument("--backend", default="auto", choices=["auto", "cuda-auto", "reference", "dense", "triton"],
                   help="attention backend of the attnzoo models")
    p.add_argument("--drop-path-rate", type=float, default=0.0,
                   help="for both models of a pair (negative: each model's own default)")
    p.add_argument("--top", type=int, default=12, help="rows per difference table")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--name", default="saved_memory")
    a = p.parse_args(argv)
    pairs = []
    for pair in a.pairs:
        if pair.count(":") != 1:
            p.error(f"pairs must be OURS:TWIN, e.g. davit_t:davit_tiny; got {pair!r}")
        pairs.append(tuple(pair.split(":")))
    drop_path = None if a.drop_path_rate < 0 else a.drop_path_rate
    report = Report(a.name, f"Saved-for-backward bytes and aten ops of one training step, batch {a.batch}, "
                    f"{a.img_size}², {a.device}, {a.autocast}, attention backend {a.backend}",
                    notes="saved_mib: unique storages autograd saves in the forward pass (parameters excluded); "
                          "kernels: aten calls that write memory (forward + backward); copies: clone/_to_copy/"
                          "copy_/pad/cat/... among them.")
    for ours, twin in pairs:
        print(f"== {ours} vs {twin}: batch {a.batch}, {a.img_size}², {a.device}, {a.autocast}, backend {a.backend}")
        for name, c in compare(ours, twin, a.batch, a.img_size, a.device, DTYPES[a.autocast], a.backend,
                               drop_path, a.top).items():
            report.add(model=name, pair=f"{ours}:{twin}", saved_mib=c.saved_total / 2**20,
                       aten_ops=sum(c.ops.values()), kernels=sum(c.kernels.values()), copies=c.copies,
                       copy_mib=c.copy_bytes / 2**20)
    report.save(a.out_dir) if a.out_dir else report.save()
    return report


if __name__ == "__main__":
    main()
