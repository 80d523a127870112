"""Operators: the WKV-7 recurrence (several backends) and the chunked linear cross-entropy."""
from __future__ import annotations

import importlib

import torch

from .wkv7_reference import wkv7_reference

# backend name -> (module, function); imported on first use so optional backends cost nothing.
_BACKENDS = {
    "reference": ("rwkv_sft.ops.wkv7_reference", "wkv7_reference"),
    "chunked": ("rwkv_sft.ops.wkv7_chunked", "wkv7_chunked"),
    "cuda": ("rwkv_sft.ops.wkv7_cuda", "wkv7_cuda"),
    "fla": ("rwkv_sft.ops.wkv7_fla", "wkv7_fla"),
}


def _load_backend(name):
    if name not in _BACKENDS:
        raise ValueError(f"unknown WKV-7 backend {name!r}; choose from auto, {', '.join(_BACKENDS)}")
    module, function = _BACKENDS[name]
    return getattr(importlib.import_module(module), function)


def resolve_backend(backend: str, device: torch.device, seq_len: int | None = None,
                    head_size: int | None = None) -> str:
    """'auto' -> the CUDA kernel on a GPU when it built and passed its self-check, else 'chunked';
    a single step on the CPU (token-by-token decoding) is cheapest as the plain recurrence."""
    if backend != "auto":
        return backend
    if seq_len == 1 and device.type == "cpu":
        return "reference"
    if device.type == "cuda":
        try:
            from .wkv7_cuda import HEAD_SIZES, cuda_kernel_usable
            if head_size in (None, *HEAD_SIZES) and cuda_kernel_usable(device):
                return "cuda"
        except ImportError:
            pass
    try:
        importlib.import_module(_BACKENDS["chunked"][0])
        return "chunked"
    except ImportError:
        return "reference"


def wkv7(r, w, k, v, a, b, state=None, backend="auto", resets=None, reset_state=None):
    """WKV-7 over [B,T,H,N] inputs with decay exp(-exp(w)); state [B,H,N,N] fp32 (value x key).

    resets: optional bool [B,T], True where a new sequence starts: the state restarts before
    that token, from zero or from reset_state ([H,N,N] or [B,H,N,N], differentiable; e.g. a
    learned initial state). Returns (y [B,T,H,N] in r's dtype, final state [B,H,N,N] fp32).
    """
    name = resolve_backend(backend, r.device, r.shape[1], r.shape[-1])
    return _load_backend(name)(r, w, k, v, a, b, state=state, resets=resets, reset_state=reset_state)


def linear_cross_entropy(hidden, weight, targets, reduction="mean", chunk_size=None, **kwargs):
    """Cross-entropy of (hidden @ weight.T) against targets without materialising all logits."""
    from .cross_entropy import linear_cross_entropy as impl
    return impl(hidden, weight, targets, reduction=reduction, chunk_size=chunk_size, **kwargs)


__all__ = ["wkv7", "wkv7_reference", "resolve_backend", "linear_cross_entropy"]
