"""Datasets and loaders through timm.data, plus the offline Fashion-MNIST set-up for the demo."""
from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from timm.data import create_dataset, create_loader

from attnzoo.training.errors import UsageError

# Where Debian's `dataset-fashion-mnist` package puts the four IDX files.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                       "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)


def prepare_fashion_mnist(root: str | os.PathLike, download: bool = False) -> Path:
    """Place Fashion-MNIST where torchvision's FashionMNIST reads it (``root/FashionMNIST/raw``).

    Sources, in order: files already there, the Debian package (``apt-get install dataset-fashion-mnist``,
    decompressed into ``root``), torchvision's downloader when ``download`` is set.
    """
    raw = Path(root) / "FashionMNIST" / "raw"
    if all((raw / f).is_file() for f in FASHION_MNIST_FILES):
        return raw
    system = [FASHION_MNIST_SYSTEM_DIR / f"{f}.gz" for f in FASHION_MNIST_FILES]
    if all(p.is_file() for p in system):
        raw.mkdir(parents=True, exist_ok=True)
        for src, name in zip(system, FASHION_MNIST_FILES):
            tmp = raw / f".{name}.tmp"
            with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout)
            tmp.replace(raw / name)
        return raw
    if download:
        return raw  # torchvision fetches the files when the dataset is created
    raise UsageError(f"Fashion-MNIST not found in {raw} or {FASHION_MNIST_SYSTEM_DIR}: run "
                     "`sudo apt-get install dataset-fashion-mnist`, or add --dataset-download on a networked machine")


def build_dataset(name: str, root: str | None, split: str, is_training: bool, download: bool = False) -> Any:
    """``timm.data.create_dataset`` with checks that turn a missing or empty folder into a one-line error."""
    if not root:
        raise UsageError("no dataset root: pass --data-dir DIR (an ImageFolder with train/ and val/ sub-folders)")
    if name == "torch/fashion_mnist":
        prepare_fashion_mnist(root, download)
    elif not name or not name.startswith(("torch/", "hfds/", "hfids/", "tfds/", "wds/")):
        if not Path(root).is_dir():
            raise UsageError(f"--data-dir {root}: no such directory; pass the folder that holds train/ and val/")
    try:
        return create_dataset(name, root=root, split=split, is_training=is_training, download=download)
    except (FileNotFoundError, RuntimeError, AssertionError) as e:
        raise UsageError(f"dataset {name or 'ImageFolder'} split {split!r} at {root}: {e}".splitlines()[0]) from None


def dataset_num_classes(dataset: Any) -> int | None:
    """Number of classes of a timm ImageDataset or a torchvision dataset, None when unknown."""
    reader = getattr(dataset, "reader", None)
    if reader is not None and getattr(reader, "class_to_idx", None):
        return len(reader.class_to_idx)
    classes = getattr(dataset, "classes", None)
    return len(classes) if classes else None


def build_loader(dataset: Any, data_config: dict, batch_size: int, is_training: bool, args: Any,
                 device: torch.device, distributed: bool, collate_fn=None) -> torch.utils.data.DataLoader:
    """``timm.data.create_loader`` with the run's augmentation flags.

    Workers are not persistent: each epoch's workers are seeded from the main process RNG, which
    ``--resume`` restores, so a resumed run sees the same augmentations as an uninterrupted one.
    """
    aug = dict(no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
               train_crop_mode=args.train_crop_mode, scale=args.scale, ratio=args.ratio, hflip=args.hflip,
               vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=args.aa,
               interpolation=args.train_interpolation) if is_training else dict(
        interpolation=data_config["interpolation"], crop_pct=data_config["crop_pct"],
        crop_mode=data_config.get("crop_mode"))
    return create_loader(
        dataset, input_size=data_config["input_size"], batch_size=batch_size, is_training=is_training,
        mean=data_config["mean"], std=data_config["std"], num_workers=args.workers, distributed=distributed,
        collate_fn=collate_fn, pin_memory=args.pin_mem, device=device, use_prefetcher=device.type == "cuda",
        persistent_workers=False, **aug)
