"""Tile sweep for the na2d Triton kernels, and a GPU correctness check of all three kernels.

For each issue case (NAT/DiNAT stage shapes at batch 128 and a 256² k13 d64 map) and each kernel (forward,
dq with delta and the window-layout dS for d_rpb, dk/dv), times candidate tile shapes with ``do_bench`` medians and
prints the best. Compilation is done first in a pool of worker processes (it fills Triton's on-disk
cache), so the timing pass in this process only loads binaries. ``choose_tiles`` in
``attnzoo/kernels/na2d_triton.py`` is written from these results.

    python -m benchmarks.na2d_tune check      # GPU correctness, writes benchmarks/results/na2d_check.{json,md}
    python -m benchmarks.na2d_tune compile    # fill Triton's cache (worker processes)
    python -m benchmarks.na2d_tune sweep      # time the candidates, writes benchmarks/results/na2d_tune.{json,md}
    python -m benchmarks.na2d_tune sweep --kernels dq --walked 2x8 4x8 --imgs 1 2 --warps 4 8   # a subset
    git show REV:attnzoo/kernels/na2d_triton.py > base.py
    python -m benchmarks.na2d_tune ab --baseline base.py   # each kernel (and the whole backward) against an
                                                           # earlier version, one process
    python -m benchmarks.na2d_tune drpb       # the d_rpb reduction's constants, writes na2d_drpb.{json,md}
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import multiprocessing as mp
import sys

import torch

from benchmarks.harness import RESULTS_DIR, Report, kernel_times_ms, time_ms

# (name, B, H, W, heads, D, kernel, dilation)
CASES = [("nat56", 128, 56, 56, 2, 32, 7, 1), ("nat28", 128, 28, 28, 4, 32, 7, 1), ("nat14", 128, 14, 14, 8, 32, 7, 1),
         ("nat7", 128, 7, 7, 16, 32, 7, 1), ("dinat56_d8", 128, 56, 56, 2, 32, 7, 8),
         ("hires256_k13_d64", 4, 256, 256, 4, 64, 13, 1)]
# (BY, BX, KBY, KBX, num_warps, num_stages): owned tile, walked block (the sweep adds images per program)
CANDIDATES = [(8, 8, 4, 16, 4, 2), (8, 8, 4, 16, 4, 3), (8, 8, 2, 16, 4, 3), (8, 8, 8, 8, 4, 3), (8, 8, 4, 8, 4, 3),
              (8, 8, 2, 8, 4, 3), (8, 8, 1, 16, 4, 3),
              (8, 8, 2, 32, 4, 3), (8, 8, 4, 16, 2, 3), (16, 8, 4, 16, 4, 3), (16, 8, 4, 16, 8, 3),
              (8, 16, 2, 32, 4, 3), (8, 16, 4, 16, 8, 3), (16, 16, 4, 16, 8, 3), (16, 16, 4, 8, 8, 3)]
KERNELS = ("fwd", "dq", "dkdv")
KERNEL_NAMES = {"fwd": "_na2d_fwd_kernel", "dq": "_na2d_bwd_dq_kernel", "dkdv": "_na2d_bwd_dkdv_kernel"}


def _inputs(case, dtype=torch.bfloat16, device="cuda", batch=None):
    _, B, H, W, N, D, k, d = case
    B = batch or B
    g = torch.Generator(device=device).manual_seed(0)
    q, kk, v = (torch.randn(B, H, W, N, D, device=device, dtype=dtype, generator=g) for _ in range(3))
    rpb = torch.randn(N, 2 * k - 1, 2 * k - 1, device=device, generator=g)
    return q, kk, v, rpb


def _valid(case, t) -> bool:
    from attnzoo.kernels import na2d_triton as T

    _, B, H, W, N, D, k, d = case
    sub_h, sub_w = -(-H // d), -(-W // d)
    by, bx, kby, kbx = t.BY, t.BX, t.KBY, t.KBX
    return by <= T._p2(sub_h) and bx <= T._p2(sub_w) and kby * kbx >= 16


@contextlib.contextmanager
def _tiles(kernel, t):
    """Run ``kernel`` with tiles ``t`` (the others at their defaults): swaps ``choose_tiles`` and clears the
    launch-plan cache. A benchmark-side override; the production code has no tuning hook."""
    from attnzoo.kernels import na2d_triton as T

    default = T.choose_tiles
    T.choose_tiles = lambda k, *a: t if k == kernel else default(k, *a)
    T._plan.cache_clear()
    try:
        yield
    finally:
        T.choose_tiles = default
        T._plan.cache_clear()


def _runner(case, kernel, t, with_rpb=True, T=None):
    """A closure that launches ``kernel`` of ``case`` with tiles ``t`` (inputs prepared once), with a learned
    bias (its gradient included) or without one. ``T``: the kernels' module (default attnzoo's), whose own
    tile choice runs when ``t`` is None."""
    if T is None:
        from attnzoo.kernels import na2d_triton as T

    _, B, H, W, N, D, k, d = case
    q, kk, v, rpb = _inputs(case)
    rpb = rpb if with_rpb else None
    scale = D ** -0.5
    out, lse = T.na2d_forward(q, kk, v, rpb, (k, k), (d, d), scale)
    dout = torch.randn_like(out)

    def run():
        with _tiles(kernel, t) if t is not None else contextlib.nullcontext():
            if kernel == "fwd":
                return T.na2d_forward(q, kk, v, rpb, (k, k), (d, d), scale)
            return T.na2d_backward(dout, q, kk, v, rpb, out, lse, (k, k), (d, d), scale, True)
    return run


def _compile_job(job) -> str:
    from attnzoo.kernels import na2d_triton as T

    ci, kernel, cand, with_rpb = job
    try:
        _runner(CASES[ci], kernel, T.Tiles(*cand), with_rpb)()
        torch.cuda.synchronize()
        return "ok"
    except Exception as e:  # out of resources: reported by the timing pass
        return f"{type(e).__name__}"


def check() -> list[dict]:
    """bf16/fp16/fp32 forward and every gradient against the float64 reference; d_rpb bit-identical twice."""
    from attnzoo.kernels import na2d
    from attnzoo.kernels.na2d_reference import na2d_reference
    from tests.helpers import rel_l2

    rows = []
    shapes = [c[:1] + (2,) + c[2:] for c in CASES[:5]] + [("odd", 3, 23, 37, 3, 24, (5, 7), (2, 3)),
                                                        ("hires_k13", 1, 64, 48, 2, 64, 13, 1)]
    for case, dtype in itertools.product(shapes, (torch.bfloat16, torch.float16, torch.float32)):
        name, B, H, W, N, D, k, d = case
        g = torch.Generator(device="cuda").manual_seed(1)
        ks = k if isinstance(k, tuple) else (k, k)
        ds = d if isinstance(d, tuple) else (d, d)
        q, kk, v = (torch.randn(B, H, W, N, D, device="cuda", generator=g) for _ in range(3))
        rpb = torch.randn(N, 2 * ks[0] - 1, 2 * ks[1] - 1, device="cuda", generator=g)
        dout = torch.randn(B, H, W, N, D, device="cuda", generator=g)
        ref_in = [t.double().requires_grad_() for t in (q, kk, v, rpb)]
        ref = na2d_reference(*ref_in[:3], ks, ds, ref_in[3], D ** -0.5)
        ref_g = torch.autograd.grad(ref, ref_in, dout.double())
        inp = [t.to(dtype).requires_grad_() for t in (q, kk, v)] + [rpb.clone().requires_grad_()]
        out = na2d(*inp[:3], ks, ds, inp[3], backend="triton")
        grads = torch.autograd.grad(out, inp, dout.to(dtype))
        drpb2 = torch.autograd.grad(na2d(*inp[:3], ks, ds, inp[3], backend="triton"), inp[3], dout.to(dtype))[0]
        row = dict(case=name, dtype=str(dtype).split(".")[-1], out=rel_l2(out, ref),
                   **{f"d{n}": rel_l2(gr, rg) for n, gr, rg in zip(("q", "k", "v", "rpb"), grads, ref_g)},
                   drpb_bit_identical=bool(torch.equal(grads[3], drpb2)))
        # the same with a frozen table (no dS stores for d_rpb in the dq kernel)
        grads = torch.autograd.grad(na2d(*inp[:3], ks, ds, inp[3].detach(), backend="triton"), inp[:3], dout.to(dtype))
        row.update({f"d{n}_frozen_rpb": rel_l2(gr, rg) for n, gr, rg in zip("qkv", grads, ref_g)})
        rows.append(row)
        print(row, flush=True)
    return rows


def sweep(jobs: int, compile_only: bool = False, kernels=KERNELS, cases=None, with_rpb=True, walked=None,
          imgs=(1,), warps=(4,)) -> list[dict]:
    from attnzoo.kernels import na2d_triton as T

    base = CANDIDATES
    if walked is not None:  # 8 x 8 owned tiles with these walked blocks, at each warp count of ``warps``
        base = [c[:4] + (w,) + c[5:] for c in CANDIDATES for w in warps
                if c[:2] == (8, 8) and c[4] == 4 and f"{c[2]}x{c[3]}" in walked]
    cands = [c + (i,) for c in base for i in imgs]
    work = [(ci, kernel, cand, with_rpb) for ci, case in enumerate(CASES) for kernel in kernels for cand in cands
            if (cases is None or case[0] in cases) and _valid(case, T.Tiles(*cand))]
    with mp.get_context("spawn").Pool(jobs) as pool:
        status = pool.map(_compile_job, work, chunksize=1)
    if compile_only:
        return []
    rows = []
    for (ci, kernel, cand, _), st in zip(work, status):
        case, t = CASES[ci], T.Tiles(*cand)
        row = dict(case=case[0], kernel=kernel, tiles="{}x{}/{}x{} w{} s{} i{}".format(*cand), rpb=with_rpb)
        if st != "ok":
            rows.append(dict(row, error=st))
            continue
        try:
            times = kernel_times_ms(_runner(case, kernel, t, with_rpb))
            row["ms"] = sum(ms for name, ms in times.items() if KERNEL_NAMES[kernel] in name)
        except Exception as e:
            row["error"] = type(e).__name__
        rows.append(row)
        print(row, flush=True)
    for case in CASES:
        for kernel in kernels:
            done = [r for r in rows if r["case"] == case[0] and r["kernel"] == kernel and "ms" in r]
            if done:
                best = min(done, key=lambda r: r["ms"])
                best["best"] = True
                print(f"best {case[0]:18s} {kernel:5s} {best['tiles']:22s} {best['ms']:.4f} ms", flush=True)
    return rows


def _load_baseline(path: str):
    """An earlier ``na2d_triton.py`` (e.g. from ``git show``) as its own module."""
    spec = importlib.util.spec_from_file_location("na2d_triton_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _ab_compile_job(job) -> str:
    from attnzoo.kernels import na2d_triton as T

    baseline, ci, kernel, with_rpb = job
    try:
        _runner(CASES[ci], kernel, None, with_rpb, _load_baseline(baseline) if baseline else T)()
        torch.cuda.synchronize()
        return "ok"
    except Exception as e:  # reported by the timing pass
        return f"{type(e).__name__}"


def ab(baseline: str, jobs: int, cases=None, repeats: int = 3) -> list[dict]:
    """Device time of each kernel, this version against ``baseline``, each at its own tile choice, with and
    without a bias; the two alternate ``repeats`` times in this process and the medians are reported.
    Compilation runs first in ``jobs`` worker processes."""
    import statistics

    from attnzoo.kernels import na2d_triton as T

    picked = [(ci, c) for ci, c in enumerate(CASES) if cases is None or c[0] in cases]
    work = [(b, ci, kernel, r) for b in (baseline, None) for ci, _ in picked for kernel in KERNELS
            for r in (True, False)]
    with mp.get_context("spawn").Pool(jobs) as pool:
        pool.map(_ab_compile_job, work, chunksize=1)
    versions = {"baseline": _load_baseline(baseline), "current": T}
    rows = []
    for _, case in picked:
        for kernel, with_rpb in itertools.product(KERNELS, (True, False)):
            runs = {name: _runner(case, kernel, None, with_rpb, mod) for name, mod in versions.items()}
            ms = {name: [] for name in runs}
            bwd = {name: [] for name in runs}  # dq's runner is the whole backward: all its kernels
            for _ in range(repeats):
                for name, fn in runs.items():
                    times = kernel_times_ms(fn)
                    ms[name].append(sum(t for n, t in times.items() if KERNEL_NAMES[kernel] in n))
                    bwd[name].append(sum(times.values()))
            row = dict(case=case[0], kernel=kernel, rpb=with_rpb,
                       **{f"{name}_ms": statistics.median(v) for name, v in ms.items()},
                       **{f"{name}_spread": (max(v) - min(v)) / statistics.median(v) for name, v in ms.items()})
            if kernel == "dq":
                row.update({f"{name}_backward_ms": statistics.median(v) for name, v in bwd.items()})
            row["speedup"] = row["baseline_ms"] / row["current_ms"]
            rows.append(row)
            print(row, flush=True)
            del runs
            torch.cuda.empty_cache()
    return rows


# (DRPB_BR, DRPB_BC, DRPB_PROGRAMS, DRPB_BIN_PREC): round 14's geometry in each precision, then larger blocks and
# more programs on tensor cores (round 14's full geometry sweep, in exact fp32 products: na2d_drpb_r14.md)
DRPB_CANDIDATES = [(16, 64, 1024, p) for p in ("ieee", "tf32x3", "tf32")] + [
    (br, bc, progs, "tf32x3") for br, bc, progs in ((32, 64, 1024), (16, 128, 1024), (32, 128, 1024),
                                                    (64, 128, 1024), (16, 64, 2048))]


@contextlib.contextmanager
def _drpb_constants(T, cand):
    """The reduction kernel's module constants set to ``cand`` (a benchmark-side override)."""
    names = ("DRPB_BR", "DRPB_BC", "DRPB_PROGRAMS", "DRPB_BIN_PREC")
    default = tuple(getattr(T, n) for n in names)
    for n, val in zip(names, cand):
        setattr(T, n, val)
    try:
        yield
    finally:
        for n, val in zip(names, default):
            setattr(T, n, val)


