"""ONNX Runtime CPU latency at batch 1: attnzoo's T variants beside timm's Swin-T and ConvNeXt-T.

Every model is exported the same way (``attnzoo.export.export``: torch.export, dynamic batch, opset 18,
checked against PyTorch) at 224², then timed in ONNX Runtime's CPU provider (median of ``--reps`` runs
after warm-up), next to PyTorch eager on the same input. Random weights (latency does not depend on them).

    python -m benchmarks.onnx_latency [--models nat_tiny,convnext_tiny] [--threads 2] [--reps 20]

Writes ``benchmarks/results/onnx_latency.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import RESULTS_DIR, Report

T_VARIANTS = ["nat_tiny", "dinat_tiny", "dinat_s_tiny", "biformer_tiny", "maxvit_t", "davit_t", "focalnet_t_srf",
              "agent_swin_t", "agent_pvt_t", "agent_deit_t"]
TIMM_BASELINES = ["swin_tiny_patch4_window7_224", "convnext_tiny"]


def _median_ms(fn, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def measure(name: str, threads: int, reps: int, out_dir: Path) -> dict:
    import onnxruntime as ort

    from attnzoo.export import build_model, export

    model = build_model(name)
    t0 = time.perf_counter()
    res = export(model, "onnx", (3, 224, 224), out_dir / f"{name}.onnx", overwrite=True)
    export_s = time.perf_counter() - t0
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(res.path), opts, providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, 224, 224)
    feed = {session.get_inputs()[0].name: x.numpy()}
    ort_ms = _median_ms(lambda: session.run(None, feed), reps)
    with torch.inference_mode():
        torch_ms = _median_ms(lambda: model(x), reps)
    return dict(model=name, source="timm" if name in TIMM_BASELINES else "attnzoo",
                params_m=sum(p.numel() for p in model.parameters()) / 1e6, ort_ms=ort_ms, torch_eager_ms=torch_ms,
                rel_l2=res.rel_l2, export_s=export_s)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(T_VARIANTS + TIMM_BASELINES))
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime and PyTorch intra-op threads")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--notes", default="", help="appended to the report's notes (e.g. machine load)")
    p.add_argument("--append", action="store_true",
                   help="keep the committed rows of models not measured now (each row carries its date)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import onnxruntime

    notes = (f"Batch 1, 224², fp32, ONNX Runtime {onnxruntime.__version__} CPUExecutionProvider with "
             f"{args.threads} intra-op threads vs PyTorch eager with {args.threads} threads; median of "
             f"{args.reps} runs; random weights; export opset 18 via attnzoo.export. {args.notes}").strip()
    report = Report("onnx_latency", "ONNX Runtime CPU latency, batch 1 (T variants and timm baselines)",
                    columns=["model", "source", "params_m", "ort_ms", "torch_eager_ms", "rel_l2", "export_s",
                             "measured"], notes=notes)
    names = args.models.split(",")
    if args.append and (RESULTS_DIR / "onnx_latency.json").exists():
        old = json.loads((RESULTS_DIR / "onnx_latency.json").read_text())
        for row in old["rows"]:
            if row["model"] not in names:
                report.add(**{"measured": old["env"]["date"], **row})
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            row = report.add(**measure(name, args.threads, args.reps, Path(tmp)), measured=report.env["date"])
            print(row, flush=True)
            js, _ = report.save()  # after every model: a long run keeps what it measured
    return js


if __name__ == "__main__":
    print(f"wrote {main()}")
