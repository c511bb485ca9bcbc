"""Command-line flags of ``tools/train.py`` and ``tools/validate.py``, named as in timm's train.py.

A ``--config`` YAML supplies defaults (keys are the flags' destination names, e.g. ``drop_path``);
flags given on the command line override it, as in timm.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import yaml

from attnzoo.training.errors import UsageError


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _floats(n: int | str):
    return dict(type=float, nargs=n, default=None, metavar="F")


def train_parser() -> argparse.ArgumentParser:
    """Parser with timm train.py's vocabulary for the flags attnzoo's loop implements."""
    p = argparse.ArgumentParser(description="Train a timm/attnzoo image classifier (single process or torchrun DDP)")
    p.add_argument("-c", "--config", default="", metavar="FILE", help="YAML of flag defaults (dest names as keys)")
    g = p.add_argument_group("dataset")
    g.add_argument("data", nargs="?", metavar="DIR", help="dataset root (same as --data-dir)")
    g.add_argument("--data-dir", metavar="DIR", default=None, help="dataset root (ImageFolder with train/ and val/)")
    g.add_argument("--dataset", default="", help="timm dataset name: '' = ImageFolder, 'torch/fashion_mnist', ...")
    g.add_argument("--train-split", default="train")
    g.add_argument("--val-split", default="validation")
    g.add_argument("--dataset-download", action="store_true", help="let torchvision download torch/* datasets")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="nat_nano", help="registered timm or attnzoo model name")
    g.add_argument("--pretrained", action="store_true", help="start from the model's pretrained weights")
    g.add_argument("--pretrained-path", default=None, metavar="FILE", help="official checkpoint file for --pretrained")
    g.add_argument("--initial-checkpoint", default="", metavar="FILE",
                   help="load model weights from a training checkpoint")
    g.add_argument("--resume", default="", metavar="FILE", help="resume full training state from a training checkpoint")
    g.add_argument("--no-resume-opt", action="store_true", help="on --resume, restore only the model weights")
    g.add_argument("--num-classes", type=int, default=None, metavar="N")
    g.add_argument("--in-chans", type=int, default=None, metavar="N")
    g.add_argument("--img-size", type=int, default=None, metavar="N")
    g.add_argument("--input-size", type=int, nargs=3, default=None, metavar=("C", "H", "W"))
    g.add_argument("--crop-pct", type=float, default=None)
    g.add_argument("--mean", **_floats("+"))
    g.add_argument("--std", **_floats("+"))
    g.add_argument("--interpolation", default="")
    g.add_argument("-b", "--batch-size", type=int, default=128, metavar="N", help="per-process batch size")
    g.add_argument("-vb", "--validation-batch-size", type=int, default=None, metavar="N")
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--grad-checkpointing", action="store_true")
    g.add_argument("--torchcompile", nargs="?", const="inductor", default=None, metavar="BACKEND")
    g.add_argument("--torchcompile-mode", default=None, metavar="MODE",
                   help=f"torch.compile mode for the inductor backend: {', '.join(COMPILE_MODES)} "
                        "(reduce-overhead replays forward and backward as CUDA graphs)")
    g.add_argument("--drop", type=float, default=0.0, metavar="PCT", help="dropout rate")
    g.add_argument("--drop-path", type=float, default=None, metavar="PCT", help="stochastic depth rate")
    g.add_argument("--model-kwargs", type=yaml.safe_load, default=None, help="extra create_model kwargs as YAML")
    g = p.add_argument_group("optimizer")
    g.add_argument("--opt", default="adamw")
    g.add_argument("--opt-eps", type=float, default=None)
    g.add_argument("--opt-betas", **_floats("+"))
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--clip-grad", type=float, default=None)
    g.add_argument("--clip-mode", default="norm", choices=("norm", "value", "agc"))
    g.add_argument("--layer-decay", type=float, default=None, help="layer-wise lr decay (isotropic models)")
    g = p.add_argument_group("schedule")
    g.add_argument("--sched", default="cosine")
    g.add_argument("--sched-on-updates", action="store_true")
    g.add_argument("--lr", type=float, default=None, help="learning rate; default: --lr-base scaled by global batch")
    g.add_argument("--lr-base", type=float, default=5e-4)
    g.add_argument("--lr-base-size", type=int, default=512)
    g.add_argument("--lr-base-scale", default="", choices=("", "linear", "sqrt"))
    g.add_argument("--warmup-lr", type=float, default=1e-6)
    g.add_argument("--min-lr", type=float, default=1e-5)
    g.add_argument("--epochs", type=int, default=300)
    g.add_argument("--decay-epochs", type=float, default=90)
    g.add_argument("--decay-rate", type=float, default=0.1)
    g.add_argument("--warmup-epochs", type=int, default=5)
    g.add_argument("--warmup-prefix", action="store_true")
    g.add_argument("--cooldown-epochs", type=int, default=0)
    g = p.add_argument_group("augmentation and regularization")
    g.add_argument("--no-aug", action="store_true")
    g.add_argument("--train-crop-mode", default=None)
    g.add_argument("--scale", type=float, nargs=2, default=[0.08, 1.0])
    g.add_argument("--ratio", type=float, nargs=2, default=[3 / 4, 4 / 3])
    g.add_argument("--hflip", type=float, default=0.5)
    g.add_argument("--vflip", type=float, default=0.0)
    g.add_argument("--color-jitter", type=float, default=0.4)
    g.add_argument("--aa", default=None, help="RandAugment/AutoAugment policy, e.g. rand-m9-mstd0.5-inc1")
    g.add_argument("--reprob", type=float, default=0.0)
    g.add_argument("--remode", default="pixel")
    g.add_argument("--recount", type=int, default=1)
    g.add_argument("--mixup", type=float, default=0.0)
    g.add_argument("--cutmix", type=float, default=0.0)
    g.add_argument("--cutmix-minmax", **_floats(2))
    g.add_argument("--mixup-prob", type=float, default=1.0)
    g.add_argument("--mixup-switch-prob", type=float, default=0.5)
    g.add_argument("--mixup-mode", default="batch")
    g.add_argument("--mixup-off-epoch", type=int, default=0)
    g.add_argument("--smoothing", type=float, default=0.1)
    g.add_argument("--train-interpolation", default="random")
    g.add_argument("--model-ema", action="store_true")
    g.add_argument("--model-ema-decay", type=float, default=0.9998)
    g.add_argument("--model-ema-warmup", action="store_true")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("-j", "--workers", type=int, default=4)
    g.add_argument("--pin-mem", action="store_true")
    g.add_argument("--amp", action="store_true", help="mixed precision (autocast)")
    g.add_argument("--amp-dtype", default="float16", choices=("float16", "bfloat16"))
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--output", default="output/train", metavar="DIR", help="parent folder of the run folder")
    g.add_argument("--experiment", default="", help="run folder name (default: <model>-<dataset>)")
    g.add_argument("--eval-metric", default="top1", choices=("top1", "top5", "loss"))
    g.add_argument("--log-interval", type=int, default=50, help="steps between per-rank log lines")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (log lines only)")
    g.add_argument("--no-plot", action="store_true", help="skip the PNG of loss/accuracy curves")
    return p


def parse_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv``; a ``--config`` YAML sets defaults that explicit flags override."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config", default="")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        path = Path(known.config)
        if not path.is_file():
            raise UsageError(f"--config {path}: no such file; pass a YAML such as configs/demo/fashion_mnist.yaml")
        try:
            cfg = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UsageError(f"--config {path}: not valid YAML ({e.__class__.__name__}); fix the file") from None
        dests = {a.dest for a in parser._actions}
        unknown = sorted(set(cfg) - dests)
        if unknown:
            raise UsageError(f"--config {path}: unknown keys {unknown}; keys are flag names with '_' "
                             "(e.g. drop_path for --drop-path)")
        config_data_dir = cfg.pop("data_dir", None)  # a default only: a positional DIR replaces it too
        parser.set_defaults(**cfg)
    else:
        config_data_dir = None
    args = parser.parse_args(argv)
    check_compile_mode(args)
    return resolve_data_dir(args, config_data_dir)


def check_compile_mode(args: argparse.Namespace) -> None:
    """``--torchcompile-mode`` (a flag or a config key, which argparse does not check) names one of
    ``COMPILE_MODES`` and comes with the inductor backend, which is the one that reads it."""
    mode = args.torchcompile_mode
    if mode is None:
        return
    if mode not in COMPILE_MODES:
        raise UsageError(f"--torchcompile-mode {mode!r}: expected one of {', '.join(COMPILE_MODES)}")
    if args.torchcompile != "inductor":
        raise UsageError(f"--torchcompile-mode {mode} needs --torchcompile inductor, got --torchcompile "
                         f"{args.torchcompile}")


def resolve_data_dir(args: argparse.Namespace, default: str | None = None) -> argparse.Namespace:
    """One dataset root from the positional DIR, ``--data-dir`` or ``default`` (a config's ``data_dir``)."""
    if args.data and args.data_dir and args.data != args.data_dir:
        raise UsageError(f"got data dir {args.data!r} and --data-dir {args.data_dir!r}; pass one")
    args.data_dir = args.data_dir or args.data or default
    return args
