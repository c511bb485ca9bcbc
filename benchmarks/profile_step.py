"""One training step (or, with ``--infer``, one inference forward) of a model, profiled: wall time per step
and the top kernels by device time.

Separates GPU time from host time for a whole model (METHOD: time the kernel, then the op, then the model,
and profile before guessing). bf16 autocast, channels-last input, AdamW, batch 128 at 224².

    python -m benchmarks.profile_step nat_tiny dinat_tiny
"""
from __future__ import annotations

import argparse
import time

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import attnzoo  # noqa: F401  (registers the models)


def profile_step(name: str, batch: int = 128, img_size: int = 224, top: int = 12, host: bool = False,
                 compile: bool = False, infer: bool = False) -> dict:
    model = timm.create_model(name).cuda().to(memory_format=torch.channels_last)
    run_model = torch.compile(model) if compile else model
    x = torch.randn(batch, 3, img_size, img_size, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device="cuda")
    opt = torch.optim.AdamW(model.parameters())

    def train_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(run_model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def infer_step():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            run_model(x)

    model.train(not infer)
    step = infer_step if infer else train_step

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - t0) / 5 * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels: dict[str, float] = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            kernels[e.name[:60]] = kernels.get(e.name[:60], 0.0) + e.device_time_total / 1e3
    gpu_ms = sum(kernels.values())
    print(name, "compiled" if compile else "eager", "inference" if infer else "train", "step ms", step_ms,
          "gpu ms", gpu_ms, "peak MiB", torch.cuda.max_memory_allocated() / 2**20)
    for k, ms in sorted(kernels.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {ms:.2f} {k}")
    if host:
        _host_profile(step, top)
    return dict(model=name, step_ms=step_ms, gpu_ms=gpu_ms, img_s=batch / step_ms * 1e3)


def _host_profile(step, top: int) -> None:
    """Where the host's time goes in one step: operators by self CPU time (torch.profiler, CPU only), then
    Python functions by own time (cProfile)."""
    import cProfile
    import io
    import pstats

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=3 * top), flush=True)
    cprof = cProfile.Profile()
    cprof.enable()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    cprof.disable()
    text = io.StringIO()
    pstats.Stats(cprof, stream=text).sort_stats("tottime").print_stats(3 * top)
    print(text.getvalue(), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--host", action="store_true", help="also profile the host: operators and Python functions")
    ap.add_argument("--compile", action="store_true", help="the step under torch.compile (default mode)")
    ap.add_argument("--infer", action="store_true", help="profile the inference forward (eval, no grad)")
    args = ap.parse_args()
    for name in args.models:
        profile_step(name, host=args.host, compile=args.compile, infer=args.infer)


if __name__ == "__main__":
    main()
