"""The embedding and head of an fsdp run split by vocabulary rows (train/vocab_parallel.py) against
the whole tables in one process, in float64: lookups, per-process losses (with L2Wrap), and the
gradients of the tables and of what feeds the head. 2 and 3 processes, uneven numbers of rows
(one process with none), vocabularies that do not split evenly (one with an empty slice)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from test_train_dist import _free_port

C, T = 8, 5


class Tables(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, C, dtype=torch.float64)
        self.head = nn.Linear(C, vocab, bias=False, dtype=torch.float64)


def _inputs(rank, world, vocab):
    """Process `rank`'s tokens [rank+1, T], a factor on its hidden rows, the rows that carry loss
    (none on the last process) and their targets."""
    g = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, vocab, (rank + 1, T), generator=g)
    factor = torch.rand(rank + 1, T, C, generator=g, dtype=torch.float64) + 0.5
    mask = torch.rand(rank + 1, T, generator=g) < (0.6 if rank < world - 1 else 0.0)
    return tokens, factor, mask, torch.randint(0, vocab, (int(mask.sum()),), generator=g)


def _losses(model, rank, world, vocab, loss_fn):
    """Process rank's summed loss through `loss_fn(rows, targets)`, and its factor (a leaf)."""
    tokens, factor, mask, targets = _inputs(rank, world, vocab)
    factor.requires_grad_(True)
    rows = (model.emb(tokens) * factor)[mask]
    return loss_fn(rows, targets), factor


def _check(rank, world, port, vocab, failures):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    from rwkv_sft.ops import linear_cross_entropy
    from rwkv_sft.train import vocab_parallel

    def fail(what):
        failures.put(f"V={vocab} world={world} rank {rank}: {what}")

    try:
        # the twin: every process's loss through the whole tables
        whole = Tables(vocab)
        twin = [_losses(whole, r, world, vocab, lambda h, t: linear_cross_entropy(
            h, whole.head.weight, t, reduction="sum", chunk_size=3, l2wrap=0.25)) for r in range(world)]
        sum(loss for loss, _ in twin).backward()

        model = Tables(vocab)
        vocab_parallel.shard(model, init_device_mesh("cpu", (world,)))
        if model.emb.weight.to_local().untyped_storage().nbytes() > model.emb.weight.to_local().nbytes:
            fail("the shard keeps the whole table alive")
        # scaled as the trainer scales it (the table gradients are averaged over processes; L2Wrap
        # does not depend on the upstream gradient, so its factor is scaled too)
        loss, factor = _losses(model, rank, world, vocab, lambda h, t: model.head.completion_loss(h, t, 3, 0.25 * world))
        (loss * world).backward()
        if not torch.allclose(loss, twin[rank][0], rtol=1e-12, atol=1e-12):
            fail(f"loss {float(loss)} != {float(twin[rank][0])}")
        checks = [("grad of what feeds the head", factor.grad / world, twin[rank][1].grad),
                  ("embedding gradient", model.emb.weight.grad.full_tensor(), whole.emb.weight.grad),
                  ("head gradient", model.head.weight.grad.full_tensor(), whole.head.weight.grad)]
        for what, got, want in checks:
            if not torch.allclose(got, want, rtol=1e-10, atol=1e-12):
                fail(f"{what}: max error {float((got - want).abs().max())}")

        with vocab_parallel.gathered(model):  # evaluation: the whole tables, a plain lookup
            tokens = torch.arange(vocab).view(1, -1)
            if not torch.equal(model.emb(tokens)[0], whole.emb.weight.detach()):
                fail("gathered embedding")
            if not torch.equal(model.head.weight, whole.head.weight.detach()):
                fail("gathered head")
        with pytest.raises(ValueError, match=r"token ids must lie in \[0, "):
            model.emb(torch.tensor([[vocab if rank == 0 else 0]]))  # every process raises, none hangs
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world,vocab", [(2, 37), (3, 37), (3, 4)])
def test_vocab_parallel_matches_whole_tables(world, vocab):
    failures = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_check, args=(world, _free_port(), vocab, failures), nprocs=world, join=True)
    found = []
    while not failures.empty():
        found.append(failures.get())
    assert not found, found
