"""Per-epoch records: timm's summary CSV, a PNG of the curves, TensorBoard when it is installed."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...]) -> list[int]:
    """Number of samples whose target is among the top-k logits, for each k (k capped at #classes)."""
    maxk = min(max(ks), logits.shape[-1])
    pred = logits.topk(maxk, dim=-1).indices
    hit = pred.eq(target[:, None])
    return [int(hit[:, :min(k, maxk)].any(dim=-1).sum()) for k in ks]


def all_reduce_sums(values: list[float], device: torch.device) -> list[float]:
    """Sum ``values`` over all ranks (identity without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def plot_curves(csv_path: str | os.PathLike, png_path: str | os.PathLike, title: str = "") -> None:
    """Draw train/eval loss and eval top-1/top-5 per epoch from the summary CSV into ``png_path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    col = lambda k: [float(r[k]) for r in rows if r.get(k) not in (None, "")]  # noqa: E731
    epochs = col("epoch")
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, col("train_loss"), "o-", label="train loss")
    if "eval_loss" in rows[0]:
        ax_loss.plot(epochs, col("eval_loss"), "s-", label="eval loss")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    for key, style in (("eval_top1", "o-"), ("eval_top5", "s--"), ("eval_ema_top1", "^:")):
        if key in rows[0]:
            ax_acc.plot(epochs, col(key), style, label=key.replace("eval_", "eval "))
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
        if len(epochs) > 1:
            ax.set_xticks(epochs)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, png_path)


def save_figure(fig: Any, png_path: str | os.PathLike) -> Path:
    """Write a matplotlib figure to ``png_path`` atomically (a reader never sees half a file) and close it."""
    import matplotlib.pyplot as plt

    png_path = Path(png_path)
    tmp = png_path.with_name(f".{png_path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path


def tensorboard_writer(log_dir: str | os.PathLike) -> Any:
    """A SummaryWriter when the tensorboard package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(log_dir))
