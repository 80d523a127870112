"""Two gloo processes on 127.0.0.1 must train exactly like one process with the whole batch."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from conftest import random_model
from test_train_helpers import VOCAB, random_batch, tiny_config, tiny_data

from rwkv_sft.data import Batch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches():
    """Rank 0 gets two micro-batches, rank 1 one real and one all-masked micro-batch."""
    b = [random_batch(B=2, T=8, seed=s, mask_fraction=0.5) for s in range(4)]
    b[3].loss_mask[:] = False
    return [b[0], b[1]], [b[2], b[3]]


def _model():
    m = random_model(0, n_layer=2, n_embd=64, head_size=64, vocab_size=VOCAB)
    m.wkv_backend = "chunked"
    return m


def _worker(rank, port, out_dir, result_file):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from torch.nn.parallel import DistributedDataParallel as DDP

    from rwkv_sft.train import distributed, train
    from rwkv_sft.train.step import accumulate_gradients
    from rwkv_sft.train.loss import CompletionLoss
    d = distributed.setup("cpu", 60)
    # 1. gradients of one accumulated step
    model = _model()
    lm = CompletionLoss(model, chunk_size=3, segment_len=3)  # in segments here, whole rows in the twin
    mine = _batches()[rank]
    count = int(distributed.all_sum(d, [sum(b.num_loss_tokens for b in mine)])[0])
    loss = accumulate_gradients(lm, mine, device="cpu", global_count=count, world_size=2, wrapped=DDP(lm), l2wrap=True)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    # 2. a rank whose only batch is all-masked must neither hang nor contribute
    model.zero_grad()
    empty = Batch(mine[0].tokens, mine[0].targets, torch.zeros_like(mine[0].loss_mask))
    only = [mine[0] if rank == 0 else empty]
    count2 = int(distributed.all_sum(d, [only[0].num_loss_tokens])[0])
    accumulate_gradients(lm, only, device="cpu", global_count=count2, world_size=2, wrapped=DDP(lm), l2wrap=True)
    grads_masked = {n: p.grad.clone() for n, p in model.named_parameters()}
    # 3. the whole loop: one step over the whole epoch, split across the two processes
    r = train(tiny_config(out_dir, max_steps=None, epochs=1, step_tokens=10**6, batch_tokens=48,
                          wkv_backend="chunked", save_every=1), data=tiny_data())
    if rank == 0:
        torch.save({"loss": loss, "grads": grads, "grads_masked": grads_masked, "steps": r.steps,
                    "weights": r.model.state_dict()}, result_file)


def _close(a, b, tol=2e-6):
    err = (a - b).abs().max().item()
    assert err <= tol * (1 + b.abs().max().item()), err


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    result_file = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(_free_port(), str(tmp_path / "ddp"), str(result_file)), nprocs=2, join=True)
    got = torch.load(result_file, weights_only=True)

    from rwkv_sft.train import train
    from rwkv_sft.train.step import accumulate_gradients
    from rwkv_sft.train.loss import CompletionLoss
    model = _model()
    lm = CompletionLoss(model, chunk_size=3)
    everything = _batches()[0] + _batches()[1]
    count = sum(b.num_loss_tokens for b in everything)
    accumulate_gradients(lm, everything, device="cpu", global_count=count, l2wrap=True)
    for n, p in model.named_parameters():
        _close(got["grads"][n], p.grad)
    model.zero_grad()
    first = _batches()[0][0]
    accumulate_gradients(lm, [first], device="cpu", global_count=first.num_loss_tokens, l2wrap=True)
    for n, p in model.named_parameters():
        _close(got["grads_masked"][n], p.grad)

    single = train(tiny_config(tmp_path / "one", max_steps=None, epochs=1, step_tokens=10**6, batch_tokens=48,
                               wkv_backend="chunked"), data=tiny_data())
    assert got["steps"] == single.steps == 1
    for k, v in single.model.state_dict().items():
        _close(got["weights"][k], v, tol=1e-5)
    assert (tmp_path / "ddp" / "checkpoints" / "step_000001" / "COMPLETE").is_file()
