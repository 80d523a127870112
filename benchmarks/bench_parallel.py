"""DDP vs FSDP on CPU with gloo: the largest process's peak memory and training tokens/s.

What is measured: N processes (default 2, one thread each) train a fresh RWKV-7 (default 8 x
1024, V 65536: 0.24B parameters) with the trainer's own pieces (CompletionLoss, the wrapping of
rwkv_sft.train.parallel, accumulate_gradients, clipping, fused AdamW), one micro-batch of
--tokens tokens per process and step, the loss on the last quarter of each row. Each mode runs
in fresh processes, one mode after the other.
- peak: the largest process's resident high-water mark (ru_maxrss) over the whole run: model,
  gradients, AdamW state, DDP's buckets or FSDP's gathered blocks, activations.
- tokens/s: all processes' tokens over the time of the steps after the first (best of the
  per-step times, then the median, both printed). This machine's step times vary by up to 2x
  from run to run; --rounds R runs the modes R times in turn (ddp, fsdp, ddp, ...) and pools
  their steps, so that a slow period falls on both.
Both modes see the same data; their losses are printed for the eye (the tests check equality).
As under `rwkv-sft train`: large tensors on 2 MiB pages, FSDP2's own collectives (as on nccl),
fsdp under the low-memory heap policy (parallel.use_heap_policy), ddp under the default one.

    flock /tmp/rwkv-heavy.lock python benchmarks/bench_parallel.py          # several GiB
    python benchmarks/bench_parallel.py --layers 2 --embd 256 --vocab 4096  # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import tempfile
import time

from rwkv_sft.cli import use_huge_pages

use_huge_pages()  # as the command line does, before torch allocates
import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

GiB = 2**30


def _worker(rank, args, port, mode, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(args.procs),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(args.threads)
    from rwkv_sft import RWKV7, RWKV7Config
    from rwkv_sft.data import Batch
    from rwkv_sft.train import distributed, parallel
    from rwkv_sft.train.step import accumulate_gradients
    from rwkv_sft.train.loss import CompletionLoss
    from rwkv_sft.train.optim import make_optimizer
    from rwkv_sft.utils import set_heap_policy

    set_heap_policy(low_memory=args.low_memory or mode == "fsdp")  # as `rwkv-sft train` does on CPU
    d = distributed.setup("cpu", 600)
    torch.manual_seed(0)
    model = RWKV7(RWKV7Config(n_layer=args.layers, n_embd=args.embd, vocab_size=args.vocab))
    model.activation_checkpointing = args.activation_checkpointing
    loss_module = CompletionLoss(model)
    par = parallel.wrap(loss_module, d, mode, "fp32")
    optimizer = make_optimizer(model, lr=1e-5, weight_decay=0.0, betas=(0.9, 0.99), eps=1e-8)
    params = [p for p in model.parameters() if p.requires_grad]
    T, times, losses = args.tokens, [], []
    for step in range(args.steps):
        g = torch.Generator().manual_seed(1000 * step + rank)
        tokens = torch.randint(1, args.vocab, (1, T), generator=g)
        mask = torch.zeros(1, T, dtype=torch.bool)
        mask[:, -T // 4:] = True
        batches = [Batch(tokens, torch.roll(tokens, -1, 1), mask)] * args.micro_batches
        count = int(distributed.all_sum(d, [int(mask.sum()) * args.micro_batches])[0])
        distributed.barrier(d)
        t0 = time.perf_counter()
        loss = accumulate_gradients(loss_module, batches, device=d.device, global_count=count,
                                    world_size=d.world_size, wrapped=par.module)
        parallel.clip_grad_norm(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        distributed.barrier(d)
        times.append(time.perf_counter() - t0)
        losses.append(distributed.all_sum(d, [loss])[0] / count)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peaks = torch.zeros(d.world_size, dtype=torch.float64)
    torch.distributed.all_gather_into_tensor(peaks, torch.tensor([float(peak)], dtype=torch.float64))
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"peaks": peaks.tolist(), "times": times, "losses": losses}, f)
    distributed.teardown(d)


def run(args, mode):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(_worker, args=(args, port, mode, out), nprocs=args.procs, join=True)
        with open(out) as f:
            return json.load(f)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--embd", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--tokens", type=int, default=256, help="tokens per process and step")
    p.add_argument("--steps", type=int, default=4, help="the first one is not timed")
    p.add_argument("--micro-batches", type=int, default=1, help="per process and step")
    p.add_argument("--rounds", type=int, default=1, help="run the modes this many times in turn, steps pooled")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--low-memory", action="store_true",
                   help="ddp under train --low-memory's heap policy too (fsdp always is, as in the trainer)")
    args = p.parse_args()
    from rwkv_sft import RWKV7, RWKV7Config
    with torch.device("meta"):
        n_params = RWKV7(RWKV7Config(n_layer=args.layers, n_embd=args.embd, vocab_size=args.vocab),
                         init_weights=False).num_parameters()
    modes = ("ddp", "fsdp")
    results = {}
    for _ in range(args.rounds):
        for mode in modes:
            r = run(args, mode)
            pooled = results.setdefault(mode, {"peaks": [], "timed": [], "losses": r["losses"]})
            pooled["peaks"] += r["peaks"]
            pooled["timed"] += r["times"][1:]
    tokens = args.procs * args.tokens * args.micro_batches
    print(f"{args.layers} x {args.embd}, V {args.vocab} ({n_params / 1e9:.2f}B parameters); {args.procs} gloo processes x {args.threads} thread(s), "
          f"{args.micro_batches} x {args.tokens} tokens per process and step, {args.rounds} x {args.steps - 1} timed steps"
          + (", low-memory heap policy" if args.low_memory else ", ddp: default heap policy, fsdp: low-memory (as the trainer)"))
    print(f"{'mode':<12} {'peak GiB (largest process)':>27} {'tokens/s best':>14} {'tokens/s median':>16}  losses")
    rows = {}
    for mode, r in results.items():
        timed = r["timed"]
        rows[mode] = (max(r["peaks"]) / GiB, tokens / min(timed), tokens / statistics.median(timed))
        print(f"{mode:<12} {rows[mode][0]:>27.2f} {rows[mode][1]:>14.1f} {rows[mode][2]:>16.1f}  "
              + " ".join(f"{x:.4f}" for x in r["losses"]))
    print(f"fsdp / ddp: peak {rows['fsdp'][0] / rows['ddp'][0]:.2f}x (target <= 0.65x), tokens/s best "
          f"{rows['fsdp'][1] / rows['ddp'][1]:.2f}x, median {rows['fsdp'][2] / rows['ddp'][2]:.2f}x (no target on CPU)")


if __name__ == "__main__":
    main()
