"""Training throughput of attnzoo's loop (tools/train.py) vs timm's train.py on the same model and settings.

Both train one epoch of a synthetic ImageFolder (random JPEGs, ``--images`` of them, ``--size`` px) with
the same batch, AMP dtype, channels-last and augmentation, in one process each; throughput is the
steady-state img/s each script reports (attnzoo: summary.csv; timm: its last "Train:" log line).
timm's train.py is not part of attnzoo: fetch it (same version as the installed timm) and pass --timm-train.

    python -m benchmarks.train_throughput --timm-train /path/to/timm/train.py --model nat_tiny
"""
from __future__ import annotations

import argparse
import csv
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.harness import Report

REPO = Path(__file__).resolve().parents[1]


def make_folder(root: Path, images: int, size: int, classes: int = 10) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", images), ("val", max(classes, images // 50))):
        for i in range(n):
            d = root / split / f"c{i % classes}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.jpg", quality=90)
    return root


def common_flags(a: argparse.Namespace) -> list[str]:
    flags = ["--model", a.model, "-b", str(a.batch_size), "--epochs", "1", "--warmup-epochs", "0", "-j", str(a.workers),
             "--lr", "1e-3", "--weight-decay", "0.05", "--opt", "adamw", "--sched", "cosine", "--smoothing", "0.1",
             "--aa", "rand-m9-mstd0.5-inc1", "--mixup", "0.8", "--cutmix", "1.0", "--reprob", "0.25"]
    if a.amp:
        flags += ["--amp", "--amp-dtype", "bfloat16"]
    return flags + (["--channels-last"] if a.channels_last else [])


def run_attnzoo(data: Path, out: Path, a: argparse.Namespace) -> float:
    cmd = [sys.executable, str(REPO / "tools" / "train.py"), str(data), *common_flags(a), "--output", str(out),
           "--experiment", "attnzoo", "--no-progress", "--no-plot", "--val-split", "val"]
    subprocess.run(cmd, check=True, cwd=REPO)
    with open(out / "attnzoo" / "summary.csv") as f:
        return float(list(csv.DictReader(f))[-1]["train_img_per_s"])


def run_timm(data: Path, out: Path, a: argparse.Namespace) -> float:
    code = ("import sys, runpy, attnzoo; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    cmd = [sys.executable, "-c", code, a.timm_train, "--data-dir", str(data), *common_flags(a), "--output", str(out),
           "--experiment", "timm", "--val-split", "val", "--log-interval", "10"]
    proc = subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, text=True)
    rates = re.findall(r"([0-9.]+)/s", proc.stdout + proc.stderr)
    if not rates:
        raise RuntimeError("no throughput in timm's train.py output")
    return float(rates[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--timm-train", required=True, help="path of timm's train.py (fetched, same timm version)")
    p.add_argument("--model", default="nat_tiny")
    p.add_argument("-b", "--batch-size", type=int, default=128)
    p.add_argument("-j", "--workers", type=int, default=8)
    p.add_argument("--images", type=int, default=50_000)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--no-amp", dest="amp", action="store_false")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = make_folder(Path(tmp) / "data", a.images, a.size)
        out = Path(tmp) / "out"
        ours, theirs = run_attnzoo(data, out, a), run_timm(data, out, a)
    report = Report("train_throughput", f"Training throughput: attnzoo loop vs timm train.py ({a.model})",
                    notes=f"{a.images} synthetic {a.size}px JPEGs, 224 crops, batch {a.batch_size}, bf16 AMP={a.amp}, "
                          f"channels-last={a.channels_last}, RandAugment + mixup/cutmix + random erasing, 1 process")
    report.add(model=a.model, attnzoo_img_s=ours, timm_img_s=theirs, ratio=ours / theirs)
    print(report.markdown())
    report.save()


if __name__ == "__main__":
    main()
