"""Preference training step: the forked forward (context once, both completions from its state)
against running the two full sequences (what a transformer trainer does), side by side.

    python benchmarks/bench_preference.py            # 4 x 512, V 65536, 2 pairs, context 1024, completions 128
    python benchmarks/bench_preference.py --pairs 1 --context 512
    python benchmarks/bench_preference.py --plan       # the batches' padding on spread lengths

One DPO step's forward and backward (fp32, the chunked WKV backend on CPU, the CUDA one on a
GPU), three ways: the two full sequences, the forked forward with a pair's completions in one row
(the default) and in two rows. tokens/s counts each pair's tokens as the full sequences see them
(context + completion, twice), so every row measures the same work. Peak memory: on a GPU
torch.cuda.max_memory_allocated during the step; on CPU each variant runs in a fresh subprocess on
the same checkpoint, under the trainer's heap policy, and reports its peak resident set during the
step (VmHWM, reset before the step) above the resident set before it (the model, its gradients
and the batch already allocated). Losses and gradients are compared with the fp32 full sequences
and with the full sequences in float64 (each gradient relative to its largest entry).
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_gpu import matrix_params  # (the weights a token passes through: bench_gpu's MFU counts them)
from rwkv_sft import RWKV7, RWKV7Config
from rwkv_sft.weights import load_model, save_model
from rwkv_sft.data.pairs import PairBatch, PairExamples, PairLoader
from rwkv_sft.train import preference as pref
from rwkv_sft.utils import set_heap_policy


def flop_bound(model, context, completion) -> float:
    """The most a forked step can gain at this shape: the matrix FLOPs (forward and backward, 6 per
    weight per position) of the full sequences over the forked step's. The blocks run 2(c + y)
    positions against c + 2y; the head runs over the 2y scored tokens in both."""
    head = model.head.weight.numel()
    blocks = matrix_params(model) - head
    scored = 2 * completion
    return (blocks * 2 * (context + completion) + head * scored) / (blocks * (context + 2 * completion) + head * scored)


def make_batch(pairs, context, completion, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return PairBatch(torch.randint(1, vocab, (pairs, context), generator=g),
                     torch.zeros(pairs, context, dtype=torch.bool).index_fill_(1, torch.tensor([0]), True),
                     torch.randint(1, vocab, (2 * pairs, completion), generator=g),
                     torch.ones(2 * pairs, completion, dtype=torch.bool), torch.ones(pairs))


VARIANTS = {"unforked": "both full sequences", "forked": "forked (context once)",
            "forked-two-rows": "forked, completions in 2 rows"}


def step(model, batch, variant: str, ref):
    """One DPO step's forward and backward; returns the loss. `forked` runs each pair's two
    completions in one row (the default), `forked-two-rows` in a row each."""
    if variant == "unforked":
        logp, count = pref.sequence_logps_unforked(model, batch)
    else:
        logp, count = pref.sequence_logps(model, batch, packed=variant == "forked")
    loss = pref.pair_losses("dpo", logp, count, ref, 0.1)[0].mean()
    loss.backward()
    return loss.detach()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _hwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def child(args) -> None:
    """One variant's step in this fresh process: the peak memory of the step."""
    set_heap_policy(low_memory=False)  # as `rwkv-sft train` does on CPU (fixed thresholds: stable peaks)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.child_model).float().to(device)
    model.wkv_backend = "cuda" if device.type == "cuda" else "chunked"
    batch = make_batch(args.pairs, args.context, args.completion, model.config.vocab_size).to(device)
    ref = torch.zeros(2 * args.pairs, device=device)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(model, batch, args.child, ref)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak resident set (VmHWM) restarts from the current one
        base = _rss()
        step(model, batch, args.child, ref)
        peak = _hwm() - base
    print(json.dumps({"peak": peak}))


