"""The completion loss: hidden rows gathered at the loss mask before the head, chunked CE.

The loss of an optimizer step is the mean over every completion token of the global batch (all
micro-batches of all processes): each micro-batch returns its *sum* of token losses and the
caller scales it by 1 / (global loss-token count), a count known before any backward.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..adapters.quant import loss_weight
from ..model.segments import hidden_rows, pad_to_segments, segment_count, segment_len_for
from ..ops import linear_cross_entropy

L2WRAP = 1e-4  # upstream's factor; divided by the number of loss rows of the global batch


class HeadLoss(nn.Module):
    """The head's summed cross-entropy over the loss rows (no full logits), as a module of its own:
    called like any module, and the unit an fsdp run gathers the head's weight around (parallel.wrap)."""

    def __init__(self, head, chunk_size: int | None = None):
        super().__init__()
        self.head, self.chunk_size = head, chunk_size  # the model's head itself (no copy)

    def forward(self, rows, targets, l2wrap: float = 0.0):
        return head_loss(self.head, rows, targets, self.chunk_size, l2wrap)


class CompletionLoss(nn.Module):
    """Wraps the model so that DDP sees one forward returning the summed token loss."""

    def __init__(self, model, chunk_size: int | None = None, segment_len: int | None = None,
                 batch_tokens: int | None = None):
        super().__init__()
        self.model = model
        self.head_loss = HeadLoss(model.head, chunk_size)
        self.segment_len, self.batch_tokens = segment_len, batch_tokens  # see segment_len_for
        self.lockstep_segments = False  # every process runs as many segments (set for sharded blocks)

    def forward(self, tokens, targets, loss_mask, resets=None, l2wrap: float = 0.0):
        S = segment_len_for(tokens.shape, self.segment_len, self.batch_tokens)
        targets = targets[loss_mask]
        if self.lockstep_segments:
            tokens, loss_mask, resets, S = same_segment_count(tokens, loss_mask, resets, S)
        rows = hidden_rows(self.model, tokens, resets, loss_mask, S)
        return self.head_loss(rows, targets, l2wrap)


def same_segment_count(tokens, rows, resets, segment_len, group=None, before: bool = False):
    """(tokens, rows, resets, segment_len) padded (at the end, or `before`) so that every process of
    `group` runs as many segments as the one with the most (sharded blocks gather their weights at
    every call)."""
    import torch.distributed as dist
    count = torch.tensor([segment_count(tokens.shape[1], segment_len)], device=tokens.device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX, group=group)
    return pad_to_segments(tokens, rows, resets, int(count), before)


def head_loss(head, rows, targets, chunk_size=None, l2wrap: float = 0.0):
    """Summed cross-entropy of `rows` through `head` without the full logits."""
    if rows.shape[0] == 0:
        # Nothing to learn here, but every parameter must still take part in the backward so
        # that DDP's and FSDP's gradient reductions match the other processes (and do not hang).
        return 0.0 * (rows.float().sum() + sum(p.float().sum() for p in head.parameters()))
    return linear_cross_entropy(rows, loss_weight(head), targets, reduction="sum", chunk_size=chunk_size, l2wrap=l2wrap)


def reference_loss_sum(model, tokens, targets, loss_mask, resets=None):
    """The obviously-correct twin: full logits and a masked F.cross_entropy (tests compare)."""
    logits, _ = model(tokens, resets=resets)
    losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    return (losses * loss_mask.flatten()).sum()
