"""Chunked linear cross-entropy: the loss of (hidden @ weight.T) without the full logits.

A language model's head turns N hidden rows into N x V logits; at V = 65536 that tensor (and
its log-softmax and gradient) dwarfs everything else in a training step. Here the rows are
processed `chunk_size` at a time: the forward keeps only each row's fp32 log-sum-exp, and the
backward recomputes each chunk's logits to form softmax - onehot. Peak extra memory is one chunk
of logits plus the fp32 weight-gradient accumulator: O(chunk * V + V * C) instead of O(N * V).

A weight stored narrower than the matmuls' dtype (a bf16 head under fp32 compute, or a quantized
head: any object with `.shape` [V, C] and `.rows(start, end, dtype)`) is converted a block of
vocabulary rows at a time (`weight_blocks`), never whole: a [V, C] fp32 copy would be 640 MiB at
65536 x 2560, twice a bf16 head and four times an int8 one.

Precision: matmuls run in the input dtype (bf16 stays bf16), log-sum-exp and softmax in fp32
(fp64 for fp64 inputs), the weight gradient is accumulated across chunks in fp32 (or fp64), and
the loss comes back in fp32 (or fp64).

Autocast: under torch.autocast for the inputs' device, hidden and weight are cast explicitly to
the autocast dtype (fp64 is left alone, as autocast does) and the op then runs with autocast
off, so the matmuls are in the autocast dtype and the reductions in fp32 as above. fp32
parameters get fp32 gradients, the weight's straight from the fp32 accumulator.

No ignore_index: gather the rows that carry loss first (one boolean mask for hidden and targets).
With N = 0 rows the loss is 0 for "sum" and also 0 (not NaN, unlike F.cross_entropy) for "mean",
and the gradients are zero.
"""
from __future__ import annotations

import torch

from .amp import no_autocast

# Target size of one chunk of fp32 logits. Measured on 2 CPU threads, V=65536, C=768, 512 rows
# (benchmarks/bench_memory.py --sweep-chunk): forward+backward took 38/28/22/18/15/13 s at
# 4/8/16/32/64/128 MiB per chunk; 64 MiB (256 rows at V=65536) takes most of the gain while the
# chunk stays a third of the fp32 weight gradient that the step holds anyway.
CHUNK_BYTES = 64 * 2**20
# Rows of a narrower weight converted at a time (weight_blocks): 32 MiB of them in the matmuls' dtype.
BLOCK_BYTES = 32 * 2**20


