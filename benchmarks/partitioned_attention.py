"""Partitioned attention: the fused Triton kernel vs timm's partition + SDPA-with-bias path.

bf16, batch 128, 224² inputs: every attention layer shape of MaxViT-T (block and grid, rel-pos bias),
DaViT-T (windows, no bias) and Swin-T (shifted windows, bias + Swin's region mask). Both sides take
the fused qkv map ``[B, H, W, 3C]`` and return the attention output ``[B, H, W, C]``: timm partitions
it (``window_partition`` / ``grid_partition``), runs ``F.scaled_dot_product_attention`` with the bias
(Swin: bias + mask expanded per window, as timm's ``WindowAttention``) and reverses the partition; the
kernel indexes the map directly. Forward and forward+backward medians (``time_ms``), peak memory of
forward+backward, and a float64 check of each kernel output. A short MaxViT-T training-step
comparison (timm vs attnzoo) closes the table; the lead's model benchmark is the reference for those.

    python -m benchmarks.partitioned_attention [--quick] [--out DIR]
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch
import torch.nn.functional as F
from timm.models.maxxvit import grid_partition, grid_reverse, window_partition, window_reverse

from attnzoo.kernels.partitioned_attention import auto_backend, partitioned_attention
from attnzoo.kernels.partitioned_attention_reference import partition_mask, rpb_bias
from benchmarks.harness import (RESULTS_DIR, Report, measured_bandwidth_gbs, measured_matmul_tflops, peak_memory_mib,
                                time_ms)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: --quick smoke run under TRITON_INTERPRET=1


def _stages(model: str, dims: tuple[int, ...], modes: tuple[str, ...], rpb: bool, shift: int = 0):
    for i, dim in enumerate(dims):
        size = 56 >> i
        for mode in modes:
            shifts = (0, shift) if shift and size > 7 else (0,)  # Swin drops the shift when the map is one window
            for s in shifts:
                tag = f"{model} s{i + 1} {mode}" + (f" shift{s}" if s else "")
                yield tag, 128, size, size, dim // 32, 32, mode, s, rpb


CASES = [*_stages("MaxViT-T", (64, 128, 256, 512), ("window", "grid"), True),
         *_stages("DaViT-T", (96, 192, 384, 768), ("window",), False),
         *_stages("Swin-T", (96, 192, 384, 768), ("window",), True, shift=3)]
QUICK_CASES = [("quick grid", 2, 14, 14, 2, 32, "grid", 0, True), ("quick shift", 2, 14, 14, 2, 32, "window", 3, True)]


def counts(B: int, H: int, W: int, heads: int, D: int) -> dict[str, float]:
    """Useful FLOPs (49 keys per query, no padding) and the fewest bytes: qkv read, output written (bf16);
    backward reads qkv, out, dout and writes dqkv."""
    tokens = B * H * W * heads
    fwd_flops = 4 * tokens * 49 * D
    t = tokens * D * 2
    return dict(fwd_flops=fwd_flops, fb_flops=3.5 * fwd_flops, fwd_bytes=4 * t, fb_bytes=4 * t + 9 * t)


def timm_path(qkv: torch.Tensor, heads: int, mode: str, shift: int, rpb: torch.Tensor | None) -> torch.Tensor:
    """timm's route: partition the map, SDPA with the bias (and Swin's mask), reverse the partition."""
    B, H, W, C3 = qkv.shape
    C = C3 // 3
    D = C // heads
    x = torch.roll(qkv, (-shift, -shift), (1, 2)) if shift else qkv
    part = window_partition(x, [7, 7]) if mode == "window" else grid_partition(x, [7, 7])
    q, k, v = part.reshape(-1, 49, 3, heads, D).permute(2, 0, 3, 1, 4).unbind(0)
    mask = None
    if rpb is not None:
        mask = rpb_bias(rpb, (7, 7)).to(qkv.dtype)[None]  # [1, heads, N, N]
    if shift:
        allowed = partition_mask(H, W, (7, 7), "window", (shift, shift), qkv.device)  # [nW, N, N]
        region = torch.zeros(allowed.shape, dtype=qkv.dtype, device=qkv.device).masked_fill(~allowed, -100.0)
        mask = (mask + region[:, None]).unsqueeze(0).expand(B, -1, -1, -1, -1).reshape(-1, heads, 49, 49)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    o = o.transpose(1, 2).reshape(-1, 7, 7, C)
    o = window_reverse(o, [7, 7], [H, W]) if mode == "window" else grid_reverse(o, [7, 7], [H, W])
    return torch.roll(o, (shift, shift), (1, 2)) if shift else o


def kernel_path(qkv: torch.Tensor, heads: int, mode: str, shift: int, rpb: torch.Tensor | None,
                backend: str = "triton") -> torch.Tensor:
    B, H, W, C3 = qkv.shape
    q, k, v = qkv.view(B, H, W, 3, heads, -1).unbind(3)
    return partitioned_attention(q, k, v, 7, mode=mode, shift=shift, rpb=rpb, backend=backend).reshape(B, H, W, -1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def fwd_bwd(fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor], grad: torch.Tensor) -> Callable[[], None]:
    def step():
        for t in leaves:
            t.grad = None
        fn().backward(grad)
    return step


def bench_case(rep: Report, case, ceilings: dict[str, float]) -> None:
    tag, B, H, W, heads, D, mode, shift, use_rpb = case
    C = heads * D
    qkv = torch.randn(B, H, W, 3 * C, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    rpb = torch.randn(heads, 13, 13, device=DEVICE, requires_grad=True) if use_rpb else None
    grad = torch.randn(B, H, W, C, device=DEVICE, dtype=torch.bfloat16)
    leaves = [qkv] + ([rpb] if use_rpb else [])
    n = counts(B, H, W, heads, D)

    # correctness on this very shape: float64 reference on a slice of the batch
    with torch.no_grad():
        sub = qkv[:2].detach()
        ref = kernel_ref(sub, heads, mode, shift, rpb)
        err_kernel = _rel(kernel_path(sub, heads, mode, shift, rpb), ref)
        err_timm = _rel(timm_path(sub, heads, mode, shift, rpb), ref)

    row = dict(case=tag, tokens=f"{B}x{H}x{W}x{heads}h", err_kernel=err_kernel, err_timm=err_timm)
    for name, fn in (("timm", lambda: timm_path(qkv, heads, mode, shift, rpb)),
                     ("kernel", lambda: kernel_path(qkv, heads, mode, shift, rpb))):
        with torch.no_grad():
            row[f"{name}_fwd_ms"] = time_ms(fn)
        row[f"{name}_fb_ms"] = time_ms(fwd_bwd(fn, leaves, grad))
        row[f"{name}_fb_mib"] = peak_memory_mib(fwd_bwd(fn, leaves, grad))
    # backend="auto": the kernel, or the dense path (partition + SDPA) where the op's rule prefers it
    auto = auto_backend(qkv.view(B, H, W, 3, heads, D)[:, :, :, 0], (7, 7), (shift, shift), rpb)
    row["auto_path"] = auto if DEVICE == "cuda" else "reference"
    row["auto_fb_ms"] = time_ms(fwd_bwd(lambda: kernel_path(qkv, heads, mode, shift, rpb, "auto"), leaves, grad))
    row["fwd_speedup"] = row["timm_fwd_ms"] / row["kernel_fwd_ms"]
    row["fb_speedup"] = row["timm_fb_ms"] / row["kernel_fb_ms"]
    row["auto_fb_speedup"] = row["timm_fb_ms"] / row["auto_fb_ms"]
    if ceilings:
        floor_fwd = max(n["fwd_flops"] / ceilings["tflops"] / 1e9, n["fwd_bytes"] / ceilings["gbs"] / 1e6)
        floor_fb = max(n["fb_flops"] / ceilings["tflops"] / 1e9, n["fb_bytes"] / ceilings["gbs"] / 1e6)
        row["fwd_floor_ms"], row["fb_floor_ms"] = floor_fwd, floor_fb
        row["kernel_fwd_GBs"] = n["fwd_bytes"] / row["kernel_fwd_ms"] / 1e6
    rep.add(**row)
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)


def kernel_ref(qkv: torch.Tensor, heads: int, mode: str, shift: int, rpb: torch.Tensor | None) -> torch.Tensor:
    B, H, W, C3 = qkv.shape
    q, k, v = qkv.double().view(B, H, W, 3, heads, -1).unbind(3)
    out = partitioned_attention(q, k, v, 7, mode=mode, shift=shift, rpb=None if rpb is None else rpb.double(),
                                backend="reference")
    return out.reshape(B, H, W, -1)


def sweep_launch(rep: Report, quick: bool) -> None:
    """Time other num_warps / num_stages for the MaxViT-T stage-1 shapes (the defaults are rows above)."""
    from attnzoo.kernels import partitioned_attention_triton as pat

    saved = dict(pat.FWD_LAUNCH), dict(pat.BWD_LAUNCH)
    B, S = (2, 14) if quick else (128, 56)
    for mode in ("window", "grid"):
        qkv = torch.randn(B, S, S, 192, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        rpb = torch.randn(2, 13, 13, device=DEVICE, requires_grad=True)
        grad = torch.randn(B, S, S, 64, device=DEVICE, dtype=torch.bfloat16)
        fn = lambda: kernel_path(qkv, 2, mode, 0, rpb)  # noqa: E731
        for warps in (4,) if quick else (4, 8):
            for stages in (1,) if quick else (1, 2, 3):
                pat.FWD_LAUNCH.update(num_warps=warps, num_stages=stages)
                pat.BWD_LAUNCH.update(num_warps=warps, num_stages=stages)
                with torch.no_grad():
                    fwd = time_ms(fn)
                fb = time_ms(fwd_bwd(fn, [qkv, rpb], grad))
                row = dict(case=f"sweep {B}x{S}² {mode} warps{warps} stages{stages}", kernel_fwd_ms=fwd,
                           kernel_fb_ms=fb)
                rep.add(**row)
                print(row, flush=True)
    pat.FWD_LAUNCH.update(saved[0])
    pat.BWD_LAUNCH.update(saved[1])


def bench_model(rep: Report) -> None:
    """MaxViT-T training step (bf16 autocast, batch 128, 224²): timm vs attnzoo, img/s and peak memory."""
    import timm

    import attnzoo  # noqa: F401

    x = torch.randn(128, 3, 224, 224, device=DEVICE)
    target = torch.randint(0, 1000, (128,), device=DEVICE)
    for label, name in (("timm maxvit_tiny_tf_224", "maxvit_tiny_tf_224"), ("attnzoo maxvit_t", "maxvit_t")):
        model = timm.create_model(name).to(DEVICE).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), target)
            loss.backward()
            opt.step()

        step()
        ms = time_ms(step, warmup=200, rep=1000)
        row = dict(case=f"train step {label}", tokens="128x3x224x224", kernel_fb_ms=ms,
                   kernel_fb_mib=peak_memory_mib(step), img_per_s=128 / ms * 1e3)
        rep.add(**row)
        print(row, flush=True)
        del step  # the closure holds model and opt
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="two tiny cases (CPU smoke run)")
    ap.add_argument("--no-model", action="store_true", help="skip the MaxViT-T training-step comparison")
    ap.add_argument("--out", default=str(RESULTS_DIR))
    args = ap.parse_args()
    ceilings = {}
    if DEVICE == "cuda":
        ceilings = dict(gbs=measured_bandwidth_gbs(), tflops=measured_matmul_tflops())
    notes = ("Kernel alone vs timm's partition + SDPA-with-bias path, bf16; ms = do_bench median; fb = forward+"
             "backward; mib = peak extra memory of forward+backward; err = relative L2 vs float64 reference "
             "(batch slice); floor = max(FLOPs / measured matmul rate, bytes / measured copy bandwidth)"
             + (f"; measured ceilings {ceilings['gbs']:.0f} GB/s, {ceilings['tflops']:.0f} TFLOP/s"
                if ceilings else ""))
    rep = Report("partitioned_attention", "Partitioned attention kernel vs timm partition + SDPA (bf16)", notes=notes)
    for case in QUICK_CASES if args.quick else CASES:
        bench_case(rep, case, ceilings)
    sweep_launch(rep, args.quick)
    if DEVICE == "cuda" and not args.quick and not args.no_model:
        bench_model(rep)
    js, md = rep.save(args.out)
    print(md.read_text())


if __name__ == "__main__":
    main()
