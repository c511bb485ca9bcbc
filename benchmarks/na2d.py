"""na2d kernel benchmark: fused Triton vs masked dense SDPA, FlexAttention (compiled), plain SDPA, the gather reference.

Forward and forward+backward medians (``triton.testing.do_bench``) in bf16 on the NAT/DiNAT shapes at
224² (batch 128) and on high-resolution maps (batch 8). Each row carries the effective TFLOP/s
(useful neighbourhood FLOPs only: 4*B*heads*H*W*kh*kw*D forward, 3.5x that forward+backward) and the
HBM floor (q, k, v, o once forward; plus dO read and dq, dk, dv written for forward+backward, over the
measured copy bandwidth). ``dense`` is na2d's masked-SDPA path (same function, rpb included) and
``auto`` what ``backend="auto"`` runs (its choice in the ``auto_picks`` column): together with ``triton``
they show the small-map crossover on the NAT/DiNAT shapes.

    python -m benchmarks.na2d                 # full run, writes benchmarks/results/na2d.{json,md}
    python -m benchmarks.na2d --quick         # a few small cases (CPU smoke run or a first look)

Each Triton row also carries ``gpu_ms``: the summed device time of the kernels one forward+backward launches
(``torch.profiler``), so host time (``fwd_bwd_ms - gpu_ms`` when the host is the bound) shows separately, and
``graphed_fwd_bwd_ms``: the same forward+backward captured once as a CUDA graph and replayed (no per-call host
work, as in a CUDA-graphed training step); all-token SDPA rows carry both too.
Tile sweeps live in ``benchmarks/na2d_tune.py``.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from attnzoo.kernels import na2d
from attnzoo.kernels.na2d import auto_backend
from benchmarks.harness import (RESULTS_DIR, Report, gpu_time_ms, graphed_time_ms, measured_bandwidth_gbs,
                                measured_matmul_tflops, time_ms)
from benchmarks.na2d_flex import na2d_flex

# (group, H, W, heads, D, kernel, dilation, batch, rpb)
NAT = [("nat", s, s, h, 32, 7, 1, 128, rpb) for s, h in ((56, 2), (28, 4), (14, 8), (7, 16)) for rpb in (True, False)]
DINAT = [("dinat", s, s, h, 32, 7, d, 128, rpb)
         for s, h, d in ((56, 2, 8), (28, 4, 4), (14, 8, 2)) for rpb in (True, False)]
HIRES = [("hires", 256, 256, 4, 64, 13, 1, 4, rpb) for rpb in (True, False)] + [
    ("hires", 128, 128, 4, 32, k, 1, 8, True) for k in (7, 13)]
QUICK = [("nat", 56, 56, 2, 32, 7, 1, 8, True), ("dinat", 56, 56, 2, 32, 7, 8, 8, True)]
# Baselines that are affordable per case: flex compiles once per shape; dense SDPA is O(L^2).
FLEX_CASES = {("nat", 56, 1, False)} | {("nat", s, 1, True) for s in (56, 28, 14, 7)} | {("dinat", 56, 8, True)}


def _flops(B, H, W, N, D, k) -> float:
    return 4.0 * B * N * H * W * k * k * D


def _bench_case(case, backends, bw_gbs, reps) -> list[dict]:
    group, H, W, N, D, k, d, B, use_rpb = case
    dev, dt = "cuda" if torch.cuda.is_available() else "cpu", torch.bfloat16
    q, kk, v = (torch.randn(B, H, W, N, D, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    rpb = torch.randn(N, 2 * k - 1, 2 * k - 1, device=dev, dtype=torch.float32, requires_grad=True) if use_rpb else None
    dout = torch.randn_like(q)
    leaves = [q, kk, v] + ([rpb] if use_rpb else [])
    tensor_bytes = q.numel() * q.element_size()
    rows = []
    for backend in backends:
        if backend == "flex" and (group, H, d, use_rpb) not in FLEX_CASES:
            continue
        if backend == "sdpa" and (H * W > 128 * 128 or use_rpb):
            continue  # dense over all tokens: one no-rpb row per shape is the comparison
        if backend == "reference" and B * H * W > 128 * 56 * 56:
            continue
        if backend in ("dense", "auto") and group == "hires":
            continue  # dense is O(L^2) (auto runs Triton there): the crossover lives on the 224² shapes
        if backend == "sdpa":
            def fwd():  # token views made per call: views kept across calls hold the leaves' autograd nodes, which
                # would tie the default stream into a CUDA graph's capture
                return F.scaled_dot_product_attention(*(t.flatten(1, 2).transpose(1, 2) for t in (q, kk, v)))
        elif backend == "flex":
            fwd = lambda: na2d_flex(q, kk, v, (k, k), (d, d), rpb, D ** -0.5)  # noqa: E731
        else:
            fwd = lambda: na2d(q, kk, v, k, d, rpb, backend=backend)  # noqa: E731

        def fwd_bwd():
            out = fwd()
            torch.autograd.grad(out, leaves, dout if out.shape == dout.shape else dout.flatten(1, 2).transpose(1, 2))

        try:
            with torch.no_grad():
                t_fwd = time_ms(fwd, rep=reps)
            t_fb = time_ms(fwd_bwd, rep=reps)
        except Exception as e:  # a baseline that cannot run this case (e.g. out of memory) is reported
            rows.append(dict(group=group, case=_name(case), backend=backend, error=f"{type(e).__name__}: {e}"[:120]))
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
            continue
        fl = _flops(B, H, W, N, D, k)
        row = dict(group=group, case=_name(case), backend=backend, fwd_ms=t_fwd, fwd_bwd_ms=t_fb,
                   fwd_tflops=fl / t_fwd / 1e9, fwd_bwd_tflops=3.5 * fl / t_fb / 1e9)
        if backend in ("triton", "sdpa") and dev == "cuda":
            row["gpu_ms"] = gpu_time_ms(fwd_bwd)
            try:
                row["graphed_fwd_bwd_ms"] = graphed_time_ms(fwd_bwd, rep=reps)
            except RuntimeError as e:  # the timed rows stand; the row says why its graph could not be captured
                row["error"] = f"CUDA graph capture: {type(e).__name__}: {e}"[:120]
        if backend == "auto":
            row["auto_picks"] = "reference" if dev == "cpu" else auto_backend(q, (k, k), False)
        if bw_gbs:
            row.update(fwd_floor_ms=4 * tensor_bytes / bw_gbs / 1e6, fwd_bwd_floor_ms=12 * tensor_bytes / bw_gbs / 1e6)
        rows.append(row)
    base = {r["backend"]: r for r in rows if "fwd_ms" in r}
    if "triton" in base:
        for r in rows:
            if "fwd_ms" in r and r["backend"] != "triton":
                r["triton_speedup_fwd"] = r["fwd_ms"] / base["triton"]["fwd_ms"]
                r["triton_speedup_fwd_bwd"] = r["fwd_bwd_ms"] / base["triton"]["fwd_bwd_ms"]
    return rows


def _name(case) -> str:
    group, H, W, N, D, k, d, B, use_rpb = case
    return f"B{B} {H}x{W} h{N} d{D} k{k} dil{d}" + (" rpb" if use_rpb else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--groups", default="nat,dinat,hires")
    ap.add_argument("--backends", default="triton,dense,auto,flex,sdpa,reference")
    ap.add_argument("--reps", type=int, default=100, help="do_bench repetition time per measurement (ms)")
    ap.add_argument("--out", default=str(RESULTS_DIR))
    args = ap.parse_args()
    torch._dynamo.config.cache_size_limit = 64
    cuda = torch.cuda.is_available()
    bw = measured_bandwidth_gbs() if cuda else None
    mm = measured_matmul_tflops() if cuda else None
    cases = QUICK if args.quick else [c for c in NAT + DINAT + HIRES if c[0] in args.groups.split(",")]
    notes = (f"bf16; measured copy bandwidth {bw:.0f} GB/s, bf16 matmul {mm:.0f} TFLOP/s. " if cuda else "") + (
        "TFLOP/s count only neighbourhood FLOPs (4·B·heads·H·W·k²·D forward, 3.5x forward+backward); "
        "floors: q,k,v,o (forward) and q,k,v,o,dO,dq,dk,dv + forward (fwd+bwd) once over the copy bandwidth. "
        "dense = na2d's masked SDPA path (neighbourhood + rpb as an additive mask, same function); auto = "
        "backend='auto' (its choice in auto_picks); sdpa = dense attention over all tokens (no mask, no rpb); "
        "reference = the PyTorch reference (dense on small maps, else chunked gather); "
        "flex = FlexAttention, compiled, same mask + rpb score_mod (benchmarks/na2d_flex.py); gpu_ms = summed "
        "device time of the kernels per forward+backward (torch.profiler); graphed_fwd_bwd_ms = that "
        "forward+backward captured as one CUDA graph and replayed (no per-call host work). NATTEN is not "
        "importable here.")
    report = Report("na2d", "na2d: fused Triton neighborhood attention vs baselines", notes=notes,
                    columns=["group", "case", "backend", "fwd_ms", "fwd_bwd_ms", "fwd_tflops", "fwd_bwd_tflops",
                             "gpu_ms", "graphed_fwd_bwd_ms", "fwd_floor_ms", "fwd_bwd_floor_ms", "triton_speedup_fwd",
                             "triton_speedup_fwd_bwd",
                             "auto_picks", "error"])
    for case in cases:
        for row in _bench_case(case, args.backends.split(","), bw, args.reps):
            report.add(**row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    js, md = report.save(args.out)
    print(md.read_text())


if __name__ == "__main__":
    main()
