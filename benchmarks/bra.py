"""Bi-level routing attention: fused Triton kernel and masked dense SDPA vs the gather reference, dense SDPA
over all tokens and FlexAttention.

bf16, forward and forward+backward medians (``time_ms``), peak memory of forward+backward, BiFormer-S
stages at 224² (batch 128, head dim 32, 7x7 regions) and 128²/256² maps at batch 8 (8x8 regions,
top-k 8). FlexAttention runs on region-major token order (each region's tokens contiguous, permutation not
timed) with a BlockMask from the same region index; block mask construction is not timed either.
"dense (masked sdpa)" is ``routed_attention(backend="dense")`` without its index range check, like the
"triton" rows (bias construction timed); "auto" is the
whole ``bra(backend="auto")`` (routing included; its note names the path the rule chose); "routing" times
``route_regions`` alone (forward only).

    python -m benchmarks.bra [--quick] [--sweep] [--out DIR]
"""
from __future__ import annotations

import argparse
import functools
import contextlib
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnzoo.kernels import bra, routed_attention
from attnzoo.kernels import bra_triton
from attnzoo.kernels.bra import _bra_triton, auto_backend, choose_deterministic
from attnzoo.kernels.bra_dense import routed_attention_dense
from attnzoo.kernels.bra_reference import region_partition, route_regions
from benchmarks.harness import (RESULTS_DIR, Report, gpu_time_ms, graphed_time_ms, measured_bandwidth_gbs,
                                measured_matmul_tflops, peak_memory_mib, time_ms)

# name, B, H, W, heads, D, n_win, topk
CASES = [
    ("stage1 56²", 128, 56, 56, 2, 32, 7, 1),
    ("stage2 28²", 128, 28, 28, 4, 32, 7, 4),
    ("stage3 14²", 128, 14, 14, 8, 32, 7, 16),
    ("map 128²", 8, 128, 128, 8, 32, 8, 8),
    ("map 256²", 8, 256, 256, 8, 32, 8, 8),
]
QUICK_CASES = [("quick 14²", 1, 14, 14, 1, 32, 7, 4)]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: --quick smoke run under TRITON_INTERPRET=1
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float16  # the interpreter's tl.dot lacks bf16