def plan_padding(n_pairs=20000, seed=0) -> None:
    """Padding of the pair batches (share of padded positions) on lognormal lengths: contexts
    around 200 tokens, chosen and rejected around 150 each, drawn independently; the plan against
    grouping by total length alone (pairs sorted by context + completions, same budget)."""
    rng = np.random.default_rng(seed)
    lens = np.stack([np.clip(rng.lognormal(np.log(m), s, n_pairs).astype(np.int64), lo, hi)
                     for m, s, lo, hi in ((200, 0.8, 1, 3000), (150, 0.7, 2, 1500), (150, 0.7, 2, 1500))], 1)
    start = np.concatenate([[0], np.cumsum(lens.sum(1))[:-1]])
    n = int(lens.sum())
    examples = PairExamples([(np.ones(n, np.int64), np.ones(n, bool))], np.zeros(n_pairs), start, lens, lens,
                            np.arange(n_pairs))
    used = examples.positions.sum()

    class ByTotal(PairLoader):
        def _order(self, window):  # as BatchLoader.plan hands it over: by total positions, longest first
            return window

    print(f"pair batches' padding (share of padded positions), {n_pairs} pairs, lognormal lengths (context ~200, "
          f"completions ~150 each, drawn independently)")
    print(f"{'completions':<14}{'batch tokens':>13}{'grouped by total length':>25}{'the plan':>10}{'one pair per batch':>20}")
    for packing, label in ((False, "in two rows"), (True, "in one row")):
        alone = PairLoader(examples, batch_tokens=1, packing=packing)  # (every batch over budget: one pair each)
        floor = 1 - used / sum(alone.positions_of(rows) for rows in alone.plan(0))
        for bt in (4096, 16384):
            pad = [1 - used / sum(L.positions_of(rows) for rows in L.plan(0))
                   for L in (ByTotal(examples, batch_tokens=bt, packing=packing),
                             PairLoader(examples, batch_tokens=bt, packing=packing))]
            print(f"{label:<14}{bt:>13}{pad[0]:>25.1%}{pad[1]:>10.1%}{floor:>20.1%}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--completion", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--plan", action="store_true", help="only the batches' padding on spread lengths")
    p.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--child-model", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.plan:
        return plan_padding()
    set_heap_policy(low_memory=False)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = RWKV7(RWKV7Config(n_layer=args.layers, n_embd=args.width, vocab_size=args.vocab))
    with torch.no_grad():  # a trained-looking model: nothing exactly zero
        for q in model.parameters():
            q.add_(torch.randn_like(q) * 0.02)
    model = model.to(device)
    model.wkv_backend = "cuda" if device.type == "cuda" else "chunked"
    batch = make_batch(args.pairs, args.context, args.completion, args.vocab).to(device)
    with torch.no_grad():
        ref = pref.sequence_logps(model, batch)[0] + torch.linspace(-1, 1, 2 * args.pairs, device=device)  # any reference

    def timed(variant):
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = step(model, batch, variant, ref)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t, loss, {n: q.grad.clone() for n, q in model.named_parameters()}

    times = {v: [] for v in VARIANTS}
    results = {}
    for v in VARIANTS:  # warm-up
        timed(v)
    for _ in range(args.repeats):  # alternate, so that load on the machine hits all alike
        for v in VARIANTS:
            dt, loss, grads = timed(v)
            times[v].append(dt)
            results[v] = (loss, grads)
    lu, gu = results["unforked"]
    # the truth the fp32 variants are held to: the full sequences in float64
    model64 = copy.deepcopy(model).double()
    model64.wkv_backend = "chunked"
    loss64 = step(model64, batch, "unforked", ref.double())
    g64 = {n: q.grad for n, q in model64.named_parameters()}
    del model64

    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pth"
        save_model(model.cpu(), path)
        for v in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--child", v, "--child-model", str(path),
                                  *(f"--{k}={getattr(args, k)}" for k in ("pairs", "context", "completion", "threads"))],
                                 capture_output=True, text=True, check=True)
            peaks[v] = json.loads(out.stdout.strip().splitlines()[-1])["peak"]

    tokens = 2 * args.pairs * (args.context + args.completion)
    best = {k: min(t) for k, t in times.items()}
    print(f"preference step (DPO), {args.layers} x {args.width}, V {args.vocab}, {args.pairs} pairs, context "
          f"{args.context}, completions {args.completion} each, {device.type}, fp32, best of {args.repeats}")
    def rel(g, truth):  # the largest of each gradient's max |difference| / max |entry|
        return max(float((g[n].double() - truth[n].double()).abs().max() / truth[n].abs().max().clamp(min=1e-30))
                   for n in truth)

    print(f"{'variant':<32}{'step s':>9}{'tokens/s':>11}{'peak MiB':>11}{'loss':>12}{'x tokens/s':>12}{'x peak':>8}"
          f"{'grad vs fp32 full':>19}{'loss, grad vs fp64':>20}")
    for v, label in VARIANTS.items():
        lv, gv = results[v]
        loss_rel = abs(float(lv) - float(loss64)) / abs(float(loss64))
        print(f"{label:<32}{best[v]:>9.2f}{tokens / best[v]:>11,.0f}{peaks[v] / 2**20:>11.0f}{float(lv):>12.6f}"
              f"{best['unforked'] / best[v]:>11.2f}x{peaks[v] / peaks['unforked']:>7.2f}x{rel(gv, gu):>19.1e}"
              f"{loss_rel:>11.1e}, {rel(gv, g64):.1e}")
    print("x: against both full sequences (fp32); grad: the largest of each gradient's max |difference| / max |entry|; "
          "fp64: the full sequences in float64")
    print(f"matrix FLOPs, full sequences / forked: {flop_bound(model, args.context, args.completion):.2f}x "
          f"(the most the fork can gain here: both run the head over the same scored tokens)")


if __name__ == "__main__":
    main()
