"""Datasets and loaders through timm.data, plus the offline Fashion-MNIST set-up for the demo.

Images load in the mode that gives the model's input channels (1: ``L``, 3: ``RGB``, 4: ``RGBA``), and one
sample is checked against the model before training or evaluation starts.
"""
from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from timm.data import create_dataset, create_loader
from torch import nn

from attnzoo.training.errors import UsageError

# Where Debian's `dataset-fashion-mnist` package puts the four IDX files (.gz); ATTNZOO_FASHION_MNIST_DIR names
# another folder holding the same files (a machine without the package).
FASHION_MNIST_SYSTEM_DIR = Path(os.environ.get("ATTNZOO_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                       "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
# PIL image mode per input channel count
IMAGE_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


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
            # a temporary file of this process's own, renamed into place: runs started together (one per GPU)
            # each write a whole copy and the last rename wins, never a half-written or vanished file
            with gzip.open(src, "rb") as fin, tempfile.NamedTemporaryFile(dir=raw, prefix=f".{name}.",
                                                                         delete=False) as fout:
                shutil.copyfileobj(fin, fout)
            os.replace(fout.name, raw / name)
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
    """``timm.data.create_loader`` with the run's augmentation flags, images in the mode of
    ``data_config["input_size"][0]`` channels.

    Workers are not persistent: each epoch's workers are seeded from the main process RNG, which
    ``--resume`` restores, so a resumed run sees the same augmentations as an uninterrupted one.
    """
    aug = dict(no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
               train_crop_mode=args.train_crop_mode, scale=args.scale, ratio=args.ratio, hflip=args.hflip,
               vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=args.aa,
               interpolation=args.train_interpolation) if is_training else dict(
        interpolation=data_config["interpolation"], crop_pct=data_config["crop_pct"],
        crop_mode=data_config.get("crop_mode"))
    loader = create_loader(
        dataset, input_size=data_config["input_size"], batch_size=batch_size, is_training=is_training,
        mean=data_config["mean"], std=data_config["std"], num_workers=args.workers, distributed=distributed,
        collate_fn=collate_fn, pin_memory=args.pin_mem, device=device, use_prefetcher=device.type == "cuda",
        persistent_workers=False, **aug)
    set_image_mode(dataset, data_config["input_size"][0])
    return loader


def model_in_chans(model: nn.Module) -> int:
    """Input channels ``model`` takes: its ``in_chans`` attribute, else its first convolution's."""
    in_chans = getattr(model, "in_chans", None)
    if isinstance(in_chans, int):
        return in_chans
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise UsageError(f"cannot tell the input channels of {type(model).__name__}: pass --input-size C H W")
    return conv.in_channels


def fit_data_config(data_config: dict, in_chans: int, args: Any) -> dict:
    """``data_config`` with ``input_size`` of the model's channels and one mean/std value per channel.

    A single mean/std value (a grayscale set's) is repeated; another count given by --mean/--std is an error,
    one from the model's pretrained_cfg (an RGB mean for a 1-channel model) is averaged.
    """
    cfg = dict(data_config, input_size=(in_chans, *data_config["input_size"][1:]))
    for key in ("mean", "std"):
        values = tuple(cfg[key])
        if len(values) == in_chans:
            continue
        if len(values) == 1:
            cfg[key] = values * in_chans
        elif getattr(args, key, None):
            raise UsageError(f"--{key} has {len(values)} values but the model takes {in_chans} input channel(s): "
                             f"pass {in_chans} value(s) or change --in-chans")
        else:
            cfg[key] = (sum(values) / len(values),) * in_chans
    return cfg


class ConvertImage:
    """Convert a PIL image to ``mode`` (torchvision datasets, which timm's ``input_img_mode`` does not reach)."""

    def __init__(self, mode: str, transform: Any) -> None:
        self.mode, self.transform = mode, transform

    def __call__(self, img: Any) -> Any:
        if hasattr(img, "convert") and img.mode != self.mode:
            img = img.convert(self.mode)
        return self.transform(img) if self.transform is not None else img


def set_image_mode(dataset: Any, in_chans: int) -> None:
    """Load ``dataset``'s images with ``in_chans`` channels (no change for counts without a PIL mode)."""
    mode = IMAGE_MODES.get(in_chans)
    if mode is None:
        return
    if hasattr(dataset, "input_img_mode"):  # timm's ImageDataset / IterableImageDataset
        dataset.input_img_mode = mode
        reader = getattr(dataset, "reader", None)
        if hasattr(reader, "input_img_mode"):
            reader.input_img_mode = mode
    elif hasattr(dataset, "transform"):
        transform = dataset.transform
        if isinstance(transform, ConvertImage):
            transform = transform.transform
        dataset.transform = ConvertImage(mode, transform)


def check_input_channels(dataset: Any, data_config: dict, model_name: str) -> None:
    """Load one sample as training/evaluation will and compare it with the model's input size."""
    if not hasattr(dataset, "__getitem__") or len(dataset) == 0:
        return
    in_chans = data_config["input_size"][0]
    try:
        x = dataset[0][0]
    except (RuntimeError, ValueError, TypeError) as e:
        if in_chans not in IMAGE_MODES:
            raise UsageError(f"{model_name} takes {in_chans}-channel input but images load with 1 (L), 3 (RGB) or "
                             "4 (RGBA) channels: pass --in-chans 1, 3 or 4") from None
        raise UsageError(f"the data cannot be prepared as {model_name}'s input {tuple(data_config['input_size'])} "
                         f"({e.__class__.__name__}: {str(e).splitlines()[0][:160]}); check --in-chans, --mean "
                         "and --std against the images") from None
    if isinstance(x, torch.Tensor) and x.ndim == 3 and x.shape[0] != in_chans:
        raise UsageError(f"the data gives {x.shape[0]}-channel images but {model_name} takes {in_chans} channels: "
                         f"pass --in-chans {x.shape[0]} (or --input-size {x.shape[0]} H W) to match the data")
