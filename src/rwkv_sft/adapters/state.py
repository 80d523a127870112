"""The learned initial WKV state (state tuning) as a file of its own, `state.pth`.

Layout (RWKV-PEFT writes it, RWKV-Runner loads it): {"blocks.{i}.att.time_state": [H, N, N]}
for every layer i, value x key: the orientation of `RWKV7State.wkv` and of the `rwkv` package's
RWKV_x070 state, which ignores the file for v7; a caller of that package inserts layer i's
tensor at `state[i*3+1]` of the list `generate_zero_state()` returns (see the README).
Written here; read into a model by weights/state.py (reading goes through the model-file readers).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..utils import atomic_write

KEY = "blocks.{}.att.time_state"


def state_tensors(model, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """The model's learned state in the file's layout (contiguous CPU tensors)."""
    learned = model.learned_state()
    if learned is None:
        raise ValueError("the model has no learned state (see RWKV7.enable_state_tuning)")
    return {KEY.format(i): s.detach().to("cpu", dtype).contiguous().clone() for i, s in enumerate(learned)}


def save_state(model, path, dtype=torch.float32) -> None:
    """Write `state.pth` atomically."""
    write_state(state_tensors(model, dtype), path)


def write_state(tensors: dict[str, torch.Tensor], path) -> None:
    """Write `state.pth` atomically from `tensors` (an adapter's: only the learned state is kept)."""
    keep = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in tensors.items()
            if re.fullmatch(r"blocks\.\d+\.att\.time_state", k)}
    with atomic_write(Path(path)) as tmp:
        torch.save(keep, tmp)


__all__ = ["KEY", "state_tensors", "save_state", "write_state"]
