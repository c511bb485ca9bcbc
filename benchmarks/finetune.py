"""Dense fine-tuning from the Fashion-MNIST classification checkpoint vs from scratch (issue: downstream fine-tuning).

For each model, ``tools/finetune.py --schedule full`` twice with the same seed, data and schedule: once pretraining
on Fashion-MNIST and fine-tuning Mask R-CNN and UPerNet from that checkpoint (``init_cfg``), once ``--from-scratch``
(no pretraining). One row per run: COCO bbox/segm mAP and mIoU (fractions) on the pasted validation sets, and per
fine-tuning its wall time (training and its evaluations), img/s (median training step) and peak CUDA memory.
Targets: from the checkpoint, bbox mAP >= 0.5, segm mAP >= 0.4 and mIoU >= 0.6, each fine-tuning <= 5 minutes on one
H200, above the from-scratch run of the same model.

    python -m benchmarks.finetune                      # nat_tiny, biformer_small, maxvit_t, one run at a time
    python -m benchmarks.finetune --gpus 2 --runs-per-gpu 3 --run-timeout 480   # all six at once on two GPUs
    python -m benchmarks.finetune --models maxvit_t --append   # add rows to the report, keep the other models'
    python -m benchmarks.finetune --finetune-args "--det-epochs 6 --seg-iters 1000 --amp"
    python -m benchmarks.finetune --quick              # CPU smoke run of the script (nat_nano, toy sizes)

The pasted sets are written once, before the runs; then each run is its own ``tools/finetune.py`` process (its own
CUDA peak) on the GPU ``CUDA_VISIBLE_DEVICES`` names, its output in ``<work-dir>/<run>.log``; pretrained runs (the
longer ones) start first. With ``--runs-per-gpu`` above 1 runs share a GPU, so their wall times are upper bounds of
a GPU of their own (the report says how many shared). A run stopped by ``--run-timeout`` reports the stages it
finished. Folders, ``summary.json`` and ``curves.png`` of the runs stay under ``--work-dir``.

Without mmcv's compiled ops (mmcv 2.1.0 ships no wheel with them for recent torch/CUDA builds), the ops-free mmcv
build (``MMCV_WITH_OPS=0``) with ``benchmarks/mmcv_ext_torchvision.py`` copied in as ``mmcv/_ext.py`` runs this
benchmark on torchvision's CUDA kernels for NMS and RoIAlign, the only mmcv ops Mask R-CNN and UPerNet use.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
import yaml

from benchmarks.harness import RESULTS_DIR, Report

REPO = Path(__file__).resolve().parents[1]
MODELS = ["nat_tiny", "biformer_small", "maxvit_t"]
TARGETS = dict(bbox_mAP=0.5, segm_mAP=0.4, mIoU=0.6, minutes=5.0)
# A CPU smoke run: one Fashion-MNIST epoch, then a few fine-tuning steps on a handful of small canvases.
QUICK = ["--schedule", "toy", "--train-images", "8", "--val-images", "4", "--image-size", "64", "96",
         "--det-epochs", "1", "--seg-iters", "4", "--workers", "1"]
COLUMNS = ["model", "init", "bbox mAP", "segm mAP", "mIoU", "det s", "det img/s", "det peak MiB", "seg s",
           "seg img/s", "seg peak MiB", "pretrain s", "pretrain top-1", "run s", "GPU", "schedule", "targets",
           "measured"]


@dataclass
class Run:
    """One ``tools/finetune.py`` process of the benchmark."""

    model: str
    scratch: bool
    cmd: list[str] = field(default_factory=list)
    log: Path | None = None
    proc: subprocess.Popen | None = None
    gpu: int | None = None
    started: float = 0.0
    stopped: str = ""  # why the benchmark ended it early
    file: IO | None = None

    @property
    def name(self) -> str:
        return f"{self.model}-{'scratch' if self.scratch else 'pretrained'}"

    @property
    def init(self) -> str:
        return "scratch" if self.scratch else "pretrained"


def run_all(runs: list[Run], work_dir: Path, extra: list[str], gpus: int, per_gpu: int,
            timeout: float | None) -> None:
    """Run ``runs`` as ``tools/finetune.py`` processes, at most ``per_gpu`` at a time on each of ``gpus`` GPUs (on
    the device the tool picks when ``gpus`` is 0); each is stopped after ``timeout`` seconds."""
    queue = sorted(runs, key=lambda r: r.scratch)  # pretrained first: they pretrain, so they take longer
    busy: dict[int, list[Run]] = {g: [] for g in range(max(gpus, 1))}
    while queue or any(busy.values()):
        for active in busy.values():
            for run in [r for r in active if r.proc.poll() is not None]:
                active.remove(run)
                run.file.close()
                print(f"== {run.name} ended (exit {run.proc.returncode}) after {time.monotonic() - run.started:.0f} s"
                      f"{'; ' + run.stopped if run.stopped else ''}; log {run.log}", flush=True)
        while queue and min(len(a) for a in busy.values()) < per_gpu:  # the least busy GPU takes the next run
            g = min(busy, key=lambda i: len(busy[i]))
            run = queue.pop(0)
            _start(run, work_dir, extra, g if gpus else None)
            busy[g].append(run)
        for active in busy.values():
            for run in active:
                if timeout and not run.stopped and time.monotonic() - run.started > timeout:
                    run.stopped = f"stopped by --run-timeout {timeout:.0f} s"
                    _kill(run, signal.SIGTERM)
                elif run.stopped and time.monotonic() - run.started > timeout + 30:
                    _kill(run, signal.SIGKILL)
        time.sleep(1.0)


def _kill(run: Run, sig: int) -> None:
    """Signal the run and its data-loading workers (its own session)."""
    try:
        os.killpg(run.proc.pid, sig)
    except ProcessLookupError:  # ended meanwhile
        pass


def _start(run: Run, work_dir: Path, extra: list[str], gpu: int | None) -> None:
    run.cmd = [sys.executable, str(REPO / "tools" / "finetune.py"), "--model", run.model, "--output", str(work_dir),
               "--experiment", run.name, "--data-dir", str(work_dir / "data"), *extra]
    run.cmd += ["--from-scratch"] if run.scratch else []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if gpu is not None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # GPU i of the ones this process was given
        env["CUDA_VISIBLE_DEVICES"] = visible.split(",")[gpu] if visible else str(gpu)
    run.gpu, run.log = gpu, work_dir / f"{run.name}.log"
    print(f"== {run.name} on {'GPU ' + str(gpu) if gpu is not None else 'the default device'}: "
          f"{' '.join(shlex.quote(c) for c in run.cmd)}", flush=True)
    run.file = open(run.log, "w")
    run.started = time.monotonic()
    run.proc = subprocess.Popen(run.cmd, cwd=REPO, env=env, stdout=run.file, stderr=subprocess.STDOUT,
                                start_new_session=True)


def result(run: Run, work_dir: Path) -> dict[str, Any]:
    """The run's summary.json (what it finished, when stopped early), with the error it ended with if any."""
    path = work_dir / run.name / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else dict(model=run.model, init=run.init)
    if run.proc is None:  # --report-from: a run of an earlier invocation, measured when it wrote its summary
        if path.is_file():
            summary["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(path.stat().st_mtime))
        if "wall_s" not in summary:
            summary["error"] = f"{path} is missing or the run did not finish"
    elif run.proc.returncode != 0 or "wall_s" not in summary:
        summary["error"] = run.stopped or f"tools/finetune.py exit {run.proc.returncode} (see {run.log.name})"
    summary["gpu"] = run.gpu
    return summary


def row(summary: dict[str, Any]) -> dict[str, Any]:
    """The report row of one run."""
    det, seg, pre = summary.get("det") or {}, summary.get("seg") or {}, summary.get("pretrain") or {}
    return {"model": summary["model"], "init": summary["init"], "bbox mAP": det.get("bbox_mAP"),
            "segm mAP": det.get("segm_mAP"), "mIoU": seg.get("mIoU"), "det s": det.get("wall_s"),
            "det img/s": det.get("img_per_s"), "det peak MiB": det.get("peak_memory_mib"), "seg s": seg.get("wall_s"),
            "seg img/s": seg.get("img_per_s"), "seg peak MiB": seg.get("peak_memory_mib"),
            "pretrain s": pre.get("wall_s"), "pretrain top-1": pre.get("top1"), "run s": summary.get("wall_s"),
            "GPU": summary.get("gpu"), "schedule": schedule(summary.get("args")),
            "targets": summary.get("error") and f"error: {summary['error']}"}


def schedule(args: dict[str, Any] | None) -> str | None:
    """A run's schedule in a few words (rows appended from other invocations may differ)."""
    if not args:
        return None
    return (f"pretrain {args['pretrain_epochs']} ep b{args['pretrain_batch_size']} {args.get('pretrain_size', 28)} px, "
            f"det {args['det_epochs']} ep, "
            f"seg {args['seg_iters']} it, b{args['batch_size']}, {args['train_images']} img"
            + (", amp" if args.get("amp") else "")
            + (f", {' + '.join(args['tasks'])} only" if len(args.get("tasks") or ["det", "seg"]) < 2 else "")
            + "".join(f", {task} {' '.join(args[f'{task}_cfg_options'])}" for task in ("det", "seg")
                      if args.get(f"{task}_cfg_options")))


def targets(pretrained: dict[str, Any], scratch: dict[str, Any]) -> str:
    """Which targets the pretrained run meets ('all', or the misses), over the stages it ran (``--tasks``)."""
    ran = {"bbox mAP": "det s", "segm mAP": "det s", "mIoU": "seg s"}
    metrics = [k for k, stage in ran.items() if pretrained[stage] is not None]
    misses = [f"{k} {pretrained[k]:.3f} < {TARGETS[k.replace(' ', '_')]}" for k in metrics
              if (pretrained[k] or 0.0) < TARGETS[k.replace(" ", "_")]]
    misses += [f"{k} {pretrained[k] / 60:.1f} min > {TARGETS['minutes']}" for k in ("det s", "seg s")
               if pretrained[k] is not None and pretrained[k] > 60 * TARGETS["minutes"]]
    misses += [f"{k} not above scratch" for k in metrics if (pretrained[k] or 0.0) <= (scratch[k] or 0.0)]
    return "all" if not misses else "missed: " + "; ".join(misses)


def _dense_versions() -> dict[str, str | None]:
    """mm* versions, and whose ops mmcv runs on (its compiled extension, or the torchvision stand-in)."""
    from tools.finetune import library_versions

    versions = {k: v for k, v in library_versions().items() if k.startswith("mm")}
    try:
        from mmcv import _ext

        versions["mmcv ops"] = "compiled" if not _ext.__file__.endswith(".py") else f"torchvision ({_ext.__name__}.py)"
    except ImportError:
        versions["mmcv ops"] = None
    return versions


def main(argv: list[str] | None = None) -> Report:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=None, help=f"default: {' '.join(MODELS)} (--quick: nat_nano)")
    p.add_argument("--quick", action="store_true", help="CPU smoke run of this script, not a measurement")
    p.add_argument("--finetune-args", default="", help="more tools/finetune.py flags for every run (after "
                   "--schedule full: --det-epochs, --seg-iters, --pretrain-epochs, --amp, --workers, ...)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs to spread the runs over, 0..N-1 (default: 1 with "
                   "CUDA, 0 with --quick: the device tools/finetune.py picks)")
    p.add_argument("--runs-per-gpu", type=int, default=1,
                   help="runs sharing one GPU (or, with --gpus 0, the device) at a time (1); more finish sooner "
                        "but time each other's share")
    p.add_argument("--run-timeout", type=float, default=None, metavar="S",
                   help="stop a run after S seconds and report the stages it finished (default: none)")
    p.add_argument("--append", action="store_true",
                   help="keep the report's rows of models not run now (each row carries its date)")
    p.add_argument("--work-dir", default="output/benchmark_finetune", help="parent of the runs' folders")
    p.add_argument("--out", default=str(RESULTS_DIR), help="where finetune.{json,md} go")
    p.add_argument("--name", default=None, help="report file name (default: finetune, or finetune_quick)")
    p.add_argument("--report-from", metavar="DIR", default=None,
                   help="run nothing: report the finished runs in DIR (a --work-dir's full/ folder), e.g. when the "
                        "benchmark stopped before its report")
    args = p.parse_args(argv)
    cuda = torch.cuda.device_count()
    if args.report_from:
        if not Path(args.report_from).is_dir():
            p.error(f"--report-from {args.report_from}: no such directory")
    elif not args.quick and not cuda:
        raise SystemExit("benchmarks.finetune needs a CUDA device (the full schedule takes hours on a CPU); "
                         "--quick smoke-tests the script on a CPU")
    gpus = args.gpus if args.gpus is not None else (0 if args.quick else 1)
    if not args.report_from and not 0 <= gpus <= cuda:
        p.error(f"--gpus {gpus}: expected 0..{cuda}, the CUDA devices this machine shows")
    if args.runs_per_gpu < 1:
        p.error(f"--runs-per-gpu {args.runs_per_gpu}: expected at least 1")
    if args.run_timeout is not None and args.run_timeout <= 0:
        p.error(f"--run-timeout {args.run_timeout}: expected a positive number of seconds")
    from attnzoo.openmmlab.finetune import fresh_folder
    from attnzoo.training.data import prepare_fashion_mnist
    from tools.finetune import parse_args as finetune_args
    from tools.finetune import prepare_data

    models = args.models or (["nat_nano"] if args.quick else MODELS)
    work_dir = Path(args.report_from).resolve() if args.report_from else \
        fresh_folder(Path(args.work_dir).resolve(), "quick" if args.quick else "full")
    extra = (QUICK if args.quick else ["--schedule", "full"]) + ["--seed", "0"] + shlex.split(args.finetune_args)
    name = args.name or ("finetune_quick" if args.quick else "finetune")
    per_gpu = args.runs_per_gpu
    sharing = f" Up to {per_gpu} runs shared one {'GPU' if gpus else 'device'} at a time: their wall times are " \
        "upper bounds." if per_gpu > 1 else ""
    runs_are = (f"Rebuilt from the finished runs in {work_dir.name}/ of an earlier invocation (its schedule column "
                "gives each run's flags): pretrained and --from-scratch per model" if args.report_from else
                f"tools/finetune.py {' '.join(extra)} per model, pretrained and --from-scratch")
    report = Report(name, "Mask R-CNN / UPerNet fine-tuning on the pasted Fashion-MNIST sets: from the "
                    "classification checkpoint vs from scratch", columns=COLUMNS,
                    notes=(f"{runs_are} (same seed, data and schedule). mAP/mIoU: fractions on the pasted "
                           "validation sets; s: wall time of each fine-tuning (training + its evaluations); img/s: "
                           "median training step; peak MiB: CUDA high-water mark of the stage; run s: the whole "
                           "run (pretraining included). Targets: from the checkpoint bbox mAP >= "
                           f"{TARGETS['bbox_mAP']}, segm mAP >= {TARGETS['segm_mAP']}, mIoU >= {TARGETS['mIoU']}, "
                           f"each fine-tuning <= {TARGETS['minutes']:.0f} min, above from scratch.{sharing}"
                           + (" --quick: a CPU smoke run of the script, not a measurement." if args.quick else "")))
    report.env.update(_dense_versions())
    out_json = Path(args.out) / f"{name}.json"
    if args.append and out_json.is_file():
        old = json.loads(out_json.read_text())
        for r in old["rows"]:
            if r["model"] not in models:
                report.add(**{"measured": old["env"]["date"], **r})
    runs = [Run(model, scratch) for model in models for scratch in (False, True)]
    if args.report_from:
        stamps = [json.loads(f.read_text()) for r in runs if (f := work_dir / r.name / "summary.json").is_file()]
        if stamps:  # the measuring machine's, as the runs recorded it, not this one's
            report.env = dict(date=report.env["date"], command=report.env["command"],
                              **{k: v for k, v in stamps[0].get("versions", {}).items() if v is not None},
                              device=stamps[0].get("device"))
    else:
        # the pasted sets and the pretraining's Fashion-MNIST files once, before any run: parallel runs would
        # each write them into the same folders
        data = finetune_args(["--model", models[0], "--data-dir", str(work_dir / "data"), *extra])
        print(f"== pasted sets in {data.data_dir}: {prepare_data(data)}", flush=True)
        recipe = yaml.safe_load((REPO / "configs" / "demo" / "fashion_mnist.yaml").read_text())  # data_dir: REPO's
        print(f"== Fashion-MNIST for pretraining in {prepare_fashion_mnist(REPO / recipe['data_dir'])}", flush=True)
        t0 = time.monotonic()
        run_all(runs, work_dir, extra, gpus, per_gpu, args.run_timeout)
        report.env["benchmark wall s"] = round(time.monotonic() - t0)
    failed = []
    for model in models:
        summaries = {r.scratch: result(r, work_dir) for r in runs if r.model == model}
        pair = {scratch: row(summary) for scratch, summary in summaries.items()}
        if not (pair[False]["targets"] or pair[True]["targets"]):
            pair[False]["targets"] = targets(pair[False], pair[True])
        for scratch, r in pair.items():
            if (r["targets"] or "").startswith("error"):
                failed.append(f"{r['model']} ({r['init']}): {r['targets']}")
            report.add(**r, measured=summaries[scratch].get("finished") or report.env["date"])
    js, md = report.save(args.out)
    print(report.markdown())
    print(f"wrote {js} and {md}; runs in {work_dir}")
    if failed:
        raise SystemExit("failed runs: " + "; ".join(failed))
    return report


if __name__ == "__main__":
    main()
