"""Benchmark the WKV-7 backends: forward and forward+backward time and peak memory.

    python benchmarks/bench_wkv.py                 # B=4, H=12, N=64, T in 256 1024 4096, fp32 + bf16
    python benchmarks/bench_wkv.py --quick         # T in 256 1024, one repeat, reference only at T=256
    python benchmarks/bench_wkv.py --T 1024 --dtypes fp32 --backends reference chunked
    python benchmarks/bench_wkv.py --packed 128 --reset-state   # packed rows restarting from a learned state

Every backend that is available is measured: "reference" (the per-token recurrence under
autograd, the baseline), "chunked", and "cuda" / "fla" when a GPU and those modules exist
(they are skipped with a note otherwise). Speed-ups are against the reference at the same
T, dtype and device, measured in the same run.

The reference at long T is slow and memory-hungry (it keeps every per-token state for the
backward): above --ref-max-T it is not run; its time and memory are estimated by scaling the
largest measured T linearly (both are linear in T) and marked "~" in the table.

Method. Each (backend, T, dtype, pass) runs in its own subprocess, so one case's allocator
state cannot hide another's peak. Time: the best of the timed runs after one warm-up run: at
least --repeats of them and at least --min-seconds of them in all (fast cases run more often, so
their best is as little exposed to a noisy machine as the reference's).
Peak memory on CPU: the growth of the process's ru_maxrss (the kernel's high-water mark of
resident memory, which sees every allocator peak, however short) from just after the inputs
are created to the end of the first run; the inputs themselves are not counted. On a GPU:
torch.cuda.max_memory_allocated above the memory held before the run.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GPU_BACKENDS = ("cuda", "fla")


def make_inputs(B, T, H, N, dtype, device):
    """Inputs shaped like the model's (w <= -0.5, a' = -kk, b' = kk * a with kk unit per head)."""
    g = torch.Generator().manual_seed(0)
    rnd = lambda: torch.randn(B, T, H, N, generator=g)  # noqa: E731
    r, k, v, x = rnd(), rnd(), rnd(), rnd()
    w = -torch.nn.functional.softplus(-2 * x) - 0.5
    kk = torch.nn.functional.normalize(rnd(), dim=-1)
    a = torch.rand(B, T, H, N, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (r, w, k, v, -kk, kk * a)]


def maxrss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_case(backend, B, T, H, N, dtype, device, backward, repeats, min_seconds, packed=0, reset_state=False):
    """One measurement in this process: (best seconds, peak bytes of the first run)."""
    from rwkv_sft.ops import _load_backend
    op = _load_backend(backend)
    xs = make_inputs(B, T, H, N, DTYPES[dtype], device)
    kwargs = {}
    if packed:  # a new example every `packed` tokens, restarting from zero or from a learned state
        kwargs["resets"] = (torch.arange(T, device=device) % packed == 0).expand(B, T)
        if reset_state:
            kwargs["reset_state"] = torch.randn(H, N, N, device=device) * 0.1
    if backward:
        xs = [x.requires_grad_() for x in xs]
        if reset_state and packed:
            kwargs["reset_state"].requires_grad_()
    fn = lambda *a: op(*a, **kwargs)  # noqa: E731
    gy = torch.randn(B, T, H, N, device=device).to(DTYPES[dtype])
    cuda = device.startswith("cuda")

    def once():
        if backward:
            for x in xs:
                x.grad = None
            y, s = fn(*xs)
            ((y * gy).sum() + s.sum()).backward()
        else:
            with torch.no_grad():
                fn(*xs)
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = maxrss_bytes()
    times = []
    # the first run is the warm-up and the memory measurement
    while len(times) < repeats + 1 or sum(times[1:]) < min_seconds:
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
        if len(times) == 1:
            peak = (torch.cuda.max_memory_allocated() if cuda else maxrss_bytes()) - base
    return min(times[1:] or times), peak


