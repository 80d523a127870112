"""Reading a learned initial WKV state file (`state.pth`, written by adapters/state.py) into a model."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..adapters.state import KEY
from ..errors import UserError
from .checkpoint import read_state_dict


def read_state(path, config) -> list[torch.Tensor]:
    """Each layer's [H,N,N] state from a `state.pth` (or `.safetensors`) for a model of `config`;
    one-line errors for anything else (a model checkpoint, another model's state, NaN...)."""
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


__all__ = ["read_state", "load_state"]
