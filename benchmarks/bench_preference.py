"""Preference training step: the forked forward (context once, both completions from its state)
against running the two full sequences (what a transformer trainer does), side by side.

    python benchmarks/bench_preference.py            # 4 x 512, V 65536, 2 pairs, context 1024, completions 128
    python benchmarks/bench_preference.py --pairs 1 --context 512

One DPO step's forward and backward (fp32, the chunked WKV backend on CPU, the CUDA one on a
GPU). tokens/s counts each pair's tokens as the unforked step sees them (context + completion,
twice), so both rows measure the same work. Peak memory: on a GPU torch.cuda.max_memory_allocated
during the step; on CPU each variant runs in a fresh subprocess on the same checkpoint and reports
its peak resident set during the step (VmHWM, reset before the step) above the resident set before it (the model, its gradients
and the batch already allocated). The losses and gradients of the two are compared (relative to
each gradient's largest entry).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from rwkv_sft import RWKV7, RWKV7Config
from rwkv_sft.weights import load_model, save_model
from rwkv_sft.data.pairs import PairBatch
from rwkv_sft.train import preference as pref


def make_batch(pairs, context, completion, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return PairBatch(torch.randint(1, vocab, (pairs, context), generator=g),
                     torch.zeros(pairs, context, dtype=torch.bool).index_fill_(1, torch.tensor([0]), True),
                     torch.randint(1, vocab, (2 * pairs, completion), generator=g),
                     torch.ones(2 * pairs, completion, dtype=torch.bool), torch.ones(pairs))


def step(model, batch, forked: bool, ref):
    """One DPO step's forward and backward; returns the loss."""
    logps = pref.sequence_logps if forked else pref.sequence_logps_unforked
    logp, count = logps(model, batch)
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
        step(model, batch, args.child == "forked", ref)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak resident set (VmHWM) restarts from the current one
        base = _rss()
        step(model, batch, args.child == "forked", ref)
        peak = _hwm() - base
    print(json.dumps({"peak": peak}))


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
    p.add_argument("--child", choices=["forked", "unforked"], help=argparse.SUPPRESS)
    p.add_argument("--child-model", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
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

    def timed(forked):
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = step(model, batch, forked, ref)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t, loss, {n: q.grad.clone() for n, q in model.named_parameters()}

    times = {True: [], False: []}
    results = {}
    timed(True), timed(False)  # warm-up
    for _ in range(args.repeats):  # alternate, so that load on the machine hits both alike
        for forked in (True, False):
            dt, loss, grads = timed(forked)
            times[forked].append(dt)
            results[forked] = (loss, grads)
    (lf, gf), (lu, gu) = results[True], results[False]
    loss_rel = abs(float(lf - lu)) / abs(float(lu))
    grad_rel = max(float((gf[n] - gu[n]).abs().max() / gu[n].abs().max().clamp(min=1e-30)) for n in gf)

    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pth"
        save_model(model.cpu(), path)
        for name in ("forked", "unforked"):
            out = subprocess.run([sys.executable, __file__, "--child", name, "--child-model", str(path),
                                  *(f"--{k}={getattr(args, k)}" for k in ("pairs", "context", "completion", "threads"))],
                                 capture_output=True, text=True, check=True)
            peaks[name] = json.loads(out.stdout.strip().splitlines()[-1])["peak"]

    tokens = 2 * args.pairs * (args.context + args.completion)
    best = {k: min(v) for k, v in times.items()}
    print(f"preference step (DPO), {args.layers} x {args.width}, V {args.vocab}, {args.pairs} pairs, context "
          f"{args.context}, completions {args.completion} each, {device.type}, fp32, best of {args.repeats}")
    print(f"{'variant':<28}{'step s':>9}{'tokens/s':>11}{'peak MiB':>11}{'loss':>12}")
    for forked, name, label in ((False, "unforked", "both full sequences"), (True, "forked", "forked (context once)")):
        print(f"{label:<28}{best[forked]:>9.2f}{tokens / best[forked]:>11,.0f}{peaks[name] / 2**20:>11.0f}"
              f"{float(results[forked][0]):>12.6f}")
    print(f"forked / unforked: {best[False] / best[True]:.2f}x tokens/s, {peaks['forked'] / peaks['unforked']:.2f}x peak "
          f"memory; loss rel diff {loss_rel:.1e}, max gradient rel diff {grad_rel:.1e}")


if __name__ == "__main__":
    main()
