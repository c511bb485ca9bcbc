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
    python -m benchmarks.na2d --tune          # time tile shapes per kernel on the main cases
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from attnzoo.kernels import na2d
from attnzoo.kernels.na2d import _prefer_dense
from benchmarks.harness import RESULTS_DIR, Report, measured_bandwidth_gbs, measured_matmul_tflops, time_ms

# (group, H, W, heads, D, kernel, dilation, batch, rpb)
NAT = [("nat", s, s, h, 32, 7, 1, 128, rpb) for s, h in ((56, 2), (28, 4), (14, 8), (7, 16)) for rpb in (True, False)]
DINAT = [("dinat", s, s, h, 32, 7, d, 128, True) for s, h, d in ((56, 2, 8), (28, 4, 4), (14, 8, 2))]
HIRES = [("hires", s, s, 4, d, k, 1, 8, True) for s in (128, 256) for d in (32, 64) for k in (7, 13)]
QUICK = [("nat", 56, 56, 2, 32, 7, 1, 8, True), ("dinat", 56, 56, 2, 32, 7, 8, 8, True)]
# Baselines that are affordable per case: flex compiles once per shape; dense SDPA is O(L^2).
FLEX_CASES = {("nat", 56, 1, True), ("nat", 56, 1, False), ("nat", 28, 1, True), ("dinat", 56, 8, True),
              ("dinat", 28, 4, True), ("hires", 128, 1, True), ("hires", 256, 1, True)}
# Tile candidates (BY, BX, KBY, KBX, num_warps, num_stages) for --tune; compile time bounds the list.
TUNE_CONFIGS = [(8, 8, 2, 16, 4, 2), (8, 8, 1, 16, 4, 2), (8, 8, 4, 16, 4, 2), (8, 8, 2, 16, 2, 2),
                (8, 8, 4, 16, 4, 3), (16, 8, 2, 16, 4, 2), (16, 8, 2, 16, 8, 2), (16, 8, 4, 16, 4, 2),
                (16, 8, 4, 16, 8, 2), (8, 16, 1, 32, 4, 2), (16, 16, 2, 32, 8, 2), (32, 8, 2, 16, 8, 2)]


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
            qs, ks, vs = (t.flatten(1, 2).transpose(1, 2) for t in (q, kk, v))
            fwd = lambda: F.scaled_dot_product_attention(qs, ks, vs)  # noqa: E731
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
        if backend == "auto":
            row["auto_picks"] = ("reference" if dev == "cpu" else
                                 "dense" if _prefer_dense(H, W, (k, k), B, N) else "triton")
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


def tune(budget_s: float = 110.0) -> list[dict]:
    """Time each kernel of the Triton path over candidate tile shapes on two main cases (``budget_s`` each)."""
    from attnzoo.kernels import na2d_triton as T

    rows = []
    for case in [NAT[0], HIRES[2]]:
        t0 = time.perf_counter()
        group, H, W, N, D, k, d, B, _ = case
        q, kk, v = (torch.randn(B, H, W, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        rpb = torch.randn(N, 2 * k - 1, 2 * k - 1, device="cuda")
        scale = D ** -0.5
        out, lse = T.na2d_forward(q, kk, v, rpb, (k, k), (d, d), scale)
        dout = torch.randn_like(out)
        delta = (dout.float() * out.float()).sum(-1).permute(0, 3, 1, 2).contiguous()
        args = (dout, q, kk, v, rpb, lse, delta, (k, k), (d, d), scale)
        for by, bx, kby, kbx, warps, stages in TUNE_CONFIGS:
            if time.perf_counter() - t0 > budget_s:
                break
            t = T.Tiles(by, bx, kby, kbx, warps, stages)
            try:
                ms = dict(fwd=time_ms(lambda: T.na2d_forward(q, kk, v, rpb, (k, k), (d, d), scale, tiles=t), rep=30),
                          dq=time_ms(lambda: T.na2d_backward_dq(*args, tiles=t), rep=30),
                          dkdv=time_ms(lambda: T.na2d_backward_dkdv(*args, tiles=t), rep=30),
                          drpb=time_ms(lambda: T.na2d_backward_drpb(*args, False, tiles=t), rep=30))
            except Exception as e:  # out of resources for this shape
                rows.append(dict(case=_name(case), tiles=str(t), error=type(e).__name__))
                continue
            rows.append(dict(case=_name(case), tiles=f"{by}x{bx}/{kby}x{kbx} w{warps} s{stages}",
                             **{f"{kind}_ms": v for kind, v in ms.items()}))
            print(rows[-1], flush=True)
    for case in {r["case"] for r in rows}:
        done = [r for r in rows if r["case"] == case and "fwd_ms" in r]
        for kind in ("fwd", "dq", "dkdv", "drpb"):
            best = min(done, key=lambda r: r[f"{kind}_ms"])
            print(f"best {kind:5s} {case}: {best['tiles']} {best[f'{kind}_ms']:.4f} ms", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--groups", default="nat,dinat,hires")
    ap.add_argument("--backends", default="triton,dense,auto,flex,sdpa,reference")
    ap.add_argument("--reps", type=int, default=100, help="do_bench repetition time per measurement (ms)")
    ap.add_argument("--out", default=str(RESULTS_DIR))
    args = ap.parse_args()
    torch._dynamo.config.cache_size_limit = 64
    cuda = torch.cuda.is_available()
    bw = measured_bandwidth_gbs() if cuda else None
    mm = measured_matmul_tflops() if cuda else None
    if args.tune:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "na2d_tune.json").write_text(json.dumps(tune(), indent=1))
        return
    cases = QUICK if args.quick else [c for c in NAT + DINAT + HIRES if c[0] in args.groups.split(",")]
    notes = (f"bf16; measured copy bandwidth {bw:.0f} GB/s, bf16 matmul {mm:.0f} TFLOP/s. " if cuda else "") + (
        "TFLOP/s count only neighbourhood FLOPs (4·B·heads·H·W·k²·D forward, 3.5x forward+backward); "
        "floors: q,k,v,o (forward) and q,k,v,o,dO,dq,dk,dv + forward (fwd+bwd) once over the copy bandwidth. "
        "dense = na2d's masked SDPA path (neighbourhood + rpb as an additive mask, same function); auto = "
        "backend='auto' (its choice in auto_picks); sdpa = dense attention over all tokens (no mask, no rpb); "
        "reference = the PyTorch reference (dense on small maps, else chunked gather); "
        "flex = FlexAttention, compiled, same mask + rpb score_mod. NATTEN is not importable here.")
    report = Report("na2d", "na2d: fused Triton neighborhood attention vs baselines", notes=notes,
                    columns=["group", "case", "backend", "fwd_ms", "fwd_bwd_ms", "fwd_tflops", "fwd_bwd_tflops",
                             "fwd_floor_ms", "fwd_bwd_floor_ms", "triton_speedup_fwd", "triton_speedup_fwd_bwd",
                             "auto_picks", "error"])
    for case in cases:
        for row in _bench_case(case, args.backends.split(","), bw, args.reps):
            report.add(**row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    js, md = report.save(args.out)
    print(md.read_text())


if __name__ == "__main__":
    main()