def default_chunk_size(vocab_size: int) -> int:
    return max(1, CHUNK_BYTES // (4 * max(1, vocab_size)))


def check_ids(ids: torch.Tensor, vocab: int, what: str) -> torch.Tensor:
    """`ids`, after a ValueError naming `what` if one lies outside [0, vocab). One reduction and one
    host sync: cheap next to the matmuls, and a bad id would otherwise surface as an opaque
    gather/index error (or a device assert on CUDA)."""
    if ids.numel() and bool(((ids < 0) | (ids >= vocab)).any()):
        raise ValueError(f"{what} must lie in [0, {vocab}); got min {int(ids.min())}, max {int(ids.max())}")
    return ids


def compute_dtype(hidden: torch.Tensor, weight) -> torch.dtype:
    """The matmuls' dtype: the wider of the two (hidden's for a weight given by rows), or
    autocast's (fp64 is left alone, as autocast does)."""
    dtype = torch.promote_types(hidden.dtype, weight.dtype) if isinstance(weight, torch.Tensor) else hidden.dtype
    device_type = hidden.device.type
    if (dtype != torch.float64 and torch.amp.is_autocast_available(device_type)
            and torch.is_autocast_enabled(device_type)):
        dtype = torch.get_autocast_dtype(device_type)
    return dtype


def weight_blocks(weight, dtype: torch.dtype):
    """(start, end, weight[start:end] in `dtype`) covering the vocabulary: the whole tensor at once
    when that conversion costs no more than the weight itself (same dtype, or narrower), else
    blocks of rows converted one at a time. `weight`: a tensor or a row source (`.rows`)."""
    V, C = weight.shape
    if isinstance(weight, torch.Tensor) and dtype.itemsize <= weight.element_size():
        yield 0, V, weight.to(dtype)
        return
    step = max(1, BLOCK_BYTES // (C * dtype.itemsize))
    for s in range(0, V, step):
        e = min(s + step, V)
        yield s, e, weight[s:e].to(dtype) if isinstance(weight, torch.Tensor) else weight.rows(s, e, dtype)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16, fp64 for fp64: where the softmax and sums are computed."""
    return torch.promote_types(dtype, torch.float32)


def _rows_forward(hidden, weight, targets, chunk_size, dtype, want_max):
    """Per-row loss and log-sum-exp [N] (acc dtype), `chunk_size` rows of logits at a time; with
    `want_max` also each row's largest logit and its index (else both empty).

    Each chunk's log-sum-exp is combined over the weight's blocks of vocabulary rows as they come
    (a running max and a sum of exponentials rescaled to it), so a weight converted by blocks never
    has a [chunk, V] tensor of logits: only [chunk, block] ones."""
    n, acc, dev = hidden.shape[0], _acc_dtype(dtype), hidden.device
    h = hidden.to(dtype)
    loss, lse = torch.empty(n, dtype=acc, device=dev), torch.empty(n, dtype=acc, device=dev)
    maxv = torch.empty(n if want_max else 0, dtype=acc, device=dev)
    argmax = torch.empty(n if want_max else 0, dtype=torch.long, device=dev)
    for s in range(0, n, chunk_size):
        e = min(s + chunk_size, n)
        t = targets[s:e]
        top = torch.full((e - s,), -torch.inf, dtype=acc, device=dev)  # the largest logit so far
        total = torch.zeros(e - s, dtype=acc, device=dev)               # sum of exp(logit - top)
        picked = torch.zeros(e - s, dtype=acc, device=dev)              # the target's logit
        index = torch.zeros(e - s if want_max else 0, dtype=torch.long, device=dev)
        for a, b, w in weight_blocks(weight, dtype):
            logits = (h[s:e] @ w.T).to(acc)                             # [c, block], the only big tensor
            block_top, block_index = logits.max(dim=-1)
            new_top = torch.maximum(top, block_top)
            total.mul_((top - new_top).exp_()).add_((logits - new_top[:, None]).exp_().sum(dim=-1))
            if want_max:  # the first index of the largest, as torch.max over the whole row
                index = torch.where(block_top > top, block_index + a, index)
            top = new_top
            inside = (t >= a) & (t < b)
            picked += torch.where(inside, logits.gather(1, (t - a).clamp(0, b - a - 1)[:, None]).squeeze(1), 0.0)
            del logits  # free it before the next block's matmul allocates its own
        lse[s:e] = top + total.log()
        loss[s:e] = lse[s:e] - picked
        if want_max:
            maxv[s:e], argmax[s:e] = top, index
    return loss, lse, maxv, argmax


class LinearCrossEntropy(torch.autograd.Function):
    """Rows -> per-row loss [N] (acc dtype). Backward adds l2wrap * max_logit at each row's argmax.

    The matmuls run in `dtype`; hidden and weight are cast to it here rather than by the caller
    so that their gradients come back in their own dtypes straight from the fp32 accumulators.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, l2wrap, dtype):
        loss, lse, maxv, argmax = _rows_forward(hidden, weight, targets, chunk_size, dtype, l2wrap != 0.0)
        rows = not isinstance(weight, torch.Tensor)  # a row source (frozen): kept as it is
        ctx.save_for_backward(hidden, None if rows else weight, targets, lse, maxv, argmax)
        ctx.chunk_size, ctx.l2wrap, ctx.dtype, ctx.rows = chunk_size, l2wrap, dtype, weight if rows else None
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        with no_autocast(grad_loss.device.type):
            return LinearCrossEntropy._backward(ctx, grad_loss)

    @staticmethod
    def _backward(ctx, grad_loss):
        hidden, weight, targets, lse, maxv, argmax = ctx.saved_tensors
        weight = weight if ctx.rows is None else ctx.rows
        grad_h, grad_w = logit_grads(hidden, weight, targets, lse, grad_loss, ctx.chunk_size, ctx.dtype,
                                     ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.l2wrap, maxv, argmax)
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None


def logit_grads(hidden, weight, targets, lse, grad_loss, chunk_size, dtype, need_h, need_w,
                l2wrap=0.0, maxv=None, argmax=None):
    """The backward of rows -> per-row loss through `hidden @ weight.T`, `chunk_size` rows at a time
    (and, for a weight converted by blocks, block by block of the vocabulary: the softmax needs
    only each row's log-sum-exp, so no chunk of full logits exists then).

    lse [N]: each row's log-sum-exp over the vocabulary. Returns (grad_hidden in hidden's dtype,
    grad_weight in the accumulation dtype), each None when not needed.
    """
    n, acc = hidden.shape[0], lse.dtype
    h = hidden.to(dtype)
    grad_h = torch.zeros_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=hidden.device) if need_w else None
    grad_loss = grad_loss.to(acc)
    for s in range(0, n, chunk_size):
        e = min(s + chunk_size, n)
        rows = torch.arange(e - s, device=hidden.device)
        gh = None  # this chunk's grad_hidden, summed over blocks in acc
        for a, b, w in weight_blocks(weight, dtype):
            whole = a == 0 and b == weight.shape[0]
            # d loss_i / d logits_i = softmax_i - onehot(target_i), scaled by the upstream gradient
            d = (h[s:e] @ w.T).to(acc).sub_(lse[s:e, None]).exp_()
            _add_at(d, rows, targets[s:e] - a, -1.0)
            d.mul_(grad_loss[s:e, None])
            if l2wrap != 0.0:  # upstream L2Wrap: independent of grad_output and reduction
                _add_at(d, rows, argmax[s:e] - a, l2wrap * maxv[s:e])
            d = d.to(dtype)
            if need_h and whole:
                grad_h[s:e] = d @ w
            elif need_h:
                part = (d @ w).to(acc)
                gh = part if gh is None else gh.add_(part)
            if need_w and d.dtype == acc:
                grad_w[a:b].addmm_(d.T, h[s:e])
            elif need_w:  # bf16/fp16: matmul in the input dtype, sum over chunks in fp32
                grad_w[a:b].add_((d.T @ h[s:e]).to(acc))
            del d
        if gh is not None:
            grad_h[s:e] = gh
    return grad_h, grad_w