def _cand(row: dict) -> tuple:
    return row["BR"], row["BC"], row["programs"], row["prec"]


def drpb(cases=None, baseline: str | None = None, repeats: int = 3) -> list[dict]:
    """The d_rpb reduction (window-layout dS -> bias gradient) per case: round 13's torch path (fp32 batch sum
    and two one-hot matmuls) against the reduction kernel at each candidate of its constants; device time of
    all kernels of one call, the bandwidth it reaches over the dS bytes, and the error vs float64. dS has the
    image groups the dq kernel writes (its images per program summed). With
    ``baseline`` (an earlier na2d_triton.py) then the whole backward with a learned bias at the shipped
    constants and at the sweep's best (geometric mean of time over the best per case) against the baseline,
    alternating ``repeats`` times in this process (medians)."""
    import statistics

    from attnzoo.kernels import na2d_triton as T
    from attnzoo.kernels.na2d_reference import rpb_grad_from_window_ds, window_ds_binning
    from tests.helpers import rel_l2

    rows = []
    picked = [c for c in CASES if cases is None or c[0] in cases]
    shipped = (T.DRPB_BR, T.DRPB_BC, T.DRPB_PROGRAMS, T.DRPB_BIN_PREC)
    for case in picked:
        name, B, H, W, N, D, k, d = case
        groups = T._plan("dq", (H, W, N, D), torch.bfloat16, (k, k), (d, d), True, True,
                         torch.backends.cuda.matmul.allow_tf32).groups(B)
        g = torch.Generator(device="cuda").manual_seed(0)
        dsnb = torch.randn(groups, N, H, k, W, k + 1, device="cuda", generator=g).to(torch.bfloat16)
        ref = rpb_grad_from_window_ds(dsnb, (k, k), (d, d))
        gbytes = dsnb.numel() * dsnb.element_size() / 1e9

        def row(variant, fn, **extra):
            ms = sum(kernel_times_ms(fn).values())
            r = dict(case=name, variant=variant, **extra, device_ms=ms, gb_per_s=gbytes / ms * 1e3,
                     rel_l2=rel_l2(fn(), ref))
            print(r, flush=True)
            return r

        my, mx = window_ds_binning(H, W, (k, k), (d, d), dsnb.device, torch.float32)  # cached in round 13
        rows.append(row("torch (round 13)",
                        lambda: my @ dsnb.sum(0, dtype=torch.float32).view(N, H * k, W * (k + 1)) @ mx))
        for cand in DRPB_CANDIDATES:
            try:
                with _drpb_constants(T, cand):
                    rows.append(row("kernel", lambda: T.rpb_grad_from_window_ds(dsnb, (k, k), (d, d)), BR=cand[0],
                                    BC=cand[1], programs=cand[2], prec=cand[3], shipped=cand == shipped))
            except Exception as e:  # out of resources
                print(name, cand, type(e).__name__, flush=True)
        dsnb = ref = my = mx = None
        torch.cuda.empty_cache()
    kern = [r for r in rows if r["variant"] == "kernel"]
    best_ms = {c[0]: min(r["device_ms"] for r in kern if r["case"] == c[0]) for c in picked}
    score = {cand: statistics.geometric_mean([r["device_ms"] / best_ms[r["case"]] for r in kern
                                              if _cand(r) == cand]) for cand in DRPB_CANDIDATES
             if sum(_cand(r) == cand for r in kern) == len(picked)}
    best = min(score, key=score.get)
    print("best overall", best, "score %.3f" % score[best], "shipped", shipped, "score %.3f" % score[shipped],
          flush=True)
    if not baseline:
        return rows
    versions = {"baseline": _load_baseline(baseline), "current": T}
    for case in picked:
        for cand in dict.fromkeys((shipped, best)):
            with _drpb_constants(T, cand):
                runs = {n: _runner(case, "dq", None, True, mod) for n, mod in versions.items()}  # whole backward
                ms = {n: [] for n in runs}
                for _ in range(repeats):
                    for n, fn in runs.items():
                        ms[n].append(sum(kernel_times_ms(fn).values()))
            r = dict(case=case[0], variant="backward with d_rpb", BR=cand[0], BC=cand[1], programs=cand[2],
                     prec=cand[3], shipped=cand == shipped, **{f"{n}_ms": statistics.median(v) for n, v in ms.items()})
            r["speedup"] = r["baseline_ms"] / r["current_ms"]
            rows.append(r)
            print(r, flush=True)
            runs = None
            torch.cuda.empty_cache()
    return rows


