"""Dense fine-tuning of a classification checkpoint on the pasted Fashion-MNIST sets (``tools/finetune.py``).

Per task (``det``: Mask R-CNN, ``seg``: UPerNet) a fine-tune config is a family config plus the data, image size
and short schedule of one recipe dict (``configs/mm*/_base_/fashion_*_finetune.py``). The shipped ones under
``configs/mm*/finetune/`` are :func:`recipe_text` over a family config; for any other model one is written into
the run folder over the model's family config, or over a sibling's with the model name and the head widths
replaced. :func:`configure` applies a run's choices to a loaded config, :func:`train` runs it with mmengine's
``Runner`` and returns its record (curves from ``vis_data/scalars.json``, final metrics, wall time, img/s,
peak memory), :func:`plot_run` draws one figure of every stage's loss and metric curves.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import timm
import torch
from timm.models import model_entrypoint

import attnzoo  # noqa: F401  (registers the models)
from attnzoo.training.errors import UsageError
from attnzoo.training.metrics import save_figure


@dataclass(frozen=True)
class Task:
    """What differs between detection and segmentation fine-tuning."""

    name: str  # det | seg
    library: str  # configs/<library>/
    family_glob: str  # a family config of one model, in configs/<library>/<family>/
    recipe: str  # the recipe dict's name, defined in configs/<library>/_base_/<recipe>_finetune.py
    keys: tuple[str, ...]  # the top-level config keys a fine-tune config takes from the recipe
    metrics: dict[str, str]  # summary name -> scalars.json key
    metric_scale: float  # multiplies the logged metric into a fraction (mmseg logs IoU in %)


TASKS = {
    "det": Task("det", "mmdet", "mask-rcnn_*_fpn_1x_coco.py", "fashion_det",
                ("model", "data_root", "max_epochs", "train_pipeline", "test_pipeline", "train_dataloader",
                 "val_dataloader", "val_evaluator", "train_cfg", "param_scheduler", "default_hooks", "log_processor",
                 "optim_wrapper"),
                {"bbox_mAP": "coco/bbox_mAP", "segm_mAP": "coco/segm_mAP"}, 1.0),
    "seg": Task("seg", "mmseg", "upernet_*_ade20k-512x512.py", "fashion_seg",
                ("model", "data_preprocessor", "crop_size", "dataset_type", "data_root", "train_pipeline",
                 "test_pipeline", "train_dataloader", "val_dataloader", "val_evaluator", "train_cfg",
                 "param_scheduler", "default_hooks", "optim_wrapper"),
                {"mIoU": "mIoU"}, 0.01),
}
_MODEL_NAME = re.compile(r"""model_name\s*=\s*['"]([\w.]+)['"]""")
_FIRST_BASE = re.compile(r"""_base_\s*=\s*\[\s*['"]([^'"]+)['"]""")


def recipe_text(base_config: str | os.PathLike, task: str, base_dir: str | os.PathLike | None = None) -> str:
    """The body of a fine-tune config: ``base_config`` plus the task's recipe, key by key.

    Paths are written relative to ``base_dir`` when given (the shipped configs), else absolute (a config
    written into a run folder).
    """
    t = TASKS[task]
    recipe = Path(base_config).resolve().parents[1] / "_base_" / f"{t.recipe}_finetune.py"
    bases = [Path(base_config).resolve(), recipe]
    if base_dir is not None:
        bases = [Path(os.path.relpath(b, Path(base_dir).resolve())).as_posix() for b in bases]
    lines = [f"_base_ = [{str(bases[0])!r}, {str(bases[1])!r}]", ""]
    for key in t.keys:
        lines.append(f"{key} = _base_.{t.recipe}.{key}")
        if key in ("val_dataloader", "val_evaluator"):
            lines.append(f"{key.replace('val_', 'test_')} = {key}")
    return "\n".join(lines) + "\n"


