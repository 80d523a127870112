"""The gloo collectives an fsdp run uses (parallel.PairwiseAllGather / PairwiseReduceScatter)
against gloo's own all_gather_into_tensor and reduce_scatter_tensor, on 2 and 3 processes."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_train_dist import _free_port


def _check(rank, world, port, failures):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from rwkv_sft.train.parallel import PairwiseAllGather, PairwiseReduceScatter

    group = dist.group.WORLD
    try:
        for n in (world, 7 * world, 4096 * world):  # one element per process, odd sizes, a larger one
            g = torch.Generator().manual_seed(100 * rank + n)
            shard = torch.randn(n // world, generator=g)
            expected, got = torch.empty(n), torch.full((n,), float("nan"))
            dist.all_gather_into_tensor(expected, shard)
            assert PairwiseAllGather()(got, shard, group) is None
            if not torch.equal(got, expected):
                failures.put(f"all-gather n={n} rank {rank}")
            for op in (dist.ReduceOp.SUM, dist.ReduceOp.AVG):
                full = torch.randn(n, generator=g)
                expected, got = torch.empty(n // world), torch.full((n // world,), float("nan"))
                dist.reduce_scatter_tensor(expected, full.clone(), op=op)
                PairwiseReduceScatter()(got, full.clone(), group, op)
                if not torch.allclose(got, expected, rtol=1e-6, atol=1e-6):
                    failures.put(f"reduce-scatter {op} n={n} rank {rank}: {(got - expected).abs().max()}")
        with pytest.raises(ValueError, match="only SUM and AVG"):
            PairwiseReduceScatter()(torch.empty(1), torch.empty(world), group, dist.ReduceOp.MAX)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_pairwise_collectives_equal_gloo(world):
    failures = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_check, args=(world, _free_port(), failures), nprocs=world, join=True)
    found = []
    while not failures.empty():
        found.append(failures.get())
    assert not found, found