def host(case_names=("nat7", "nat14", "nat56")) -> list[dict]:
    """Wall time per forward+backward (do_bench) against its device time (profiler), beside all-token SDPA
    in the same harness, and the host's own submit time (no synchronisation, GPU work far below it)."""
    import cProfile
    import io
    import pstats
    import time

    import torch.nn.functional as F

    from attnzoo.kernels import na2d
    from benchmarks.harness import gpu_time_ms

    rows = []
    for case in [c for c in CASES if c[0] in case_names]:
        name, B, H, W, N, D, k, d = case
        q, kk, v, rpb = (t.requires_grad_() for t in _inputs(case))
        dout = torch.randn_like(q)
        qs, ks, vs = (t.detach().flatten(1, 2).transpose(1, 2).requires_grad_() for t in (q, kk, v))
        calls = {
            "na2d rpb": lambda: torch.autograd.grad(na2d(q, kk, v, k, d, rpb, backend="triton"), (q, kk, v, rpb), dout),
            "na2d": lambda: torch.autograd.grad(na2d(q, kk, v, k, d, backend="triton"), (q, kk, v), dout),
            "sdpa all tokens": lambda: torch.autograd.grad(F.scaled_dot_product_attention(qs, ks, vs), (qs, ks, vs),
                                                           dout.flatten(1, 2).transpose(1, 2)),
        }
        for label, fn in calls.items():
            fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(100):
                fn()
            submit = (time.perf_counter() - t0) * 10
            torch.cuda.synchronize()
            rows.append(dict(case=name, call=label, fwd_bwd_ms=time_ms(fn), gpu_ms=gpu_time_ms(fn),
                             host_submit_ms=submit))
            print(rows[-1], flush=True)
        rows += _launch_rows(name, q, kk, v, rpb, dout, k, d)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(100):
            calls["na2d rpb"]()
        prof.disable()
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
        print(text.getvalue()[-6000:], flush=True)
    return rows