def family_configs(task: str, configs_dir: str | os.PathLike) -> dict[str, Path]:
    """Model name -> its family config for ``task`` (the shipped 1x Mask R-CNN / ADE20K UPerNet configs)."""
    t = TASKS[task]
    found = {}
    for path in sorted(Path(configs_dir, t.library).glob(f"*/{t.family_glob}")):
        if path.parent.name in ("_base_", "finetune"):
            continue
        match = _MODEL_NAME.search(path.read_text())
        if match:
            found.setdefault(match.group(1), path)
    return found


def shipped_finetune_configs(task: str, configs_dir: str | os.PathLike) -> dict[str, Path]:
    """Model name -> its shipped fine-tune config (``configs/<library>/finetune/``), found through its first base."""
    by_path = {p.resolve(): name for name, p in family_configs(task, configs_dir).items()}
    found = {}
    for path in sorted(Path(configs_dir, TASKS[task].library, "finetune").glob("*.py")):
        match = _FIRST_BASE.search(path.read_text())
        if match and (name := by_path.get((path.parent / match.group(1)).resolve())):
            found[name] = path
    return found


def resolve_config(model: str, task: str, configs_dir: str | os.PathLike, out_dir: str | os.PathLike,
                   model_kwargs: dict[str, Any] | None = None) -> tuple[Path, dict[str, Any]]:
    """The fine-tune config for ``model`` and the overrides it still needs.

    In order: the shipped fine-tune config; one written to ``out_dir`` over the model's family config; one
    written over a sibling's config (same attnzoo family, the smallest variant) with ``model_name`` and the
    head input widths replaced (the returned overrides, in ``Config.merge_from_dict`` form).
    """
    shipped = shipped_finetune_configs(task, configs_dir)
    if model in shipped:
        return shipped[model], {}
    families = family_configs(task, configs_dir)
    overrides: dict[str, Any] = {}
    base = families.get(model)
    if base is None:
        if not timm.is_model(model):
            raise UsageError(f"--model {model}: unknown model; see attnzoo.list_models()")
        family = model_entrypoint(model).__module__.rsplit(".", 1)[-1]
        siblings = [p for p in families.values() if p.parent.name == family]
        if not siblings:
            raise UsageError(f"--model {model}: no {TASKS[task].library} config of its family under "
                             f"{Path(configs_dir, TASKS[task].library)} to fine-tune from; pass --{task}-config "
                             f"(models with one: {', '.join(sorted(families))})")
        base = min(siblings, key=lambda p: ("tiny" not in p.name, p.name))
        overrides = _sibling_overrides(model, task, model_kwargs or {})
    out = Path(out_dir) / f"{task}_{model}_finetune.py"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# {model}: {base.name} with the {TASKS[task].recipe} fine-tuning recipe "
                   "(written by tools/finetune.py)\n" + recipe_text(base, task))
    return out, overrides


