"""The training loop behind ``tools/train.py``: timm components wired for single-process or torchrun DDP.

Each epoch trains, evaluates (all-reduced over ranks), appends a CSV row, redraws the PNG and writes
``last.pth.tar`` atomically with the full state (model, optimizer, scheduler, EMA, scaler, epoch, every
rank's RNG). ``--resume`` restarts from the last completed epoch and replays it bit for bit.

A run writes into ``<output>/<experiment>`` only while that folder holds no other run's checkpoint or
metrics (or ``--resume`` points into it); otherwise into a fresh ``<experiment>-N``, as timm's train.py does.
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import timm
import torch
import torch.distributed as dist
from timm.data import Mixup, resolve_data_config
from timm.data.distributed_sampler import OrderedDistributedSampler
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import model_parameters
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, NativeScaler, dispatch_clip_grad, random_seed, update_summary
from timm.utils.distributed import init_distributed_device_so
from torch import nn
from tqdm import tqdm

import attnzoo  # noqa: F401  (registers attnzoo's models with timm)
from attnzoo.training import checkpoint as ckpt
from attnzoo.training.args import parse_with_config, train_parser
from attnzoo.backbones._pretrained import WeightsUnavailableError, create_pretrained
from attnzoo.training.data import (build_dataset, build_loader, check_input_channels, dataset_num_classes,
                                   fit_data_config, model_in_chans)
from attnzoo.training.errors import UsageError
from attnzoo.training.metrics import all_reduce_sums, plot_curves, tensorboard_writer, topk_correct

_logger = logging.getLogger("attnzoo.train")
_step_logger = logging.getLogger("attnzoo.train.steps")


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; ``checkpoint`` is the file to ``--resume`` from (None before the first one)."""

    def __init__(self, run_dir: Path, checkpoint: Path | None) -> None:
        super().__init__()
        self.run_dir, self.checkpoint = run_dir, checkpoint


@dataclass
class TrainResult:
    model: nn.Module  # unwrapped (no DDP / compile wrapper)
    output_dir: Path
    best_metric: float | None
    last_metrics: dict[str, float]


def check_model_name(name: str) -> None:
    """One-line error with close matches when ``name`` is not a registered timm/attnzoo model."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "see attnzoo.list_models() or timm.list_models()"
        raise UsageError(f"--model {name}: unknown model; {hint}")


def create_model(args: Any, num_classes: int) -> nn.Module:
    """timm.create_model with the run's head size, channels, dropout and stochastic depth."""
    check_model_name(args.model)
    kwargs: dict[str, Any] = dict(num_classes=num_classes, drop_rate=args.drop, **(args.model_kwargs or {}))
    if args.drop_path is not None:
        kwargs["drop_path_rate"] = args.drop_path
    if args.in_chans is not None:
        kwargs["in_chans"] = args.in_chans
    elif args.input_size is not None:
        kwargs["in_chans"] = args.input_size[0]
    if args.img_size is not None:
        kwargs["img_size"] = args.img_size
    if args.pretrained and args.pretrained_path:
        path = ckpt.check_file(args.pretrained_path, "--pretrained-path")
        kwargs["pretrained_cfg_overlay"] = dict(file=str(path))
        if (trained := ckpt.trained_num_classes(path)) is not None:
            kwargs["pretrained_cfg_overlay"]["num_classes"] = trained
    try:
        return load_model(args.model, args.pretrained, args.pretrained_path or "", "--pretrained-path", **kwargs)
    except TypeError as e:
        if "img_size" in str(e) and "img_size" in kwargs:  # conv nets take any size: drop the hint
            kwargs.pop("img_size")
            return load_model(args.model, args.pretrained, args.pretrained_path or "", "--pretrained-path", **kwargs)
        raise


