"""Long sequences: peak memory and speed of a training step, whole rows vs segments (`segment_len`).

One step = forward + backward of the completion loss (`CompletionLoss`: the loss rows gathered,
chunked cross-entropy) on one row of T tokens whose last 16 tokens are the completion, on a fresh
n_layer x n_embd model with the World vocabulary (65536). Cases, each in a fresh subprocess
(peak memory as in bench_memory.py: the resident high-water mark on CPU, max allocated on CUDA,
minus what was allocated before the step; the gradients of the parameters are part of it):
  whole     segment_len=0: the unsegmented call, every activation of the row alive at once
  seg       segment_len=S: S tokens at a time, each segment recomputed in the backward
  seg-full  as seg, but the model returns the whole hidden sequence [B,T,C] and the loss rows are
            gathered afterwards (what `rows=` avoids), to show what that choice is worth
Printed: peak MiB, time of a step (best of --repeats after the measured one), tokens/s, the loss
(identical across cases up to rounding), then the memory growth per token between two lengths.

    python benchmarks/bench_long.py             # 4 x 512, S = 512
    python benchmarks/bench_long.py --quick     # lengths and S / 4, one repeat
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from rwkv_sft.cli import use_huge_pages

use_huge_pages()  # as the command line does, before torch allocates
import torch  # noqa: E402

from bench_memory import PeakMeter  # same directory

from rwkv_sft import RWKV7, RWKV7Config
from rwkv_sft.train.loss import CompletionLoss

MiB = 2**20
COMPLETION = 16


def child(a):
    device = torch.device(a.device)
    torch.manual_seed(0)
    model = RWKV7(RWKV7Config(n_layer=a.n_layer, n_embd=a.n_embd)).to(device)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, 65536, (1, a.T + 1), generator=g).to(device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    mask = torch.zeros_like(inputs, dtype=torch.bool)
    mask[:, -COMPLETION:] = True
    S = 0 if a.case == "whole" else a.S
    lm = CompletionLoss(model, segment_len=S)
    if a.case == "seg-full":
        def step():
            hidden, _ = model.forward_hidden(inputs, segment_len=S)
            from rwkv_sft.ops import linear_cross_entropy
            return linear_cross_entropy(hidden[mask], model.head.weight, targets[mask], reduction="sum")
    else:
        def step():
            return lm(inputs, targets, mask)
    torch.ones(64, 64, device=device) @ torch.ones(64, 64, device=device)  # start the thread pool
    meter = PeakMeter(device)
    meter.start()
    loss = step()
    loss.backward()
    peak = meter.stop()
    times = []
    for _ in range(a.repeats):
        model.zero_grad(set_to_none=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    print(json.dumps(dict(peak=peak, loss=float(loss.detach()) / COMPLETION, time=min(times) if times else float("nan"))))


def run_case(a, case, T):
    cmd = [sys.executable, __file__, "--child", case, "--T", str(T), "--S", str(a.S), "--n-layer", str(a.n_layer),
           "--n-embd", str(a.n_embd), "--device", a.device, "--repeats", str(a.repeats)]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=512)
    p.add_argument("--S", type=int, default=512, help="segment length")
    p.add_argument("--whole-T", type=int, nargs=2, default=[1024, 4096], help="two lengths for the unsegmented call")
    p.add_argument("--seg-T", type=int, nargs=2, default=[4096, 16384], help="two lengths for the segmented call")
    p.add_argument("--speed-T", type=int, default=2048, help="length of the speed comparison")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="lengths and S / 4, one repeat")
    p.add_argument("--child", choices=["whole", "seg", "seg-full"], help=argparse.SUPPRESS)
    p.add_argument("--T", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        a.case = a.child
        return child(a)
    if a.quick:
        a.whole_T, a.seg_T, a.speed_T = [t // 4 for t in a.whole_T], [t // 4 for t in a.seg_T], a.speed_T // 4
        a.S, a.repeats = a.S // 4, 1

    print(f"device={a.device} model={a.n_layer}x{a.n_embd} V=65536 B=1 completion={COMPLETION} S={a.S} "
          f"threads={torch.get_num_threads()}", flush=True)
    print(f"{'case':>8} {'T':>6} {'peak MiB':>9} {'step s':>7} {'tokens/s':>9} {'loss':>8}")
    results = {}
    plan = [("whole", a.speed_T), ("seg", a.speed_T), ("whole", a.whole_T[0]), ("whole", a.whole_T[1]),
            ("seg", a.seg_T[0]), ("seg", a.seg_T[1]), ("seg-full", a.seg_T[1])]
    for case, T in plan:
        if (case, T) in results:
            continue
        r = results[case, T] = run_case(a, case, T)
        print(f"{case:>8} {T:>6} {r['peak'] / MiB:>9.0f} {r['time']:>7.2f} {T / r['time']:>9.0f} {r['loss']:>8.4f}", flush=True)

    def growth(case, Ts):  # bytes of peak memory per extra token
        return (results[case, Ts[1]]["peak"] - results[case, Ts[0]]["peak"]) / (Ts[1] - Ts[0])
    whole, seg, full = growth("whole", a.whole_T), growth("seg", a.seg_T), None
    speed = results["whole", a.speed_T]["time"] / results["seg", a.speed_T]["time"]
    print(f"\nmemory growth: whole {whole / 1024:.1f} KiB/token (T {a.whole_T[0]} -> {a.whole_T[1]}), "
          f"segmented {seg / 1024:.1f} KiB/token (T {a.seg_T[0]} -> {a.seg_T[1]}): ratio {seg / whole:.3f} (target <= 0.1)")
    print(f"speed at T={a.speed_T}: segmented / whole = {speed:.2f}x (target >= 0.7)")
    full = results["seg-full", a.seg_T[1]]["peak"] - results["seg", a.seg_T[1]]["peak"]
    print(f"returning the whole hidden sequence instead of the loss rows adds {full / MiB:.0f} MiB at T={a.seg_T[1]}")


if __name__ == "__main__":
    main()
