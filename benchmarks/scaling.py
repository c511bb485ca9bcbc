"""Scaling with resolution: time and peak memory of one forward+backward from 224² to 1024².

Each step holds about the same number of pixels (``--pixels-per-step``, default 64 images of 224²), so the
GPU stays busy at every size instead of timing launch overhead at small ones; time and memory are then
reported per image. The T variant of every family, timm's Swin-T beside Agent-Swin-T, and timm's ViT-S/16 as the
quadratic (global attention) reference. The log-log slope of time and memory against pixels says how
each model scales: ~1 linear, ~2 quadratic.

    python -m benchmarks.scaling [--quick] [--models ...] [--sizes 224 512 1024]
"""
from __future__ import annotations

import argparse
import math

import timm
import torch
from tqdm import tqdm

from benchmarks.harness import Report, peak_memory_mib, time_ms
from benchmarks.models import _autocast, build

DEFAULT_MODELS = ["nat_tiny", "dinat_tiny", "biformer_tiny", "maxvit_t", "davit_t", "focalnet_t_srf",
                  "agent_swin_t", "agent_pvt_t", "swin_tiny_patch4_window7_224", "vit_small_patch16_224"]
DEFAULT_SIZES = [224, 384, 512, 768, 1024]


def batch_for(size: int, pixels_per_step: int) -> int:
    """Images per step at ``size``² so that a step holds about ``pixels_per_step`` pixels (at least 1)."""
    return max(1, round(pixels_per_step / (size * size)))


def measure(name: str, size: int, batch: int, device: torch.device) -> dict:
    model = build(name, size).to(device).train()
    x = torch.randn(batch, 3, size, size, device=device)

    def step():
        with _autocast(device):
            out = model(x)
        out.float().sum().backward()
        model.zero_grad(set_to_none=True)

    ms = time_ms(step, warmup=50, rep=300)
    peak = peak_memory_mib(step)
    return dict(model=name, size=size, pixels=size * size, batch=batch, fwd_bwd_ms=ms, ms_per_image=ms / batch,
                peak_mib=peak, mib_per_image=None if peak is None else peak / batch)


def loglog_slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log(y) against log(x)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den


def run(models: list[str], sizes: list[int], pixels_per_step: int, name: str = "scaling", out_dir=None) -> Report:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    known = set(timm.list_models())
    report = Report(name, f"Scaling with resolution: one forward+backward of ~{pixels_per_step / 1e6:.1f} MPixel "
                    f"per step, {'bf16 autocast' if device.type == 'cuda' else 'fp32'}",
                    notes="batch = images per step (about constant pixels); slopes = log-log least-squares slope of "
                          "per-image time and per-image peak memory against pixels (1 = linear, 2 = quadratic).")
    for m in tqdm([m for m in models if m in known], desc="scaling"):
        rows = []
        for s in sizes:
            try:
                rows.append(measure(m, s, batch_for(s, pixels_per_step), device))
            except torch.cuda.OutOfMemoryError:
                rows.append(dict(model=m, size=s, pixels=s * s, error="out of memory"))
            except Exception as e:  # noqa: BLE001 (one failing size must not end the run)
                rows.append(dict(model=m, size=s, pixels=s * s, error=f"{type(e).__name__}: {e}"[:200]))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        ok = [r for r in rows if "error" not in r]
        t_slope = loglog_slope([r["pixels"] for r in ok], [r["ms_per_image"] for r in ok])
        m_slope = (loglog_slope([r["pixels"] for r in ok], [r["mib_per_image"] for r in ok])
                   if device.type == "cuda" else None)
        for r in rows:
            report.add(**r, time_slope=t_slope, memory_slope=m_slope)
    report.save(out_dir) if out_dir else report.save()
    return report


def main(argv: list[str] | None = None) -> Report:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=DEFAULT_MODELS)
    p.add_argument("--sizes", nargs="*", type=int, default=DEFAULT_SIZES)
    p.add_argument("--pixels-per-step", type=int, default=64 * 224 * 224,
                   help="pixels per forward+backward; batch = round(this / size²), at least 1")
    p.add_argument("--quick", action="store_true", help="tiny CPU smoke configuration (sizes 64, 96)")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--name", default=None)
    a = p.parse_args(argv)
    sizes = [64, 96] if a.quick else a.sizes
    name = a.name or ("scaling_quick" if a.quick else "scaling")
    return run(a.models, sizes, 1 if a.quick else a.pixels_per_step, name, a.out_dir)


if __name__ == "__main__":
    main()