def _add_at(d: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, value) -> None:
    """d[rows, cols] += value, only where the column falls inside d (a block of the vocabulary);
    the others add 0 at a clamped column (no host sync to select them)."""
    inside = (cols >= 0) & (cols < d.shape[1])
    d[rows, cols.clamp(0, d.shape[1] - 1)] += torch.where(inside, value, 0.0)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         reduction: str = "mean", chunk_size: int | None = None,
                         l2wrap: float = 0.0) -> torch.Tensor:
    """F.cross_entropy(hidden @ weight.T, targets, reduction=...) holding one chunk of logits.

    hidden [N,C] (only the rows that carry loss), weight [V,C] (or a frozen row source: see the
    module's docstring), targets [N] of valid ids in
    [0, V). reduction: "mean" | "sum" | "none". chunk_size: rows per chunk (default: ~64 MiB of
    fp32 logits). l2wrap: RWKV's L2Wrap factor (the trainer passes 1e-4 / loss rows in the
    global batch); the loss value is unchanged, the backward adds l2wrap * max_logit at each
    row's argmax logit. Returns a 0-d loss (or [N] for "none") in fp32 (fp64 for fp64 inputs).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if hidden.dim() != 2 or len(weight.shape) != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [N,C] and weight [V,C], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must have shape [{hidden.shape[0]}], got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer ids, got {targets.dtype}")
    vocab = weight.shape[0]
    targets = targets.long()
    check_ids(targets, vocab, "targets")
    if chunk_size is None:
        chunk_size = default_chunk_size(vocab)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    dtype = compute_dtype(hidden, weight)
    with no_autocast(hidden.device.type):
        loss = LinearCrossEntropy.apply(hidden, weight, targets, int(chunk_size), float(l2wrap), dtype)

    if reduction == "none":
        return loss
    total = loss.sum()
    return total / max(1, loss.shape[0]) if reduction == "mean" else total


@torch.no_grad()
def loss_and_argmax(hidden: torch.Tensor, weight, targets: torch.Tensor,
                    chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation's pass over the logits of `hidden @ weight.T`: each row's loss [N] (as
    linear_cross_entropy's reduction="none") and its argmax [N], one chunk of logits at a time."""
    vocab = weight.shape[0]
    check_ids(targets, vocab, "targets")
    dtype = compute_dtype(hidden, weight)
    with no_autocast(hidden.device.type):
        loss, _, _, argmax = _rows_forward(hidden, weight, targets.long(), chunk_size or default_chunk_size(vocab),
                                           dtype, True)
    return loss, argmax
