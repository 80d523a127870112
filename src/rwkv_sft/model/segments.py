"""Segment-wise forward: a long sequence runs S tokens at a time with the recurrent state carried.

Under autograd every segment is a non-reentrant `torch.utils.checkpoint` region: its forward
keeps only what enters it (the incoming state and its token slice), and the backward recomputes
the segment from there. Gradients still cross every segment boundary through the carried state
(exact backpropagation through time; nothing is detached), while only one segment's activations
are alive at a time. Memory then grows with the length only by the carried states (one per
segment) and the per-token hidden rows that are kept.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def segment_len_for(shape, segment_len, batch_tokens) -> int | None:
    """The segment length for a batch of `shape` [B,T]: `segment_len` when it is positive, None
    (never split) when it is 0, and when it is None (automatic) as many tokens per row as keep a
    segment within `batch_tokens` tokens: only a row longer than the micro-batch budget is split."""
    if segment_len is not None:
        return int(segment_len) or None
    if batch_tokens is None:
        return None
    B, T = shape
    S = max(1, batch_tokens // B)
    return S if S < T else None


def segment_count(T: int, segment_len: int | None) -> int:
    """How many segments a row of T tokens is split into."""
    return 1 if segment_len is None else -(-T // segment_len)


def pad_to_segments(tokens, rows, resets, n: int, before: bool = False):
    """(tokens, rows, resets, segment_len) for exactly `n` segments (at least the rows' own count),
    padded at the end of the rows: a sharded model whose processes must all run as many segments
    (their weight gathers pair up) pads every process to the largest count among them, which the
    caller agrees on. The padding is token 0 after each row's end, outside `rows`, so nothing
    before it changes. `before`: padded at the start instead (rows that begin with a reset, such
    as left-padded contexts, so nothing after it changes)."""
    if n == 1:
        return tokens, rows, resets, None
    T = tokens.shape[1]
    S = -(-T // n)
    pad = (n * S - T, 0) if before else (0, n * S - T)
    if any(pad):
        tokens = torch.nn.functional.pad(tokens, pad)
        rows = torch.nn.functional.pad(rows, pad)
        resets = None if resets is None else torch.nn.functional.pad(resets, pad)
    return tokens, rows, resets, S


def hidden_rows(model, tokens, resets, rows, segment_len=None):
    """model.forward_hidden(tokens, resets=resets)[0][rows], segment by segment when `segment_len`
    splits the rows (a plain call otherwise)."""
    if segment_len is None or segment_len >= tokens.shape[1]:
        return model.forward_hidden(tokens, resets=resets)[0][rows]
    return model.forward_hidden(tokens, resets=resets, segment_len=segment_len, rows=rows)[0]


def forward_segments(step, tokens, state, resets, segment_len, rows=None, embed=None):
    """`step(tokens, state, resets, embedded=...) -> (hidden [B,S,C], state)` over consecutive slices
    of S tokens. Under autograd the embeddings come from one `embed(tokens)` call for the whole
    sequence: its weight then gets one dense gradient [V,C], not one per segment (at V=65536 making
    and adding those cost as much as a segment's compute).

    Returns (hidden [B,T,C], final state), or with `rows` (bool [B,T]) (hidden[rows] [N,C], final
    state): each segment's rows are gathered as soon as it is computed, so the hidden states of
    the whole sequence never exist at once (the loss needs only the completion rows).
    """
    B, T = tokens.shape
    S = T if segment_len is None else int(segment_len)
    if S < 1:
        raise ValueError(f"segment_len must be at least 1, got {segment_len}")
    starts = range(0, T, S)
    recompute = torch.is_grad_enabled() and len(starts) > 1
    outs, order = [], []
    reorder = rows is not None and B > 1 and len(starts) > 1
    flat = torch.arange(B * T, device=tokens.device).view(B, T) if reorder else None
    x = embed(tokens) if recompute and embed is not None else None
    for start in starts:
        seg = slice(start, start + S)
        r = None if resets is None else resets[:, seg]
        embedded = None if x is None else x[:, seg]
        if recompute:
            hidden, state = checkpoint(step, tokens[:, seg], state, r, embedded=embedded, use_reentrant=False)
        else:
            hidden, state = step(tokens[:, seg], state, r)
        if rows is not None:
            hidden = hidden[rows[:, seg]]
            if flat is not None:
                order.append(flat[:, seg][rows[:, seg]])
        outs.append(hidden)
    if rows is None:
        return torch.cat(outs, dim=1), state
    hidden = torch.cat(outs)
    if flat is not None:  # segment-major -> the row-major order of hidden[rows]
        hidden = hidden[torch.argsort(torch.cat(order))]
    return hidden, state
