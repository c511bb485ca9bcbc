"""Shared benchmark harness: median timings, peak memory, measured ceilings, stamped JSON + Markdown.

Every benchmark script builds a :class:`Report`, adds one row per measurement and calls
:meth:`Report.save`, which writes ``benchmarks/results/<name>.json`` and ``<name>.md`` with the device
and library versions in the header. A speed claim in the README points at one of those files.
"""
from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import timm
import torch

# ATTNZOO_RESULTS_DIR sends every report elsewhere (e.g. a scratch folder on a shared GPU box).
RESULTS_DIR = Path(os.environ.get("ATTNZOO_RESULTS_DIR", Path(__file__).parent / "results"))


def environment() -> dict[str, Any]:
    """Device name and library versions, the stamp every result carries."""
    import timm

    import attnzoo

    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(shlex.quote(_portable(a)) for a in sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "attnzoo": attnzoo.__version__,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, cuda=torch.version.cuda, sm_count=props.multi_processor_count,
                   gpu_memory_gib=round(props.total_memory / 2**30, 1))
    else:
        env.update(device=f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    return env


def _portable(arg: str) -> str:
    """A command-line word without this machine's absolute paths (relative to the working directory)."""
    if not os.path.isabs(arg):
        return arg
    rel = os.path.relpath(arg)
    return rel if not rel.startswith("..") else os.path.join("...", os.path.basename(arg))


def time_ms(fn: Callable[[], Any], warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn()``.

    On CUDA this is ``triton.testing.do_bench`` (events, L2 flushed; ``warmup``/``rep`` in ms). On CPU
    (``--quick`` smoke runs) a host-clock median over a few calls.
    """
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    fn()
    samples = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def kernel_times_ms(fn: Callable[[], Any], iters: int = 20) -> dict[str, float]:
    """Device time per call of each kernel ``fn()`` launches, by kernel name (``torch.profiler``)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            times[e.name] = times.get(e.name, 0.0) + e.device_time_total / iters / 1e3
    return times


def capture_cuda_graph(fn: Callable[[], Any], warmup: int = 3) -> tuple[torch.cuda.CUDAGraph, Any]:
    """``fn()`` captured once as a CUDA graph: ``(graph, what the captured call returned)``, whose tensors the
    replays overwrite. Warmed up on a side stream first, as capture requires, and captured on that stream.
    Autograd nodes of earlier eager calls that are still alive would tie the default stream into the capture
    (autograd waits on a leaf's gradient accumulator's stream), so unreachable ones are collected first, and
    torch versions that can redirect such a stale stream to the capturing one are told to."""
    gc.collect()
    override = getattr(torch.autograd.graph, "set_override_stale_capture_stream", None)
    if override is not None:
        override(True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=side):
            result = fn()
    finally:
        if override is not None:
            override(False)
    return graph, result


def graphed_time_ms(fn: Callable[[], Any], rep: int = 100) -> float:
    """Median milliseconds of ``fn()`` captured once as a CUDA graph (:func:`capture_cuda_graph`) and replayed:
    the call without its per-call host work (Python, dispatch, launches), as a CUDA-graphed step
    (``torch.compile(mode="reduce-overhead")``) runs it."""
    graph, _ = capture_cuda_graph(fn)
    try:
        return time_ms(graph.replay, rep=rep)
    finally:
        del graph
        torch.cuda.empty_cache()


def gpu_time_ms(fn: Callable[[], Any], iters: int = 20) -> float:
    """Summed device time of the kernels ``fn()`` launches, per call: the GPU's share of a step, so host
    time shows as the difference to :func:`time_ms`."""
    return sum(kernel_times_ms(fn, iters).values())


def peak_memory_mib(fn: Callable[[], Any]) -> float | None:
    """Peak CUDA memory allocated while ``fn()`` runs, in MiB (None on CPU)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def model_steps(name: str, batch: int, img: int, compile: bool, device: str) -> dict[str, Callable[[], None]]:
    """``{"infer", "train"}`` closures for timm model ``name`` at drop path 0: channels-last input, bf16 autocast on
    CUDA (fp32 on CPU smoke runs), ``torch.compile`` (default mode) when ``compile``; inference = forward under
    ``no_grad``, train = forward + backward + AdamW step. For A/B scripts that time variants of one model."""
    model = timm.create_model(name, drop_path_rate=0.0).to(device).to(memory_format=torch.channels_last)
    run = torch.compile(model) if compile else model
    x = torch.randn(batch, 3, img, img, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    opt = torch.optim.AdamW(model.parameters())
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def infer() -> None:
        model.eval()
        with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
            run(x)

    def train() -> None:
        model.train()
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
            loss = torch.nn.functional.cross_entropy(run(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return dict(infer=infer, train=train)


def measured_bandwidth_gbs(nbytes: int = 2**30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus written (the HBM ceiling)."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def measured_matmul_tflops(n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """Dense matrix-product rate in TFLOP/s on random data (the arithmetic ceiling)."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = time_ms(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3) / 1e12


class Report:
    """Rows of one benchmark run, written as JSON and a Markdown table."""

    def __init__(self, name: str, title: str, columns: list[str] | None = None, notes: str = ""):
        self.name, self.title, self.columns, self.notes = name, title, columns, notes
        self.env = environment()
        self.rows: list[dict[str, Any]] = []

    def add(self, **row: Any) -> dict[str, Any]:
        self.rows.append(row)
        return row

    def markdown(self) -> str:
        cols = self.columns or list(dict.fromkeys(k for r in self.rows for k in r))
        lines = [f"# {self.title}", "", "| " + " | ".join(f"{k}" for k in self.env) + " |",
                 "|" + "---|" * len(self.env), "| " + " | ".join(str(v) for v in self.env.values()) + " |", ""]
        if self.notes:
            lines += [self.notes, ""]
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in self.rows]
        return "\n".join(lines) + "\n"

    def save(self, out_dir: Path | str = RESULTS_DIR) -> tuple[Path, Path]:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        js, md = out_dir / f"{self.name}.json", out_dir / f"{self.name}.md"
        js.write_text(json.dumps({"title": self.title, "env": self.env, "rows": self.rows}, indent=1) + "\n")
        md.write_text(self.markdown())
        return js, md


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)
