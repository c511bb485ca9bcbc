"""UPerNet mIoU levers on the pasted segmentation set for the models that miss mIoU >= 0.6 (issue: downstream
fine-tuning).

Each variant is ``tools/finetune.py --schedule full --pretrain-size 56 --tasks seg`` with one change to the shipped
recipe: batch size, training images, mmseg's usual augmentation (``benchmarks/configs/``), the backbone's
stochastic depth or the learning rate. Per model, its first variant pretrains on Fashion-MNIST; the others start
from that checkpoint (``--checkpoint``) as soon as it is written, so every variant of a model fine-tunes the same
weights, and all the variants share the GPU (their wall times are upper bounds). The shipped recipe's own result is
``results/finetune_seg_lr.md``.

    python -m benchmarks.finetune_levers --variants nat_b16 nat_b32 nat_2400 nat_b16_2400
    python -m benchmarks.finetune_levers --report-from output/finetune_levers   # report finished runs only
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import RESULTS_DIR, Report

REPO = Path(__file__).resolve().parents[1]
CONFIGS = Path("benchmarks") / "configs"
MODELS = {"nat": "nat_tiny", "bif": "biformer_small"}
# variant -> (model key, tools/finetune.py flags on top of the shipped recipe, what changes)
VARIANTS: dict[str, tuple[str, list[str], str]] = {
    "nat_b16": ("nat", ["--batch-size", "16"], "batch 16"),
    "nat_b32": ("nat", ["--batch-size", "32"], "batch 32"),
    "nat_2400": ("nat", ["--train-images", "2400"], "2400 training images"),
    "nat_b16_2400": ("nat", ["--batch-size", "16", "--train-images", "2400"], "batch 16, 2400 training images"),
    "nat_aug": ("nat", ["--seg-config", str(CONFIGS / "upernet_nat-tiny_fashion-seg_augmented.py")],
                "augmentation"),
    "nat_aug_b16": ("nat", ["--batch-size", "16", "--seg-config",
                            str(CONFIGS / "upernet_nat-tiny_fashion-seg_augmented.py")], "augmentation, batch 16"),
    "bif_aug": ("bif", ["--seg-config", str(CONFIGS / "upernet_biformer-small_fashion-seg_augmented.py")],
                "augmentation"),
    "nat_dp01": ("nat", ["--seg-cfg-options", "model.backbone.drop_path_rate=0.1"], "drop path 0.1 (0.3)"),
    "nat_dp0": ("nat", ["--seg-cfg-options", "model.backbone.drop_path_rate=0.0"], "drop path 0 (0.3)"),
    "bif_dp01": ("bif", ["--seg-cfg-options", "model.backbone.drop_path_rate=0.1"], "drop path 0.1 (0.3)"),
    "nat_lr4": ("nat", ["--seg-cfg-options", "optim_wrapper.optimizer.lr=4e-4"], "AdamW lr 4e-4 (2e-4)"),
    "nat_lr8": ("nat", ["--seg-cfg-options", "optim_wrapper.optimizer.lr=8e-4"], "AdamW lr 8e-4 (2e-4)"),
}
COMMON = ["--schedule", "full", "--pretrain-size", "56", "--tasks", "seg", "--seed", "0", "--workers", "3"]
COLUMNS = ["variant", "model", "change", "mIoU", "mIoU at each evaluation", "seg s", "seg img/s", "seg peak MiB",
           "pretrained in", "finished"]


def run(variants: list[str], work_dir: Path, timeout: float) -> None:
    """Start each model's first variant (it pretrains), then the rest from its checkpoint; wait for all."""
    t0, procs, first = time.monotonic(), [], {}
    for name in variants:
        first.setdefault(VARIANTS[name][0], name)
    waiting = [n for n in variants if first[VARIANTS[n][0]] != n]
    pretraining = {}
    for model, name in first.items():
        procs.append(pretraining.setdefault(model, _start(name, work_dir, [])))
        while not (work_dir / "data").is_dir() and procs[-1].poll() is None:  # one writes the sets, then on
            time.sleep(2)
    while waiting and time.monotonic() - t0 < timeout:
        for name in list(waiting):
            model = VARIANTS[name][0]
            checkpoint = work_dir / first[model] / "pretrain" / "last.pth.tar"
            if checkpoint.is_file():
                procs.append(_start(name, work_dir, ["--checkpoint", str(checkpoint)]))
                waiting.remove(name)
            elif pretraining[model].poll() is not None:  # it ended without a checkpoint
                print(f"== {name}: not run, {first[model]} wrote no checkpoint", flush=True)
                waiting.remove(name)
        time.sleep(3)
    for p in procs:
        try:
            p.wait(timeout=max(1.0, timeout - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            p.kill()


def _start(name: str, work_dir: Path, extra: list[str]) -> subprocess.Popen:
    model, flags, _ = VARIANTS[name]
    cmd = [sys.executable, str(REPO / "tools" / "finetune.py"), "--model", MODELS[model], *COMMON, *flags, *extra,
           "--output", str(work_dir), "--experiment", name, "--data-dir", str(work_dir / "data")]
    print("==", " ".join(cmd), flush=True)
    log = open(work_dir / f"{name}.log", "w")
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ,
                                                                                       PYTHONUNBUFFERED="1"))


