"""FocalNet-T, compiled (or eager): the global context as a mean vs as a matrix product (A/B, one process).

Inductor fuses FocalModulation's global context, ``GELU(ctx).mean((2, 3))`` over a channels-last map, into a
looped reduction that leads the compiled inference profile (``NOTES_timm_twins.md``, round 9). The ``matmul``
variant computes the same mean as ``ones(HW) / HW @ ctx`` (a GEMM Inductor does not fuse into); timm's twin runs
in the same process. bf16 autocast, channels-last input, batch 128, 224², ``do_bench`` medians, repeats in
alternating order; inference = forward under ``no_grad``, train = forward + backward + AdamW step.

    python -m benchmarks.focalnet_modulation --out benchmarks/results
    python -m benchmarks.focalnet_modulation --eager --modes infer train --name focalnet_modulation_eager
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

import attnzoo  # noqa: F401  (registers the models)
from attnzoo.blocks import focal_modulation as fm
from benchmarks.harness import RESULTS_DIR, Report, model_steps, time_ms

_ORIGINAL = fm.FocalModulation.forward


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


def _matmul_forward(self: fm.FocalModulation, x: torch.Tensor) -> torch.Tensor:
    """FocalModulation.forward with the global context's mean as a matrix product."""
    q, ctx, gates = self.f(x).split([self.dim, self.dim, self.focal_level + 1], dim=-1)
    ctx = fm._nchw(ctx)
    ctx = self.focal_layers[0](ctx)
    ctx_all = _nhwc(ctx) * gates[..., :1]
    for level in range(1, self.focal_level):
        ctx = self.focal_layers[level](ctx)
        ctx_all = ctx_all + _nhwc(ctx) * gates[..., level:level + 1]
    tokens = _nhwc(ctx).flatten(1, 2)  # [B, HW, C]
    weights = tokens.new_full((1, tokens.shape[1]), 1.0 / tokens.shape[1])
    ctx_global = self.act(torch.matmul(weights, tokens)).unsqueeze(1)  # [B, 1, 1, C]
    ctx_all = ctx_all + ctx_global * gates[..., self.focal_level:]
    if self.normalize_modulator:
        ctx_all = ctx_all / (self.focal_level + 1)
    x = q * self.h(ctx_all)
    x = self.ln(x)
    return self.proj_drop(self.proj(x))


VARIANTS: dict[str, Callable] = {"mean": _ORIGINAL, "matmul": _matmul_forward}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["focalnet_t_srf", "focalnet_t_lrf"])
    ap.add_argument("--modes", nargs="+", default=["infer"], choices=["infer", "train"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--eager", action="store_true", help="without torch.compile")
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: batch 2 at 64², eager")
    ap.add_argument("--name", default="focalnet_modulation")
    ap.add_argument("--out", default=str(RESULTS_DIR))
    args = ap.parse_args()
    batch, img, compile = (2, 64, False) if args.quick else (128, 224, not args.eager)
    rep = Report(args.name, "FocalNet-T: global context as mean vs matmul (bf16)", notes=(
        f"batch {batch}, {img}², torch.compile={compile}, drop path 0; img/s = batch / median of {args.repeats} "
        "do_bench medians taken in alternating order; twin = timm's focalnet_tiny_* (its own code)"))
    cases = []
    for name in args.models:
        for variant in VARIANTS:
            fm.FocalModulation.forward = VARIANTS[variant]
            cases.append((name, variant, model_steps(name, batch, img, compile, DEVICE)))
        fm.FocalModulation.forward = _ORIGINAL
        twin = name.replace("focalnet_t_", "focalnet_tiny_")
        cases.append((twin, "timm", model_steps(twin, batch, img, compile, DEVICE)))
    times: dict[tuple[str, str, str], list[float]] = {}
    t0 = time.perf_counter()
    for r in range(args.repeats):
        for name, variant, steps in (cases if r % 2 == 0 else cases[::-1]):
            for mode in args.modes:
                if variant != "timm":
                    fm.FocalModulation.forward = VARIANTS[variant]
                times.setdefault((name, variant, mode), []).append(time_ms(steps[mode]))
                fm.FocalModulation.forward = _ORIGINAL
        print(f"repeat {r + 1}/{args.repeats} done after {time.perf_counter() - t0:.0f} s", flush=True)
    for (name, variant, mode), ms in times.items():
        med = statistics.median(ms)
        rep.add(model=name, variant=variant, mode=mode, img_s=round(batch / med * 1e3, 1),
                spread=round((max(ms) - min(ms)) / med, 4), repeats=len(ms))
    js, md = rep.save(args.out)
    print(md.read_text())


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

if __name__ == "__main__":
    main()
