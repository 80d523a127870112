"""Truncation of one (context, completion) example to max_len tokens — the only place it happens."""
from __future__ import annotations


def truncate(context_len: int, completion_len: int, max_len: int, anchor_fraction: float = 0.25) -> tuple[int, int]:
    """Return (kept context tokens, kept completion tokens); the kept tokens are the LAST ones of
    the context and the FIRST ones of the completion, so the example is context[-kc:] + completion[:kp].

    The oldest context tokens are dropped first, down to an anchor of
    min(context_len, max(1, int(anchor_fraction * max_len))) tokens (the context nearest the
    completion matters most); only if the completion still does not fit is it cut from its end.
    The context is never empty here (an empty one was already replaced by token 0).
    """
    if context_len + completion_len <= max_len:
        return context_len, completion_len
    anchor = min(context_len, max(1, int(anchor_fraction * max_len)))
    kept_context = max(anchor, max_len - completion_len)
    return kept_context, min(completion_len, max_len - kept_context)
