#!/usr/bin/env python3
"""Peak memory of loading a sharded Hugging Face directory vs the same weights as a BlinkDL `.pth`.

    python benchmarks/bench_hf_load.py [--n-layer 32 --n-embd 2560] [--dtype bf16] [--work DIR]

Writes a 2.9B-shaped model (32 x 2560, World vocabulary) both ways, then loads each in a fresh
process (`load_model`, then reads every weight once) and reports its peak resident memory, beside a process that only imports
torch and rwkv_sft (the floor every load pays).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import sys, torch
from rwkv_sft import RWKV7
from rwkv_sft.weights import load_model
if sys.argv[1] != "-":
    m = load_model(sys.argv[1])
    assert m.emb.weight.dtype == getattr(torch, sys.argv[2])
    for t in m.state_dict().values():  # touch every page: memory-mapped weights count once resident
        t.sum()
# VmHWM: this process's own peak (ru_maxrss would carry the parent's peak across fork + exec)
print(int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024)
"""


def peak(path, dtype) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), dtype], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-layer", type=int, default=32)
    p.add_argument("--n-embd", type=int, default=2560)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--shard-gib", type=float, default=2.0)
    p.add_argument("--work", type=Path, default=None)
    args = p.parse_args()
    import torch

    from rwkv_sft import RWKV7, RWKV7Config
    from rwkv_sft.weights import write_state_dict
    from rwkv_sft.weights.hf import write_hf

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    config = RWKV7Config(n_layer=args.n_layer, n_embd=args.n_embd)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in RWKV7(config, init_weights=False).state_dict().items()}
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_hf_load."))
    try:
        sd = {k: torch.full(s, 0.01, dtype=dtype) for k, s in shapes.items()}  # values do not matter here
        size = sum(t.numel() * t.element_size() for t in sd.values())
        write_hf(sd, work / "hf", config, shard_bytes=int(args.shard_gib * 2**30), overwrite=True)
        write_state_dict(sd, work / "model.pth", config)
        del sd
        shards = len(list((work / "hf").glob("*.safetensors")))
        dtype_name = str(dtype).removeprefix("torch.")
        floor, hf, pth = peak("-", dtype_name), peak(work / "hf", dtype_name), peak(work / "model.pth", dtype_name)
        gib = 2**30
        print(f"{args.n_layer} x {args.n_embd}, {args.dtype}: weights {size / gib:.2f} GiB; HF directory in {shards} shards")
        print("| load | peak RSS (GiB) | above import floor (GiB) | (peak - floor) / weights |")
        print("| --- | --- | --- | --- |")
        print(f"| import torch + rwkv_sft only | {floor / gib:.2f} | 0 | - |")
        for name, value in (("HF directory (sharded safetensors)", hf), ("BlinkDL .pth (baseline)", pth)):
            print(f"| {name} | {value / gib:.2f} | {(value - floor) / gib:.2f} | {(value - floor) / size:.2f} |")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