def counts(B: int, H: int, W: int, heads: int, D: int, n_win: int, topk: int) -> dict[str, float]:
    """Minimum FLOPs and bytes (bf16 tensors read/written once, fp32 log-sum-exp)."""
    T = (H // n_win) * (W // n_win)
    keys = topk * T
    fwd_flops = 4 * B * H * W * heads * keys * D  # q k^T and p v
    tensor = B * H * W * heads * D * 2
    lse = B * H * W * heads * 4
    return dict(fwd_flops=fwd_flops, fb_flops=3.5 * fwd_flops,  # backward: 5 products vs 2
                fwd_bytes=4 * tensor + lse, fb_bytes=(4 * tensor + lse) + (8 * tensor + 2 * lse))


def reference_bytes(B, H, W, heads, D, n_win, topk) -> float:
    """Rough forward+backward footprint of the gather reference: logits, fp32 softmax, probabilities, grads."""
    T = (H // n_win) * (W // n_win)
    return 16 * B * heads * n_win ** 2 * T * topk * T + 6 * B * n_win ** 2 * topk * T * heads * D * 2


def fwd_bwd(fn: Callable[..., torch.Tensor], leaves: list[torch.Tensor], grad: torch.Tensor) -> Callable[[], None]:
    def step():
        for t in leaves:
            t.grad = None
        fn(*leaves).backward(grad)
    return step


def flex_fn(index: torch.Tensor, B: int, N: int, T: int, R: int):
    """FlexAttention over region-major tokens with a BlockMask built from ``index`` (None if unavailable)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    allowed = torch.zeros(B, R, R, dtype=torch.bool, device=index.device)
    allowed.scatter_(2, index, True)

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed[b, q_idx // T, kv_idx // T]

    block = 128 if T % 128 == 0 else 64
    mask = create_block_mask(mask_mod, B, None, N, N, device=index.device, BLOCK_SIZE=block)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, block_mask=mask), block


CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
               SDPBackend.MATH]


def _cudnn_first(fn: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """``fn(*args)`` with cuDNN's SDPA kernel preferred (the backward follows the forward's kernel)."""
    with sdpa_kernel(CUDNN_FIRST, set_priority=True):
        return fn(*args)


# methods also timed as one CUDA graph (no per-call host work) and by their summed device time
GRAPHED = ("triton det", "bra (routing + triton)", "auto", "dense (masked sdpa)", "dense sdpa")


def run_case(report: Report, name: str, B, H, W, heads, D, n_win, topk, ceilings: dict, deadline: float) -> None:
    dev, dt = DEVICE, DTYPE
    R, T, N = n_win ** 2, (H // n_win) * (W // n_win), H * W
    c = counts(B, H, W, heads, D, n_win, topk)
    q, k, v = torch.randn(3, B, H, W, heads, D, device=dev, dtype=dt)
    grad = torch.randn_like(q)
    index = route_regions(q, k, n_win, topk, D ** -0.5)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    base = dict(case=name, shape=f"B{B} {H}x{W} h{heads} d{D}", regions=f"{n_win}x{n_win} of {T}", topk=topk,
                fwd_floor_us=1e6 * max(c["fwd_flops"] / (ceilings["tflops"] * 1e12),
                                       c["fwd_bytes"] / (ceilings["gbs"] * 1e9)),
                fb_floor_us=1e6 * max(c["fb_flops"] / (ceilings["tflops"] * 1e12),
                                      c["fb_bytes"] / (ceilings["gbs"] * 1e9)))

    methods: dict[str, tuple[Callable, list[torch.Tensor], torch.Tensor] | str] = {}
    scale = D ** -0.5
    op = _bra_triton  # the fused op itself (eager autograd.Function), without the index range check
    methods["triton"] = (lambda q, k, v: op(q, k, v, index, n_win, scale, False), leaves, grad)
    methods["triton det"] = (lambda q, k, v: op(q, k, v, index, n_win, scale, True), leaves, grad)
    methods["bra (routing + triton)"] = (lambda q, k, v: bra(q, k, v, n_win, topk, backend="triton"), leaves, grad)
    bias_bytes = B * N * N * q.element_size()
    if bias_bytes < 0.1 * (torch.cuda.get_device_properties(0).total_memory if dev == "cuda" else 2**34):
        methods["dense (masked sdpa)"] = (
            lambda q, k, v: routed_attention_dense(q, k, v, index, n_win, scale), leaves, grad)
        methods["dense, cuDNN SDPA first"] = (
            lambda q, k, v: _cudnn_first(routed_attention_dense, q, k, v, index, n_win, scale), leaves, grad)
    else:
        methods["dense (masked sdpa)"] = f"skipped: the B*N^2 bias alone is {bias_bytes / 2**30:.0f} GiB"
    methods["auto"] = (lambda q, k, v: bra(q, k, v, n_win, topk, backend="auto"), leaves, grad)
    chosen = auto_backend(q, n_win, topk) if dev == "cuda" else "reference"
    if chosen == "triton":
        chosen += " det" if choose_deterministic(None, T) else " atomics"
    memory = torch.cuda.get_device_properties(0).total_memory if dev == "cuda" else 2**34
    if reference_bytes(B, H, W, heads, D, n_win, topk) < 0.6 * memory:
        methods["gather ref"] = (lambda q, k, v: routed_attention(q, k, v, index, n_win, backend="reference"),
                                 leaves, grad)
    else:
        methods["gather ref"] = f"skipped: needs ~{reference_bytes(B, H, W, heads, D, n_win, topk) / 2**30:.0f} GiB"
    dense = [t.detach().flatten(1, 2).transpose(1, 2).requires_grad_() for t in (q, k, v)]  # [B, heads, N, D] views
    methods["dense sdpa"] = (lambda q, k, v: F.scaled_dot_product_attention(q, k, v), dense,
                             grad.flatten(1, 2).transpose(1, 2))
    try:
        if dev != "cuda":
            raise RuntimeError("FlexAttention is timed on CUDA only")
        if T < 64:
            raise RuntimeError(f"regions of {T} tokens are smaller than a flex block (64+)")
        fn, block = flex_fn(index, B, N, T, R)
        rm = [region_partition(t, n_win).flatten(1, 2).transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v)]
        grad_rm = region_partition(grad, n_win).flatten(1, 2).transpose(1, 2).contiguous()
        methods[f"flex (block {block})"] = (fn, rm, grad_rm)
    except Exception as e:  # noqa: BLE001 - the row records why flex could not run
        methods["flex"] = f"not run: {str(e)[:100]}"

    out = routed_attention(q, k, v, index, n_win, backend="triton")
    if isinstance(methods["gather ref"], tuple):
        with torch.no_grad():
            ref = routed_attention(q.float(), k.float(), v.float(), index, n_win, backend="reference")
        base["rel_l2_vs_fp32_ref"] = float((out.float() - ref).norm() / ref.norm())
        del ref
    if time.time() < deadline:
        routing_ms = time_ms(lambda: route_regions(q, k, n_win, topk, D ** -0.5))
        report.add(**base, method="routing", fwd_ms=routing_ms, note="route_regions alone, forward only")
    for method, m in methods.items():
        row = dict(base, method=method, note=f"chose {chosen}" if method == "auto" else None)
        if isinstance(m, str):
            report.add(**dict(row, note=m))
            continue
        if time.time() > deadline:
            report.add(**dict(row, note="skipped: benchmark time budget spent"))
            continue
        fn, ls, g = m
        try:
            with torch.no_grad():
                row["fwd_ms"] = time_ms(lambda: fn(*ls))
            step = fwd_bwd(fn, ls, g)
            row["fwd_bwd_ms"] = time_ms(step)
            row["peak_fb_mib"] = peak_memory_mib(step)
            if dev == "cuda" and method in GRAPHED:
                row["gpu_ms"] = gpu_time_ms(step)
                row["graphed_fb_ms"] = graphed_time_ms(step)
            row["fwd_tflops"] = c["fwd_flops"] / (row["fwd_ms"] * 1e-3) / 1e12
            row["fb_pct_floor"] = 100 * base["fb_floor_us"] * 1e-3 / row["fwd_bwd_ms"]
        except torch.OutOfMemoryError:
            row["note"] = "out of memory"
        except Exception as e:  # noqa: BLE001 - recorded in the table
            row["note"] = f"{type(e).__name__}: {str(e)[:100]}"
        if dev == "cuda":
            torch.cuda.empty_cache()
        report.add(**row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)


@contextlib.contextmanager
def override_config(kernel: str, **changes):
    """Temporarily change one kernel's launch parameters (for --sweep)."""
    original = bra_triton.kernel_config

    def patched(name, T, D, Dv):
        config = original(name, T, D, Dv)
        return dict(config, **changes) if name == kernel else config

    bra_triton.kernel_config = patched
    try:
        yield
    finally:
        bra_triton.kernel_config = original


SWEEP = {
    "fwd": [dict(), dict(num_warps=4), dict(num_warps=1), dict(BLOCK_N=32), dict(BLOCK_N=128)],
    "dq": [dict(), dict(num_warps=4), dict(BLOCK_M=32), dict(BLOCK_N=32), dict(BLOCK_N=64)],
    "dkdv": [dict(), dict(num_warps=4), dict(BLOCK_N=32), dict(BLOCK_M=32), dict(BLOCK_M=64)],
}


def sweep(report: Report, cases, deadline: float, variants: int | None = None) -> None:
    """Time each kernel alone under alternative launch parameters (rows with method 'sweep')."""
    for name, B, H, W, heads, D, n_win, topk in cases:
        q, k, v = torch.randn(3, B, H, W, heads, D, device=DEVICE, dtype=DTYPE)
        index = route_regions(q, k, n_win, topk, 1.0)
        T = (H // n_win) * (W // n_win)
        out, lse = bra_triton.routed_attention_fwd(q, k, v, index, n_win, D ** -0.5)
        grad = torch.randn_like(out)
        for kernel, variants_ in SWEEP.items():
            for changes in variants_[:variants]:
                if time.time() > deadline:
                    return
                if changes.get("BLOCK_M", 0) > max(16, T) * 2 and kernel != "dkdv":
                    continue
                with override_config(kernel, **changes):
                    if kernel == "fwd":
                        fn = functools.partial(bra_triton.routed_attention_fwd, q, k, v, index, n_win, D ** -0.5)
                    else:
                        fn = functools.partial(bra_triton.routed_attention_bwd, grad, q, k, v, out, lse, index,
                                               n_win, D ** -0.5, kernel == "dkdv")
                    try:
                        ms = time_ms(fn)
                    except Exception as e:  # noqa: BLE001
                        ms, changes = None, dict(changes, error=type(e).__name__)
                config = bra_triton.kernel_config(kernel, T, D, D)
                report.add(case=name, method=f"sweep {kernel}", note=str(dict(config, **changes)), fwd_ms=ms)
                print(name, kernel, dict(config, **changes), ms, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one small case (smoke test)")
    parser.add_argument("--sweep", action="store_true", help="also time alternative launch parameters")
    parser.add_argument("--budget", type=float, default=1e9, help="seconds after which remaining timings are skipped")
    parser.add_argument("--cases", nargs="+", help="cases whose name starts with one of these (e.g. stage2 stage3)")
    parser.add_argument("--name", default="bra", help="result file name")
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args()
    cases = QUICK_CASES if args.quick else [c for c in CASES if not args.cases or c[0].startswith(tuple(args.cases))]
    deadline = time.time() + args.budget
    torch.manual_seed(0)
    ceilings = (dict(gbs=measured_bandwidth_gbs(), tflops=measured_matmul_tflops()) if DEVICE == "cuda"
                else dict(gbs=float("nan"), tflops=float("nan")))
    columns = ["case", "method", "fwd_ms", "fwd_bwd_ms", "gpu_ms", "graphed_fb_ms", "peak_fb_mib", "fwd_floor_us",
               "fb_floor_us", "fb_pct_floor",
               "fwd_tflops", "rel_l2_vs_fp32_ref", "shape", "regions", "topk", "note"]
    report = Report(args.name, "Bi-level routing attention (bf16): fused Triton vs gather reference, dense SDPA, "
                    "FlexAttention", columns=columns, notes=(
                        f"Measured ceilings: {ceilings['gbs']:.0f} GB/s copy, {ceilings['tflops']:.0f} TFLOP/s bf16 "
                        "matmul. Floors = max(FLOPs / matmul rate, minimum bytes / bandwidth). 'triton' = fast "
                        "mode (fp32 atomics for dk/dv), 'triton det' = deterministic inverted-index backward. "
                        "Dense SDPA attends to all tokens (not the same function). Flex runs on region-major "
                        "token order with a BlockMask from the same region index. gpu_ms = summed device time of the "
                        "kernels per forward+backward (torch.profiler); graphed_fb_ms = that forward+backward "
                        "captured as one CUDA graph and replayed (no per-call host work)."))
    if args.sweep:
        sweep(report, QUICK_CASES if args.quick else [CASES[1], CASES[2], CASES[3]],
              time.time() + 0.35 * args.budget, variants=2 if args.quick else None)
        report.save(args.out)
    for case in cases:
        run_case(report, *case, ceilings=ceilings, deadline=deadline)
        report.save(args.out)
    print(report.markdown())


if __name__ == "__main__":
    main()
