"""Train an mmdetection 3.x / mmsegmentation 1.x config with an attnzoo backbone (thin mmengine Runner CLI).

    python tools/dense_train.py configs/mmdet/nat/mask-rcnn_nat-tiny_fpn_ms-crop-3x_coco.py
    torchrun --nproc-per-node 8 tools/dense_train.py CONFIG --launcher pytorch      # multi-GPU
    python tools/dense_train.py CONFIG --cfg-options train_dataloader.batch_size=1 --amp

The config's ``default_scope`` (``mmdet`` or ``mmseg``, from its base files) picks the registries; the
``custom_imports`` of attnzoo's configs register ``AttnZooBackbone``. Needs the ``dense`` extra.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from mmengine.config import Config, DictAction
from mmengine.runner import Runner


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a detection/segmentation config with mmengine's Runner")
    p.add_argument("config", help="config file (configs/mmdet/... or configs/mmseg/...)")
    p.add_argument("--work-dir", help="where logs and checkpoints go (default: work_dirs/<config name>)")
    p.add_argument("--amp", action="store_true", help="automatic mixed precision (AmpOptimWrapper)")
    p.add_argument("--auto-scale-lr", action="store_true",
                   help="scale the lr by total batch / the config's auto_scale_lr.base_batch_size")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from a checkpoint, or from the latest one in the work dir if none is given")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, default={},
                   help="override config keys, e.g. train_dataloader.batch_size=1 train_cfg.max_iters=10")
    p.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none",
                   help="'pytorch' under torchrun for multi-GPU training")
    p.add_argument("--local-rank", "--local_rank", type=int, default=0)
    args = p.parse_args(argv)
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return args


def build_config(args: argparse.Namespace) -> Config:
    """Load the config and apply the command-line choices (all of them visible in the dumped config)."""
    if not Path(args.config).is_file():
        raise SystemExit(f"config: no such file {args.config!r}")
    cfg = Config.fromfile(args.config)
    cfg.merge_from_dict(args.cfg_options)
    cfg.launcher = args.launcher
    cfg.work_dir = args.work_dir or cfg.get("work_dir") or str(Path("work_dirs") / Path(args.config).stem)
    if args.amp:
        if cfg.optim_wrapper.get("type", "OptimWrapper") == "AmpOptimWrapper":
            raise SystemExit("--amp: the config already uses AmpOptimWrapper")
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.setdefault("loss_scale", "dynamic")
    if args.auto_scale_lr:
        if "auto_scale_lr" not in cfg or "base_batch_size" not in cfg.auto_scale_lr:
            raise SystemExit("--auto-scale-lr: the config has no auto_scale_lr.base_batch_size")
        cfg.auto_scale_lr.enable = True
    if args.resume == "auto":
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume
    return cfg


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    runner = Runner.from_cfg(build_config(args))
    runner.train()


if __name__ == "__main__":
    main()
