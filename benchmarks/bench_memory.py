"""Peak memory and time of a training step's loss path: full logits vs. chunked cross-entropy.

What is measured: starting from the model's output hidden [B,T,C] (a leaf tensor standing in for
the network) and the head weight [V,C], one forward + backward of the loss, with the loss on the
completion tokens only (the last 1/4 of each row):
  full    hidden -> head -> logits [B,T,V] fp32 -> F.cross_entropy with the non-completion
          targets set to ignore_index -> backward
  chunked gather the completion rows with the mask -> rwkv_sft.ops.linear_cross_entropy -> backward
Both produce the same loss (checked) and the same gradients for hidden and weight.

How: every case runs in a fresh subprocess so that no allocator cache carries over. On CPU the
peak is the process's resident high-water mark (VmHWM) during the first step minus its resident
size just before it, after the inputs are allocated and touched; the high-water mark is reset by
writing 5 to /proc/self/clear_refs (falls back to ru_maxrss if that is not possible). On CUDA it
is torch.cuda.max_memory_allocated() minus the memory allocated before the step. The gradient
of the head weight ([V,C], fp32) is part of both peaks. Time: best of --repeats further steps.

    python benchmarks/bench_memory.py                    # C in {768, 256}, T in {1024, 4096}
    python benchmarks/bench_memory.py --C 768 --T 4096 --sweep-chunk   # time vs chunk size
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from rwkv_sft.ops import linear_cross_entropy

MiB = 2**20


def rss_status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMeter:
    """Extra peak memory of the code run between start() and stop(), in bytes."""

    def __init__(self, device):
        self.device = device

    def start(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.base, self.hwm = rss_status("VmRSS"), True
        except OSError:
            self.base, self.hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, False

    def stop(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        peak = rss_status("VmHWM") if self.hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return peak - self.base


def step_full(hidden, weight, targets, mask):
    ignored = targets.masked_fill(~mask, -100)
    logits = (hidden @ weight.T).float()
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), ignored.view(-1), ignore_index=-100)
    loss.backward()
    return loss.item()


def step_chunked(hidden, weight, targets, mask, chunk_size=None):
    loss = linear_cross_entropy(hidden[mask], weight, targets[mask], chunk_size=chunk_size)
    loss.backward()
    return loss.item()


def child(a):
    """One case in this fresh process; prints a JSON line."""
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    C, T = a.C[0], a.T[0]
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(a.B, T, C, device=device, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(a.V, C, device=device, generator=g) * C**-0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, a.V, (a.B, T), device=device, generator=g)
    mask = torch.zeros(a.B, T, dtype=torch.bool, device=device)
    mask[:, T - T // 4:] = True  # the completion: last quarter of every row
    step = step_full if a.child == "full" else lambda *x: step_chunked(*x, chunk_size=a.chunk_size)
    torch.ones(64, 64, device=device) @ torch.ones(64, 64, device=device)  # start the thread pool

    meter = PeakMeter(device)
    meter.start()
    loss = step(hidden, weight, targets, mask)
    peak = meter.stop()
    times = []
    for _ in range(a.repeats):
        hidden.grad = weight.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(hidden, weight, targets, mask)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    print(json.dumps(dict(peak=peak, loss=loss, time=min(times) if times else float("nan"))))


def run_case(a, method, C, T, chunk_size=None):
    cmd = [sys.executable, __file__, "--child", method, "--C", str(C), "--T", str(T), "--V", str(a.V),
           "--B", str(a.B), "--dtype", a.dtype, "--device", a.device, "--repeats", str(a.repeats)]
    if chunk_size:
        cmd += ["--chunk-size", str(chunk_size)]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--C", type=int, nargs="+", default=[768, 256])
    p.add_argument("--T", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--V", type=int, default=65536)
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=2, help="timed steps after the measured one")
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--sweep-chunk", action="store_true", help="time the chunked loss over chunk sizes")
    p.add_argument("--child", choices=["full", "chunked"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)

    print(f"device={a.device} dtype={a.dtype} V={a.V} B={a.B} completion=T/4 threads={torch.get_num_threads()}")
    if a.sweep_chunk:
        print(f"{'C':>5} {'T':>6} {'chunk':>6} {'chunk MiB':>9} {'peak MiB':>9} {'time s':>7}")
        for C in a.C:
            for T in a.T:
                for chunk in (16, 32, 64, 128, 256, 512, 1024):
                    r = run_case(a, "chunked", C, T, chunk)
                    print(f"{C:>5} {T:>6} {chunk:>6} {chunk * a.V * 4 / MiB:>9.0f} {r['peak'] / MiB:>9.0f} {r['time']:>7.2f}")
        return
    print(f"{'C':>5} {'T':>6} {'rows':>5} {'full MiB':>9} {'chunked MiB':>11} {'ratio':>6} "
          f"{'full s':>7} {'chunked s':>9} {'loss diff':>9}")
    for C in a.C:
        for T in a.T:
            full = run_case(a, "full", C, T)
            ours = run_case(a, "chunked", C, T, a.chunk_size)
            diff = abs(full["loss"] - ours["loss"])
            tol = (1e-2 if a.dtype == "bfloat16" else 1e-4) * max(1.0, abs(full["loss"]))
            print(f"{C:>5} {T:>6} {a.B * (T // 4):>5} {full['peak'] / MiB:>9.0f} {ours['peak'] / MiB:>11.0f} "
                  f"{ours['peak'] / full['peak']:>6.3f} {full['time']:>7.2f} {ours['time']:>9.2f} "
                  f"{diff:>9.1e}{'' if diff <= tol else '  LOSS MISMATCH'}")


if __name__ == "__main__":
    main()
