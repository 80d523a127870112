"""Autocast and our operators: each operator chooses its own precisions, so inside one autocast
is switched off (it would otherwise re-cast the operator's matmuls behind its back)."""
from __future__ import annotations

import contextlib

import torch


def no_autocast(device_type: str):
    """A context with autocast off for `device_type` (a no-op where autocast does not exist)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