def _sibling_overrides(model: str, task: str, model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``model_name`` and the widths the neck/heads read, for a model that takes a sibling's config."""
    net = timm.create_model(model, num_classes=0, **model_kwargs)
    widths = [f["num_chs"] for f in net.feature_info][-4:]
    if task == "det":
        return {"model.backbone.model_name": model, "model.neck.in_channels": widths}
    return {"model.backbone.model_name": model, "model.decode_head.in_channels": widths,
            "model.auxiliary_head.in_channels": widths[2]}


def configure(cfg: Any, task: str, *, work_dir: str | os.PathLike, data_root: str | os.PathLike,
              image_size: Sequence[int], length: int, batch_size: int, train_images: int, workers: int,
              seed: int, checkpoint: str | None, model_kwargs: dict[str, Any] | None = None,
              log_interval: int = 10) -> Any:
    """Apply a run's choices to a fine-tune ``cfg`` (an mmengine ``Config``) in place and return it.

    ``length`` is epochs for ``det`` (Mask R-CNN, epoch-based) and iterations for ``seg`` (UPerNet,
    iteration-based); the warm-up is the recipe's 50 iterations, or a fifth of a shorter run (none below 10).
    ``checkpoint`` None trains the backbone from scratch, otherwise it is loaded through ``init_cfg``.
    """
    if length < 1 or batch_size < 1 or train_images < 1:
        raise UsageError(f"schedule: length {length}, batch size {batch_size} and training images "
                         f"{train_images} must each be at least 1")
    height, width = image_size
    cfg.work_dir = str(work_dir)
    cfg.experiment_name = f"finetune_{task}_{uuid.uuid4().hex[:8]}"  # one mmengine logger/message hub per run
    cfg.visualizer.name = cfg.experiment_name  # mmengine keeps one visualizer per name in a process
    cfg.randomness = dict(seed=seed)
    backbone = cfg.model.backbone
    backbone.init_cfg = None if checkpoint is None else dict(type="Pretrained", checkpoint=str(checkpoint))
    backbone.model_kwargs = dict(backbone.get("model_kwargs") or {}, **(model_kwargs or {}))
    root = Path(data_root) / task
    loaders = [cfg[k] for k in ("train_dataloader", "val_dataloader", "test_dataloader")]
    for loader in loaders:
        loader.dataset.data_root = f"{root}/"
        loader.num_workers = workers
        loader.persistent_workers = workers > 0
        for step in loader.dataset.pipeline:
            if step["type"] in ("Resize", "RandomResize"):
                step.scale = (width, height)
            elif step["type"] == "RandomCrop":
                step.crop_size = (height, width)
    cfg.data_root = f"{root}/"
    cfg.train_dataloader.batch_size = batch_size
    for key in ("train_pipeline", "test_pipeline"):
        cfg[key] = loaders[0 if key == "train_pipeline" else 1].dataset.pipeline
    iters = length * math.ceil(train_images / batch_size) if task == "det" else length
    warmup = min(50, iters // 5)
    warm, main = cfg.param_scheduler
    if warmup < 2:  # too short to warm up (mmengine's LinearLR would never reach the full rate): constant
        warmup, warm.start_factor = 0, 1.0
    warm.end = max(warmup, 1)
    if task == "det":
        cfg.max_epochs = cfg.train_cfg.max_epochs = length
        main.end = main.T_max = length
        for key in ("val_evaluator", "test_evaluator"):
            cfg[key].ann_file = str(root / "annotations" / "instances_val.json")
    else:
        cfg.train_cfg.max_iters = length
        cfg.train_cfg.val_interval = max(1, length // 4)
        main.begin, main.end = warmup, max(length, warmup + 1)
        cfg.crop_size = cfg.data_preprocessor.size = cfg.model.data_preprocessor.size = (height, width)
    cfg.default_hooks.checkpoint.interval = length
    cfg.default_hooks.logger.interval = log_interval
    cfg.default_hooks.logger.log_metric_by_epoch = False  # metrics stepped by iteration, like the losses
    cfg.log_processor.window_size = log_interval
    return cfg


def train(cfg: Any, task: str) -> dict[str, Any]:
    """Run ``cfg`` with mmengine's Runner: train (validating on its schedule), then read back its record."""
    from mmengine.runner import Runner

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    runner = Runner.from_cfg(cfg)
    runner.train()
    wall = time.perf_counter() - t0
    record = read_scalars(Path(runner.log_dir) / "vis_data" / "scalars.json", task)
    times = record.pop("iter_time")
    steady = sorted(times[1:] if len(times) > 2 else times)
    batch = cfg.train_dataloader.batch_size
    record.update(
        wall_s=wall, batch_size=batch, img_per_s=batch / steady[len(steady) // 2] if steady else None,
        peak_memory_mib=torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        work_dir=str(cfg.work_dir), log_dir=str(runner.log_dir))
    return record


def read_scalars(path: str | os.PathLike, task: str) -> dict[str, Any]:
    """Train-loss and validation-metric curves (by iteration) and the last metrics from mmengine's scalars.json.

    mmdet's CocoMetric logs no metric at all when the detector predicts no box above its score threshold (early
    in a short schedule): that evaluation counts as mAP 0, and ``no_detections`` lists its iterations.
    """
    t = TASKS[task]
    curve: dict[str, list[float]] = {"iter": [], "loss": [], "val_iter": [], **{m: [] for m in t.metrics}}
    times, empty = [], []
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            curve["iter"].append(row["step"])
            curve["loss"].append(row["loss"])
            times.append(row.get("time"))
        elif "lr" not in row:  # an evaluation
            found = all(key in row for key in t.metrics.values())
            if not found and task != "det":
                raise RuntimeError(f"{path}: an evaluation at step {row['step']} logged none of "
                                   f"{', '.join(t.metrics.values())}")
            curve["val_iter"].append(row["step"])
            if not found:
                empty.append(row["step"])
            for name, key in t.metrics.items():
                curve[name].append(row[key] * t.metric_scale if found else 0.0)
    if not curve["val_iter"]:
        raise RuntimeError(f"{path}: no evaluation was logged ({', '.join(t.metrics.values())})")
    return dict(**{m: curve[m][-1] for m in t.metrics}, curve=curve, no_detections=empty,
                iter_time=[x for x in times if x])


def pretrain_curve(summary_csv: str | os.PathLike) -> dict[str, list[float]]:
    """The per-epoch columns of a ``tools/train.py`` run's summary.csv that the plot draws."""
    with open(summary_csv) as f:
        rows = list(csv.DictReader(f))
    keys = ("epoch", "train_loss", "eval_loss", "eval_top1")
    return {k: [float(r[k]) for r in rows] for k in keys if rows and k in rows[0]}


def plot_run(summary: dict[str, Any], png_path: str | os.PathLike) -> Path:
    """One figure: pretraining loss/top-1, detection loss + bbox/segm mAP, segmentation loss + mIoU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = (("pretrain", "classification pretraining", "epoch", ("eval_top1",), "top-1 (%)"),
              ("det", "Mask R-CNN fine-tuning", "iteration", ("bbox_mAP", "segm_mAP"), "COCO mAP"),
              ("seg", "UPerNet fine-tuning", "iteration", ("mIoU",), "mIoU"))
    for ax, (stage, title, xlabel, metrics, metric_label) in zip(axes, panels):
        record = summary.get(stage)
        ax.set(title=title, xlabel=xlabel)
        if not record or not record.get("curve"):
            ax.text(0.5, 0.5, (record or {}).get("note", "not run"), ha="center", va="center",
                    transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        curve = record["curve"]
        x = curve.get("epoch") or curve.get("iter")
        ax.plot(x, curve.get("train_loss") or curve.get("loss"), "o-", ms=3, color="C0", label="train loss")
        if curve.get("eval_loss"):
            ax.plot(x, curve["eval_loss"], "s--", ms=3, color="C1", label="eval loss")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        twin = ax.twinx()
        xm = curve.get("epoch") or curve.get("val_iter")
        for i, m in enumerate(metrics):
            if curve.get(m):
                twin.plot(xm, curve[m], "^-", ms=4, color=f"C{i + 2}", label=m)
        twin.set_ylabel(metric_label)
        twin.set_ylim(0, 100 if stage == "pretrain" else 1)
        lines = ax.get_legend_handles_labels()
        more = twin.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="best")
    init = "from scratch" if summary.get("init") == "scratch" else f"from {summary.get('init')}"
    fig.suptitle(f"{summary.get('model')} ({init})")
    fig.tight_layout()
    return save_figure(fig, png_path)


def fresh_folder(output: str | os.PathLike, name: str) -> Path:
    """``output/name``, or the first ``name-N`` when it already holds something: a run is never overwritten."""
    wanted = folder = Path(output) / name
    n = 0
    while folder.exists() and any(folder.iterdir()):
        n += 1
        folder = wanted.with_name(f"{wanted.name}-{n}")
    folder.mkdir(parents=True, exist_ok=True)
    return folder
