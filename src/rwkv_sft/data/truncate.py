"""Truncation of (context, completion) examples to max_len tokens — the only place it happens."""
from __future__ import annotations

import numpy as np


def truncate(context_len, completion_len, max_len: int, anchor_fraction: float = 0.25):
    """Return (kept context tokens, kept completion tokens); the kept tokens are the LAST ones of
    the context and the FIRST ones of the completion: the example becomes context[-kc:] + completion[:kp].

    The oldest context tokens are dropped first, down to an anchor of
    min(context_len, max(1, int(anchor_fraction * max_len))) tokens (the context nearest the
    completion matters most); only if the completion still does not fit is it cut from its end.
    The context is never empty here (an empty one was already replaced by token 0).
    Works on ints or, elementwise, on integer arrays (one call for a whole file).
    """
    c, p = np.asarray(context_len, dtype=np.int64), np.asarray(completion_len, dtype=np.int64)
    anchor = np.minimum(c, max(1, int(anchor_fraction * max_len)))
    kept_context = np.where(c + p <= max_len, c, np.maximum(anchor, max_len - p))
    kept_completion = np.minimum(p, max_len - kept_context)
    if kept_context.ndim == 0:
        return int(kept_context), int(kept_completion)
    return kept_context, kept_completion
