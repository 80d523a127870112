"""Tokens/s and peak memory of one training step: our engine vs a plain reference trainer.

Both run the same model (fresh RWKV-7, upstream init) on the same batch, fp32, and do the whole
step: forward, backward, gradient clipping, AdamW update.
  engine     rwkv_sft.train: completion rows gathered before the head, chunked linear
             cross-entropy (no full logits), chunked WKV-7 backend
  reference  full logits [B,T,V] + F.cross_entropy(reduction="none") * mask / count,
             model.wkv_backend = "reference" (the per-token recurrence under autograd)
  engine-bf16  the engine under bf16 autocast (fp32 master weights), as `--precision bf16`
The completion is the last 1/4 of each row. Each trainer runs in a fresh subprocess; peak memory
is the resident high-water mark of one step after a warm-up step (so AdamW's state exists in
both) minus the resident size before it (benchmarks/bench_memory.py's PeakMeter). Time: best of
--steps steps after the warm-up; CPU s is the process's CPU time of that step (less exposed to
other processes on a shared machine than wall time).

    python benchmarks/bench_train.py                       # n_layer 4, n_embd 256, V 65536, B 4, T 512
    python benchmarks/bench_train.py --T 256 --steps 1     # quicker
    python benchmarks/bench_train.py --trainers engine engine-bf16   # bf16 vs fp32 on this CPU
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from rwkv_sft.cli import use_huge_pages

use_huge_pages()  # as the command line does, before torch allocates
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bench_memory import PeakMeter  # noqa: E402

from rwkv_sft import RWKV7, RWKV7Config  # noqa: E402
from rwkv_sft.data import Batch  # noqa: E402
from rwkv_sft.train.step import accumulate_gradients  # noqa: E402
from rwkv_sft.train.loss import CompletionLoss  # noqa: E402
from rwkv_sft.train.optim import make_optimizer  # noqa: E402
from rwkv_sft.utils import set_heap_policy  # noqa: E402

MiB = 2**20
TRAINERS = ("reference", "engine", "engine-bf16")


def make_batch(B, T, V):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (B, T), generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, T - T // 4:] = True
    return Batch(tokens, targets, mask)


def child(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = RWKV7(RWKV7Config(n_layer=args.layers, n_embd=args.embd, vocab_size=args.vocab))
    opt = make_optimizer(model, lr=1e-5, weight_decay=0.0, betas=(0.9, 0.99), eps=1e-8)
    batch = make_batch(args.B, args.T, args.vocab)
    count = batch.num_loss_tokens
    if args.child.startswith("engine"):
        set_heap_policy(low_memory=False)  # as `rwkv-sft train` does on CPU
        model.wkv_backend = "chunked"
        lm = CompletionLoss(model)
        precision = "bf16" if args.child == "engine-bf16" else "fp32"

        def loss_and_backward():
            return accumulate_gradients(lm, [batch], device="cpu", global_count=count, l2wrap=True,
                                        precision=precision) / count
    else:
        model.wkv_backend = "reference"

        def loss_and_backward():
            logits, _ = model(batch.tokens)
            losses = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), reduction="none")
            loss = (losses * batch.loss_mask.flatten()).sum() / count
            loss.backward()
            return loss.item()

    def step():
        loss = loss_and_backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    first_loss = step()  # warm-up: allocates AdamW's state
    meter = PeakMeter(torch.device("cpu"))
    times, cpu = [], []
    meter.start()
    for i in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if i == 0:
            peak = meter.stop()
    print(json.dumps(dict(first_loss=first_loss, time=min(times), cpu=min(cpu), peak=peak)))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--embd", type=int, default=256)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--T", type=int, default=512)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--trainers", nargs="+", choices=TRAINERS, default=["reference", "engine"])
    p.add_argument("--child", choices=TRAINERS)
    args = p.parse_args()
    if args.child:
        return child(args)
    results = {}
    for name in args.trainers:
        cmd = [sys.executable, __file__, "--child", name] + [f"--{k}={getattr(args, k)}" for k in
                                                            ("layers", "embd", "vocab", "B", "T", "steps", "threads")]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
    tokens = args.B * args.T
    print(f"training step: n_layer {args.layers}, n_embd {args.embd}, vocab {args.vocab}, B {args.B}, T {args.T}, "
          f"completion 1/4, {args.threads} threads")
    print(f"{'trainer':<12} {'step s':>8} {'CPU s':>8} {'tokens/s':>10} {'peak MiB':>9} {'first loss':>11}")
    for name, r in results.items():
        print(f"{name:<12} {r['time']:>8.3f} {r['cpu']:>8.3f} {tokens / r['time']:>10.0f} {r['peak'] / MiB:>9.0f} "
              f"{r['first_loss']:>11.5f}")
    for new, old in (("engine", "reference"), ("engine-bf16", "engine")):
        if new in results and old in results:
            a, b = results[new], results[old]
            print(f"{new} vs {old}: {b['time'] / a['time']:.2f}x tokens/s ({b['cpu'] / a['cpu']:.2f}x by CPU time), "
                  f"{a['peak'] / b['peak']:.2f}x peak memory")


if __name__ == "__main__":
    main()
