"""The run's precision: `resolve` turns a requested precision (auto | bf16 | fp32) into the one a
device runs, and `autocast` is the context a forward runs in for it (bf16: autocast with fp32
master weights; fp32: nothing). Training, evaluation and the CLIs share these two.

(The operators' own precisions are theirs: ops/amp.py switches autocast off inside them.)
"""
from __future__ import annotations

import contextlib

import torch

from .errors import UserError


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 on a GPU that has it, fp32 elsewhere; bf16 on a GPU without it is refused."""
    bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
    if precision == "auto":
        return "bf16" if device.type == "cuda" and bf16_ok else "fp32"
    if precision == "bf16" and not bf16_ok:
        raise UserError(f"precision bf16: this GPU ({torch.cuda.get_device_name(device)}) has no bf16; use --precision fp32")
    return precision


def autocast(device: torch.device, precision: str):
    """The context a forward runs in for `precision` (bf16 autocast, or nothing for fp32)."""
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