def available_backends(requested):
    from rwkv_sft.ops import _load_backend
    out, notes = [], []
    for name in requested:
        if name in GPU_BACKENDS and not torch.cuda.is_available():
            notes.append(f"{name}: skipped (no GPU)")
            continue
        try:
            _load_backend(name)
        except Exception as e:  # ImportError, a failed kernel build, ...
            notes.append(f"{name}: skipped ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            continue
        out.append(name)
    return out, notes


def measure(args, backend, T, dtype, backward):
    device = "cuda" if backend in GPU_BACKENDS else args.device
    cmd = [sys.executable, __file__, "--_case", json.dumps(
        dict(backend=backend, B=args.B, T=T, H=args.H, N=args.N, dtype=dtype, device=device,
             backward=backward, repeats=args.repeats, min_seconds=args.min_seconds, threads=args.threads,
             **({"packed": args.packed, "reset_state": args.reset_state} if args.packed else {})))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        return None, f"{backend} T={T} {dtype}: failed: {proc.stderr.strip().splitlines()[-1:]}"
    seconds, peak = json.loads(proc.stdout.strip().splitlines()[-1])
    return (seconds, peak, device), None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--H", type=int, default=12)
    p.add_argument("--N", type=int, default=64)
    p.add_argument("--T", type=int, nargs="+", default=None, help="sequence lengths (default 256 1024 4096)")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--backends", nargs="+", default=["reference", "chunked", "cuda", "fla"])
    p.add_argument("--device", default="cpu", help="device for reference and chunked (cuda/fla always use cuda)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every case")
    p.add_argument("--repeats", type=int, default=None, help="timed runs after the warm-up (default 3, --quick 1)")
    p.add_argument("--min-seconds", type=float, default=None,
                   help="keep timing until the timed runs add up to this (default 3, --quick 0)")
    p.add_argument("--ref-max-T", type=int, default=None,
                   help="longest T at which the reference runs; longer ones are estimated (default 1024, --quick 256)")
    p.add_argument("--quick", action="store_true", help="T in 256 1024, one repeat, reference measured at 256 only")
    p.add_argument("--json", metavar="FILE", help="also write the measurements (and the skip notes) to FILE")
    p.add_argument("--packed", type=int, default=0, metavar="L", help="packed rows: a reset every L tokens")
    p.add_argument("--reset-state", action="store_true",
                   help="with --packed: resets restart from a given (learned) state, not zero")
    p.add_argument("--_case", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args._case:  # child process: one measurement, printed as JSON
        c = json.loads(args._case)
        torch.set_num_threads(c.pop("threads"))
        print(json.dumps(run_case(**c)))
        return

    Ts = args.T or ([256, 1024] if args.quick else [256, 1024, 4096])
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.min_seconds is None:
        args.min_seconds = 0.0 if args.quick else 3.0
    ref_max_T = args.ref_max_T or (256 if args.quick else 1024)
    backends, notes = available_backends(args.backends)
    packing = f"  packed every {args.packed}{' from a learned state' if args.reset_state else ''}" if args.packed else ""
    print(f"WKV-7  B={args.B} H={args.H} N={args.N}{packing}  threads={args.threads}  repeats>={args.repeats}  min {args.min_seconds:g} s  "
          f"torch {torch.__version__}")
    for n in notes:
        print("  " + n)

    rows = []
    for dtype in args.dtypes:
        ref = {}  # (T, pass) -> (seconds, peak, estimated)
        for T in sorted(Ts):
            for backend in backends:
                cells = {}
                for backward in (True, False):  # fwd+bwd first: a first-use compile (fla) may not leave time for both
                    if backend == "reference" and T > ref_max_T:
                        measured = [t for (t, b) in ref if b == backward and not ref[(t, b)][2]]
                        if not measured:
                            continue
                        t0 = max(measured)
                        s0, m0, _ = ref[(t0, backward)]
                        cells[backward] = (s0 * T / t0, m0 * T / t0, True)
                    else:
                        res, err = measure(args, backend, T, dtype, backward)
                        if err:
                            print("  " + err)
                            continue
                        cells[backward] = (res[0], res[1], False)
                    if backend == "reference":
                        ref[(T, backward)] = cells[backward]
                    print(f"  ... {backend:9s} T={T:5d} {dtype} {'fwd+bwd' if backward else 'fwd':7s} "
                          f"{cells[backward][0] * 1e3:10.1f} ms", flush=True)
                if cells:
                    rows.append((backend, dtype, T, cells, ref))

    print()
    head = (f"{'backend':10s} {'dtype':5s} {'T':>5s} | {'fwd ms':>10s} {'x ref':>7s} {'peak MiB':>9s} | "
            f"{'fwd+bwd ms':>11s} {'x ref':>7s} {'peak MiB':>9s}")
    print(head)
    print("-" * len(head))
    for backend, dtype, T, cells, ref in rows:
        line = f"{backend:10s} {dtype:5s} {T:5d} |"
        for backward in (False, True):
            if backward not in cells:
                line += f" {'-':>10s} {'':>7s} {'':>9s} |" if not backward else f" {'-':>11s}"
                continue
            s, m, est = cells[backward]
            mark = "~" if est else ""
            r = ref.get((T, backward))
            speed = f"{r[0] / s:.1f}" + ("~" if r[2] else "") if r and backend != "reference" else ""
            width = 11 if backward else 10
            line += f" {mark + format(s * 1e3, '.1f'):>{width}s} {speed:>7s} {mark + format(m / 2**20, '.0f'):>9s}"
            line += " |" if not backward else ""
        print(line)
    print("~ = reference estimated by linear scaling from its longest measured T (not run).")
    print("peak MiB = growth of the high-water mark during the first run (CPU: ru_maxrss), inputs excluded.")
    if args.json:
        cases = [dict(backend=backend, dtype=dtype, T=T, **{"pass": "fwd+bwd" if backward else "fwd"},
                      ms=s * 1e3, peak_mib=m / 2**20, estimated=est)
                 for backend, dtype, T, cells, _ in rows for backward, (s, m, est) in cells.items()]
        with open(args.json, "w") as f:
            json.dump(dict(B=args.B, H=args.H, N=args.N, torch=torch.__version__, notes=notes, cases=cases), f, indent=1)


if __name__ == "__main__":
    main()