def _launch_rows(name, q, kk, v, rpb, dout, k, d) -> list[dict]:
    """Host time of the pieces of one na2d forward+backward: each bare kernel launch (Triton's JIT launcher,
    arguments prepared), the op's forward and backward host functions, and an empty autograd.Function."""
    import time

    from attnzoo.kernels import na2d_triton as T

    q, kk, v, rpb = (t.detach() for t in (q, kk, v, rpb))
    scale = q.shape[-1] ** -0.5
    ks, dil = (k, k), (d, d)
    out, lse = T.na2d_forward(q, kk, v, rpb, ks, dil, scale)
    B, H, W, N, D = q.shape
    key = (tuple(q.shape[1:]), q.dtype, ks, dil, True, True, False)
    p_fwd, p_dq, p_dkdv = T._plan("fwd", *key[:5], False, False), T._plan("dq", *key), T._plan("dkdv", *key)
    delta = torch.empty_like(lse)
    dsnb = torch.empty((p_dq.groups(B), N, H, k, W, k + 1), dtype=q.dtype, device=q.device)  # dq's layout
    dq, dk, dv = (torch.empty_like(q) for _ in range(3))
    strides = (*q.stride()[:4], *kk.stride()[:4], *v.stride()[:4], *out.stride()[:4], rpb.stride(0))

    class Empty(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b, c, r):
            return a.view_as(a)

        @staticmethod
        def backward(ctx, g):
            return g, None, None, None

    qg = q.detach().requires_grad_()
    pieces = {
        "launch fwd kernel, JIT": lambda: T._na2d_fwd_kernel[p_fwd.grid(B)](
            q, kk, v, rpb, out, lse, *q.stride()[:4], *kk.stride()[:4], *v.stride()[:4], *out.stride()[:4],
            rpb.stride(0), B, H, W, scale * T.LOG2E, **p_fwd.meta),
        "launch dq kernel, JIT": lambda: T._na2d_bwd_dq_kernel[p_dq.grid(B)](
            q, kk, v, rpb, out, dout, lse, delta, dq, dsnb, *strides, B, H, W, scale * T.LOG2E, scale, **p_dq.meta),
        "launch dkdv kernel, JIT": lambda: T._na2d_bwd_dkdv_kernel[p_dkdv.grid(B)](
            q, kk, v, rpb, dout, lse, delta, dk, dv, *strides, B, H, W, scale * T.LOG2E, scale, **p_dkdv.meta),
        "launch fwd kernel, Launcher (cached)": lambda: T._FWD(
            p_fwd.grid(B), q, kk, v, rpb, out, lse, *q.stride()[:4], *kk.stride()[:4], *v.stride()[:4],
            *out.stride()[:4], rpb.stride(0), B, H, W, scale * T.LOG2E, **p_fwd.meta),
        "launch dq kernel, Launcher (cached)": lambda: T._DQ(
            p_dq.grid(B), q, kk, v, rpb, out, dout, lse, delta, dq, dsnb, *strides, B, H, W, scale * T.LOG2E, scale,
            **p_dq.meta),
        "na2d_forward (host fn)": lambda: T.na2d_forward(q, kk, v, rpb, ks, dil, scale),
        "na2d_backward (host fn)": lambda: T.na2d_backward(dout, q, kk, v, rpb, out, lse, ks, dil, scale, True),
        "empty autograd.Function fwd+bwd": lambda: torch.autograd.grad(Empty.apply(qg, kk, v, rpb), (qg,), dout),
    }
    rows = []
    for label, fn in pieces.items():
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            fn()
        submit = (time.perf_counter() - t0) * 5
        torch.cuda.synchronize()
        rows.append(dict(case=name, call=label, host_submit_ms=submit))
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["check", "compile", "sweep", "host", "ab", "drpb"],
                    help="check: GPU correctness (na2d_check.*); compile: fill Triton's cache for the sweep in "
                         "worker processes; sweep: time the candidates (na2d_tune.*); drpb: the d_rpb reduction's "
                         "constants against round 13's torch path (na2d_drpb.*)")
    ap.add_argument("--jobs", type=int, default=12, help="compile worker processes")
    ap.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS), help="compile/sweep: kernels")
    ap.add_argument("--cases", nargs="+", choices=[c[0] for c in CASES], help="compile/sweep: cases (default all)")
    ap.add_argument("--walked", nargs="+", metavar="KBYxKBX",
                    help="compile/sweep: only the candidates with 8x8 owned tiles and these walked blocks")
    ap.add_argument("--warps", nargs="+", type=int, default=[4], choices=[2, 4, 8],
                    help="compile/sweep with --walked: warps per program of each candidate")
    ap.add_argument("--no-rpb", action="store_true", help="compile/sweep without a bias (the kernels' baseline)")
    ap.add_argument("--imgs", nargs="+", type=int, default=[1], choices=[1, 2],
                    help="compile/sweep: images per program of each candidate")
    ap.add_argument("--baseline", help="ab, drpb: an earlier na2d_triton.py to time against")
    ap.add_argument("--name", help="ab, sweep, drpb: result file name (default na2d_ab, na2d_tune, na2d_drpb)")
    ap.add_argument("--out", default=str(RESULTS_DIR))
    args = ap.parse_args()
    if args.what == "ab":
        if not args.baseline:
            ap.error("ab needs --baseline FILE")
        report = Report(args.name or "na2d_ab", "na2d Triton kernels against an earlier version",
                        notes="device time of one kernel per call (torch.profiler, mean of 20 calls; median of 3 "
                              "alternating repeats), bf16, each version at its own tile choice; rpb: with a learned "
                              "bias (dq then includes the window-layout dS for d_rpb); speedup = baseline / current; "
                              "*_backward_ms (dq rows): every kernel of the backward call (dq, dk/dv and d_rpb's "
                              "reduction).")
        for row in ab(args.baseline, args.jobs, args.cases):
            report.add(**row)
    elif args.what == "drpb":
        report = Report(args.name or "na2d_drpb", "na2d d_rpb reduction: kernel constants against the torch path",
                        notes="device time of all kernels of one call (torch.profiler, mean of 20 calls), bf16 "
                              "window-layout dS of each case (the dq kernel's image groups); gb_per_s over the dS "
                              "bytes read; rel_l2 vs float64; prec: the one-hot products' input precision; "
                              "shipped: the shipped constants; backward with d_rpb: all kernels of the backward "
                              "against --baseline, median of 3 alternating repeats.")
        for row in drpb(args.cases, args.baseline):
            report.add(**row)
    elif args.what == "host":
        report = Report("na2d_host", "na2d forward+backward: wall, device and host submit time",
                        notes="do_bench median (wall), summed kernel device time (profiler) and host submit time "
                              "per call (100 calls without synchronisation), bf16, batch 128.")
        for row in host():
            report.add(**row)
    elif args.what == "check":
        report = Report("na2d_check", "na2d Triton kernels on the GPU vs the float64 reference",
                        notes="relative L2 error vs the float64 reference (batch 2 of each sweep case, odd sizes, "
                              "per-axis kernels and dilations); d_rpb computed twice must be bit-identical.")
        for row in check():
            report.add(**row)
    else:
        report = Report(args.name or "na2d_tune", "na2d Triton kernels: tile sweep",
                        notes="device time of one kernel per call (torch.profiler, mean of 20 calls), bf16; rpb: "
                              "with a learned bias (dq then includes the window-layout dS for d_rpb) or without one; "
                              "dq always includes delta.")
        for row in sweep(args.jobs, compile_only=args.what == "compile", kernels=args.kernels, cases=args.cases,
                         with_rpb=not args.no_rpb, walked=args.walked, imgs=args.imgs,
                         warps=args.warps):
            report.add(**row)
        if args.what == "compile":
            return
    report.save(args.out)


if __name__ == "__main__":
    main()
