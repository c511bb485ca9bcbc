"""Dense fine-tuning from the Fashion-MNIST classification checkpoint vs from scratch (issue: downstream fine-tuning).

For each model, ``tools/finetune.py --schedule full`` twice with the same seed, data and schedule: once pretraining
on Fashion-MNIST and fine-tuning Mask R-CNN and UPerNet from that checkpoint (``init_cfg``), once ``--from-scratch``.
One row per run: COCO bbox/segm mAP and mIoU (fractions) on the pasted validation sets, and per fine-tuning its wall
time (training and its evaluations), img/s (median training step) and peak CUDA memory. Targets: from the checkpoint,
bbox mAP >= 0.5, segm mAP >= 0.4 and mIoU >= 0.6, each fine-tuning <= 5 minutes on one H200, above the from-scratch
run of the same model.

    python -m benchmarks.finetune                      # nat_tiny, biformer_small, maxvit_t on one GPU
    python -m benchmarks.finetune --finetune-args "--amp --workers 16"
    python -m benchmarks.finetune --quick              # CPU smoke run of the script (nat_nano, toy sizes)

Each run is its own ``tools/finetune.py`` process (its own CUDA peak); their folders, ``summary.json`` and
``curves.png`` stay under ``--work-dir``.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import RESULTS_DIR, Report

REPO = Path(__file__).resolve().parents[1]
MODELS = ["nat_tiny", "biformer_small", "maxvit_t"]
TARGETS = dict(bbox_mAP=0.5, segm_mAP=0.4, mIoU=0.6, minutes=5.0)
# A CPU smoke run: one Fashion-MNIST epoch, then a few fine-tuning steps on a handful of small canvases.
QUICK = ["--schedule", "toy", "--train-images", "8", "--val-images", "4", "--image-size", "64", "96",
         "--det-epochs", "1", "--seg-iters", "4", "--workers", "1"]
COLUMNS = ["model", "init", "bbox mAP", "segm mAP", "mIoU", "det s", "det img/s", "det peak MiB", "seg s",
           "seg img/s", "seg peak MiB", "pretrain s", "pretrain top-1", "targets"]


def run_one(model: str, scratch: bool, work_dir: Path, extra: list[str]) -> dict[str, Any]:
    """One ``tools/finetune.py`` process; its summary.json, or the error it ended with."""
    name = f"{model}-{'scratch' if scratch else 'pretrained'}"
    cmd = [sys.executable, str(REPO / "tools" / "finetune.py"), "--model", model, "--output", str(work_dir),
           "--experiment", name, "--data-dir", str(work_dir / "data"), *extra]
    cmd += ["--from-scratch"] if scratch else []
    print(f"== {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    rc = subprocess.run(cmd, cwd=REPO).returncode
    summary = work_dir / name / "summary.json"
    if rc != 0 or not summary.is_file():
        return dict(model=model, init="scratch" if scratch else "pretrained", error=f"tools/finetune.py exit {rc}")
    return json.loads(summary.read_text())


def row(summary: dict[str, Any]) -> dict[str, Any]:
    """The report row of one run."""
    det, seg, pre = summary.get("det") or {}, summary.get("seg") or {}, summary.get("pretrain") or {}
    return {"model": summary["model"], "init": summary["init"], "bbox mAP": det.get("bbox_mAP"),
            "segm mAP": det.get("segm_mAP"), "mIoU": seg.get("mIoU"), "det s": det.get("wall_s"),
            "det img/s": det.get("img_per_s"), "det peak MiB": det.get("peak_memory_mib"), "seg s": seg.get("wall_s"),
            "seg img/s": seg.get("img_per_s"), "seg peak MiB": seg.get("peak_memory_mib"),
            "pretrain s": pre.get("wall_s"), "pretrain top-1": pre.get("top1"),
            "targets": summary.get("error") and f"error: {summary['error']}"}


def targets(pretrained: dict[str, Any], scratch: dict[str, Any]) -> str:
    """Which targets the pretrained run meets ('all', or the misses)."""
    misses = [f"{k} {pretrained[k.replace('_', ' ')]:.3f} < {v}" for k, v in TARGETS.items() if k != "minutes"
              and (pretrained[k.replace("_", " ")] or 0.0) < v]
    misses += [f"{k} {pretrained[k] / 60:.1f} min > {TARGETS['minutes']}" for k in ("det s", "seg s")
               if (pretrained[k] or float("inf")) > 60 * TARGETS["minutes"]]
    misses += [f"{k} not above scratch" for k in ("bbox mAP", "segm mAP", "mIoU")
               if (pretrained[k] or 0.0) <= (scratch[k] or 0.0)]
    return "all" if not misses else "missed: " + "; ".join(misses)


def _dense_versions() -> dict[str, str | None]:
    import importlib.metadata as md

    versions: dict[str, str | None] = {}
    for pkg in ("mmengine", "mmcv", "mmdet", "mmsegmentation"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return versions


def main(argv: list[str] | None = None) -> Report:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=None, help=f"default: {' '.join(MODELS)} (--quick: nat_nano)")
    p.add_argument("--quick", action="store_true", help="CPU smoke run of this script, not a measurement")
    p.add_argument("--finetune-args", default="", help="more tools/finetune.py flags for every run")
    p.add_argument("--work-dir", default="output/benchmark_finetune", help="parent of the runs' folders")
    p.add_argument("--out", default=str(RESULTS_DIR), help="where finetune.{json,md} go")
    args = p.parse_args(argv)
    if not args.quick and not torch.cuda.is_available():
        raise SystemExit("benchmarks.finetune needs a CUDA device (the full schedule takes hours on a CPU); "
                         "--quick smoke-tests the script on a CPU")
    from attnzoo.openmmlab.finetune import fresh_folder

    models = args.models or (["nat_nano"] if args.quick else MODELS)
    work_dir = fresh_folder(Path(args.work_dir).resolve(), "quick" if args.quick else "full")
    extra = (QUICK if args.quick else ["--schedule", "full"]) + ["--seed", "0"] + shlex.split(args.finetune_args)
    name = "finetune_quick" if args.quick else "finetune"
    report = Report(name, "Mask R-CNN / UPerNet fine-tuning on the pasted Fashion-MNIST sets: from the "
                    "classification checkpoint vs from scratch", columns=COLUMNS,
                    notes=(f"tools/finetune.py {' '.join(extra)} per model, pretrained and --from-scratch (same "
                           "seed, data and schedule). mAP/mIoU: fractions on the pasted validation sets; s: wall "
                           "time of each fine-tuning (training + its evaluations); img/s: median training step; "
                           "peak MiB: CUDA high-water mark of the stage. Targets: from the checkpoint bbox mAP >= "
                           f"{TARGETS['bbox_mAP']}, segm mAP >= {TARGETS['segm_mAP']}, mIoU >= {TARGETS['mIoU']}, "
                           f"each fine-tuning <= {TARGETS['minutes']:.0f} min, above from scratch."
                           + (" --quick: a CPU smoke run of the script, not a measurement." if args.quick else "")))
    report.env.update(_dense_versions())
    failed = []
    for model in models:
        runs = {scratch: row(run_one(model, scratch, work_dir, extra)) for scratch in (False, True)}
        if not (runs[False]["targets"] or runs[True]["targets"]):
            runs[False]["targets"] = targets(runs[False], runs[True])
        for r in runs.values():
            if (r["targets"] or "").startswith("error"):
                failed.append(f"{r['model']} ({r['init']}): {r['targets']}")
            report.add(**r)
    js, md = report.save(args.out)
    print(report.markdown())
    print(f"wrote {js} and {md}; runs in {work_dir}")
    if failed:
        raise SystemExit("failed runs: " + "; ".join(failed))
    return report


if __name__ == "__main__":
    main()
