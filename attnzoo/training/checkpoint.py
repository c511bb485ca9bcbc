"""Training checkpoints: atomic writes, full-state resume (RNG included), readable errors on bad files."""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from attnzoo.training.errors import UsageError

FORMAT = "attnzoo-train-v1"


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A run killed while writing leaves the previous checkpoint intact.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_file(path: str | os.PathLike) -> Any:
    """``torch.load`` on CPU, with one-line errors for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path}: no such file; pass the path of a .pth/.pth.tar/.pt file")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise UsageError(f"checkpoint {path} is corrupt or not a PyTorch file ({e.__class__.__name__}); "
                         "re-download it or use an earlier checkpoint") from None


def is_training_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch (and CUDA) RNG states."""
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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
                         f"{own[k].shape[0]}: use a dataset with the checkpoint's classes or pass matching --num-classes")
    if missing or unexpected or mismatched:
        raise UsageError(f"{source} does not fit the model: {len(missing)} missing keys {missing[:3]}, "
                         f"{len(unexpected)} unexpected {unexpected[:3]}, shape mismatches {mismatched[:3]}; "
                         "pass the --model it was trained with")
