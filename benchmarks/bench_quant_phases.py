"""Where a LoRA step's memory goes on a quantized (or bf16) base: resident memory phase by phase.

    python benchmarks/bench_quant_phases.py CKPT int8|nf4|bf16 [T] [default|low]

CKPT: a bf16 checkpoint (e.g. `python benchmarks/bench_peft.py --write CKPT --shape '{...}'`).
Does what bench_quant.py's steps child does (LoRA r16, activation checkpointing, 2 steps) under
the named heap policy (glibc's default, or --low-memory's), and after each phase (load, adapters
and optimizer, each forward, backward, optimizer step) prints the resident memory (anonymous and
file-backed), the phase's own high-water mark (Linux: VmHWM, reset through /proc/self/clear_refs
after each phase) and glibc's heap: bytes in use, bytes freed but kept, bytes in separate mmaps.
"""
import ctypes
import os
import resource
import sys
import time

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the command line does (cli.use_huge_pages)
import torch  # noqa: E402

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
          f"heap: arena {m.arena/G:5.2f} inuse {m.uordblks/G:5.2f} free {m.fordblks/G:5.2f} mmapped {m.hblkhd/G:5.2f}", flush=True)
    open("/proc/self/clear_refs", "w").write("5")


ckpt, base = sys.argv[1], sys.argv[2]
T = int(sys.argv[3]) if len(sys.argv) > 3 else 512
low = len(sys.argv) > 4 and sys.argv[4] == "low"
from rwkv_sft import RWKV7  # noqa: E402
from rwkv_sft.adapters import training as peft_run
from rwkv_sft.data import DataConfig
from rwkv_sft.train.config import TrainConfig
from rwkv_sft.train.loss import CompletionLoss
from rwkv_sft.train.optim import make_optimizer
from rwkv_sft.utils import set_heap_policy
torch.set_num_threads(2)
config = TrainConfig(data=DataConfig(train_files=["unused"]), model=ckpt, lora_rank=16, base_dtype=base).validate()
set_heap_policy(low or config.low_memory)
phase("start")
quantize = base if base in peft_run.QUANTIZED else None
model = RWKV7.load(ckpt, quantize=quantize)
phase("load")
peft_run.prepare(model, peft_run.settings_from(config), seed=0, initialize=True)
model = peft_run.compact(model, config.base_dtype)
model.activation_checkpointing = config.activation_checkpointing
model.train()
optimizer = make_optimizer(model, lr=config.lr, weight_decay=0.0, betas=(0.9, 0.99), eps=1e-8)
params = [p for p in model.parameters() if p.requires_grad]
print("trainable", sum(p.numel() for p in params) / 1e6, "M")
loss_module = CompletionLoss(model)
phase("prepare")
V = model.config.vocab_size
seq = torch.randint(0, V, (1, T + 1), generator=torch.Generator().manual_seed(1))
tokens, targets, mask = seq[:, :-1], seq[:, 1:], torch.ones(1, T, dtype=torch.bool)
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
