#!/usr/bin/env python3
"""Pretrain a backbone on Fashion-MNIST, then fine-tune Mask R-CNN and UPerNet from it on the pasted sets.

    python tools/finetune.py --model nat_nano                          # CPU: the toy schedule
    python tools/finetune.py --model nat_tiny --schedule full          # one GPU: the shipped configs' recipe
    python tools/finetune.py --model nat_tiny --schedule full --from-scratch   # same schedule and seed, no init
    python tools/finetune.py --model nat_tiny --checkpoint my_run/last.pth.tar # your own classification checkpoint

Stages, each through the repo's own tool: ``tools/make_dense_demo_data.py`` (only when the data folder is
missing) -> ``tools/train.py`` classification pretraining (configs/demo's Fashion-MNIST recipe, grayscale repeated
to 3 channels) -> ``tools/dense_train.py`` Mask R-CNN and UPerNet fine-tuning with
``model.backbone.init_cfg=dict(type='Pretrained', checkpoint=<pretrain>/last.pth.tar)``, evaluated during
training (COCO bbox/segm mAP, mIoU). The run folder ``<output>/<model>[-scratch]`` (``-N`` appended when it
already holds a run) gets ``pretrain/``, ``det/``, ``seg/``, ``summary.json`` and ``curves.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import yaml  # noqa: E402

from attnzoo.training.errors import UsageError  # noqa: E402

PRESETS: dict[str, dict[str, Any]] = {
    # CPU, a few minutes: the whole path and the losses going down, far from converged
    "toy": dict(pretrain_epochs=1, pretrain_batch_size=128, pretrain_size=28, train_images=64, val_images=16,
                det_epochs=1, seg_iters=20, batch_size=2, workers=1, log_interval=2),
    # one GPU: the schedule of the shipped configs/mm*/finetune configs (benchmarks/finetune.py runs it), short
    # enough for each fine-tuning to take minutes and for the benchmark's six runs to share two GPUs; pretraining
    # batches of 512 (4x the demo recipe's; PRETRAIN_FLAGS) keep a GPU busy; 56 px, inside the 26-80 px the pasted
    # items take on the canvases (at Fashion-MNIST's 28 px the checkpoint gave detection nothing over scratch)
    "full": dict(pretrain_epochs=3, pretrain_batch_size=512, pretrain_size=56, train_images=1024, val_images=128,
                 det_epochs=4, seg_iters=1000, batch_size=8, workers=4, log_interval=10),
}
# tools/train.py flags of each preset's pretraining, ahead of --pretrain-args (which can override them). The
# demo recipe's rate (2.5e-3 from the first step) is for nat_nano at batch 128; with batches of 512 it sent
# nat_tiny to chance accuracy in the second epoch on an H200 (benchmarks/NOTES_finetune.md), so "full" takes
# a lower rate, a warm-up epoch and gradient-norm clipping.
PRETRAIN_FLAGS: dict[str, list[str]] = {
    "toy": [],
    "full": ["--lr", "1e-3", "--warmup-epochs", "1", "--clip-grad", "1.0"],
}
DATA_META = "finetune_data.json"  # what make_dense_demo_data.py was asked for, written next to the sets


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])

    def preset(key: str) -> str:
        return "; " + ", ".join(f"{name} {values[key]}" for name, values in sorted(PRESETS.items()))

    p.add_argument("--model", default="nat_nano", help="attnzoo model name, any family with dense configs (nat_nano)")
    p.add_argument("--schedule", choices=sorted(PRESETS), default="toy",
                   help="preset of the knobs below: toy (the whole path on a CPU, far from converged) or full "
                        "(one GPU, the shipped configs' recipe)")
    p.add_argument("--output", default="output/finetune", help="parent folder of the run folder (output/finetune)")
    p.add_argument("--experiment", default="", help="run folder name (default: <model>, <model>-scratch)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available")
    p.add_argument("--from-scratch", action="store_true",
                   help="no pretraining and no init_cfg: the same fine-tuning from random weights")
    p.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="skip pretraining and fine-tune from this classification checkpoint (a tools/train.py "
                        "last.pth.tar, an official file, a URL or hf-hub:ORG/NAME)")
    p.add_argument("--tasks", nargs="+", choices=["det", "seg"], default=["det", "seg"])
    p.add_argument("--seed", type=int, default=0, help="seed of every stage (0)")
    p.add_argument("--model-kwargs", type=yaml.safe_load, default=None,
                   help="timm create_model kwargs (YAML) for pretraining and the dense backbone alike")
    g = p.add_argument_group("schedule (defaults from --schedule)")
    g.add_argument("--pretrain-epochs", type=int, help="Fashion-MNIST epochs" + preset("pretrain_epochs"))
    g.add_argument("--pretrain-batch-size", type=int, help="pretraining batch" + preset("pretrain_batch_size"))
    g.add_argument("--pretrain-size", type=int,
                   help="pretraining image side (Fashion-MNIST's is 28)" + preset("pretrain_size"))
    g.add_argument("--pretrain-args", default="", metavar="'FLAGS'",
                   help="more tools/train.py flags in one string, e.g. --pretrain-args='--dataset-download'")
    g.add_argument("--det-epochs", type=int, help="Mask R-CNN epochs" + preset("det_epochs"))
    g.add_argument("--seg-iters", type=int, help="UPerNet iterations" + preset("seg_iters"))
    g.add_argument("--batch-size", type=int, help="fine-tuning images per batch" + preset("batch_size"))
    g.add_argument("--image-size", type=int, nargs=2, default=(160, 192), metavar=("H", "W"),
                   help="canvas size of the pasted sets and of fine-tuning (160 192)")
    g.add_argument("--train-images", type=int, help="pasted training images" + preset("train_images"))
    g.add_argument("--val-images", type=int, help="pasted validation images" + preset("val_images"))
    g.add_argument("--workers", type=int, help="data-loading processes of every stage" + preset("workers"))
    g.add_argument("--log-interval", type=int,
                   help="iterations between fine-tuning log lines and curve points" + preset("log_interval"))
    g.add_argument("--amp", action="store_true", help="mixed precision in pretraining and fine-tuning")
    g = p.add_argument_group("data and configs")
    g.add_argument("--data-dir", default=None,
                   help="pasted sets (written there when missing; default data/fashion_dense_<train>+<val>_<H>x<W>)")
    g.add_argument("--allow-random-glyphs", action="store_true",
                   help="paste random blobs when Fashion-MNIST is not installed (make_dense_demo_data.py)")
    for task, what in (("det", "Mask R-CNN"), ("seg", "UPerNet")):
        g.add_argument(f"--{task}-config", default=None,
                       help=f"{what} fine-tune config (default: the model's in configs/, or one written over its "
                            "family's)")
        g.add_argument(f"--{task}-cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                       help=f"override keys of the {what} config last, as tools/dense_train.py --cfg-options")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.schedule].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in PRESETS["toy"]:
        if getattr(args, key) < (0 if key == "workers" else 1):
            p.error(f"--{key.replace('_', '-')}: must be at least {0 if key == 'workers' else 1}, "
                    f"got {getattr(args, key)}")
    if min(args.image_size) < 32:
        p.error(f"--image-size: each side must be at least 32 pixels, got {tuple(args.image_size)}")
    if "seg" in args.tasks and args.batch_size < 2:  # UPerNet's pooling module normalises 1x1 maps over the batch
        p.error(f"--batch-size {args.batch_size}: UPerNet fine-tuning needs at least 2 images a batch")
    if args.from_scratch and args.checkpoint:
        p.error("--from-scratch and --checkpoint exclude each other")
    if args.model_kwargs is not None and not isinstance(args.model_kwargs, dict):
        p.error(f"--model-kwargs: expected a YAML mapping such as '{{depths: [1, 1, 1, 1]}}', "
                f"got {args.model_kwargs!r}")
    if args.data_dir is None:
        h, w = args.image_size
        args.data_dir = f"data/fashion_dense_{args.train_images}+{args.val_images}_{h}x{w}"
    return args


def prepare_data(args: argparse.Namespace) -> dict[str, Any]:
    """The pasted sets in ``--data-dir``: written there when the folder is missing, else checked and reused."""
    from tools.make_dense_demo_data import main as make_data

    folder = Path(args.data_dir)
    wanted = dict(train=args.train_images, val=args.val_images, size=list(args.image_size), seed=0)
    if folder.exists():
        meta_path = folder / DATA_META
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            if {k: meta.get(k) for k in wanted} != wanted:
                raise UsageError(f"--data-dir {folder} holds {meta['train']}+{meta['val']} images of "
                                 f"{meta['size'][0]}x{meta['size'][1]}, this run asks for {args.train_images}+"
                                 f"{args.val_images} of {args.image_size[0]}x{args.image_size[1]}: pass another "
                                 "--data-dir (it is written there) or the matching sizes")
            return meta
        ann = folder / "det" / "annotations" / "instances_train.json"
        if not (ann.is_file() and (folder / "seg" / "annotations" / "train").is_dir()):
            raise UsageError(f"--data-dir {folder} exists but holds neither a set written by this tool nor "
                             "det/ and seg/ in make_dense_demo_data.py's layout: pass another --data-dir")
        n_train = len(json.loads(ann.read_text())["images"])
        print(f"data: using {folder} as it is ({n_train} training images, not written by this tool)")
        return dict(train=n_train, source="user")
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")  # a killed run leaves no half-written set
    try:
        source = make_data([str(tmp), "--train", str(args.train_images), "--val", str(args.val_images), "--size",
                            *map(str, args.image_size), "--seed", "0"]
                           + (["--allow-random-glyphs"] if args.allow_random_glyphs else []))
    except FileNotFoundError as e:  # no Fashion-MNIST to paste from
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(str(e)) from None
    meta = dict(wanted, source=source)
    (tmp / DATA_META).write_text(json.dumps(meta) + "\n")
    folder.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, folder)
    return meta


def pretrain(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """``tools/train.py`` on Fashion-MNIST (the demo recipe) with 3-channel input; returns its record."""
    import torch

    from attnzoo.openmmlab.finetune import pretrain_curve
    from attnzoo.training.loop import main as train_main

    s = str(args.pretrain_size)
    argv = ["--config", str(ROOT / "configs" / "demo" / "fashion_mnist.yaml"), "--model", args.model,
            "--input-size", "3", s, s, "--epochs", str(args.pretrain_epochs), "-b", str(args.pretrain_batch_size),
            "--seed", str(args.seed),
            "-j", str(args.workers), "--output", str(run_dir), "--experiment", "pretrain"]
    argv += ["--device", args.device] + (["--amp"] if args.amp else [])
    if args.model_kwargs:
        argv += ["--model-kwargs", yaml.safe_dump(args.model_kwargs, default_flow_style=True).strip()]
    argv += PRETRAIN_FLAGS[args.schedule] + shlex.split(args.pretrain_args)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = train_main(argv)
    wall = time.perf_counter() - t0
    checkpoint = result.output_dir / "last.pth.tar"
    return dict(checkpoint=_portable(checkpoint), run_dir=_portable(result.output_dir), wall_s=wall,
                top1=result.last_metrics.get("eval_top1"), img_per_s=result.last_metrics.get("train_img_per_s"),
                peak_memory_mib=torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
                curve=pretrain_curve(result.output_dir / "summary.csv"), argv=argv)


def fine_tune(args: argparse.Namespace, task: str, run_dir: Path, checkpoint: str | None,
              train_images: int) -> dict[str, Any]:
    """``tools/dense_train.py``'s config handling plus this run's data, size, schedule and init."""
    from mmengine.config import DictAction

    from attnzoo.openmmlab import finetune
    from tools.dense_train import build_config
    from tools.dense_train import parse_args as dense_args

    model_kwargs = {"in_chans": 3, **(args.model_kwargs or {})}  # the pasted canvases load as RGB
    config, overrides = (Path(getattr(args, f"{task}_config")), {}) if getattr(args, f"{task}_config") else \
        finetune.resolve_config(args.model, task, ROOT / "configs", run_dir / "configs", model_kwargs)
    cfg = build_config(dense_args([str(config), "--work-dir", str(run_dir / task)] + (["--amp"] if args.amp else [])))
    cfg.merge_from_dict(overrides)
    finetune.configure(cfg, task, work_dir=run_dir / task, data_root=args.data_dir, image_size=args.image_size,
                       length=args.det_epochs if task == "det" else args.seg_iters, batch_size=args.batch_size,
                       train_images=train_images, workers=args.workers, seed=args.seed, checkpoint=checkpoint,
                       model_kwargs=model_kwargs, log_interval=args.log_interval)
    options = getattr(args, f"{task}_cfg_options")
    if options:
        parser = argparse.ArgumentParser(prog=f"--{task}-cfg-options")
        parser.add_argument("o", nargs="+", action=DictAction)
        cfg.merge_from_dict(parser.parse_args(options).o)
    record = finetune.train(cfg, task)
    return dict(record, config=_portable(config), overrides=overrides, work_dir=_portable(record["work_dir"]),
                log_dir=_portable(record["log_dir"]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # mmengine places models on any visible GPU
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("finetune.py: error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return _run(args)
    except UsageError as e:
        print(f"finetune.py: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    import torch

    from attnzoo.openmmlab.finetune import fresh_folder, plot_run
    from attnzoo.training.loop import check_model_name

    check_model_name(args.model)
    if args.checkpoint and not args.checkpoint.startswith(("http://", "https://", "hf-hub:")):
        from attnzoo.training.checkpoint import check_file

        check_file(args.checkpoint, "--checkpoint")
    init = "scratch" if args.from_scratch else ("checkpoint" if args.checkpoint else "pretrained")
    run_dir = fresh_folder(args.output, args.experiment or (f"{args.model}-scratch" if args.from_scratch
                                                            else args.model))
    summary: dict[str, Any] = dict(
        model=args.model, init=init, schedule=args.schedule, seed=args.seed, image_size=list(args.image_size),
        batch_size=args.batch_size, device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        versions=library_versions(), command=" ".join(shlex.quote(_portable(a)) for a in sys.argv),
        args=dict(vars(args)))
    summary_path, png_path = run_dir / "summary.json", run_dir / "curves.png"

    def save() -> None:
        summary_path.write_text(json.dumps(summary, indent=1, default=str) + "\n")

    print(f"== run folder {run_dir} ({args.model}, {init}, {args.schedule} schedule, {args.device})", flush=True)
    stages = ["data"] + (["pretrain"] if init == "pretrained" else []) + list(args.tasks)
    t0 = time.perf_counter()

    def banner(stage: str, text: str) -> None:
        print(f"== [{stages.index(stage) + 1}/{len(stages)}] {text}", flush=True)

    banner("data", f"pasted detection/segmentation sets in {args.data_dir}")
    data = prepare_data(args)  # first: a missing Fashion-MNIST stops the run before any training
    summary["data"] = dict(data, dir=_portable(args.data_dir))
    checkpoint: str | None = args.checkpoint
    if init == "pretrained":
        banner("pretrain", f"pretraining {args.model} on Fashion-MNIST ({args.pretrain_epochs} epoch(s), "
                           f"{args.pretrain_size}px, 3 channels)")
        summary["pretrain"] = pretrain(args, run_dir)
        checkpoint = summary["pretrain"]["checkpoint"]
        print(f"   top-1 {summary['pretrain']['top1']:.2f}% in {summary['pretrain']['wall_s']:.0f} s; "
              f"checkpoint {checkpoint}", flush=True)
    else:
        summary["pretrain"] = dict(note="skipped: --from-scratch" if args.from_scratch else
                                   f"skipped: --checkpoint {args.checkpoint}", checkpoint=checkpoint)
    save()
    for task in args.tasks:
        what = "Mask R-CNN (COCO bbox/segm mAP)" if task == "det" else "UPerNet (mIoU)"
        length = f"{args.det_epochs} epoch(s)" if task == "det" else f"{args.seg_iters} iterations"
        banner(task, f"fine-tuning {what}, {length}, {'from ' + checkpoint if checkpoint else 'from scratch'}")
        summary[task] = fine_tune(args, task, run_dir, checkpoint, data["train"])
        save()
    summary["wall_s"] = time.perf_counter() - t0
    save()
    plot_run(summary, png_path)
    print(f"== done in {summary['wall_s']:.0f} s: {summary_path}, {png_path}")
    for task in args.tasks:
        r = summary[task]
        metrics = ", ".join(f"{k} {r[k]:.3f}" for k in ("bbox_mAP", "segm_mAP", "mIoU") if k in r)
        empty = f"; no box above the score threshold at iteration(s) {r['no_detections']}: mAP 0 there" \
            if r.get("no_detections") else ""
        print(f"   {task}: {metrics} ({r['wall_s']:.0f} s, {r['img_per_s'] or 0:.1f} img/s{empty})")
    return 0


def library_versions() -> dict[str, str | None]:
    """Python and the versions of the libraries a run depends on (None: not installed)."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "timm", "mmengine", "mmcv", "mmdet", "mmsegmentation", "attnzoo"):
        out[pkg] = None
        for dist in (pkg, "mmcv-lite") if pkg == "mmcv" else (pkg,):  # mmcv-lite: mmcv built without its ops
            try:
                out[pkg] = md.version(dist) + ("" if dist == pkg else f" ({dist})")
                break
            except md.PackageNotFoundError:
                pass
    return out


def _portable(path: Any) -> str:
    """A path relative to the working directory when it lies below it (summaries travel between machines)."""
    p = Path(str(path))
    if p.is_absolute():
        try:
            return p.relative_to(Path.cwd()).as_posix()
        except ValueError:
            return str(p)
    return str(path)


if __name__ == "__main__":
    sys.exit(main())
