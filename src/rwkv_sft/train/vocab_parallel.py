"""The embedding and the head of an fsdp run, sharded by vocabulary rows.

Each process keeps rows [lo, hi) of both [V, C] tables, as DTensors sharded on dim 0 (the layout
FSDP gives them, so checkpoints are the same), and they are never gathered while training:

- lookup: the processes exchange their token ids; each one fills the rows it owns for every
  process's tokens and sends them back to their process, one process at a time (the sum over
  processes is exact: one of them owns a row, the others add zeros). Backward: the rows'
  gradients travel back the same way, and each process adds into its own rows.
- loss: the hidden rows that carry loss are gathered (and kept for the backward, so this memory
  grows with the number of processes); each process computes the logits of its vocabulary slice
  for all of them, and the per-row max, sum of exponentials and target logit from every process
  combine into the exact log-sum-exp. Backward: each process has its slice's whole weight
  gradient at once, and the hidden rows' gradients are summed back to their process.

The traffic is [tokens, C] rows and [tokens] statistics instead of the tables: at V 65536 x
C 1024 on 2 gloo processes, FSDP's gather and reduce-scatter of the two tables cost ~3 s of an
~11 s step. The weight gradients are averaged over processes, as DDP and FSDP average theirs.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from ..ops.amp import no_autocast
from ..ops.cross_entropy import _acc_dtype, check_ids, compute_dtype, default_chunk_size, logit_grads
from . import exchange


def shard(model, mesh, param_dtype: torch.dtype | None = None) -> None:
    """Replace model.emb.weight and model.head.weight by their rows of this process, and route
    the lookup and the head's completion_loss through the exchanges described above
    (exchange.py). `param_dtype`: the dtype the rows are computed in (FSDP's param_dtype; None
    keeps the weights')."""
    group = mesh.get_group()
    tables = [m for m in (model.emb, model.head) if isinstance(m, (nn.Embedding, nn.Linear))]  # a quantized head stays whole
    for module in tables:
        weight = module.weight
        local = distribute_tensor(weight.detach(), mesh, [Shard(0)], src_data_rank=None)
        if local.to_local().untyped_storage().nbytes() > local.to_local().nbytes:  # a view of the full table
            local = DTensor.from_local(local.to_local().clone(), mesh, [Shard(0)], run_check=False,
                                       shape=local.shape, stride=local.stride())
        module.weight = nn.Parameter(local, requires_grad=weight.requires_grad)
        module.vocab_offset = min(group.rank() * -(-weight.shape[0] // group.size()), weight.shape[0])
        module.compute_dtype = param_dtype or weight.dtype
    model.emb.forward = functools.partial(_lookup, model.emb, group, param_dtype)
    if model.head in tables:
        model.head.completion_loss = functools.partial(_head_loss, model.head, group, param_dtype)


@contextlib.contextmanager
def gathered(model):
    """The whole tables for the duration (evaluation and generation in an fsdp run, where every
    process computes the same thing), read-only and in the dtype the sharded blocks compute in;
    the shards are back afterwards."""
    sharded = {m: m.weight for m in (model.emb, model.head) if isinstance(getattr(m, "weight", None), DTensor)}
    emb_forward = model.emb.__dict__.pop("forward")
    try:
        for module, weight in sharded.items():
            module.weight = nn.Parameter(weight.detach().full_tensor().to(module.compute_dtype), requires_grad=False)
        yield
    finally:
        for module, weight in sharded.items():
            module.weight = weight
        model.emb.forward = emb_forward


# -- the embedding ------------------------------------------------------------------------------------
def _lookup(module, group, dtype, tokens):
    weight = module.weight.to_local()
    out = _Lookup.apply(weight, tokens.reshape(-1), module.vocab_offset, module.weight.shape[0], group,
                        dtype or weight.dtype)
    return out.view(*tokens.shape, weight.shape[1])


class _Lookup(torch.autograd.Function):
    """Rows are exchanged one process at a time: memory holds [tokens of one process, C], not
    [tokens of all processes, C]."""

    @staticmethod
    def forward(ctx, weight, tokens, offset, vocab, group, dtype):
        counts = exchange.row_counts(tokens.numel(), group, tokens.device)
        # every process checks every process's ids, so that all raise together (none waits for the others)
        local = check_ids(exchange.all_gather_rows(tokens, counts, group), vocab, "token ids") - offset
        owned = (local >= 0) & (local < weight.shape[0])
        starts = [sum(counts[:j]) for j in range(len(counts))]

        def rows_for(j):  # the rows of process j's tokens that this process owns, zeros elsewhere
            span = slice(starts[j], starts[j] + counts[j])
            rows = weight.new_zeros((counts[j], weight.shape[1]), dtype=dtype)
            rows[owned[span]] = weight[local[span][owned[span]]].to(dtype)
            return rows

        out = exchange.add_peer_rows(rows_for(group.rank()), rows_for, group)  # exact: only the owner's row is not zero
        ctx.save_for_backward(local, owned)
        ctx.counts, ctx.starts, ctx.group, ctx.weight_meta = counts, starts, group, (weight.shape, weight.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        local, owned = ctx.saved_tensors
        shape, dtype = ctx.weight_meta
        group, counts, starts = ctx.group, ctx.counts, ctx.starts
        acc = _acc_dtype(grad.dtype)
        grad_w = torch.zeros(shape, dtype=acc, device=grad.device)

        def add(j, rows):  # process j's row gradients into the rows this process owns, averaged
            span = slice(starts[j], starts[j] + counts[j])
            grad_w.index_add_(0, local[span][owned[span]], rows[owned[span]].to(acc), alpha=1 / group.size())

        grad = grad.contiguous()
        add(group.rank(), grad)
        for to, frm in exchange.rounds(group):
            received = grad.new_empty((counts[frm], grad.shape[1]))
            exchange.swap(grad, to, received, frm, group)
            add(frm, received)
        return grad_w.to(dtype), None, None, None, None, None


# -- the loss -----------------------------------------------------------------------------------------
def _head_loss(head, group, dtype, rows, targets, chunk_size=None, l2wrap: float = 0.0):
    """Summed cross-entropy of this process's `rows` through the sharded head (every process
    must call it, also with no rows)."""
    weight = head.weight.to_local()
    dtype = dtype or compute_dtype(rows, weight)
    chunk_size = chunk_size or default_chunk_size(weight.shape[0])
    with no_autocast(rows.device.type):
        loss = ShardedLinearCrossEntropy.apply(rows, weight, targets.long(), head.vocab_offset, head.weight.shape[0],
                                               group, int(chunk_size), float(l2wrap), dtype)
    return loss.sum()


class ShardedLinearCrossEntropy(torch.autograd.Function):
    """ops.LinearCrossEntropy over a weight split by vocabulary rows across the processes of
    `group`: this process's rows [N] -> per-row loss [N] (acc dtype)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, offset, vocab, group, chunk_size, l2wrap, dtype):
        acc, n_rows = _acc_dtype(dtype), weight.shape[0]
        counts = exchange.row_counts(hidden.shape[0], group, hidden.device)
        h_all = exchange.all_gather_rows(hidden, counts, group)
        local = check_ids(exchange.all_gather_rows(targets, counts, group), vocab, "targets") - offset
        has_target = (local >= 0) & (local < n_rows)
        local = local.clamp(0, max(0, n_rows - 1))
        m = h_all.shape[0]
        # per row, over this slice of the vocabulary: max logit, sum of exp(logit - max), target logit
        stats = torch.zeros(3, m, dtype=acc, device=hidden.device)
        stats[0] = -torch.inf
        argmax = torch.zeros(m, dtype=torch.long, device=hidden.device)
        h, w = h_all.to(dtype), weight.to(dtype)
        for s in range(0, m if n_rows else 0, chunk_size):
            e = min(s + chunk_size, m)
            logits = (h[s:e] @ w.T).to(acc)
            torch.max(logits, dim=-1, out=(stats[0, s:e], argmax[s:e]))
            stats[2, s:e] = logits.gather(1, local[s:e, None]).squeeze(1) * has_target[s:e]
            stats[1, s:e] = logits.sub_(stats[0, s:e, None]).exp_().sum(dim=-1)
            del logits
        every = torch.empty(group.size(), *stats.shape, dtype=acc, device=hidden.device)
        exchange.all_gather(every, stats.unsqueeze(0), group=group)
        top = every[:, 0].max(dim=0).values
        lse = top + torch.log((every[:, 1] * torch.exp(every[:, 0] - top)).sum(dim=0))
        # L2Wrap's maximum belongs to the first process that holds it
        has_max = (every[:, 0] == top).int().argmax(dim=0) == group.rank()
        ctx.save_for_backward(h_all, weight, local, lse, top, argmax, has_target, has_max)
        ctx.counts, ctx.group, ctx.chunk_size, ctx.l2wrap, ctx.dtype = counts, group, chunk_size, l2wrap, dtype
        me = group.rank()
        start = sum(counts[:me])
        return (lse - every[:, 2].sum(dim=0))[start:start + counts[me]]

    @staticmethod
    def backward(ctx, grad_loss):
        h_all, weight, local, lse, top, argmax, has_target, has_max = ctx.saved_tensors
        group, counts = ctx.group, ctx.counts
        with no_autocast(grad_loss.device.type):
            g_all = exchange.all_gather_rows(grad_loss.to(lse.dtype).contiguous(), counts, group)
            grad_h, grad_w = logit_grads(h_all, weight, local, lse, g_all, ctx.chunk_size, ctx.dtype,
                                         ctx.needs_input_grad[0], ctx.needs_input_grad[1] and weight.shape[0] > 0,
                                         ctx.l2wrap, top, argmax, has_target, has_max, weight_scale=1 / group.size())
            if ctx.needs_input_grad[0]:
                grad_h = exchange.reduce_scatter_rows(grad_h, counts, group)
            if ctx.needs_input_grad[1]:  # (averaged over processes above)
                grad_w = torch.zeros_like(weight) if grad_w is None else grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None
