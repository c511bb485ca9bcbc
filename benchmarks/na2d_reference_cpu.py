"""The CPU reference on DiNAT's dilated shapes: the sub-grid path ``na2d_reference`` takes for maps whose sides divide
by the dilation, against the gather path it used before (forward+backward, float64, the same inputs).

    python -m benchmarks.na2d_reference_cpu      # writes benchmarks/results/na2d_reference_cpu.{json,md}
"""
from __future__ import annotations

import argparse
import time

import torch

from attnzoo.kernels.na2d_reference import na2d_gather, na2d_reference
from benchmarks.harness import RESULTS_DIR, Report

# (B, H, W, heads, D, kernel, dilation): DiNAT-T's levels in the Mask R-CNN test (784² input), and a 224² model's
CASES = [(2, 196, 196, 2, 32, 7, 28), (2, 98, 98, 4, 32, 7, 14), (2, 49, 49, 8, 32, 7, 7), (8, 56, 56, 2, 32, 7, 8)]


def _fwd_bwd_s(fn, inputs, repeats: int) -> float:
    """Median seconds of one forward and backward."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(*inputs)
        torch.autograd.grad(out, inputs, torch.ones_like(out))
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS_DIR))
    args = ap.parse_args()
    report = Report("na2d_reference_cpu", "na2d CPU reference: dilated maps as sub-grids vs the gather path",
                    notes="float64 forward+backward on the CPU, median of --repeats; max_abs_diff: outputs of the two "
                          "paths on the same inputs.")
    for B, H, W, N, D, k, d in CASES:
        g = torch.Generator().manual_seed(0)
        inputs = [torch.randn(B, H, W, N, D, dtype=torch.float64, generator=g).requires_grad_() for _ in range(3)]
        inputs.append(torch.randn(N, 2 * k - 1, 2 * k - 1, dtype=torch.float64, generator=g).requires_grad_())
        sub = lambda q, kk, v, r: na2d_reference(q, kk, v, (k, k), (d, d), r, D ** -0.5)  # noqa: E731
        gather = lambda q, kk, v, r: na2d_gather(q, kk, v, (k, k), (d, d), r, D ** -0.5)  # noqa: E731
        with torch.no_grad():
            diff = (sub(*inputs) - gather(*inputs)).abs().max().item()
        s_sub, s_gather = _fwd_bwd_s(sub, inputs, args.repeats), _fwd_bwd_s(gather, inputs, args.repeats)
        row = report.add(case=f"B{B} {H}x{W} h{N} d{D} k{k} dil{d}", subgrid_s=s_sub, gather_s=s_gather,
                         speedup=s_gather / s_sub, max_abs_diff=diff)
        print(row, flush=True)
    report.save(args.out)


if __name__ == "__main__":
    main()