def load_model(name: str, pretrained: bool, file: str, flag: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model``; with ``pretrained``, weights from ``file`` (in ``kwargs``' overlay) or the
    download, and a one-line UsageError naming ``flag`` when they cannot be loaded into the model."""
    if not pretrained:
        return timm.create_model(name, **kwargs)
    try:
        if file:
            return timm.create_model(name, pretrained=True, **kwargs)
        return create_pretrained(name, **kwargs)
    except WeightsUnavailableError as e:
        raise UsageError(f"{e}; here: {flag} PATH") from None
    except TypeError:
        raise
    except Exception as e:  # the checkpoint filter or load_state_dict of a file for another model
        if not file:
            raise UsageError(f"--pretrained {name}: {str(e).splitlines()[0][:200]}") from None
        raise UsageError(f"{flag} {file} does not fit {name} ({e.__class__.__name__}: {str(e).splitlines()[0][:200]}); "
                         "pass the weights of this model (or the --model they belong to)") from None


def _setup_logging(out_dir: Path, rank: int, console: bool) -> None:
    """Per-rank log files in the run folder; the console shows rank 0's epoch lines."""
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(message)s", "%H:%M:%S")
    for lg in (_logger, _step_logger):
        for h in list(lg.handlers):
            lg.removeHandler(h)
            h.close()
        lg.setLevel(logging.INFO)
        lg.propagate = False
        fh = logging.FileHandler(out_dir / f"log_rank{rank}.txt")
        fh.setFormatter(fmt)
        lg.addHandler(fh)
    if rank == 0:
        sh = logging.StreamHandler()
        sh.setFormatter(logging.Formatter("%(message)s"))
        _logger.addHandler(sh)
        if console:
            _step_logger.addHandler(sh)


def _resolve_lr(args: Any, world_size: int) -> float:
    """--lr, or --lr-base scaled by the global batch (sqrt for adaptive optimizers), as in timm."""
    if args.lr is not None:
        return args.lr
    scale_mode = args.lr_base_scale or ("sqrt" if any(o in args.opt.lower() for o in ("ada", "lamb")) else "linear")
    ratio = args.batch_size * world_size / args.lr_base_size
    return args.lr_base * (math.sqrt(ratio) if scale_mode == "sqrt" else ratio)


def train_one_epoch(epoch: int, num_epochs: int, model: nn.Module, loader, optimizer, loss_fn: Callable,
                    device: torch.device, args: Any, lr_scheduler, autocast: Callable, loss_scaler=None,
                    model_ema: ModelEmaV3 | None = None, mixup_fn: Mixup | None = None, world_size: int = 1,
                    show_progress: bool = True) -> dict[str, float]:
    """One pass over ``loader``; returns the rank-averaged loss and the throughput."""
    model.train()
    updates_per_epoch = len(loader)
    num_updates = epoch * updates_per_epoch
    batch = loader.loader.batch_size if hasattr(loader, "loader") else loader.batch_size
    bar = tqdm(total=updates_per_epoch * batch * world_size, unit="img", desc=f"train {epoch + 1}/{num_epochs}",
               disable=not show_progress, dynamic_ncols=True, leave=True, mininterval=1.0)
    clip_params = model_parameters(model, exclude_head="agc" in args.clip_mode)
    loss_sum, seen, t0 = 0.0, 0, time.perf_counter()
    for step, (x, y) in enumerate(loader):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if mixup_fn is not None:
            x, y = mixup_fn(x, y)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        if loss_scaler is not None:
            loss_scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode, parameters=clip_params)
        else:
            loss.backward()
            if args.clip_grad is not None:
                dispatch_clip_grad(clip_params, args.clip_grad, mode=args.clip_mode)
            optimizer.step()
        num_updates += 1
        if model_ema is not None:
            model_ema.update(model, step=num_updates)
        loss_val = loss.item()
        if not math.isfinite(loss_val):
            raise UsageError(f"training loss became {loss_val} at epoch {epoch} step {step}: lower --lr, "
                             "set --clip-grad, or use --amp-dtype bfloat16")
        loss_sum += loss_val * x.shape[0]
        seen += x.shape[0]
        lr = optimizer.param_groups[0]["lr"]
        lr_scheduler.step_update(num_updates=num_updates, metric=loss_sum / seen)
        bar.update(x.shape[0] * world_size)
        bar.set_postfix(loss=f"{loss_val:.3f}", lr=f"{lr:.2e}", refresh=False)
        if step % args.log_interval == 0 or step == updates_per_epoch - 1:
            _step_logger.info(f"epoch {epoch} step {step + 1}/{updates_per_epoch} loss {loss_val:.4f} lr {lr:.3e} "
                              f"{seen / (time.perf_counter() - t0):.1f} img/s (this rank)")
    bar.close()
    elapsed = time.perf_counter() - t0
    total_loss, total_seen = all_reduce_sums([loss_sum, float(seen)], device)
    return dict(loss=total_loss / max(total_seen, 1), img_per_s=total_seen / elapsed, time_s=elapsed)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, autocast: Callable = contextlib.nullcontext,
             channels_last: bool = False, desc: str = "eval", show_progress: bool = True) -> dict[str, float]:
    """Loss, top-1 and top-5 (%) over the whole split, summed over ranks without the padding duplicates
    that timm's OrderedDistributedSampler adds to even out the shards."""
    model.eval()
    sampler = getattr(getattr(loader, "loader", loader), "sampler", None)
    real = len(loader.dataset) if not isinstance(sampler, OrderedDistributedSampler) else \
        len(range(sampler.rank, len(sampler.dataset), sampler.num_replicas))
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    sums = [0.0, 0.0, 0.0, 0.0]  # loss, top-1 hits, top-5 hits, samples
    for x, y in tqdm(loader, desc=desc, unit="batch", disable=not show_progress, dynamic_ncols=True, leave=False):
        keep = max(0, min(x.shape[0], real - int(sums[3])))
        x, y = x[:keep].to(device), y[:keep].to(device)
        if keep == 0:
            continue
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(x)
        logits = logits.float()
        top1, top5 = topk_correct(logits, y, (1, 5))
        for i, v in enumerate((float(loss_fn(logits, y)), top1, top5, keep)):
            sums[i] += v
    loss, top1, top5, n = all_reduce_sums(sums, device)
    return dict(loss=loss / n, top1=100.0 * top1 / n, top5=100.0 * top5 / n)


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def main(argv: Sequence[str] | None = None) -> TrainResult:
    """Train as configured by ``argv`` (timm train.py flags, optional --config YAML)."""
    args = parse_with_config(train_parser(), argv)
    dev = init_distributed_device_so(device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    device, rank, world = torch.device(dev["device"]), dev["global_rank"], dev["world_size"]
    distributed = dev["distributed"]
    try:
        return _run(args, device, rank, world, distributed)
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def requested_folder(args: Any) -> Path:
    """``<output>/<experiment>``, the experiment defaulting to ``<model>-<dataset>``."""
    return Path(args.output) / (args.experiment or f"{args.model}-{(args.dataset or 'imagefolder').replace('/', '_')}")


def run_folder(args: Any) -> Path:
    """The folder this run writes: ``--resume``'s folder when it is the requested one (or no ``--experiment``
    was given), else ``<output>/<experiment>`` unless it holds a run's checkpoint or metrics, else the first
    ``<experiment>-N`` that does not."""
    wanted = requested_folder(args)
    if args.resume:
        resume_dir = Path(args.resume).resolve().parent
        if not args.experiment or resume_dir == wanted.resolve():
            return resume_dir
    out_dir, n = wanted, 0
    while _holds_run(out_dir):
        n += 1
        out_dir = wanted.with_name(f"{wanted.name}-{n}")
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def _holds_run(folder: Path) -> bool:
    csv_path = folder / "summary.csv"
    return any(folder.glob("*.pth.tar")) or (csv_path.is_file() and csv_path.stat().st_size > 0)


def _run(args: Any, device: torch.device, rank: int, world: int, distributed: bool) -> TrainResult:
    is_main = rank == 0
    random_seed(args.seed, rank)
    if args.resume:
        ckpt.check_file(args.resume, "--resume")
    out_dir = [run_folder(args) if is_main else None]
    if distributed:
        dist.broadcast_object_list(out_dir, src=0)
    out_dir = out_dir[0]
    _setup_logging(out_dir, rank, console=args.no_progress)
    wanted = requested_folder(args)
    if is_main and not args.resume and out_dir != wanted:
        _logger.info(f"{wanted} holds another run, kept as it is: this run writes to {out_dir} "
                     f"(to continue that run instead, pass --resume {wanted / 'last.pth.tar'})")
    show = is_main and not args.no_progress
    check_model_name(args.model)

    ds_train = build_dataset(args.dataset, args.data_dir, args.train_split, True, args.dataset_download)
    ds_eval = build_dataset(args.dataset, args.data_dir, args.val_split, False, args.dataset_download)
    found = dataset_num_classes(ds_train)
    if args.num_classes is None:
        if found is None:
            raise UsageError(f"cannot count the classes of {args.dataset}: pass --num-classes")
        args.num_classes = found
    elif found is not None and found != args.num_classes:
        raise UsageError(f"--num-classes {args.num_classes} but the training data at {args.data_dir} has {found} "
                         "classes: drop --num-classes or fix the data folder")

    model = create_model(args, args.num_classes)
    if args.initial_checkpoint:
        state = ckpt.load_file(args.initial_checkpoint, "--initial-checkpoint")
        sd = state["state_dict"] if ckpt.is_training_checkpoint(state) else state
        ckpt.check_state_dict(model, sd, args.initial_checkpoint)
        model.load_state_dict(sd)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    data_config = fit_data_config(resolve_data_config(vars(args), model=model, verbose=is_main),
                                  model_in_chans(model), args)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if is_main:
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        _logger.info(f"{args.model}: {n_params:.2f} M params, {args.num_classes} classes, input "
                     f"{data_config['input_size']}, {world} process(es) on {device}, run folder {out_dir}")

    args.lr = _resolve_lr(args, world)
    opt_kwargs = {k: v for k, v in (("eps", args.opt_eps), ("betas", args.opt_betas)) if v is not None}
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum, layer_decay=args.layer_decay, **opt_kwargs)
    amp_dtype = torch.bfloat16 if args.amp_dtype == "bfloat16" else torch.float16
    autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype) if args.amp else contextlib.nullcontext
    loss_scaler = NativeScaler(device=device.type) if args.amp and amp_dtype == torch.float16 else None
    model_ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup) \
        if args.model_ema else None

    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        if args.batch_size % 2:
            raise UsageError(f"-b {args.batch_size}: mixup/cutmix need an even per-process batch size")
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=args.num_classes)
        train_loss = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        train_loss = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        train_loss = nn.CrossEntropyLoss()

    if len(ds_train) < args.batch_size * world:
        raise UsageError(f"-b {args.batch_size}: the training split has only {len(ds_train)} images for {world} "
                         "process(es); lower the batch size")
    loader_train = build_loader(ds_train, data_config, args.batch_size, True, args, device, distributed)
    loader_eval = build_loader(ds_eval, data_config, args.validation_batch_size or args.batch_size, False, args,
                               device, distributed)
    check_input_channels(ds_eval, data_config, args.model)
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        decay_rate=args.decay_rate, cooldown_epochs=args.cooldown_epochs, min_lr=args.min_lr,
        warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, warmup_prefix=args.warmup_prefix,
        step_on_epochs=not args.sched_on_updates, updates_per_epoch=len(loader_train))

    start_epoch, best, rng_states = 0, None, None
    if args.resume:
        ckpt.remove_stale_temp_files(Path(args.resume))
        state = ckpt.load_file(args.resume, "--resume")
        if not ckpt.is_training_checkpoint(state):
            raise UsageError(f"--resume {args.resume}: not an attnzoo training checkpoint; use --initial-checkpoint "
                             "or --pretrained --pretrained-path for weights-only files")
        ckpt.check_state_dict(model, state["state_dict"], args.resume)
        model.load_state_dict(state["state_dict"])
        if not args.no_resume_opt:
            optimizer.load_state_dict(state["optimizer"])
            lr_scheduler.load_state_dict(state["scheduler"])
            if model_ema is not None and state.get("state_dict_ema") is not None:
                model_ema.load_state_dict(state["state_dict_ema"])
                model_ema._sr_generator.set_state(state["ema_sr_generator"])
            if loss_scaler is not None and state.get("scaler") is not None:
                loss_scaler.load_state_dict(state["scaler"])
            start_epoch, best = state["epoch"], state.get("best_metric")
            rng_states = state["rng"]
        if is_main:
            _logger.info(f"resumed {args.resume} after epoch {state['epoch']}")

    if args.torchcompile:
        model = torch.compile(model, backend=args.torchcompile, mode=args.torchcompile_mode)
    if distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    csv_path, png_path = out_dir / "summary.csv", out_dir / "curves.png"
    if is_main:
        _trim_summary(csv_path, start_epoch)
    writer = tensorboard_writer(out_dir / "tb") if is_main else None
    if rng_states is not None:  # last step before training: the RNG streams continue where the checkpoint left them
        if len(rng_states) == world:
            ckpt.set_rng_state(rng_states[rank])
        else:
            random_seed(args.seed + start_epoch, rank)
            _logger.warning(f"checkpoint holds RNG states of {len(rng_states)} ranks, this run has {world}: "
                            "reseeded, so augmentation order differs from the original run")

    last: dict[str, float] = {}
    higher_better = args.eval_metric != "loss"
    try:
        for epoch in range(start_epoch, num_epochs):
            if distributed and hasattr(loader_train.sampler, "set_epoch"):
                loader_train.sampler.set_epoch(epoch)
            if mixup_fn is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
                mixup_fn.mixup_enabled = False
            train_m = train_one_epoch(epoch, num_epochs, model, loader_train, optimizer, train_loss, device, args,
                                      lr_scheduler, autocast, loss_scaler, model_ema, mixup_fn, world, show)
            eval_m = evaluate(model, loader_eval, device, autocast, args.channels_last, "eval", show)
            if model_ema is not None:
                ema_m = evaluate(model_ema.module, loader_eval, device, autocast, args.channels_last, "eval ema", show)
                eval_m.update({f"ema_{k}": v for k, v in ema_m.items()})
            lr = optimizer.param_groups[0]["lr"]
            lr_scheduler.step(epoch + 1, eval_m[args.eval_metric])
            metric = eval_m[args.eval_metric]
            improved = best is None or (metric > best if higher_better else metric < best)
            best = metric if improved else best
            last = {**{f"train_{k}": v for k, v in train_m.items()}, **{f"eval_{k}": v for k, v in eval_m.items()}}
            rngs = ckpt.gather_rng_states(world)
            if is_main:
                _logger.info(f"epoch {epoch + 1}/{num_epochs}: train loss {train_m['loss']:.4f} "
                             f"({train_m['img_per_s']:.0f} img/s, {train_m['time_s']:.0f} s) | eval loss "
                             f"{eval_m['loss']:.4f} top-1 {eval_m['top1']:.2f}% top-5 {eval_m['top5']:.2f}%"
                             + (f" | EMA top-1 {eval_m['ema_top1']:.2f}%" if model_ema is not None else ""))
                # header decided here: older timm never writes one
                update_summary(epoch + 1, train_m, eval_m, csv_path, lr=lr,
                               write_header=not csv_path.exists() or csv_path.stat().st_size == 0)
                if not args.no_plot:
                    plot_curves(csv_path, png_path, title=f"{args.model} on {args.dataset or args.data_dir}")
                if writer is not None:
                    for k, v in last.items():
                        writer.add_scalar(k, v, epoch + 1)
                state = dict(format=ckpt.FORMAT, arch=args.model, epoch=epoch + 1,
                             state_dict=_unwrap(model).state_dict(), optimizer=optimizer.state_dict(),
                             scheduler=lr_scheduler.state_dict(),
                             state_dict_ema=model_ema.state_dict() if model_ema is not None else None,
                             ema_sr_generator=model_ema._sr_generator.get_state() if model_ema is not None else None,
                             scaler=loss_scaler.state_dict() if loss_scaler is not None else None, rng=rngs,
                             num_classes=args.num_classes, data_config=data_config, metrics=last, best_metric=best,
                             eval_metric=args.eval_metric, args=vars(args))
                ckpt.save_atomic(state, out_dir / "last.pth.tar")
                if improved:
                    ckpt.save_atomic(state, out_dir / "model_best.pth.tar")
    except KeyboardInterrupt:
        saved = out_dir / "last.pth.tar"
        raise TrainingInterrupted(out_dir, saved if saved.is_file() else None) from None
    finally:
        if writer is not None:
            writer.close()
    if is_main and last:
        _logger.info(f"done: best eval {args.eval_metric} {best:.4f}; checkpoint {out_dir / 'last.pth.tar'}, "
                     + ("" if args.no_plot else f"curves {png_path}, ") + f"metrics {csv_path}")
    return TrainResult(_unwrap(model), out_dir, best, last)


def _trim_summary(csv_path: Path, start_epoch: int) -> None:
    """Keep only the CSV rows of epochs a resumed run does not redo (none for a fresh run)."""
    if not csv_path.exists():
        return
    lines = csv_path.read_text().splitlines(keepends=True)
    keep = lines[:1] + [ln for ln in lines[1:] if int(float(ln.split(",", 1)[0])) <= start_epoch]
    csv_path.write_text("".join(keep) if start_epoch > 0 else "")
