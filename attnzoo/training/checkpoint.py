"""Training checkpoints: atomic writes, full-state resume (RNG included), readable errors on bad files.

A checkpoint holds only tensors and plain Python types, so ``torch.load(weights_only=True)`` reads it: timm's
``pretrained_cfg_overlay=dict(file=...)``, ``--pretrained-path``, ``tools/validate.py`` and the mmdet adapter
load it like any weights file.
"""
from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from attnzoo.backbones._pretrained import check_weights_file
from attnzoo.training.errors import UsageError

FORMAT = "attnzoo-train-v1"


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A run killed while writing leaves the previous checkpoint intact; its temporary file is removed by
    the next save (or :func:`remove_stale_temp_files` at resume).
    """
    path = Path(path)
    remove_stale_temp_files(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Delete the ``.<name>.tmp<PID>`` files that saves of ``path`` killed mid-write left behind (their
    process is gone); returns what was removed. Temp files of live processes are kept."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{path.name}.tmp*"):
        pid = tmp.name[len(f".{path.name}.tmp"):]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_file(path: str | os.PathLike, flag: str) -> Path:
    """One-line UsageError naming ``flag`` for a missing, empty or non-PyTorch file."""
    try:
        return check_weights_file(path, flag)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None


def load_file(path: str | os.PathLike, flag: str = "checkpoint") -> Any:
    """``torch.load(weights_only=True)`` on CPU, with one-line errors for a missing or unreadable file."""
    path = check_file(path, flag)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UsageError(f"{flag} {path} holds Python objects beyond tensors and plain types "
                         f"({str(e).splitlines()[0][:160]}); attnzoo reads checkpoints with weights_only=True: "
                         "re-save only its state_dict") from None
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise UsageError(f"{flag} {path} is corrupt or not a PyTorch file ({e.__class__.__name__}); "
                         "re-download it or use an earlier checkpoint") from None


def is_training_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def trained_num_classes(path: str | os.PathLike) -> int | None:
    """Head size of a training checkpoint file (None for other files), read without loading the tensors.

    With it as ``pretrained_cfg_overlay["num_classes"]`` timm keeps the run's classifier when the new
    model has as many classes (and replaces it otherwise), as for a published checkpoint.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # legacy-format, safetensors or foreign files: timm's loader reads (or rejects) them
        return None
    return state.get("num_classes") if is_training_checkpoint(state) else None


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch (and CUDA) RNG states as tensors and plain types."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    numpy = dict(bit_generator=name, key=torch.from_numpy(key.astype(np.int64)), pos=int(pos),
                 has_gauss=int(has_gauss), gauss=float(gauss))
    state = dict(python=random.getstate(), numpy=numpy, torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["bit_generator"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states(world_size: int) -> list[dict[str, Any]]:
    """RNG states of every rank (the checkpoint keeps one per rank so each resumes its own stream)."""
    mine = rng_state()
    if world_size == 1:
        return [mine]
    states: list[Any] = [None] * world_size
    dist.all_gather_object(states, mine)
    return states


def check_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise a one-line UsageError when ``state_dict`` does not fit ``model`` key for key and shape for shape."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    head = getattr(model, "get_classifier", lambda: None)()
    head_keys = {f"{n}.weight" for n, m in model.named_modules() if m is head and n}
    if mismatched and set(mismatched) <= head_keys | {k.replace(".weight", ".bias") for k in head_keys}:
        k = mismatched[0]
        raise UsageError(f"{source} has {state_dict[k].shape[0]} classes but the model/dataset has "
                         f"{own[k].shape[0]}: use a dataset with the checkpoint's classes or pass matching "
                         "--num-classes")
    if missing or unexpected or mismatched:
        raise UsageError(f"{source} does not fit the model: {len(missing)} missing keys {missing[:3]}, "
                         f"{len(unexpected)} unexpected {unexpected[:3]}, shape mismatches {mismatched[:3]}; "
                         "pass the --model it was trained with")