def row(name: str, work_dir: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The report row of one variant from its summary.json (what it finished), and the summary."""
    model, _, change = VARIANTS[name]
    path = work_dir / name / "summary.json"
    out: dict[str, Any] = dict(variant=name, model=MODELS[model], change=change)
    if not path.is_file():
        return dict(out, finished="no summary.json"), None
    summary = json.loads(path.read_text())
    seg = summary.get("seg") or {}
    curve = (seg.get("curve") or {}).get("mIoU") or {}
    checkpoint = (summary.get("pretrain") or {}).get("checkpoint") or ""
    return dict(out, mIoU=seg.get("mIoU"), **{"mIoU at each evaluation": " / ".join(f"{v:.3f}" for v in (
        curve.values() if isinstance(curve, dict) else curve)) or None}, **{
        "seg s": seg.get("wall_s"), "seg img/s": seg.get("img_per_s"), "seg peak MiB": seg.get("peak_memory_mib"),
        "pretrained in": Path(checkpoint).parts[-3] if checkpoint.count("/") >= 2 else None,
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(path.stat().st_mtime)) if "wall_s" in summary
        else "stopped early"}), summary


def main(argv: list[str] | None = None) -> Report:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=sorted(VARIANTS))
    p.add_argument("--work-dir", default="output/finetune_levers")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds for all the variants together")
    p.add_argument("--report-from", action="store_true", help="run nothing: report the runs in --work-dir")
    p.add_argument("--out", default=str(RESULTS_DIR))
    p.add_argument("--name", default="finetune_seg_levers")
    args = p.parse_args(argv)
    work_dir = Path(args.work_dir).resolve()
    if not args.report_from:
        work_dir.mkdir(parents=True, exist_ok=True)
        run(args.variants, work_dir, args.timeout)
    rows = [row(n, work_dir) for n in args.variants]
    report = Report(args.name, "UPerNet mIoU levers on the pasted Fashion-MNIST segmentation set",
                    columns=COLUMNS, notes=(
                        "tools/finetune.py " + " ".join(COMMON) + " plus each variant's change, from the "
                        "Fashion-MNIST checkpoint; each model's variants fine-tune one checkpoint (pretrained in: "
                        "the variant that wrote it) and shared one GPU, so seg s are upper bounds. The shipped recipe "
                        "(batch 8, 1024 images, flips only, drop path 0.3) gave nat_tiny 0.513 and biformer_small "
                        "0.529 (finetune_seg_lr.md). Target: mIoU >= 0.6."))
    stamp = next((s for _, s in rows if isinstance(s, dict) and s.get("versions")), None)
    if stamp:  # the measuring machine's stamps, as the runs recorded them
        report.env = dict(date=report.env["date"], command=report.env["command"],
                          **{k: v for k, v in stamp["versions"].items() if v is not None}, device=stamp.get("device"))
    for r, _ in rows:
        report.add(**r)
    for path in report.save(args.out):
        print(path)
    return report


if __name__ == "__main__":
    main()
