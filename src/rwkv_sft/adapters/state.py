"""The learned initial WKV state (state tuning) as a file of its own, `state.pth`.

Layout (RWKV-PEFT writes it, RWKV-Runner loads it): {"blocks.{i}.att.time_state": [H, N, N]}
for every layer i, value x key: the orientation of `RWKV7State.wkv` and of the `rwkv` package's
RWKV_x070 state, which ignores the file for v7; a caller of that package inserts layer i's
tensor at `state[i*3+1]` of the list `generate_zero_state()` returns (see the README).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import UserError
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


def read_state(path, config) -> list[torch.Tensor]:
    """Each layer's [H,N,N] state from a `state.pth` (or `.safetensors`) for a model of `config`;
    one-line errors for anything else (a model checkpoint, another model's state, NaN...)."""
    from ..model.checkpoint import read_state_dict
    if Path(path).is_dir() and (Path(path) / "state.pth").is_file():  # a PEFT run's step checkpoint
        path = Path(path) / "state.pth"
    sd = read_state_dict(path)
    L, H, N = config.n_layer, config.n_head, config.head_size
    layers = {}
    for key, t in sd.items():
        m = re.fullmatch(r"blocks\.(\d+)\.att\.time_state", key)
        if m is None:
            kind = " (a model checkpoint? --state takes a learned-state file)" if key == "emb.weight" else ""
            raise UserError(f"{path}: unexpected key '{key}' in a learned-state file{kind}")
        layers[int(m.group(1))] = t
    if sorted(layers) != list(range(L)):
        have = f"layers {min(layers)}..{max(layers)}" if layers else "no layers"
        raise UserError(f"{path}: a learned state for {L} layers expected, the file has {have}")
    out = []
    for i in range(L):
        t = layers[i]
        if t.shape != (H, N, N):
            raise UserError(f"{path}: '{KEY.format(i)}' has shape {list(t.shape)}, this model needs "
                            f"{[H, N, N]} (heads x head size x head size)")
        if not t.is_floating_point():
            raise UserError(f"{path}: '{KEY.format(i)}' has dtype {t.dtype}, expected floating point")
        if not torch.isfinite(t).all():
            raise UserError(f"{path}: '{KEY.format(i)}' holds NaN or infinite values")
        out.append(t)
    return out


def load_state(model, path):
    """Give `model` the learned initial state from `path` (replacing any it had); returns model."""
    states = read_state(path, model.config)
    with torch.no_grad():
        for param, t in zip(model.enable_state_tuning(), states):
            param.copy_(t)
    return model


__all__ = ["KEY", "state_tensors", "save_state", "write_state", "read_state", "load_state"]
