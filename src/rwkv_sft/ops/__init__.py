"""Operators: the WKV-7 recurrence (several backends) and the chunked linear cross-entropy."""
from __future__ import annotations

import importlib

import torch

from .amp import no_autocast
from .wkv7_reference import wkv7_reference

from .backends import BACKENDS as _BACKENDS  # (the names tests and benchmarks use)
from .backends import load_backend as _load_backend


def resolve_backend(backend: str, device: torch.device, seq_len: int | None = None,
                    head_size: int | None = None, *, batch_heads: int | None = None, dtype=None,
                    with_state: bool = False, with_resets: bool = False) -> str:
    """'auto' -> on a GPU, the fastest usable backend for the shape, measured once per machine
    (ops/backend_choice.py); on the CPU 'chunked', and the plain recurrence for a single step
    (token-by-token decoding). Without the shape (batch_heads, dtype) a GPU gets the first usable
    of cuda, fla, chunked."""
    if backend != "auto":
        return backend
    if seq_len == 1 and device.type == "cpu":
        return "reference"
    candidates = [name for name in ("cuda", "fla", "chunked") if _usable(name, device, head_size)]
    if not candidates:
        return "reference"
    if (len(candidates) == 1 or batch_heads is None or dtype is None or seq_len is None
            or torch.compiler.is_compiling() or _capturing(device)):
        return candidates[0]
    from . import backend_choice
    # timed as one row of batch x heads heads: every backend's work splits over (batch, head) alike
    shape = (1, seq_len, batch_heads, head_size or 64)
    key = backend_choice.shape_key(device, *shape, dtype, with_state, with_resets)
    return backend_choice.choose(key, candidates, lambda name: backend_choice.measure_backend(
        name, *shape, dtype, device, with_state, with_resets))


def _capturing(device: torch.device) -> bool:
    """Inside a CUDA graph capture, where nothing may be timed."""
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _usable(name: str, device: torch.device, head_size: int | None) -> bool:
    """Whether backend `name` is installed and runs on `device` (the CUDA kernel: built and
    self-checked, for its head sizes)."""
    if name in ("cuda", "fla") and device.type != "cuda":
        return False
    try:
        if name == "cuda":
            from .wkv7_cuda import HEAD_SIZES, cuda_kernel_usable
            return head_size in (None, *HEAD_SIZES) and cuda_kernel_usable(device)
        if name == "fla":
            from ..env import default_fla_cache
            default_fla_cache()  # before fla's first import
            importlib.import_module("fla.ops.rwkv7")
            return True
        importlib.import_module(_BACKENDS[name][0])
        return True
    except ImportError:
        return False


def check_backend(backend: str, device: torch.device) -> None:
    """A one-line UserError, before any work starts, when `backend` cannot run on `device`."""
    from ..errors import UserError
    if backend != "auto" and backend not in _BACKENDS:
        raise UserError(f"unknown WKV-7 backend {backend!r}; choose from auto, {', '.join(_BACKENDS)}")
    if backend in ("cuda", "fla") and device.type != "cuda":
        raise UserError(f"the {backend} WKV-7 backend needs a CUDA GPU, but this runs on {device.type} "
                        f"(use --wkv-backend auto or chunked)")
    if backend == "fla":
        try:
            importlib.import_module("fla.ops.rwkv7")
        except ImportError:
            raise UserError("the fla WKV-7 backend needs flash-linear-attention "
                            "(pip install flash-linear-attention), or use --wkv-backend auto") from None
    if backend == "cuda":
        from .wkv7_cuda import cuda_kernel_usable
        if not cuda_kernel_usable(device):
            raise UserError("the cuda WKV-7 kernel could not be built or failed its self-check (the warning "
                            "above says why); use --wkv-backend auto or chunked")


def wkv7(r, w, k, v, a, b, state=None, backend="auto", resets=None, reset_state=None):
    """WKV-7 over [B,T,H,N] inputs with decay exp(-exp(w)); state [B,H,N,N] fp32 (value x key).

    resets: optional bool [B,T], True where a new sequence starts: the state restarts before
    that token, from zero or from reset_state ([H,N,N] or [B,H,N,N], differentiable; e.g. a
    learned initial state). Returns (y [B,T,H,N] in r's dtype, final state [B,H,N,N] fp32).

    Precision, the same for every backend:
    - accepted: any float dtypes, mixed (an autocast region hands over bf16 projections beside
      the fp32 decay and `a` paths); the state in any float dtype;
    - computed: with autocast off (the backend chooses its precisions); the state and the
      chunk-to-chunk recurrence in fp32. Within a chunk or step, `reference` and `chunked` work
      in fp32 (on CPU a bf16 matmul is slower than fp32); `cuda` and `fla` read every operand in
      r's dtype (bf16 under autocast, as RWKV-LM's kernel does; the cuda kernel takes other
      dtypes as fp32) and accumulate in fp32. Any fp64 input puts `reference` and `chunked` in
      fp64 (to check the others);
    - returned: y in r's dtype, the state in fp32 (fp64 as just said), each gradient in its
      input's dtype.
    """
    B, T, H, N = r.shape
    name = resolve_backend(backend, r.device, T, N, batch_heads=B * H, dtype=r.dtype,
                           with_state=state is not None, with_resets=resets is not None)
    xs = (r, w, k, v, a, b)
    wide = torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32
    if wide == torch.float64:
        xs = tuple(x.to(wide) for x in xs)
    if state is not None:
        state = state.to(wide)
    if reset_state is not None:
        reset_state = reset_state.to(wide)
    with no_autocast(r.device.type):
        y, state = _load_backend(name)(*xs, state=state, resets=resets, reset_state=reset_state)
    return y.to(r.dtype), state


def linear_cross_entropy(hidden, weight, targets, reduction="mean", chunk_size=None, **kwargs):
    """Cross-entropy of (hidden @ weight.T) against targets without materialising all logits."""
    from .cross_entropy import linear_cross_entropy as impl
    return impl(hidden, weight, targets, reduction=reduction, chunk_size=chunk_size, **kwargs)


__all__ = ["wkv7", "wkv7_reference", "resolve_backend", "check_backend", "linear_cross_entropy"]
