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


def widened(t: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """t in the dtype of `t op other`: a copy only where that differs (a bf16 product under autocast
    meeting an fp32 parameter). An in-place op on a fresh t then gives what the out-of-place
    formula gives, dtype included."""
    return t.to(torch.promote_types(t.dtype, other.dtype))
