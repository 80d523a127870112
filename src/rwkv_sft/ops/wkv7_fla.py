"""WKV-7 through flash-linear-attention's Triton kernel `chunk_rwkv7` (optional, GPU only).

Conventions converted here: fla takes the log-decay -exp(w) (its `w` argument, second
positional since fla 0.2), layout [B,T,H,N] like ours, and a state [N_seq,H,K,V] (key x value),
the transpose of ours. Resets become `cu_seqlens` over the flattened batch (fla needs B = 1 for that).
"""
from __future__ import annotations

import torch


def _chunk_rwkv7(device):
    if device.type != "cuda":
        raise ValueError("the fla WKV-7 backend needs CUDA tensors; use backend='chunked' on CPU")
    try:
        from fla.ops.rwkv7 import chunk_rwkv7
    except ImportError as e:
        raise ImportError("the fla WKV-7 backend needs flash-linear-attention: "
                          "pip install flash-linear-attention (GPU with Triton only)") from e
    return chunk_rwkv7


def _segments(resets, T):
    """Start offsets of the sequences in the flattened [B*T] rows: each row start and each reset."""
    starts = resets.reshape(-1).clone()
    starts[::T] = True
    return starts.nonzero().squeeze(1)


def wkv7_fla(r, w, k, v, a, b, state=None, resets=None, reset_state=None):
    """WKV-7 with fla's chunk_rwkv7; same contract as wkv7_reference."""
    chunk_rwkv7 = _chunk_rwkv7(r.device)
    B, T, H, N = r.shape
    dtype = r.dtype  # every operand in r's dtype (mixed inputs under autocast), the state fp32
    log_w = -torch.exp(w.float())
    r, log_w, k, v, a, b = (x.to(dtype) for x in (r, log_w, k, v, a, b))
    h0 = None if state is None else state.float().transpose(-1, -2)  # ours value x key -> key x value
    if resets is None:
        y, hT = chunk_rwkv7(r, log_w, k, v, a, b, scale=1.0, initial_state=h0,
                            output_final_state=True)
        return y.to(dtype), hT.float().transpose(-1, -2)

    # packed rows: one flat row with a sequence per segment; row b's state enters its first
    # segment (unless that segment starts with a reset) and leaves from its last one; every
    # other segment starts from reset_state (or zero)
    resets = resets.to(device=r.device, dtype=torch.bool)
    starts = _segments(resets, T)
    cu_seqlens = torch.cat([starts, starts.new_tensor([B * T])])
    last = torch.searchsorted(starts, torch.arange(1, B + 1, device=r.device) * T) - 1
    flat = [x.reshape(1, B * T, H, N) for x in (r, log_w, k, v, a, b)]
    if h0 is not None or reset_state is not None:
        row = starts // T  # the batch row of each segment
        from_row = (starts % T == 0) & ~resets[row, 0]
        zeros = torch.zeros(B, H, N, N, device=r.device)
        h0 = zeros if h0 is None else h0.expand(B, H, N, N)
        restart = zeros if reset_state is None else reset_state.float().expand(B, H, N, N).transpose(-1, -2)
        h0 = torch.where(from_row.view(-1, 1, 1, 1), h0[row], restart[row])
    y, hT = chunk_rwkv7(*flat, scale=1.0, initial_state=h0, output_final_state=True,
                        cu_seqlens=cu_seqlens)
    return y.reshape(B, T, H, N).to(dtype), hT[last].float().transpose(-1, -2)
