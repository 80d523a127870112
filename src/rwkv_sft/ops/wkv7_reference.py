"""The per-token WKV-7 recurrence: slow, obviously correct, the twin every fast backend is tested against."""
from __future__ import annotations

import torch

from .amp import no_autocast


def wkv7_reference(r, w, k, v, a, b, state=None, resets=None, reset_state=None):
    """r, w, k, v, a, b: [B,T,H,N]; decay = exp(-exp(w)); state [B,H,N,N] (value x key), fp32.

    resets: optional bool [B,T]; where True the state restarts before that token (packed rows),
    from zero or from reset_state ([H,N,N] or [B,H,N,N], e.g. a learned initial state).
    Returns y [B,T,H,N] in r's dtype and the final state [B,H,N,N]. Differentiable everywhere.
    The arithmetic runs in fp32, or in fp64 when r is fp64 (for checking other backends), also
    under autocast; the inputs may mix dtypes.
    """
    with no_autocast(r.device.type):
        return _recurrence(r, w, k, v, a, b, state, resets, reset_state)


def _recurrence(r, w, k, v, a, b, state, resets, reset_state):
    B, T, H, N = r.shape
    out_dtype = r.dtype
    compute = torch.float64 if r.dtype == torch.float64 else torch.float32
    if state is None:
        state = torch.zeros(B, H, N, N, dtype=compute, device=r.device)
    S = state.to(compute)
    r, w, k, v, a, b = (x.to(compute) for x in (r, w, k, v, a, b))
    decay = torch.exp(-torch.exp(w))
    restart = 0 if reset_state is None else reset_state.to(compute).expand(B, H, N, N)
    ys = []
    for t in range(T):
        if resets is not None:
            S = torch.where(resets[:, t].view(B, 1, 1, 1), restart, S)
        # S_t = S_{t-1} diag(d_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T ;  y_t = S_t r_t
        sa = torch.einsum("bhij,bhj->bhi", S, a[:, t])
        S = (S * decay[:, t, :, None, :]
             + sa[..., :, None] * b[:, t, :, None, :]
             + v[:, t, :, :, None] * k[:, t, :, None, :])
        ys.append(torch.einsum("bhij,bhj->bhi", S, r[:, t]))
    y = torch.stack(ys, dim=1)
    return y.to(out_dtype), S
