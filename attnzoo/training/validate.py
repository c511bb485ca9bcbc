"""The evaluation behind ``tools/validate.py``: top-1/top-5 and loss of a checkpoint on an image folder.

Accepts an attnzoo training checkpoint (architecture, head size and preprocessing are read from it) or
an official checkpoint file (loaded through timm's pretrained path with the model's checkpoint filter,
evaluated with the model's pretrained_cfg preprocessing).
"""
from __future__ import annotations

import argparse
import contextlib
import json
from functools import partial
from typing import Any, Sequence

import timm
import torch
from timm.data import resolve_data_config

import attnzoo  # noqa: F401  (registers attnzoo's models with timm)
from attnzoo.training import checkpoint as ckpt
from attnzoo.training.args import resolve_data_dir
from attnzoo.training.data import (build_dataset, build_loader, check_input_channels, dataset_num_classes,
                                   fit_data_config, model_in_chans)
from attnzoo.training.errors import UsageError
from attnzoo.training.loop import check_model_name, evaluate, load_model


def validate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Evaluate a timm/attnzoo model checkpoint on an ImageFolder or timm dataset")
    p.add_argument("data", nargs="?", metavar="DIR", help="dataset root (same as --data-dir)")
    p.add_argument("--data-dir", metavar="DIR", default=None)
    p.add_argument("--dataset", default="", help="timm dataset name: '' = ImageFolder, 'torch/fashion_mnist', ...")
    p.add_argument("--split", default="validation")
    p.add_argument("--dataset-download", action="store_true")
    p.add_argument("--model", default=None, help="model name (default: the training checkpoint's)")
    p.add_argument("--checkpoint", default="", metavar="FILE", help="training checkpoint or official weights file")
    p.add_argument("--pretrained", action="store_true", help="use the model's published weights (needs network)")
    p.add_argument("--use-ema", action="store_true", help="evaluate the EMA weights of a training checkpoint")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--input-size", type=int, nargs=3, default=None, metavar=("C", "H", "W"))
    p.add_argument("--crop-pct", type=float, default=None)
    p.add_argument("--mean", type=float, nargs="+", default=None)
    p.add_argument("--std", type=float, nargs="+", default=None)
    p.add_argument("--interpolation", default="")
    p.add_argument("-b", "--batch-size", type=int, default=256)
    p.add_argument("-j", "--workers", type=int, default=4)
    p.add_argument("--pin-mem", action="store_true")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--amp-dtype", default="bfloat16", choices=("float16", "bfloat16"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--results-file", default="", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--no-progress", action="store_true")
    return p


def _model_from_training_checkpoint(state: dict, args: Any) -> tuple[torch.nn.Module, dict]:
    arch = state["arch"]
    if args.model and args.model != arch:
        raise UsageError(f"--model {args.model} but {args.checkpoint} was trained as {arch}: drop --model")
    args.model = arch
    targs = state.get("args", {})
    kwargs = {**(targs.get("model_kwargs") or {}), "num_classes": state["num_classes"],
              "in_chans": state["data_config"]["input_size"][0]}
    model = timm.create_model(arch, **kwargs)
    key = "state_dict_ema" if args.use_ema else "state_dict"
    if state.get(key) is None:
        raise UsageError(f"--use-ema: {args.checkpoint} has no EMA weights (trained without --model-ema)")
    sd = state[key]
    if args.use_ema:  # ModelEmaV3 keeps the averaged model under "module."
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    ckpt.check_state_dict(model, sd, args.checkpoint)
    model.load_state_dict(sd)
    return model, dict(state["data_config"])


def _model_from_official(args: Any) -> torch.nn.Module:
    check_model_name(args.model)
    if args.checkpoint:
        return load_model(args.model, True, args.checkpoint, "--checkpoint",
                          pretrained_cfg_overlay=dict(file=args.checkpoint))
    return load_model(args.model, args.pretrained, "", "--checkpoint")


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Evaluate as configured by ``argv``; returns (and prints) loss, top-1 and top-5 in %."""
    args = resolve_data_dir(validate_parser().parse_args(argv))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not args.model and not args.checkpoint:
        raise UsageError("pass --model NAME and/or --checkpoint FILE")
    if args.model:
        check_model_name(args.model)
    dataset = build_dataset(args.dataset, args.data_dir, args.split, False, args.dataset_download)

    state = ckpt.load_file(args.checkpoint, "--checkpoint") if args.checkpoint else None
    if state is not None and ckpt.is_training_checkpoint(state):
        model, data_config = _model_from_training_checkpoint(state, args)
        overrides = {k: getattr(args, k) for k in ("input_size", "crop_pct", "mean", "std", "interpolation")
                     if getattr(args, k)}
        if args.img_size:
            overrides["input_size"] = (data_config["input_size"][0], args.img_size, args.img_size)
        data_config.update(overrides)
        data_config = fit_data_config(data_config, model_in_chans(model), args)
    else:
        if not args.model:
            raise UsageError(f"{args.checkpoint} is a plain weights file: pass --model NAME for it")
        del state  # timm's pretrained loader reads the file again through the model's checkpoint filter
        model = _model_from_official(args)
        data_config = fit_data_config(resolve_data_config(vars(args), model=model), model_in_chans(model), args)

    found = dataset_num_classes(dataset)
    if found is not None and found != model.num_classes:
        raise UsageError(f"{args.checkpoint or args.model} predicts {model.num_classes} classes but the data at "
                         f"{args.data_dir} ({args.split}) has {found}: evaluate on data with the same classes")
    model.to(device).eval()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    args.no_aug, args.train_interpolation = True, data_config["interpolation"]
    loader = build_loader(dataset, data_config, args.batch_size, False, args, device, distributed=False)
    check_input_channels(dataset, data_config, args.model)
    dtype = torch.bfloat16 if args.amp_dtype == "bfloat16" else torch.float16
    autocast = partial(torch.autocast, device_type=device.type, dtype=dtype) if args.amp else contextlib.nullcontext
    metrics = evaluate(model, loader, device, autocast, args.channels_last, "validate", not args.no_progress)
    result = dict(model=args.model, checkpoint=args.checkpoint or None, ema=args.use_ema, split=args.split,
                  images=len(dataset), input_size=list(data_config["input_size"]),
                  **{k: round(v, 4) for k, v in metrics.items()})
    print(f"{args.model}{' (EMA)' if args.use_ema else ''} on {args.dataset or args.data_dir} [{args.split}, "
          f"{len(dataset)} images]: top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  "
          f"loss {metrics['loss']:.4f}")
    if args.results_file:
        with open(args.results_file, "w") as f:
            json.dump(result, f, indent=1)
    return result
