"""Where a LoRA step's memory goes on a quantized (or bf16) base: resident memory phase by phase.

    python benchmarks/bench_quant_phases.py CKPT int8|nf4|bf16 [T] [default|low|MIB]

CKPT: a bf16 checkpoint (e.g. `python benchmarks/bench_peft.py --write CKPT --shape '{...}'`).
Does what bench_quant.py's steps child does (LoRA r16, activation checkpointing, 2 steps) under
the named heap policy (glibc's default, --low-memory's, or blocks from MIB MiB up in their own
mmaps), and after each phase (load, adapters
and optimizer, each forward, backward, optimizer step) prints the resident memory (anonymous and
file-backed), the phase's own high-water mark (Linux: VmHWM, reset through /proc/self/clear_refs
after each phase) and glibc's heap: bytes in use, bytes freed but kept (and of those, at the top), bytes in separate mmaps.
"""
import ctypes
import resource
import sys
import time

from bench_quant import lora_setup  # (first: it sets huge pages as the command line does)
import torch

from rwkv_sft.utils import set_heap_policy

class MI(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MI
G = 2**30


def st(f):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(f + ":"))


overall = 0  # (ru_maxrss restarts with VmHWM: the peak is the largest phase's)


def phase(name):
    global overall
    hwm = st("VmHWM")
    overall = max(overall, hwm)
    m = libc.mallinfo2()
    print(f"{name:<22} rss {st('VmRSS')/G:6.2f} (anon {st('RssAnon')/G:5.2f} file {st('RssFile')/G:5.2f})  phase-peak {hwm/G:6.2f}  "
          f"heap: arena {m.arena/G:5.2f} inuse {m.uordblks/G:5.2f} free {m.fordblks/G:5.2f} (top {m.keepcost/G:5.2f}) mmapped {m.hblkhd/G:5.2f}", flush=True)
    open("/proc/self/clear_refs", "w").write("5")


ckpt, base = sys.argv[1], sys.argv[2]
T = int(sys.argv[3]) if len(sys.argv) > 3 else 512
policy = sys.argv[4] if len(sys.argv) > 4 else "default"
torch.set_num_threads(2)
if policy in ("default", "low"):
    set_heap_policy(policy == "low")
else:
    libc.mallopt(-3, int(policy) << 20)  # M_MMAP_THRESHOLD
phase("start")
loss_module, optimizer, params, tokens, targets, mask = lora_setup(ckpt, base, T, after_load=lambda: phase("load"))
print("trainable", sum(p.numel() for p in params) / 1e6, "M")
phase("prepare")
for i in range(2):
    t = time.perf_counter()
    loss = loss_module(tokens, targets, mask, None, 1e-4 / T) / T
    phase(f"{i} forward")
    loss.backward()
    phase(f"{i} backward")
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    phase(f"{i} step ({time.perf_counter()-t:.0f}s)")
print(f"overall peak {overall/G:.2f} GiB; ru_maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/2**20:.2f}")
